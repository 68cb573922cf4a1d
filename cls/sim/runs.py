"""Runs behind `clsctl simulate`: one design at one rate, a rate sweep, and what they report.

1. `Workload` makes the arrivals for a rate: an Azure trace rescaled to it (or by a factor), or
   synthetic Poisson/gamma arrivals with fixed, ranged or trace-drawn lengths.
2. `run_once` simulates one design on those arrivals and returns a `RunReport`: the latency
   percentiles (absolute and as slowdowns), the SLO checks, pool moves, utilization and how fast
   the simulation itself ran.
3. `sweep` runs every rate and names the goodput: the highest rate that met every target.
4. `plot` draws the PNGs: latency CDFs of each design, targets met against rate, pool sizes over
   time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cls.sim.design import SimDesignConfig
from cls.sim.report import Reference, SloReport, goodput_rate
from cls.sim.result import SimResult
from cls.sim.simulator import Simulator
from cls.sim.traces import Arrival, LengthSpec, gamma_arrivals, load_azure_trace


@dataclass(frozen=True)
class Workload:
    trace: str | None = None
    """Azure trace CSV; None: synthetic arrivals."""
    duration_s: float | None = None
    limit: int | None = None
    rate_scale: float | None = None
    burstiness: float = 1.0
    prompt_len: LengthSpec = 1024
    output_len: LengthSpec | None = 128
    seed: int = 0

    def arrivals(self, rate: float | None) -> list[Arrival]:
        if self.trace is not None:
            return load_azure_trace(self.trace, limit=self.limit, duration_s=self.duration_s,
                                    rate=rate, rate_scale=self.rate_scale)
        if rate is None or self.duration_s is None:
            raise ValueError("synthetic arrivals need --rate (or --sweep) and --duration")
        arrivals = gamma_arrivals(rate, self.duration_s, self.prompt_len, self.output_len,
                                  self.burstiness, self.seed)
        return arrivals[: self.limit] if self.limit else arrivals


@dataclass
class RunReport:
    design: str
    rate: float | None
    num_requests: int
    result: SimResult = field(repr=False)
    slo: SloReport
    wall_s: float

    @property
    def offered_rate(self) -> float:
        arrivals = [r.arrival_s for r in self.result.requests]
        span = max(arrivals) if arrivals else 0.0
        return (len(arrivals) - 1) / span if span > 0 else float("nan")

    def to_dict(self) -> dict:
        util = list(self.result.utilization().values())
        pools_end = self.result.pool_sizes()[-1][1]
        return {"design": self.design, "rate": self.rate, "offered_rate": self.offered_rate,
                "num_requests": self.num_requests, "wall_s": round(self.wall_s, 3),
                "requests_per_wall_s": round(self.num_requests / max(self.wall_s, 1e-9)),
                **self.result.summary(), "slo": self.slo.to_dict(),
                "utilization": {"mean": float(np.mean(util)) if util else 0.0,
                                "min": float(np.min(util)) if util else 0.0,
                                "max": float(np.max(util)) if util else 0.0},
                "num_pool_moves": len(self.result.pool_events), "pools_at_end": pools_end,
                "pool_moves": [[round(t, 6), m.machine_id, str(m.from_pool), str(m.to_pool)]
                               for t, m in self.result.pool_events],
                "busy_s": {mid: round(b, 6) for mid, b in self.result.busy_s.items()}}


def run_once(cfg: SimDesignConfig, workload: Workload, rate: float | None,
             targets: dict[str, float], progress_for=None) -> RunReport:
    """`progress_for(label, num_arrivals)` may return a callback for the simulator's progress."""
    design, latency = cfg.build()
    reference = Reference(cfg.reference_latency())
    arrivals = workload.arrivals(rate)
    label = cfg.name if rate is None else f"{cfg.name} @ {rate:g} req/s"
    progress = progress_for(label, len(arrivals)) if progress_for else None
    start = time.monotonic()
    result = Simulator(design, latency, seed=workload.seed, keep_token_times=False).run(
        arrivals, progress)
    wall_s = time.monotonic() - start
    return RunReport(cfg.name, rate, len(arrivals), result,
                     SloReport.of(result, reference, targets), wall_s)


def sweep(cfg: SimDesignConfig, workload: Workload, rates: list[float], targets: dict[str, float],
          progress_for=None) -> tuple[list[RunReport], float | None]:
    """Every rate in turn; returns the runs and the goodput rate (None: no rate met the SLOs)."""
    runs = [run_once(cfg, workload, rate, targets, progress_for) for rate in rates]
    return runs, goodput_rate([(r.rate, r.slo) for r in runs])


def plot(designs: dict[str, list[RunReport]], out_dir: str | Path) -> list[Path]:
    """PNGs into out_dir; returns their paths. The CDFs and pool sizes use each design's last run."""
    from cls.sim import plots as report_plots

    out = Path(out_dir)
    last = {name: runs[-1] for name, runs in designs.items() if runs}
    paths = []
    for metric, label in (("ttft", "TTFT"), ("tbt", "TBT (per-request TPOT)"), ("e2e", "E2E")):
        series = {f"{name} @ {_rate_label(run)}": _latencies(run.result, metric)
                  for name, run in last.items()}
        paths.append(report_plots.latency_cdf(series, out / f"{metric}_cdf.png", title=f"{label} CDF",
                                              unit="s"))
    if any(len(runs) > 1 for runs in designs.values()):
        series = {name: ([r.rate for r in runs], [r.slo.num_met / len(r.slo.targets) for r in runs])
                  for name, runs in designs.items()}
        paths.append(report_plots.attainment_vs_rate(
            series, out / "slo_vs_rate.png", title="SLO targets met (of Splitwise's nine) against rate",
            target=1.0))
    for name, run in last.items():
        timeline = run.result.pool_sizes() + [(run.result.end_s, run.result.pool_sizes()[-1][1])]
        series = {pool: ([t for t, _ in timeline], [sizes[pool] for _, sizes in timeline])
                  for pool in ("prompt", "token", "mixed")}
        paths.append(report_plots.step_series(series, out / f"pools_{name}.png",
                                              title=f"pool sizes over time: {name} @ {_rate_label(run)}",
                                              ylabel="machines"))
    return paths


def _latencies(result: SimResult, metric: str) -> list[float]:
    done = result.finished
    if metric == "ttft":
        return [r.ttft_s for r in done]
    if metric == "e2e":
        return [r.e2e_s for r in done]
    return [r.tpot_s for r in done if r.tpot_s is not None]


def _rate_label(run: RunReport) -> str:
    return f"{run.rate:g} req/s" if run.rate is not None else f"{run.offered_rate:.1f} req/s"
