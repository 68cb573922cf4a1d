"""Cluster scheduler benchmarks.

Part `routing`: the pure router at cluster scale. For each cluster size, half prompt and half
token machines with realistic KV sizes, warmed with random load reports, then a steady loop that
does what clsd does per request: `route()`, then `credit_prompt` when an earlier request's
prefill is done and `credit_decode` when an earlier request finishes, with load reports arriving
like heartbeats (`update_load`, round-robin over the machines, reporting what the machine really
holds). Measured: the latency of one `route()` call (p50, p99), routing decisions per second
(1 / mean latency; `loop/s` counts the whole loop, credits and heartbeats included), against a
brute-force O(n) JSQ (a linear min over all machines) run on a copy of the same warmed state with
the same requests. Then a short check: the sorted router's choices against the brute force on
the same state (`JSQ agree`, per side where the pool's own JSQ decides). Target: one decision
under 50 microseconds at 10,000 machines.

Part `clsd`: a real clsd process (loopback, free port) with fake machines
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

    .venv/bin/python benchmarks/cls_bench.py [--part routing|clsd|all] [--machines 10,100,1000,10000]
        [--decisions 20000] [--linear-decisions 2000] [--rates 100,250,500] [--duration-s 10]
        [--streams 64,256] [--profile-clsd clsd.prof] [--out benchmarks/results/cls_bench.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import random
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import grpc  # noqa: E402

from cls.pools import Machine, Pool, Pools  # noqa: E402
from cls.router import Router  # noqa: E402

BLOCK_SIZE = 16
# KV blocks of 16 tokens a machine holds after weights and activations, bf16:
# Llama-3.1-8B on one H100 80 GB (128 KiB per token, ~56 GiB free) and Llama-3.1-70B on 8 H100s
# (320 KiB per token, ~420 GiB free).
KV_BLOCKS = (28_000, 85_000)
MAX_MODEL_LEN = 131_072
PROMPT_QUEUE_LIMIT = 8192


# -- the two schedulers under test ----------------------------------------------------------------

class SortedJsq:
    """The real thing: cls.router.Router over cls.pools.Pools, with clsd's calls around it (a
    borrowed machine is offered its way home after each credit and each load report)."""

    def __init__(self, machines: list[Machine]):
        self.pools = Pools()
        for m in machines:
            self.pools.add(m.machine_id, m.home, m.kv_total_blocks, m.block_size, m.max_model_len)
            self.report(m.machine_id, m.pending_prompt_tokens, m.prompt_queue_len,
                        m.pending_decode_tokens, m.kv_free_blocks)
        self.router = Router(self.pools, PROMPT_QUEUE_LIMIT)
        self.machines = self.pools.machines

    def route(self, prompt_len: int, max_tokens: int) -> tuple[str, str, int]:
        r = self.router.route(prompt_len, max_tokens)
        return r.prompt_machine, r.token_machine, r.num_blocks

    def credit_prompt(self, machine_id: str, num_tokens: int) -> None:
        self.pools.credit_prompt(machine_id, num_tokens)
        if self.machines[machine_id].role == Pool.MIXED:
            self.pools.return_idle(machine_id)

    def credit_decode(self, machine_id: str, num_tokens: int, num_blocks: int) -> None:
        self.pools.credit_decode(machine_id, num_tokens, num_blocks)
        if self.machines[machine_id].role == Pool.MIXED:
            self.pools.return_idle(machine_id)

    def report(self, machine_id: str, prompt: int, queue: int, decode: int, free: int) -> None:
        self.pools.update_load(machine_id, pending_prompt_tokens=prompt, prompt_queue_len=queue,
                               pending_decode_tokens=decode, kv_free_blocks=free)
        self.pools.return_idle(machine_id)


class LinearJsq:
    """The brute-force reference: the same JSQ choice as a linear min over every machine, the same
    bookkeeping as plain field updates (no index to maintain)."""

    def __init__(self, machines: list[Machine]):
        self.machines = {m.machine_id: Machine(**vars(m)) for m in machines}
        self.prompt_pool = [m for m in self.machines.values() if m.role == Pool.PROMPT]
        self.token_pool = [m for m in self.machines.values() if m.role == Pool.TOKEN]

    def route(self, prompt_len: int, max_tokens: int) -> tuple[str, str, int]:
        need = prompt_len + max_tokens
        # where none qualifies, the least-loaded machine (the router would borrow one instead)
        pm = linear_prompt(self.prompt_pool, prompt_len) or \
            min(self.prompt_pool, key=lambda m: (m.pending_prompt_tokens, m.machine_id))
        tm = linear_token(self.token_pool, need) or \
            min(self.token_pool, key=lambda m: (m.pending_decode_tokens, m.machine_id))
        blocks = tm.blocks_for(need)
        pm.pending_prompt_tokens += prompt_len
        pm.prompt_queue_len += 1
        tm.pending_decode_tokens += max_tokens
        tm.kv_free_blocks = max(0, tm.kv_free_blocks - blocks)
        return pm.machine_id, tm.machine_id, blocks

    def credit_prompt(self, machine_id: str, num_tokens: int) -> None:
        m = self.machines[machine_id]
        m.pending_prompt_tokens = max(0, m.pending_prompt_tokens - num_tokens)
        m.prompt_queue_len = max(0, m.prompt_queue_len - 1)
        if not (m.pending_prompt_tokens and m.prompt_queue_len):
            m.pending_prompt_tokens = m.prompt_queue_len = 0

    def credit_decode(self, machine_id: str, num_tokens: int, num_blocks: int) -> None:
        m = self.machines[machine_id]
        m.pending_decode_tokens = max(0, m.pending_decode_tokens - num_tokens)
        m.kv_free_blocks = min(m.kv_total_blocks, m.kv_free_blocks + num_blocks)

    def report(self, machine_id: str, prompt: int, queue: int, decode: int, free: int) -> None:
        m = self.machines[machine_id]
        m.pending_prompt_tokens, m.prompt_queue_len = prompt, queue
        m.pending_decode_tokens, m.kv_free_blocks = decode, free


def linear_prompt(pool: list[Machine], prompt_len: int) -> Machine | None:
    """JSQ by brute force: the fewest pending prompt tokens among machines not long-queued."""
    limit = PROMPT_QUEUE_LIMIT - prompt_len
    ok = [m for m in pool if not (m.prompt_queue_len and m.pending_prompt_tokens > limit)]
    return min(ok, key=lambda m: (m.pending_prompt_tokens, m.machine_id)) if ok else None


def linear_token(pool: list[Machine], num_tokens: int) -> Machine | None:
    """JSQ by brute force: the least pending decode work among machines with the KV memory free."""
    ok = [m for m in pool if m.blocks_for(num_tokens) <= m.kv_free_blocks]
    return min(ok, key=lambda m: (m.pending_decode_tokens, m.machine_id)) if ok else None


class CheckedJsq:
    """SortedJsq with every decision checked against the brute force on the same state, on each
    side where that pool's own JSQ decides (no borrowing, not the mixed pool)."""

    def __init__(self, fast: SortedJsq):
        self.fast, self.machines = fast, fast.machines
        self.credit_prompt, self.credit_decode = fast.credit_prompt, fast.credit_decode
        self.report = fast.report
        self.agree = self.checked = 0

    def route(self, prompt_len: int, max_tokens: int) -> tuple[str, str, int]:
        pools = self.fast.pools
        pm = linear_prompt(pools.members(Pool.PROMPT), prompt_len)
        tm = linear_token(pools.members(Pool.TOKEN), prompt_len + max_tokens)
        r = self.fast.router.route(prompt_len, max_tokens)
        if not r.borrowed:
            for expected, got in ((pm, r.prompt_machine), (tm, r.token_machine)):
                if expected is not None:
                    self.checked += 1
                    self.agree += expected.machine_id == got
        return r.prompt_machine, r.token_machine, r.num_blocks


# -- workload -------------------------------------------------------------------------------------

def make_cluster(num_machines: int, rng: random.Random) -> list[Machine]:
    """Half prompt, half token machines, each with a random background load already reported."""
    machines = []
    for i in range(num_machines):
        home = Pool.PROMPT if i < num_machines // 2 else Pool.TOKEN
        total = rng.choice(KV_BLOCKS)
        m = Machine(f"{home.value[0]}{i:05d}", home, home, total, BLOCK_SIZE, MAX_MODEL_LEN)
        if home == Pool.PROMPT:
            m.prompt_queue_len = rng.choice([0, 0, 0, 1])
            m.pending_prompt_tokens = prompt_len(rng) if m.prompt_queue_len else 0
            m.kv_free_blocks = total - rng.randint(0, total // 10)
        else:
            m.pending_decode_tokens = rng.randint(0, 20_000)
            m.kv_free_blocks = total - rng.randint(0, total // 2)
        machines.append(m)
    return machines


def prompt_len(rng: random.Random) -> int:
    # Splitwise's traces: conversation prompts ~1k tokens (median), coding ~1.5k, a long tail
    return min(16_000, max(8, int(rng.lognormvariate(math.log(1100), 0.9))))


def output_len(rng: random.Random) -> int:
    return min(4096, max(1, int(rng.lognormvariate(math.log(120), 1.0))))


@dataclass
class Workload:
    """What the machines really hold: their background load plus the requests routed to them and
    not yet done. Heartbeats report it; between them the router's own charges and credits rule."""

    background: dict[str, tuple[int, int, int, int]]
    """machine id -> (prompt tokens, prompt queue length, decode tokens, KV blocks in use)"""
    prompt_lag: int
    """A request's prefill is done this many decisions after it was routed..."""
    decode_lag: int
    """...and it finishes this many decisions after it was routed."""
    prefilling: deque = field(default_factory=deque)  # (prompt machine, prompt tokens)
    decoding: deque = field(default_factory=deque)  # (token machine, max tokens, blocks)
    live: dict[str, list[int]] = field(default_factory=dict)  # like `background`, in-flight requests

    @classmethod
    def of(cls, machines: list[Machine], prompt_lag: int, decode_lag: int) -> Workload:
        bg = {m.machine_id: (m.pending_prompt_tokens, m.prompt_queue_len, m.pending_decode_tokens,
                             m.kv_used_blocks) for m in machines}
        return cls(bg, prompt_lag, decode_lag, live={mid: [0, 0, 0, 0] for mid in bg})

    def copy(self) -> Workload:
        return Workload(self.background, self.prompt_lag, self.decode_lag, deque(self.prefilling),
                        deque(self.decoding), {mid: list(v) for mid, v in self.live.items()})


def steady_loop(sched, requests, work: Workload, reports_per_decision: float):
    """clsd's use of the router: route, credit earlier requests' progress, apply heartbeats
    (round-robin over the machines). Returns (route() latencies in ns, whole-loop seconds)."""
    ids = list(sched.machines)
    live, prefilling, decoding = work.live, work.prefilling, work.decoding
    latencies = []
    report_due, next_report = 0.0, 0
    perf_ns = time.perf_counter_ns
    start = perf_ns()
    for prompt_len_, max_tokens in requests:
        t0 = perf_ns()
        pm, tm, blocks = sched.route(prompt_len_, max_tokens)
        latencies.append(perf_ns() - t0)
        prefilling.append((pm, prompt_len_))
        decoding.append((tm, max_tokens, blocks))
        p, t = live[pm], live[tm]
        p[0] += prompt_len_
        p[1] += 1
        t[2] += max_tokens
        t[3] += blocks
        if len(prefilling) > work.prompt_lag:  # an earlier request's prefill is done
            mid, n = prefilling.popleft()
            sched.credit_prompt(mid, n)
            live[mid][0] -= n
            live[mid][1] -= 1
        if len(decoding) > work.decode_lag:  # an earlier request finished
            mid, n, b = decoding.popleft()
            sched.credit_decode(mid, n, b)
            live[mid][2] -= n
            live[mid][3] -= b
        report_due += reports_per_decision
        while report_due >= 1.0:
            report_due -= 1.0
            mid = ids[next_report]
            next_report = (next_report + 1) % len(ids)
            bg, lv = work.background[mid], live[mid]
            used = bg[3] + lv[3]
            sched.report(mid, bg[0] + lv[0], bg[1] + lv[1], bg[2] + lv[2],
                         max(0, sched.machines[mid].kv_total_blocks - used))
    return latencies, (perf_ns() - start) / 1e9


def percentile(sorted_values: list[int], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def summarize(latencies: list[int], loop_s: float) -> dict:
    lat = sorted(latencies)
    return {
        "decisions": len(lat),
        "route_us_p50": percentile(lat, 0.50) / 1e3,
        "route_us_p99": percentile(lat, 0.99) / 1e3,
        "route_us_mean": sum(lat) / len(lat) / 1e3,
        "decisions_per_s": len(lat) / (sum(lat) / 1e9),
        "loop_decisions_per_s": len(lat) / loop_s,
    }


# -- part 1: routing ------------------------------------------------------------------------------

def bench_routing(sizes: list[int], decisions: int, linear_decisions: int, seed: int,
                  reports_per_decision: float) -> list[dict]:
    rows = []
    for n in sizes:
        rng = random.Random(seed + n)
        cluster = make_cluster(n, rng)
        # In flight: about one queued prompt per two prompt machines and two decoding requests
        # per token machine, on top of the background load.
        work = Workload.of(cluster, prompt_lag=max(1, n // 4), decode_lag=max(1, n))
        warmup = work.decode_lag + 1000
        requests = [(prompt_len(rng), output_len(rng)) for _ in range(warmup + decisions)]

        fast = SortedJsq(cluster)
        steady_loop(fast, requests[:warmup], work, reports_per_decision)
        # The reference starts from a copy of the warmed state with the same requests in flight.
        linear = LinearJsq(list(fast.machines.values()))
        num_linear = min(linear_decisions, decisions)
        gc.collect()
        lin_lat, lin_s = steady_loop(linear, requests[warmup:warmup + num_linear], work.copy(),
                                     reports_per_decision)
        gc.collect()
        lat, loop_s = steady_loop(fast, requests[warmup:], work, reports_per_decision)
        checked = CheckedJsq(fast)
        steady_loop(checked, [(prompt_len(rng), output_len(rng)) for _ in range(num_linear)], work,
                    reports_per_decision)
        row = {"num_machines": n, **summarize(lat, loop_s), "linear": summarize(lin_lat, lin_s)}
        row["speedup_vs_linear"] = row["decisions_per_s"] / row["linear"]["decisions_per_s"]
        row["jsq_checked"], row["jsq_agree"] = checked.checked, checked.agree
        row["num_borrowed"], row["num_returned"] = fast.pools.num_borrowed, fast.pools.num_returned
        row["p50_under_50_us"], row["p99_under_50_us"] = row["route_us_p50"] < 50, row["route_us_p99"] < 50
        rows.append(row)
        print_row(row)
    return rows


HEADER = (f"{'machines':>8} {'route p50 us':>12} {'p99 us':>8} {'decisions/s':>12} {'loop/s':>9} "
          f"{'linear p50 us':>13} {'linear/s':>9} {'speedup':>8} {'JSQ agree':>11} {'borrows':>7}")


def print_row(r: dict) -> None:
    lin = r["linear"]
    print(f"{r['num_machines']:>8} {r['route_us_p50']:>12.1f} {r['route_us_p99']:>8.1f} "
          f"{r['decisions_per_s']:>12,.0f} {r['loop_decisions_per_s']:>9,.0f} {lin['route_us_p50']:>13.1f} "
          f"{lin['decisions_per_s']:>9,.0f} {r['speedup_vs_linear']:>7.1f}x "
          f"{r['jsq_agree']:>5}/{r['jsq_checked']:<5} {r['num_borrowed']:>7}", flush=True)


# -- part 2: clsd through gRPC with fake machines -------------------------------------------------

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
    import asyncio

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
    import asyncio

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
    import asyncio

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
    import asyncio
    import tempfile

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


# -- main -----------------------------------------------------------------------------------------

def host_info() -> dict:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    return {"processor": platform.processor(), "cpu_model": model, "cpu_count": os.cpu_count(),
            "platform": platform.platform(), "python": platform.python_version()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=["routing", "clsd", "all"], default="all")
    ap.add_argument("--machines", default="10,100,1000,10000",
                    help="cluster sizes, comma-separated (half prompt, half token machines)")
    ap.add_argument("--decisions", type=int, default=20_000, help="timed routing decisions per size")
    ap.add_argument("--linear-decisions", type=int, default=2_000,
                    help="timed decisions of the O(n) reference per size (it is slow at 10,000)")
    ap.add_argument("--reports-per-decision", type=float, default=0.5,
                    help="load reports per decision: 1 / (requests/s per machine x heartbeat_s)")
    ap.add_argument("--seed", type=int, default=0)
    g = ap.add_argument_group("part clsd")
    g.add_argument("--rates", default="100,250,500", help="requests/s of the latency runs, comma-separated")
    g.add_argument("--duration-s", type=float, default=10.0, help="seconds of load per rate and path")
    g.add_argument("--arrivals", choices=["poisson", "fixed"], default="poisson")
    g.add_argument("--prompt-tokens", type=int, default=100)
    g.add_argument("--prompt-machines", type=int, default=2)
    g.add_argument("--token-machines", type=int, default=2)
    g.add_argument("--step-s", type=float, default=0.005, help="fake decode step in the latency runs")
    g.add_argument("--streams", default="64,256", help="concurrent token streams, comma-separated")
    g.add_argument("--stream-tokens", type=int, default=256, help="max_tokens of each stream")
    g.add_argument("--stream-step-s", type=float, default=0.002, help="fake decode step in the stream runs")
    g.add_argument("--stream-duration-s", type=float, default=8.0)
    g.add_argument("--max-inflight", type=int, default=100_000, help="clsd's limits.max_inflight_requests")
    g.add_argument("--profile-clsd", default=None, metavar="PATH",
                   help="run clsd under cProfile, writing its profile here")
    ap.add_argument("--out", default="benchmarks/results/cls_bench.json")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.machines.split(",")]
    if any(n < 2 for n in sizes) or args.decisions < 1 or args.linear_decisions < 1:
        ap.error("--machines must be >= 2 each, --decisions and --linear-decisions >= 1")
    args.rates = [float(r) for r in str(args.rates).split(",")]
    args.streams = [int(c) for c in str(args.streams).split(",")]
    if any(r <= 0 for r in args.rates) or any(c < 1 for c in args.streams) or args.duration_s <= 0 \
            or args.prompt_machines < 1 or args.token_machines < 1 or args.stream_tokens < 2 \
            or args.prompt_tokens < 1:
        ap.error("--rates, --streams, --duration-s, --prompt-tokens, --prompt/token-machines must be "
                 "positive, --stream-tokens >= 2")

    result: dict = {"host": host_info(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "parameters": vars(args)}
    parts = ["routing", "clsd"] if args.part == "all" else [args.part]
    for part in parts:
        if part == "routing":
            print(f"routing: {args.decisions} decisions per size ({args.linear_decisions} for the "
                  f"linear reference), {args.reports_per_decision} load reports per decision")
            print(HEADER)
            result["routing"] = bench_routing(sizes, args.decisions, args.linear_decisions, args.seed,
                                              args.reports_per_decision)
        else:
            result["clsd"] = bench_clsd(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():  # keep the other part's last results when running one part
        try:
            old = json.loads(out.read_text())
        except ValueError:
            old = {}
        for part in ("routing", "clsd"):
            if part not in result and part in old:
                result[part] = old[part]
                result.setdefault("earlier", {})[part] = {"date": old.get("date"), "host": old.get("host")}
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
