"""Part `clsd` of benchmarks/cls_bench.py (run it from there): clsd through gRPC.

A real clsd process (loopback, free port) with fake machines
(benchmarks/fake_machine.py: answer at once, tokens on a step clock) registered with it, all
served from this process's asyncio loop together with the client.
- Added latency: open-loop load at fixed rates (Poisson arrivals by default) of requests with
  ~100 prompt token ids and max_tokens=1, so the first token comes back in the Prefill reply and
  no step clock is waited for. Client-side time from send to the first token through clsd
  (SDK: AsyncClsClient; three gRPC hops: client->clsd, clsd->AddDecode, clsd->Prefill), against
  a baseline in the same run at the same rates: the raw stub calling a fake's Prefill directly
  (one hop). Reported: p50/p99/mean, clsd minus direct, the achieved send rate and late sends
  (started > 2 ms after their scheduled time), and the CPU use of clsd and of this process.
  Target: clsd adds under 2 ms p99 at 500 requests/s.
- Token streams: C concurrent streams (closed loop) of max_tokens tokens on the fakes' step
  clock; tokens/s delivered to the clients through clsd against the tokens/s the fakes emitted.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc

REPO = Path(__file__).resolve().parents[1]


def percentile(sorted_values: list[int], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]



class ClsdProcess:
    """A real clsd (`python -m cls.clsd`) on a free loopback port, its READY line read; optionally
    under cProfile (the profile is written when it exits after SIGTERM)."""

    def __init__(self, tmp: Path, max_inflight: int, profile: str | None = None):
        token = tmp / "admin-token"
        token.write_text(ADMIN_TOKEN + "\n")
        self.token_file = str(token)
        config = {"model": str(REPO / "models" / "SmolLM2-135M-Instruct"), "host": "127.0.0.1",
                  "grpc_port": 0, "metrics_port": None, "admin_token_file": self.token_file,
                  "lease_ttl_s": 5, "heartbeat_interval_s": 1, "drain_timeout_s": 10,
                  "limits": {"max_inflight_requests": max_inflight}}
        self.config_path = tmp / "clsd.yaml"
        self.config_path.write_text(json.dumps(config))  # JSON is YAML
        self.log_path = tmp / "clsd.log"
        self.profile = profile
        self.proc: subprocess.Popen | None = None
        self.address = ""

    def start(self, timeout_s: float = 60.0) -> ClsdProcess:
        prof = ["-m", "cProfile", "-o", self.profile] if self.profile else []
        self._log = open(self.log_path, "w")
        cmd = [sys.executable, *prof, "-m", "cls.clsd", "--config", str(self.config_path)]
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=self._log, text=True,
                                     env=dict(os.environ, PYTHONUNBUFFERED="1"))
        line: list[str] = []
        reader = threading.Thread(target=lambda: line.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout_s)
        if not line or not line[0].startswith("{"):
            raise RuntimeError(f"clsd did not become ready:\n{self.log()[-3000:]}")
        self.address = f"127.0.0.1:{json.loads(line[0])['grpc_port']}"
        return self

    def cpu_s(self, main_thread: bool = False) -> float:
        """User + system CPU seconds of the clsd process (or of its main thread: the event loop,
        where all Python runs; gRPC's core threads are the rest) so far."""
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


class CpuMeter:
    """CPU use (fraction of one core) of clsd and of this process over a phase."""

    def __init__(self, clsd: ClsdProcess):
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


async def clsd_bench(args: argparse.Namespace, clsd: ClsdProcess) -> dict:

    from benchmarks.fake_machine import FakeMachine
    from cls.client import AsyncClsClient
    from proto import mlsd_pb2 as mpb
    from proto import mlsd_pb2_grpc

    fakes: list[FakeMachine] = []
    channels = []
    client = AsyncClsClient(clsd.address, admin_token_file=clsd.token_file)
    try:
        for i in range(args.prompt_machines):
            fakes.append(await FakeMachine(f"fake-p{i}", mpb.PROMPT, clsd.address, args.step_s).start())
        for i in range(args.token_machines):
            fakes.append(await FakeMachine(f"fake-t{i}", mpb.TOKEN, clsd.address, args.step_s).start())
        deadline = time.monotonic() + 30
        while len(await client.list_machines()) < len(fakes):
            if time.monotonic() > deadline:
                raise RuntimeError(f"fake machines did not register:\n{clsd.log()[-3000:]}")
            await asyncio.sleep(0.05)
        prompt_fakes = [f for f in fakes if f.role == mpb.PROMPT]
        token_fakes = [f for f in fakes if f.role == mpb.TOKEN]
        for f in prompt_fakes:
            channels.append(grpc.aio.insecure_channel(f"127.0.0.1:{f.port}"))
        direct_stubs = [mlsd_pb2_grpc.MachineServiceStub(ch) for ch in channels]
        rng = random.Random(args.seed)
        prompt = [rng.randrange(100, 40_000) for _ in range(args.prompt_tokens)]
        seq = iter(range(10**9))

        async def via_clsd(i: int) -> tuple[float, float]:
            t0 = time.perf_counter()
            first = None
            stream = client.generate_stream(prompt, max_tokens=1, ignore_eos=True)
            async for d in stream:  # read to the end: leaving early would cancel (and abort)
                if first is None and d.token_ids:
                    first = time.perf_counter() - t0
            end = time.perf_counter() - t0
            if stream.completion().finish_reason != "length" or first is None:
                raise RuntimeError("no token or wrong finish reason")
            return first, end

        async def direct(i: int) -> tuple[float, float]:
            t0 = time.perf_counter()
            await direct_stubs[i % len(direct_stubs)].Prefill(mpb.PrefillRequest(
                request=mpb.RequestSpec(request_id=f"direct-{next(seq)}", prompt_token_ids=prompt,
                                        sampling=mpb.SamplingParams(max_tokens=1)),
                kv_address=b"fake"), timeout=30)
            e = time.perf_counter() - t0
            return e, e

        async def settle() -> None:
            gc.collect()
            await asyncio.sleep(0.5)  # FINISHED events of the last requests, heartbeats

        poisson = args.arrivals == "poisson"
        # warm-up: channels connected, code paths hot (not recorded)
        for send in (direct, via_clsd):
            await open_loop(send, 100, 100, poisson, args.seed)
        await settle()

        latency = []
        print(f"clsd added latency: {len(prompt_fakes)} prompt + {len(token_fakes)} token fake machines "
              f"(step {args.step_s * 1e3:g} ms), prompts of {args.prompt_tokens} token ids, max_tokens=1, "
              f"{args.arrivals} arrivals, {args.duration_s:g} s per rate; client: cls.client.AsyncClsClient "
              f"(clsd) / raw MachineServiceStub.Prefill (direct), one asyncio loop with the fakes")
        print(LAT_HEADER)
        for rate in args.rates:
            n = max(1, int(rate * args.duration_s))
            row = {"rate": rate}
            for name, send in (("direct", direct), ("clsd", via_clsd)):
                with CpuMeter(clsd) as cpu:
                    r = await open_loop(send, rate, n, poisson, args.seed + int(rate))
                r["clsd_cpu"], r["clsd_main_thread_cpu"], r["bench_cpu"] = \
                    cpu.clsd_cpu, cpu.clsd_main_cpu, cpu.bench_cpu
                r["clsd_cpu_ms_per_request"] = cpu.clsd_cpu_s / n * 1e3
                row[name] = r
                await settle()
            d, c = row["direct"]["first_token"], row["clsd"]["first_token"]
            if c["p50_ms"] is None or d["p50_ms"] is None:
                raise RuntimeError(f"every request failed at {rate:g}/s: "
                                   f"{row['clsd']['first_error'] or row['direct']['first_error']}")
            row["added_p50_ms"] = c["p50_ms"] - d["p50_ms"]
            row["added_p99_ms"] = c["p99_ms"] - d["p99_ms"]
            row["added_mean_ms"] = c["mean_ms"] - d["mean_ms"]
            row["p99_ratio"] = c["p99_ms"] / d["p99_ms"]
            row["added_p99_under_2_ms"] = row["added_p99_ms"] < 2.0
            latency.append(row)
            print_lat_row(row)

        streams = []
        for f in fakes:
            f.step_s = args.stream_step_s
        print(f"\ntoken streams through clsd: max_tokens={args.stream_tokens}, fake step "
              f"{args.stream_step_s * 1e3:g} ms, closed loop of C concurrent streams for "
              f"{args.stream_duration_s:g} s (counted after a {STREAM_RAMP_S:g} s ramp)")
        print(STREAM_HEADER)
        for c in args.streams:
            row = await stream_phase(client, prompt, token_fakes, c, args, clsd)
            streams.append(row)
            print_stream_row(row)
            await settle()
        return {"client": "cls.client.AsyncClsClient for clsd; raw MachineServiceStub for direct Prefill",
                "fakes": {"prompt": len(prompt_fakes), "token": len(token_fakes)},
                "latency": latency, "streams": streams}
    finally:
        await client.close()
        for ch in channels:
            await ch.close()
        # clsd first (its drain finds nothing in flight), then the machines it was watching
        await asyncio.to_thread(clsd.stop)
        for f in fakes:
            await f.stop()


STREAM_RAMP_S = 1.0


async def stream_phase(client, prompt, token_fakes, concurrency: int, args, clsd: ClsdProcess) -> dict:

    t_start = time.perf_counter()
    t_a, t_b = t_start + STREAM_RAMP_S, t_start + STREAM_RAMP_S + args.stream_duration_s
    counts = {"window": 0, "total": 0, "streams": 0}
    tpot: list[float] = []
    errors: list[str] = []
    snap: dict = {}

    async def snapshots() -> None:
        await asyncio.sleep(t_a - time.perf_counter())
        snap["a"] = (time.perf_counter(), sum(f.tokens_emitted for f in token_fakes),
                     sum(f.tokens_sent for f in token_fakes), clsd.cpu_s(), time.process_time(),
                     clsd.cpu_s(main_thread=True))
        await asyncio.sleep(t_b - time.perf_counter())
        snap["b"] = (time.perf_counter(), sum(f.tokens_emitted for f in token_fakes),
                     sum(f.tokens_sent for f in token_fakes), clsd.cpu_s(), time.process_time(),
                     clsd.cpu_s(main_thread=True))

    async def worker() -> None:
        while time.perf_counter() < t_b:
            try:
                first = last = None
                n = 0
                async for d in client.generate_stream(prompt, max_tokens=args.stream_tokens, ignore_eos=True):
                    if not d.token_ids:
                        continue
                    now = time.perf_counter()
                    k = len(d.token_ids)
                    n += k
                    counts["total"] += k
                    if t_a <= now < t_b:
                        counts["window"] += k
                    first = first if first is not None else now
                    last = now
                counts["streams"] += 1
                if n > 1:
                    tpot.append((last - first) / (n - 1))
            except Exception as exc:  # noqa: BLE001 - counted and reported
                errors.append(f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(0.1)

    for f in token_fakes:
        f.max_backlog = 0
    snapper = asyncio.create_task(snapshots())
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    await snapper
    drain_s = time.perf_counter() - t_b
    (ta, ea, sa, ca, ba, ma), (tb, eb, sb, cb, bb, mb) = snap["a"], snap["b"]
    wall = tb - ta
    delivered, emitted, sent = counts["window"] / wall, (eb - ea) / wall, (sb - sa) / wall
    return {"concurrency": concurrency, "step_s": args.stream_step_s, "max_tokens": args.stream_tokens,
            "window_s": wall, "streams_done": counts["streams"], "errors": len(errors),
            "first_error": errors[0] if errors else "",
            "nominal_tokens_per_s": concurrency / args.stream_step_s,
            "emitted_tokens_per_s": emitted, "sent_tokens_per_s": sent,
            "delivered_tokens_per_s": delivered,
            "delivered_over_emitted": delivered / emitted if emitted else 0.0,
            "client_tpot_ms_mean": sum(tpot) / len(tpot) * 1e3 if tpot else None,
            "max_backlog_steps": max(f.max_backlog for f in token_fakes), "drain_s": drain_s,
            "clsd_cpu": (cb - ca) / wall, "clsd_main_thread_cpu": (mb - ma) / wall,
            "bench_cpu": (bb - ba) / wall,
            "clsd_cpu_us_per_token": (cb - ca) / counts["window"] * 1e6 if counts["window"] else None}


LAT_HEADER = (f"{'rate/s':>6} {'path':>6} {'achieved/s':>10} {'late':>5} {'p50 ms':>7} {'p99 ms':>7} "
              f"{'mean ms':>7} {'errors':>6} {'clsd cpu(main)':>11} {'bench cpu':>9}   "
              f"{'added p50/p99/mean ms':>22}")


def print_lat_row(row: dict) -> None:
    for name in ("direct", "clsd"):
        r, ft = row[name], row[name]["first_token"]
        extra = (f"   {row['added_p50_ms']:>6.2f} {row['added_p99_ms']:>6.2f} {row['added_mean_ms']:>6.2f}"
                 if name == "clsd" else "")
        print(f"{row['rate']:>6g} {name:>6} {r['achieved_rate']:>10.1f} {r['late_sends']:>5} "
              f"{ft['p50_ms']:>7.2f} {ft['p99_ms']:>7.2f} {ft['mean_ms']:>7.2f} {r['errors']:>6} "
              f"{r['clsd_cpu']:>5.0%}({r['clsd_main_thread_cpu']:>4.0%}) {r['bench_cpu']:>9.0%}{extra}",
              flush=True)


STREAM_HEADER = (f"{'streams':>7} {'nominal tok/s':>13} {'emitted tok/s':>13} {'delivered tok/s':>15} "
                 f"{'deliv/emit':>10} {'TPOT ms':>7} {'backlog':>7} {'clsd cpu(main)':>11} {'bench cpu':>9} "
                 f"{'errors':>6}")


def print_stream_row(r: dict) -> None:
    tpot = r["client_tpot_ms_mean"]
    print(f"{r['concurrency']:>7} {r['nominal_tokens_per_s']:>13,.0f} {r['emitted_tokens_per_s']:>13,.0f} "
          f"{r['delivered_tokens_per_s']:>15,.0f} {r['delivered_over_emitted']:>10.2f} "
          f"{tpot if tpot is not None else float('nan'):>7.2f} {r['max_backlog_steps']:>7} "
          f"{r['clsd_cpu']:>5.0%}({r['clsd_main_thread_cpu']:>4.0%}) {r['bench_cpu']:>9.0%} "
          f"{r['errors']:>6}", flush=True)


def bench_clsd(args: argparse.Namespace) -> dict:
    """clsd through gRPC with fake machines: requests per second, the latency clsd adds (p50,
    p99) and token-stream throughput. Returns the part's JSON section."""

    with tempfile.TemporaryDirectory(prefix="cls_bench-") as tmp:
        clsd = ClsdProcess(Path(tmp), args.max_inflight, args.profile_clsd)
        try:
            clsd.start()
            return asyncio.run(clsd_bench(args, clsd))
        except BaseException:
            print(f"clsd log (tail):\n{clsd.log()[-2000:]}", file=sys.stderr)
            raise
        finally:
            clsd.stop()  # idempotent; the normal path stopped it already
