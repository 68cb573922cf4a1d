"""`clsctl simulate`: run cluster designs over a trace in virtual time and report SLOs and goodput.

    clsctl simulate --cluster configs/sim/splitwise-hh-code.yaml \
        --trace ../shared/traces/AzureLLMInferenceTrace_code.csv --rate 70 --duration 120
    clsctl simulate --cluster configs/sim/splitwise-hh-conv.yaml --cluster configs/sim/baseline-h100.yaml \
        --trace ../shared/traces/AzureLLMInferenceTrace_conv.csv --duration 120 --sweep 40,70,100 \
        --plots out/sim --json out/sim.json

The simulator (cls/sim/simulator.py) drives the daemons' own pools, router and machine policies;
step times come from engine/modelled.py. Torch is never imported.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cls.cli.progress import advance_to_callback
from daemon.settings import ConfigError


def _lengths(text: str):
    """'512' -> 512, '100:2000' -> (100, 2000)."""
    low, sep, high = text.partition(":")
    try:
        value = (int(low), int(high)) if sep else int(low)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not N or LOW:HIGH") from None
    if (min(value) if sep else value) < 1 or (sep and value[0] > value[1]):
        raise argparse.ArgumentTypeError(f"{text!r}: lengths must be >= 1 and LOW <= HIGH")
    return value


def _rates(text: str) -> list[float]:
    try:
        rates = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of rates") from None
    if not rates or any(not r > 0 for r in rates):
        raise argparse.ArgumentTypeError(f"{text!r}: rates must be > 0 requests/s")
    return sorted(rates)


def _progress_for(enabled: bool):
    """A progress bar per run, advanced as the simulator routes arrivals."""
    return lambda label, total: advance_to_callback(total, label, enabled)


def _print_run(report, out) -> None:
    s, slo = report.to_dict(), report.slo
    print(f"\n== {report.design}: {s['num_requests']} requests, offered {s['offered_rate']:.1f} req/s ==",
          file=out)
    print(f"{'metric':<6} {'p50 s':>9} {'p90 s':>9} {'p99 s':>9}   {'slowdown p50/p90/p99 (target)':<40}",
          file=out)
    for m in ("ttft", "tbt", "e2e"):
        cells = []
        for p in (50, 90, 99):
            key = f"{m}_p{p}"
            cells.append(f"{slo.values[key]:.2f}{'' if slo.met[key] else '!'}({slo.targets[key]:g})")
        print(f"{m:<6} " + " ".join(f"{s[f'{m}_p{p}_s']:>9.4f}" for p in (50, 90, 99))
              + "   " + " ".join(cells), file=out)
    print(f"SLO targets met: {slo.num_met}/{len(slo.targets)}{'  (all met)' if slo.all_met else ''}; "
          f"finished {s['num_finished']}, rejected {s['num_rejected']}, pool moves "
          f"{s['num_pool_moves']} ({s['num_borrows']} borrows); utilization mean "
          f"{s['utilization']['mean']:.0%} (min {s['utilization']['min']:.0%}, max "
          f"{s['utilization']['max']:.0%})", file=out)
    print(f"simulated {s['end_s']:.1f} s in {s['wall_s']:.2f} s wall ({s['requests_per_wall_s']} requests/s)",
          file=out)


def _print_sweep(name: str, runs, goodput, out) -> None:
    print(f"\n== {name}: rate sweep ==", file=out)
    print(f"{'rate':>8} {'met':>5} {'worst/target':>13} {'ttft p99x':>10} {'tbt p99x':>9} "
          f"{'e2e p99x':>9} {'wall s':>7}", file=out)
    for r in runs:
        v = r.slo.values
        print(f"{r.rate:>8g} {r.slo.num_met:>3}/9 {r.slo.worst_ratio:>13.2f} {v['ttft_p99']:>10.2f} "
              f"{v['tbt_p99']:>9.2f} {v['e2e_p99']:>9.2f} {r.wall_s:>7.2f}", file=out)
    print(f"goodput ({name}): " + (f"{goodput:g} req/s" if goodput is not None
                                    else "none of the swept rates met every target"), file=out)


def _cmd_simulate(args: argparse.Namespace) -> int:
    # Here, not at the top: numpy and the simulator load only when a simulation runs.
    from cls.sim.design import SimDesignConfig
    from cls.sim.report import SloError, parse_slo
    from cls.sim.runs import Workload, plot, run_once, sweep
    from cls.sim.traces import TraceError, trace_lengths
    from engine.modelled import ProfileError

    out = sys.stdout
    try:
        targets = parse_slo(args.slo)
        overrides = {"decode_axis": args.decode_axis} if args.decode_axis else None
        cfgs = [SimDesignConfig.load(path, overrides) for path in args.cluster]
        for cfg in cfgs:
            cfg.build()  # fail on a bad design before any run
        if args.trace is None and (args.duration is None or (args.rate is None and not args.sweep)):
            raise ConfigError("without --trace, synthetic arrivals need --duration and --rate or --sweep")
        if args.rate_scale is not None and (args.rate is not None or args.sweep):
            raise ConfigError("--rate-scale rescales the trace's own rate; it excludes --rate and --sweep")
        if args.rate_scale is not None and args.trace is None:
            raise ConfigError("--rate-scale needs --trace")
        prompt_len, output_len = args.prompt_len, args.output_len
        if args.lengths_from:
            prompt_len, output_len = trace_lengths(args.lengths_from), None
        workload = Workload(args.trace, args.duration, args.limit, args.rate_scale, args.burstiness,
                            prompt_len, output_len, args.seed)
        if not workload.arrivals(args.sweep[0] if args.sweep else args.rate):
            raise ConfigError("the trace selection holds no requests")
    except (ConfigError, ProfileError, TraceError, SloError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    progress_for = _progress_for(not args.no_progress)
    designs: dict[str, list] = {}
    goodputs: dict[str, float | None] = {}
    for cfg in cfgs:
        name = cfg.name if cfg.name not in designs else f"{cfg.name}#{len(designs)}"
        if args.sweep:
            runs, goodputs[name] = sweep(cfg, workload, args.sweep, targets, progress_for)
            designs[name] = runs
            _print_sweep(name, runs, goodputs[name], out)
        else:
            run = run_once(cfg, workload, args.rate, targets, progress_for)
            designs[name] = [run]
            _print_run(run, out)
    ratios = {}
    if args.sweep and len(designs) > 1:
        first = next(iter(designs))
        for other in list(designs)[1:]:
            a, b = goodputs[first], goodputs[other]
            ratios[f"{first}/{other}"] = (a / b) if a and b else None
            text = f"{a / b:.2f}x" if a and b else "n/a (a design met no swept rate)"
            print(f"goodput ratio {first} / {other}: {text}", file=out)
    if args.plots:
        for path in plot(designs, args.plots):
            print(f"wrote {path}", file=sys.stderr)
    if args.json:
        doc = {"trace": args.trace, "duration_s": args.duration, "targets": targets,
               "designs": {n: {"runs": [r.to_dict() for r in runs], "goodput_rate": goodputs.get(n)}
                           for n, runs in designs.items()},
               "goodput_ratios": ratios}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def add_parser(groups: argparse._SubParsersAction) -> None:
    p = groups.add_parser(
        "simulate", help="simulate cluster designs over a trace (virtual time): SLOs, goodput",
        description="Replay an Azure LLM inference trace (TIMESTAMP, ContextTokens, "
                    "GeneratedTokens) or synthetic Poisson/gamma arrivals on simulated cluster "
                    "designs with the daemons' own policies; print TTFT, TBT and E2E percentiles, "
                    "slowdowns against one uncontended request on the reference machine, Splitwise's "
                    "nine SLO checks, and with --sweep the goodput of each design.")
    p.add_argument("--cluster", required=True, action="append", metavar="CONFIG",
                   help="design YAML (configs/sim/); repeat to compare designs on the same arrivals")
    p.add_argument("--trace", default=None, metavar="CSV",
                   help="Azure trace CSV (../shared/traces/); omit for synthetic arrivals")
    p.add_argument("--rate", type=float, default=None, help="rescale arrivals to this mean req/s")
    p.add_argument("--rate-scale", type=float, default=None, metavar="X",
                   help="multiply the trace's own arrival rate by X")
    p.add_argument("--sweep", type=_rates, default=None, metavar="R1,R2,...",
                   help="run every rate (req/s) and report the goodput: the highest rate meeting all SLOs")
    p.add_argument("--duration", type=float, default=None, metavar="S", help="first S seconds only")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="first N requests only")
    p.add_argument("--slo", default=None, metavar="KEY=X,...",
                   help="override slowdown targets, e.g. ttft_p99=6,tbt_p50=1.25 (default: Splitwise's)")
    p.add_argument("--decode-axis", choices=("context", "requests"), default=None,
                   help="profile decode cost by context tokens, or by requests as splitwise-sim does")
    p.add_argument("--burstiness", type=float, default=1.0,
                   help="synthetic arrivals: gamma shape (1 = Poisson, < 1 burstier)")
    p.add_argument("--prompt-len", type=_lengths, default=1024, metavar="N|LO:HI",
                   help="synthetic arrivals: prompt tokens")
    p.add_argument("--output-len", type=_lengths, default=128, metavar="N|LO:HI",
                   help="synthetic arrivals: output tokens")
    p.add_argument("--lengths-from", default=None, metavar="CSV",
                   help="synthetic arrivals: draw (prompt, output) lengths from this Azure trace")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plots", default=None, metavar="DIR", help="write PNG plots into DIR")
    p.add_argument("--json", default=None, metavar="PATH", help="write every run's report as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=_cmd_simulate)
