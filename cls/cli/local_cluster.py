"""A whole cluster on this host: one clsd and its mlsd machines as child processes.

1. `LocalConfig.load` reads configs/local.yaml (`run_dir`, `clsd`, `machines`).
2. `LocalCluster.start()` creates run_dir and `<run_dir>/admin-token` (0600) if absent, starts
   clsd (`--set admin_token_file=...`) and reads its READY line, starts every machine with
   `--set cls_address=127.0.0.1:<clsd port>` and reads their READY lines, then polls clsd's
   ListMachines until all of them have registered. Any failure stops what was started and raises
   `LocalClusterError` with the failing process's log tail.
3. `LocalCluster.stop()` sends SIGTERM to the machines (they drain), waits, kills what outlives
   the timeout, then does the same to clsd.

Daemons write their logs to `<run_dir>/<name>.log` and run in their own session, so a Ctrl-C
in the terminal reaches only this process, which then stops them in order.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from cls.client import ClsClient, ClsError, MachineStatus

# The daemons' command lines (before --config); tests point these at stand-ins.
CLSD_ARGV = [sys.executable, "-m", "cls.clsd"]
MLSD_ARGV = [sys.executable, "-m", "mls.mlsd"]
READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 60.0


class LocalClusterError(RuntimeError):
    pass


@dataclass(frozen=True)
class LocalConfig:
    run_dir: Path
    clsd: Path
    machines: tuple[Path, ...]

    @classmethod
    def load(cls, path: str | os.PathLike) -> LocalConfig:
        """Relative paths are taken from the current directory (the project root)."""
        import yaml

        try:
            raw = yaml.safe_load(Path(path).read_text())
        except OSError as e:
            raise LocalClusterError(f"cannot read {path}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise LocalClusterError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise LocalClusterError(f"{path}: expected a mapping with run_dir, clsd, machines")
        unknown = set(raw) - {"run_dir", "clsd", "machines"}
        if unknown:
            raise LocalClusterError(f"{path}: unknown key {sorted(unknown)[0]!r}")
        for key in ("clsd", "machines"):
            if key not in raw:
                raise LocalClusterError(f"{path}: missing key {key!r}")
        machines = raw["machines"]
        if not isinstance(machines, list) or not machines or \
                not all(isinstance(m, str) for m in machines):
            raise LocalClusterError(f"{path}: 'machines' must be a non-empty list of config paths")
        if not isinstance(raw["clsd"], str):
            raise LocalClusterError(f"{path}: 'clsd' must be a config path")
        cfg = cls(Path(raw.get("run_dir") or ".run"), Path(raw["clsd"]),
                  tuple(Path(m) for m in machines))
        for p in (cfg.clsd, *cfg.machines):
            if not p.is_file():
                raise LocalClusterError(f"{path}: config file {p} does not exist")
        return cfg


def write_local_config(directory: str | os.PathLike, clsd: dict, machines: list[dict],
                       run_dir: str | os.PathLike | None = None) -> Path:
    """Writes a local cluster's files into `directory`: clsd.yaml, one `<machine_id>.yaml` per
    machine config and local.yaml naming them (the format of configs/local.yaml). Returns the
    path of local.yaml; `run_dir` (logs, admin token) defaults to `directory`/run."""
    import yaml

    directory = Path(directory)
    (directory / "clsd.yaml").write_text(yaml.safe_dump(clsd))
    paths = []
    for m in machines:
        path = directory / f"{m['machine_id']}.yaml"
        path.write_text(yaml.safe_dump(m))
        paths.append(str(path))
    local = directory / "local.yaml"
    local.write_text(yaml.safe_dump({"run_dir": str(run_dir or directory / "run"),
                                     "clsd": str(directory / "clsd.yaml"), "machines": paths}))
    return local


@dataclass
class Daemon:
    """One child process whose first stdout line is a READY JSON object."""

    name: str
    argv: list[str]
    log_path: Path
    proc: subprocess.Popen | None = None
    ready: dict = field(default_factory=dict)
    _lines: list[str] = field(default_factory=list)
    _got_line: threading.Event = field(default_factory=threading.Event)
    _eof: bool = False

    def start(self, env: dict | None) -> None:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=log, env=env,
                                         text=True, start_new_session=True)
        threading.Thread(target=self._read_stdout, name=f"{self.name}-stdout", daemon=True).start()

    def _read_stdout(self) -> None:
        # The first line is READY; the rest is read and dropped so the pipe never fills.
        with self.proc.stdout as out:
            for line in out:
                if not self._got_line.is_set():
                    self._lines.append(line)
                    self._got_line.set()
        self._eof = True  # the process closed stdout or exited
        self._got_line.set()

    def wait_ready(self, deadline: float) -> dict:
        self._got_line.wait(max(0.0, deadline - time.monotonic()))
        line = self._lines[0] if self._lines else ""
        try:
            ready = json.loads(line) if line else None
        except json.JSONDecodeError:
            ready = None
        if not isinstance(ready, dict) or ready.get("event") != "READY":
            code = self.proc.poll()
            if code is None and self._eof:  # stdout closed: the process is on its way out
                try:
                    code = self.proc.wait(5.0)
                except subprocess.TimeoutExpired:
                    pass
            why = (f"exited with code {code}" if code is not None
                   else "gave no READY line in time" if not line else f"printed {line.strip()!r}")
            raise LocalClusterError(f"{self.name} {why}; the end of {self.log_path}:\n"
                                    f"{self.log_tail()}")
        self.ready = ready
        return ready

    def log_tail(self, num_chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-num_chars:]
        except OSError:
            return ""

    def terminate(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def wait_or_kill(self, deadline: float) -> int | None:
        if self.proc is None:
            return None
        try:
            return self.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


class LocalCluster:
    """clsd plus its machines as child processes (see the module's life cycle)."""

    def __init__(self, config: LocalConfig, *, clsd_overrides: list[str] = (),
                 machine_overrides: list[str] = (), env: dict | None = None,
                 ready_timeout_s: float = READY_TIMEOUT_S, stop_timeout_s: float = STOP_TIMEOUT_S,
                 clsd_argv: list[str] | None = None, mlsd_argv: list[str] | None = None):
        self.config = config
        self.clsd_argv = list(clsd_argv or CLSD_ARGV)
        self.mlsd_argv = list(mlsd_argv or MLSD_ARGV)
        self.clsd_overrides = list(clsd_overrides)
        self.machine_overrides = list(machine_overrides)
        self.env = dict(os.environ if env is None else env, PYTHONUNBUFFERED="1")
        self.ready_timeout_s = ready_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.clsd: Daemon | None = None
        self.machines: list[Daemon] = []
        self.registered: list[MachineStatus] = []

    @property
    def token_file(self) -> Path:
        return self.config.run_dir / "admin-token"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.clsd.ready['grpc_port']}"

    @property
    def metrics_port(self) -> int | None:
        return self.clsd.ready.get("metrics_port")

    @property
    def http_url(self) -> str | None:
        """Base URL of clsd's OpenAI-compatible HTTP API (`.../v1`); None when it is off."""
        port = self.clsd.ready.get("http_port")
        return f"http://127.0.0.1:{port}/v1" if port else None

    def http_help(self) -> str:
        """How to reach the OpenAI-compatible API: a curl line and the openai client."""
        url, model = self.http_url, self.clsd.ready.get("model", "")
        if url is None:
            return ""
        key = "<the key in http.api_key_file>" if self.clsd.ready.get("http_api_key_required") else "none"
        auth = f" -H 'Authorization: Bearer {key}'" if key != "none" else ""
        body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Hello!"}],
                           "max_tokens": 32})
        return (f"OpenAI-compatible HTTP at {url} (model {model!r}):\n"
                f"  curl {url}/chat/completions -H 'Content-Type: application/json'{auth} -d '{body}'\n"
                f"  from openai import OpenAI\n"
                f"  client = OpenAI(base_url=\"{url}\", api_key=\"{key}\")\n"
                f"  client.chat.completions.create(model=\"{model}\", messages=[{{\"role\": \"user\", "
                f"\"content\": \"Hello!\"}}]).choices[0].message.content\n")

    def client(self) -> ClsClient:
        return ClsClient(self.address, admin_token_file=self.token_file)

    def start(self) -> LocalCluster:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        run_dir = self.config.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        self._ensure_token()
        self.clsd = Daemon("clsd", [*self.clsd_argv, "--config",
                                    str(self.config.clsd), "--set",
                                    f"admin_token_file={self.token_file}",
                                    *_sets(self.clsd_overrides)], run_dir / "clsd.log")
        self.clsd.start(self.env)
        self.clsd.wait_ready(time.monotonic() + self.ready_timeout_s)
        for path in self.config.machines:
            name = path.stem
            d = Daemon(name, [*self.mlsd_argv, "--config", str(path), "--set",
                              f"cls_address={self.address}", *_sets(self.machine_overrides)],
                       run_dir / f"{name}.log")
            self.machines.append(d)
            d.start(self.env)
        deadline = time.monotonic() + self.ready_timeout_s
        for d in self.machines:  # they load their models in parallel
            d.wait_ready(deadline)
        self._wait_registered(deadline)

    def _ensure_token(self) -> None:
        path = self.token_file
        if path.exists() and path.read_text().strip():
            return
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
        os.chmod(path, 0o600)

    def _wait_registered(self, deadline: float) -> None:
        wanted = {d.ready.get("machine_id") or d.name for d in self.machines}
        poll = threading.Event()  # never set: an interruptible pause between polls
        last_error = ""
        with self.client() as client:
            while True:
                for d in (self.clsd, *self.machines):
                    if d.proc.poll() is not None:
                        raise LocalClusterError(f"{d.name} exited with code {d.proc.returncode}; "
                                                f"the end of {d.log_path}:\n{d.log_tail()}")
                try:
                    self.registered = client.list_machines(timeout_s=5.0)
                    missing = wanted - {m.machine_id for m in self.registered}
                    last_error = f"not registered: {', '.join(sorted(missing))}"
                except ClsError as e:
                    missing, last_error = wanted, str(e)
                if not missing:
                    return
                if time.monotonic() >= deadline:
                    raise LocalClusterError(f"the machines did not all register with clsd in "
                                            f"{self.ready_timeout_s:.0f} s ({last_error}); "
                                            f"see {self.clsd.log_path}")
                poll.wait(0.2)

    def stop(self) -> dict[str, int | None]:
        """Machines first (they drain), then clsd. Returns each process's exit code."""
        codes: dict[str, int | None] = {}
        deadline = time.monotonic() + self.stop_timeout_s
        for d in self.machines:
            d.terminate()
        for d in self.machines:
            codes[d.name] = d.wait_or_kill(deadline)
        if self.clsd is not None:
            self.clsd.terminate()
            codes["clsd"] = self.clsd.wait_or_kill(time.monotonic() + self.stop_timeout_s)
        return codes

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _sets(overrides: list[str]) -> list[str]:
    out: list[str] = []
    for item in overrides:
        out += ["--set", item]
    return out
