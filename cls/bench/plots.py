"""The PNGs of a bench run (or sweep), drawn with cls/sim/plots.py.

Files in the plot folder:
- `ttft_cdf.png`, `tpot_cdf.png`, `itl_cdf.png`, `e2el_cdf.png`: latency CDFs in ms, one line
  per run (per rate in a sweep), with the SLO line where one is set;
- `ttft_over_time.png`: each request's TTFT at its send time; `tbt_over_time.png`: each gap
  between output chunks at the time it ended (s from the run's start);
- `slo_attainment.png` (sweeps with SLOs): attainment against rate, with the target.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from cls.bench.metrics import request_tpot_s
from cls.bench.outputs import RequestOutput
from cls.sim import plots as report_plots


def write_plots(runs: Mapping[str, Sequence[RequestOutput]], plot_dir: str | Path, *,
                slo_ms: Mapping[str, float] | None = None,
                sweep: tuple[Sequence[float], Sequence[float]] | None = None,
                attainment_target: float = 0.9) -> list[Path]:
    """Writes the plots of `runs` ({label: results}) into `plot_dir`; returns their paths.
    `sweep` is (rates, attainments) of a rate sweep."""
    plot_dir = Path(plot_dir)
    slo_ms = slo_ms or {}
    ok = {label: [o for o in outs if o.success] for label, outs in runs.items()}
    values = {
        "ttft": {k: [o.ttft_s * 1e3 for o in v] for k, v in ok.items()},
        "tpot": {k: [request_tpot_s(o) * 1e3 for o in v if o.output_len > 1] for k, v in ok.items()},
        "itl": {k: [g * 1e3 for o in v for g in o.itl_s] for k, v in ok.items()},
        "e2el": {k: [o.latency_s * 1e3 for o in v] for k, v in ok.items()},
    }
    titles = {"ttft": "Time to first token", "tpot": "Time per output token",
              "itl": "Inter-token latency", "e2el": "End-to-end latency"}
    paths = [report_plots.latency_cdf(series, plot_dir / f"{name}_cdf.png",
                                      title=f"{titles[name]} (CDF)", slo=slo_ms.get(name))
             for name, series in values.items()]
    ttft_time = {k: ([o.start_s for o in v], [o.ttft_s * 1e3 for o in v]) for k, v in ok.items()}
    paths.append(report_plots.time_series(ttft_time, plot_dir / "ttft_over_time.png",
                                          title="TTFT over time", xlabel="send time (s)",
                                          ylabel="TTFT (ms)"))
    tbt_time = {}
    for label, outs in ok.items():
        times, gaps = [], []
        for o in outs:
            times += o.token_times_s()[1:]
            gaps += [g * 1e3 for g in o.itl_s]
        tbt_time[label] = (times, gaps)
    paths.append(report_plots.time_series(tbt_time, plot_dir / "tbt_over_time.png",
                                          title="Time between tokens over time",
                                          xlabel="token time (s)", ylabel="TBT (ms)"))
    if sweep is not None:
        paths.append(report_plots.attainment_vs_rate({"clsctl bench": sweep},
                                                     plot_dir / "slo_attainment.png",
                                                     title="SLO attainment against request rate",
                                                     target=attainment_target))
    return paths
