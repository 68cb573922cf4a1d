"""Cluster-simulator benchmarks (issue: cluster-scale emulation).

Part `designs`: the first 2 minutes of each Azure trace scaled to 70 req/s (Splitwise's standard
setting) on Splitwise-HH and Baseline-H100 (the same 40 machines); wall time per run (target:
under 60 s) and the nine SLO checks, under both decode models (`context`: decode cost by the
batch's context tokens, the profile's own axis; `requests`: by the number of decode requests, as
Splitwise's simulator does).

Part `goodput`: a rate sweep of Splitwise-HH against Baseline-H100 (prompt-first) and
Baseline-H100 with chunked prefill on both traces; goodput = the highest swept rate meeting all
nine targets; the ratio per trace against each baseline (goal: >= 1.4x on one).

Part `scale`: 1,000 machines at 2,000 req/s for 10 simulated minutes of Poisson arrivals with
lengths drawn from a trace (`--scale-trace`; coding: 875 prompt + 125 token machines, the coding
design's split; conversation: 620 + 380); simulated requests per wall-clock second.

    .venv/bin/python benchmarks/sim_bench.py [--part designs|goodput|scale|all]
        [--rates 40,70,100,130,160] [--scale-duration 600] [--out benchmarks/results/sim_bench.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cls.sim.design import SimDesignConfig  # noqa: E402
from cls.sim.report import SPLITWISE_SLO  # noqa: E402
from cls.sim.runs import Workload, run_once, sweep  # noqa: E402
from cls.sim.traces import trace_lengths  # noqa: E402

TRACES = {"code": REPO.parent / "shared" / "traces" / "AzureLLMInferenceTrace_code.csv",
          "conv": REPO.parent / "shared" / "traces" / "AzureLLMInferenceTrace_conv.csv"}
SPLITWISE = {"code": "configs/sim/splitwise-hh-code.yaml", "conv": "configs/sim/splitwise-hh-conv.yaml"}
BASELINE = "configs/sim/baseline-h100.yaml"
BASELINE_CHUNKED = "configs/sim/baseline-h100-chunked.yaml"


def _design(path: str, decode_axis: str, **extra) -> SimDesignConfig:
    return SimDesignConfig.load(REPO / path, {"decode_axis": decode_axis, **extra})


def _row(run) -> dict:
    d = run.to_dict()
    return {"design": run.design, "rate": run.rate, "num_requests": d["num_requests"],
            "wall_s": d["wall_s"], "targets_met": run.slo.num_met, "all_met": run.slo.all_met,
            "slowdown": {k: round(v, 3) for k, v in run.slo.values.items()},
            "ttft_p99_s": d["ttft_p99_s"], "tbt_p50_s": d["tbt_p50_s"], "e2e_p50_s": d["e2e_p50_s"],
            "num_borrows": d["num_borrows"], "utilization_mean": round(d["utilization"]["mean"], 3)}


def part_designs(out: dict) -> None:
    rows = []
    print("\n== designs: first 120 s of each trace at 70 req/s ==")
    print(f"{'axis':<9} {'trace':<5} {'design':<22} {'reqs':>6} {'wall s':>7} {'met':>5} "
          f"{'ttft p99x':>9} {'tbt p50x':>8} {'tbt p99x':>8} {'e2e p50x':>8}")
    for axis in ("context", "requests"):
        for trace, path in TRACES.items():
            for cfg_path in (SPLITWISE[trace], BASELINE, BASELINE_CHUNKED):
                run = run_once(_design(cfg_path, axis), Workload(str(path), duration_s=120), 70.0,
                               SPLITWISE_SLO)
                v = run.slo.values
                print(f"{axis:<9} {trace:<5} {run.design:<22} {run.num_requests:>6} {run.wall_s:>7.2f} "
                      f"{run.slo.num_met:>3}/9 {v['ttft_p99']:>9.2f} {v['tbt_p50']:>8.2f} "
                      f"{v['tbt_p99']:>8.2f} {v['e2e_p50']:>8.2f}", flush=True)
                rows.append({"decode_axis": axis, "trace": trace, **_row(run)})
    out["designs"] = rows


def part_goodput(out: dict, rates: list[float]) -> None:
    result = {}
    for axis in ("context", "requests"):
        for trace, path in TRACES.items():
            workload = Workload(str(path), duration_s=120)
            goodputs = {}
            print(f"\n== goodput: {trace} trace, decode axis {axis}, rates {rates} ==")
            for cfg_path in (SPLITWISE[trace], BASELINE, BASELINE_CHUNKED):
                cfg = _design(cfg_path, axis)
                runs, goodput = sweep(cfg, workload, rates, SPLITWISE_SLO)
                goodputs[cfg.name] = goodput
                met = " ".join(f"{r.rate:g}:{r.slo.num_met}/9" for r in runs)
                print(f"  {cfg.name:<22} {met}  goodput {goodput} req/s", flush=True)
                result[f"{axis}/{trace}/{cfg.name}"] = {"goodput_rate": goodput,
                                                         "runs": [_row(r) for r in runs]}
            (split, g_split), *baselines = goodputs.items()
            for base, g_base in baselines:
                ratio = g_split / g_base if g_split and g_base else None
                print(f"  goodput ratio {split} / {base}: "
                      + (f"{ratio:.2f}x" if ratio else "n/a (a design met no swept rate)"), flush=True)
                result[f"{axis}/{trace}/ratio/{base}"] = ratio
    out["goodput"] = result


def part_scale(out: dict, duration_s: float, trace: str) -> None:
    num_prompt = {"code": 875, "conv": 620}[trace]
    cfg = SimDesignConfig(name=f"scale-1000-{trace}", num_prompt=num_prompt, num_token=1000 - num_prompt,
                          decode_axis="requests",
                          profile=str(REPO.parent / "shared" / "profiles" / "splitwise_perf_model.csv"))
    workload = Workload(None, duration_s=duration_s, prompt_len=trace_lengths(TRACES[trace]),
                        output_len=None, seed=1)
    print(f"\n== scale: 1,000 machines, 2,000 req/s, {duration_s:g} simulated s, {trace} lengths ==",
          flush=True)
    from cls.cli.progress import advance_to_callback

    run = run_once(cfg, workload, 2000.0, SPLITWISE_SLO,
                   lambda label, total: advance_to_callback(total, label))
    row = _row(run)
    row["simulated_s"] = run.result.end_s
    row["requests_per_wall_s"] = round(run.num_requests / run.wall_s)
    row["num_tokens"] = sum(r.output_len for r in run.result.finished)
    print(f"  {run.num_requests} requests ({row['num_tokens']} tokens) over {run.result.end_s:.0f} "
          f"simulated s in {run.wall_s:.1f} s wall: {row['requests_per_wall_s']} requests/s, "
          f"targets met {run.slo.num_met}/9", flush=True)
    out["scale"] = row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=("designs", "goodput", "scale", "all"), default="all")
    ap.add_argument("--rates", default="40,70,100,130,160")
    ap.add_argument("--scale-duration", type=float, default=600.0)
    ap.add_argument("--scale-trace", choices=sorted(TRACES), default="code")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "sim_bench.json"))
    args = ap.parse_args()
    missing = [str(p) for p in TRACES.values() if not p.is_file()]
    if missing:
        print(f"error: traces absent: {', '.join(missing)} (../shared beside the repository)",
              file=sys.stderr)
        return 1
    out = {"date": datetime.now(UTC).isoformat(timespec="seconds"),
           "machine": f"{platform.machine()} {platform.processor() or ''} cpus={os.cpu_count()}"}
    start = time.monotonic()
    if args.part in ("designs", "all"):
        part_designs(out)
    if args.part in ("goodput", "all"):
        part_goodput(out, sorted(float(r) for r in args.rates.split(",")))
    if args.part in ("scale", "all"):
        part_scale(out, args.scale_duration, args.scale_trace)
    out["total_wall_s"] = round(time.monotonic() - start, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nwrote {args.out} ({out['total_wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
