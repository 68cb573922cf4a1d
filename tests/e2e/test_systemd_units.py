"""The systemd units pass `systemd-analyze verify` and carry the settings the daemons rely on."""

from __future__ import annotations

import configparser
import shutil
import subprocess
from pathlib import Path

import pytest

UNITS = sorted((Path(__file__).resolve().parents[2] / "systemd").glob("*.service"))


def _service(unit: Path) -> dict:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str
    parser.read(unit)
    return dict(parser["Service"])


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_unit_settings(unit):
    svc = _service(unit)
    assert svc["Type"] == "notify" and svc["Restart"] == "on-failure"
    assert svc["KillMode"] == "mixed" and int(svc["WatchdogSec"]) > 0
    assert int(svc["TimeoutStopSec"]) > 30  # longer than the default drain_timeout_s
    assert svc["NoNewPrivileges"] == "yes" and svc["ProtectSystem"] == "strict"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_systemd_analyze_verify(unit, tmp_path):
    # verify checks that ExecStart exists: point it at a stand-in executable in a copy.
    exe = tmp_path / "daemon"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    text = unit.read_text()
    for line in text.splitlines():
        if line.startswith("ExecStart="):
            text = text.replace(line, f"ExecStart={exe} " + line.split(" ", 1)[1])
    name = unit.name.replace("@.service", "@test.service")
    copy = tmp_path / name
    copy.write_text(text)
    out = subprocess.run(["systemd-analyze", "verify", "--man=no", str(copy)],
                         capture_output=True, text=True)
    problems = [ln for ln in (out.stdout + out.stderr).splitlines()
                if name in ln or "Unknown" in ln or "Failed" in ln]
    assert out.returncode == 0 and not problems, out.stdout + out.stderr
