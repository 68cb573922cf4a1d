"""The load side of `benchmarks/cls_bench.py --part clsd`: the front processes under test (clsd,
and the thin front it is compared with), CPU meters, Poisson or fixed-rate open-loop load, and
latency statistics. The phases and the report are in benchmarks/cls_bench_clsd.py."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def percentile(sorted_values: list[int], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


class FrontProcess:
    """A front daemon as a child process on a free loopback port: started with `cmd`, ready once
    it prints a JSON line with its `grpc_port`; stderr goes to `log_path`."""
    name = "front"

    def __init__(self, cmd: list[str], log_path: Path):
        self.cmd, self.log_path = cmd, log_path
        self.proc: subprocess.Popen | None = None
        self.address = ""

    def start(self, timeout_s: float = 60.0) -> FrontProcess:
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=self._log,
                                     text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        line: list[str] = []
        reader = threading.Thread(target=lambda: line.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout_s)
        if not line or not line[0].startswith("{"):
            raise RuntimeError(f"{self.name} did not become ready:\n{self.log()[-3000:]}")
        self.address = f"127.0.0.1:{json.loads(line[0])['grpc_port']}"
        return self

    def cpu_s(self, main_thread: bool = False) -> float:
        """User + system CPU seconds of the process (or of its main thread: the event loop, where
        all Python runs; gRPC's core threads are the rest) so far."""
        pid = self.proc.pid
        path = f"/proc/{pid}/task/{pid}/stat" if main_thread else f"/proc/{pid}/stat"
        with open(path) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                return self.proc.wait(10)
        finally:
            self._log.close()

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""


ADMIN_TOKEN = "bench-admin-token"


class ClsdProcess(FrontProcess):
    """A real clsd (`python -m cls.clsd`); optionally under cProfile (the profile is written when
    it exits after SIGTERM)."""
    name = "clsd"

    def __init__(self, tmp: Path, max_inflight: int, profile: str | None = None):
        token = tmp / "admin-token"
        token.write_text(ADMIN_TOKEN + "\n")
        self.token_file = str(token)
        config = {"model": str(REPO / "models" / "SmolLM2-135M-Instruct"), "host": "127.0.0.1",
                  "grpc_port": 0, "metrics_port": None, "admin_token_file": self.token_file,
                  "lease_ttl_s": 5, "heartbeat_interval_s": 1, "drain_timeout_s": 10,
                  "limits": {"max_inflight_requests": max_inflight}}
        config_path = tmp / "clsd.yaml"
        config_path.write_text(json.dumps(config))  # JSON is YAML
        prof = ["-m", "cProfile", "-o", profile] if profile else []
        super().__init__([sys.executable, *prof, "-m", "cls.clsd", "--config", str(config_path)],
                         tmp / "clsd.log")


class ThinFrontProcess(FrontProcess):
    """The peer: benchmarks/thin_front.py in front of the given prompt machines."""
    name = "thin front"

    def __init__(self, tmp: Path, prompt_addresses: list[str]):
        super().__init__([sys.executable, str(REPO / "benchmarks" / "thin_front.py"), *prompt_addresses],
                         tmp / "thin_front.log")

class CpuMeter:
    """CPU use (fraction of one core) of a front process and of this process over a phase."""

    def __init__(self, clsd: FrontProcess):
        self.clsd = clsd

    def __enter__(self) -> CpuMeter:
        self.t0, self.c0, self.b0 = time.perf_counter(), self.clsd.cpu_s(), time.process_time()
        self.m0 = self.clsd.cpu_s(main_thread=True)
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self.t0
        self.clsd_cpu_s = self.clsd.cpu_s() - self.c0
        self.clsd_cpu = self.clsd_cpu_s / self.wall
        self.bench_cpu = (time.process_time() - self.b0) / self.wall
        self.clsd_main_cpu = (self.clsd.cpu_s(main_thread=True) - self.m0) / self.wall


def lat_stats(values_s: list[float]) -> dict:
    v = sorted(values_s)
    if not v:
        return {"p50_ms": None, "p99_ms": None, "mean_ms": None, "max_ms": None}
    return {"p50_ms": percentile(v, 0.50) * 1e3, "p99_ms": percentile(v, 0.99) * 1e3,
            "mean_ms": sum(v) / len(v) * 1e3, "max_ms": v[-1] * 1e3}


def arrivals(rate: float, n: int, poisson: bool, rng: random.Random) -> list[float]:
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate) if poisson else 1.0 / rate
        out.append(t)
    return out


async def open_loop(send, rate: float, n: int, poisson: bool, seed: int) -> dict:
    """Sends `n` requests at `rate` per second (scheduled in advance, not waiting for replies);
    `send(i)` returns (first token s, end s) measured from its own start. A send is late when it
    starts more than LATE_S after its scheduled time (the generator or the loop fell behind)."""

    due = arrivals(rate, n, poisson, random.Random(seed))
    first, end, lag = [], [], []
    errors: list[str] = []

    async def one(i: int, t0: float) -> None:
        lag.append(time.perf_counter() - t0 - due[i])
        try:
            f, e = await send(i)
            first.append(f)
            end.append(e)
        except Exception as exc:  # noqa: BLE001 - counted and reported
            errors.append(f"{type(exc).__name__}: {exc}")

    tasks = []
    t0 = time.perf_counter()
    for i in range(n):
        wait = t0 + due[i] - time.perf_counter()
        if wait > 0:
            await asyncio.sleep(wait)
        tasks.append(asyncio.create_task(one(i, t0)))
    send_s = time.perf_counter() - t0
    await asyncio.gather(*tasks)
    lag.sort()
    return {"rate_target": rate, "requests": n, "ok": len(first), "errors": len(errors),
            "first_error": errors[0] if errors else "",
            "achieved_rate": n / send_s if send_s > 0 else 0.0,
            "late_sends": sum(1 for x in lag if x > LATE_S),
            "send_lag_p99_ms": percentile(lag, 0.99) * 1e3, "send_lag_max_ms": lag[-1] * 1e3,
            "first_token": lat_stats(first), "end": lat_stats(end)}


LATE_S = 0.002
