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

Part `clsd` (benchmarks/cls_bench_clsd.py): a real clsd with fake machines over loopback gRPC;
the latency clsd adds against a direct Prefill and against a thin forwarding front, and
token-stream throughput through it. The routing part's schedulers and load are in
benchmarks/routing_models.py.

    .venv/bin/python benchmarks/cls_bench.py [--part routing|clsd|all] [--machines 10,100,1000,10000]
        [--decisions 20000] [--linear-decisions 2000] [--rates 100,250,500] [--duration-s 10]
        [--streams 64,256] [--profile-clsd clsd.prof] [--out benchmarks/results/cls_bench.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


from cls_bench_clsd import bench_clsd, percentile  # noqa: E402
from routing_models import (  # noqa: E402
    CheckedJsq,
    LinearJsq,
    SortedJsq,
    Workload,
    make_cluster,
    output_len,
    prompt_len,
)


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
                         max(0, sched.machines[mid].kv_blocks_total - used))
    return latencies, (perf_ns() - start) / 1e9


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
    g.add_argument("--streams", default="64,256",
                   help="concurrent token streams, comma-separated ('' for none)")
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
    try:
        args.rates = [float(r) for r in str(args.rates).split(",")]
        args.streams = [int(c) for c in str(args.streams).split(",") if c.strip()]  # "": none
    except ValueError as e:
        ap.error(f"--rates and --streams are comma-separated numbers: {e}")
    if any(r <= 0 for r in args.rates) or any(c < 1 for c in args.streams) or args.duration_s <= 0 \
            or args.prompt_machines < 1 or args.token_machines < 1 or args.stream_tokens < 2 \
            or args.prompt_tokens < 1:
        ap.error("--rates, --streams, --duration-s, --prompt-tokens, --prompt/token-machines must be "
                 "positive, --stream-tokens >= 2")

    result: dict = {"host": host_info(), "date": datetime.now(UTC).isoformat(timespec="seconds"),
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
