"""`clsctl simulate`: run a cluster design over a trace in virtual time and print the latencies.

    clsctl simulate --cluster configs/sim/splitwise-hh-code.yaml \
        --trace ../shared/traces/AzureLLMInferenceTrace_code.csv --rate 70 --duration 120

The simulator (cls/simulator.py) drives the daemons' own pools, router and machine policies;
step times come from engine/modelled.py. Torch is never imported.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _cmd_simulate(args: argparse.Namespace) -> int:
    from cls.sim_design import SimDesignConfig
    from cls.simulator import Simulator
    from cls.traces import TraceError, load_azure_trace
    from engine.modelled import ProfileError
    from mls.config import ConfigError

    try:
        cfg = SimDesignConfig.load(args.cluster)
        design, model = cfg.build()
        arrivals = load_azure_trace(args.trace, limit=args.limit, duration_s=args.duration, rate=args.rate)
    except (ConfigError, ProfileError, TraceError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if not arrivals:
        print("error: the trace selection holds no requests", file=sys.stderr)
        return 1
    print(f"simulating {cfg.name}: {cfg.num_prompt} prompt + {cfg.num_token} token machines, "
          f"{len(arrivals)} requests over {arrivals[-1].arrival_s:.0f} s of the trace", file=sys.stderr)
    start = time.monotonic()
    result = Simulator(design, model, seed=args.seed).run(arrivals)
    wall_s = time.monotonic() - start
    summary = {"design": cfg.name, "trace": str(args.trace), "num_requests": len(arrivals),
               "wall_s": round(wall_s, 3), "requests_per_wall_s": round(len(arrivals) / max(wall_s, 1e-9)),
               **result.summary()}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{'metric':<10} {'p50':>10} {'p90':>10} {'p99':>10}")
    for name in ("ttft", "tbt", "e2e"):
        print(f"{name + ' (s)':<10} " + " ".join(f"{summary[f'{name}_p{p}_s']:>10.4f}" for p in (50, 90, 99)))
    print(f"finished {summary['num_finished']}, rejected {summary['num_rejected']}, "
          f"borrows {summary['num_borrows']}; simulated {summary['end_s']:.1f} s in {wall_s:.2f} s wall")
    return 0


def add_parser(groups: argparse._SubParsersAction) -> None:
    p = groups.add_parser(
        "simulate", help="simulate a cluster design over a trace (virtual time)",
        description="Replay an Azure LLM inference trace (TIMESTAMP, ContextTokens, "
                    "GeneratedTokens) on a simulated cluster design with the daemons' own "
                    "policies, and print TTFT, TBT and E2E percentiles.")
    p.add_argument("--cluster", required=True, metavar="CONFIG", help="design YAML (configs/sim/)")
    p.add_argument("--trace", required=True, metavar="CSV", help="Azure trace CSV (../shared/traces/)")
    p.add_argument("--rate", type=float, default=None, help="rescale arrivals to this mean req/s")
    p.add_argument("--duration", type=float, default=None, metavar="S", help="first S seconds only")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="first N requests only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, metavar="PATH", help="also write the summary as JSON")
    p.set_defaults(func=_cmd_simulate)
