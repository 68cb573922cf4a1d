"""Part `clsd` of benchmarks/cls_bench.py (run it from there): clsd through gRPC.

A real clsd process (loopback, free port) with fake machines
(benchmarks/fake_machine.py: answer at once, tokens on a step clock) registered with it, all
served from this process's asyncio loop together with the client.
- Added latency: open-loop load at fixed rates (Poisson arrivals by default) of requests with
  ~100 prompt token ids and max_tokens=1, so the first token comes back in the Prefill reply and
  no step clock is waited for. Client-side time from send to the first token through clsd
  (SDK: AsyncClsClient; three gRPC hops: client->clsd, clsd->AddDecode, clsd->Prefill), against
  two baselines in the same run at the same rates: `direct`, the raw stub calling a fake's
  Prefill (one hop), and `thin`, the same SDK client through benchmarks/thin_front.py, a front
  process that only forwards each request as one Prefill (two hops: the floor of any Python gRPC
  front on this host). Reported: p50/p99/mean, each front minus direct and clsd minus thin, the
  achieved send rate and late sends (started > 2 ms after their scheduled time), and the CPU use
  of the front and of this process. Target: clsd adds under 2 ms p99 at 500 requests/s.
- Token streams: C concurrent streams (closed loop) of max_tokens tokens on the fakes' step
  clock; tokens/s delivered to the clients through clsd against the tokens/s the fakes emitted.
The load side (processes, CPU meters, open-loop load, statistics) is benchmarks/clsd_load.py.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import random
import sys
import tempfile
import time
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))

from clsd_load import (  # noqa: E402
    ClsdProcess,
    CpuMeter,
    ThinFrontProcess,
    open_loop,
    percentile,
)

__all__ = ["bench_clsd", "percentile"]


async def clsd_bench(args: argparse.Namespace, clsd: ClsdProcess, thin: ThinFrontProcess) -> dict:

    from benchmarks.fake_machine import FakeMachine
    from cls.client import AsyncClsClient
    from proto import mlsd_pb2 as mpb
    from proto import mlsd_pb2_grpc

    fakes: list[FakeMachine] = []
    channels = []
    client = AsyncClsClient(clsd.address, admin_token_file=clsd.token_file)
    thin_client = None
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
        thin.cmd += [f"127.0.0.1:{f.port}" for f in prompt_fakes]
        await asyncio.to_thread(thin.start)
        thin_client = AsyncClsClient(thin.address)
        rng = random.Random(args.seed)
        prompt = [rng.randrange(100, 40_000) for _ in range(args.prompt_tokens)]
        seq = iter(range(10**9))

        async def through(front_client, i: int) -> tuple[float, float]:
            t0 = time.perf_counter()
            first = None
            stream = front_client.generate_stream(prompt, max_tokens=1, ignore_eos=True)
            async for d in stream:  # read to the end: leaving early would cancel (and abort)
                if first is None and d.token_ids:
                    first = time.perf_counter() - t0
            end = time.perf_counter() - t0
            if stream.completion().finish_reason != "length" or first is None:
                raise RuntimeError("no token or wrong finish reason")
            return first, end

        async def via_clsd(i: int) -> tuple[float, float]:
            return await through(client, i)

        async def via_thin(i: int) -> tuple[float, float]:
            return await through(thin_client, i)

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
        for send in (direct, via_thin, via_clsd):
            await open_loop(send, 100, 100, poisson, args.seed)
        await settle()

        latency = []
        print(f"clsd added latency: {len(prompt_fakes)} prompt + {len(token_fakes)} token fake machines "
              f"(step {args.step_s * 1e3:g} ms), prompts of {args.prompt_tokens} token ids, max_tokens=1, "
              f"{args.arrivals} arrivals, {args.duration_s:g} s per rate; client: cls.client.AsyncClsClient "
              f"(clsd, thin front) / raw MachineServiceStub.Prefill (direct), one asyncio loop with fakes")
        print(LAT_HEADER)
        for rate in args.rates:
            n = max(1, int(rate * args.duration_s))
            row = {"rate": rate}
            for name, send, front in (("direct", direct, clsd), ("thin", via_thin, thin),
                                      ("clsd", via_clsd, clsd)):
                with CpuMeter(front) as cpu:
                    r = await open_loop(send, rate, n, poisson, args.seed + int(rate))
                r["clsd_cpu"], r["clsd_main_thread_cpu"], r["bench_cpu"] = \
                    cpu.clsd_cpu, cpu.clsd_main_cpu, cpu.bench_cpu
                r["clsd_cpu_ms_per_request"] = cpu.clsd_cpu_s / n * 1e3
                row[name] = r
                await settle()
            d, t, c = (row[k]["first_token"] for k in ("direct", "thin", "clsd"))
            for name in ("direct", "thin", "clsd"):
                if row[name]["first_token"]["p50_ms"] is None:
                    raise RuntimeError(f"every request failed at {rate:g}/s ({name}): "
                                       f"{row[name]['first_error']}")
            for stat in ("p50", "p99", "mean"):
                row[f"added_{stat}_ms"] = c[f"{stat}_ms"] - d[f"{stat}_ms"]
                row[f"thin_added_{stat}_ms"] = t[f"{stat}_ms"] - d[f"{stat}_ms"]
                row[f"clsd_over_thin_{stat}_ms"] = c[f"{stat}_ms"] - t[f"{stat}_ms"]
            row["p99_ratio"] = c["p99_ms"] / d["p99_ms"]
            row["clsd_over_thin_p99_ratio"] = c["p99_ms"] / t["p99_ms"]
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
        return {"client": "cls.client.AsyncClsClient for clsd and the thin front; raw MachineServiceStub "
                          "for direct Prefill",
                "fakes": {"prompt": len(prompt_fakes), "token": len(token_fakes)},
                "latency": latency, "streams": streams}
    finally:
        await client.close()
        if thin_client is not None:
            await thin_client.close()
        await asyncio.to_thread(thin.stop)
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
              f"{'mean ms':>7} {'errors':>6} {'front cpu(main)':>11} {'bench cpu':>9}   "
              f"{'added p50/p99/mean ms':>22}   {'clsd - thin p50/p99 ms':>22}")


def print_lat_row(row: dict) -> None:
    for name in ("direct", "thin", "clsd"):
        r, ft = row[name], row[name]["first_token"]
        pre = {"direct": None, "thin": "thin_added", "clsd": "added"}[name]
        extra = (f"   {row[pre + '_p50_ms']:>6.2f} {row[pre + '_p99_ms']:>6.2f} {row[pre + '_mean_ms']:>6.2f}"
                 if pre else "")
        if name == "clsd":
            extra += f"   {row['clsd_over_thin_p50_ms']:>10.2f} {row['clsd_over_thin_p99_ms']:>6.2f}"
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
        thin = ThinFrontProcess(Path(tmp), [])  # the prompt fakes' addresses are added once up
        try:
            clsd.start()
            return asyncio.run(clsd_bench(args, clsd, thin))
        except BaseException:
            for p in (clsd, thin):
                print(f"{p.name} log (tail):\n{p.log()[-2000:]}", file=sys.stderr)
            raise
        finally:
            clsd.stop()  # idempotent; the normal path stopped it already
            thin.stop()
