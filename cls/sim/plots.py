"""Generic report plots as PNG files: latency CDFs, SLO attainment against rate, time series.

Used by `clsctl bench` (cls/bench/plots.py) and meant for the simulator's reports as well. Every
function is pure apart from writing its file: data in, the PNG's path out; it creates the parent
folder, draws on a figure of its own (matplotlib's object API with the Agg canvas: no pyplot, no
global state, safe in threads) and returns `Path(path)`. matplotlib is imported on the first
call, so importing this module costs nothing.

    latency_cdf({"ttft": [0.12, 0.3, ...]}, "out/ttft_cdf.png", title="TTFT", unit="s")
    attainment_vs_rate({"splitwise": ([1, 2, 4], [1.0, 0.97, 0.6])}, "out/slo.png", target=0.9)
    time_series({"ttft": ([0.0, 0.5, ...], [120.0, 140.0, ...])}, "out/ttft_time.png",
                ylabel="TTFT (ms)")

Series are `{label: data}` mappings, one line per label, in the mapping's order; an empty series
is drawn as nothing (its label stays in the legend), so a plot never fails for lack of data.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path


def _figure(title: str, xlabel: str, ylabel: str):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _save(fig, ax, path: str | Path, legend: bool) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if legend:
        ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def latency_cdf(series: Mapping[str, Sequence[float]], path: str | Path, *, title: str = "Latency CDF",
                unit: str = "ms", slo: float | None = None) -> Path:
    """Empirical CDF of each series of latencies (in `unit`); `slo` draws a vertical target line."""
    fig, ax = _figure(title, f"latency ({unit})", "share of requests")
    for label, values in series.items():
        xs = sorted(values)
        ys = [(i + 1) / len(xs) for i in range(len(xs))]
        ax.step(xs, ys, where="post", label=f"{label} (n={len(xs)})")
    if slo is not None:
        ax.axvline(slo, color="red", linestyle="--", linewidth=1, label=f"SLO {slo:g} {unit}")
    ax.set_ylim(0, 1.02)
    return _save(fig, ax, path, legend=True)


def attainment_vs_rate(series: Mapping[str, tuple[Sequence[float], Sequence[float]]], path: str | Path, *,
                       title: str = "SLO attainment", target: float | None = 0.9) -> Path:
    """SLO attainment (0..1) against request rate (req/s), one line per design or run;
    `target` draws the attainment target (goodput is where a line crosses it)."""
    fig, ax = _figure(title, "request rate (req/s)", "SLO attainment (%)")
    for label, (rates, attainments) in series.items():
        pairs = sorted(zip(rates, attainments))
        ax.plot([r for r, _ in pairs], [100 * a for _, a in pairs], marker="o", label=label)
    if target is not None:
        ax.axhline(100 * target, color="red", linestyle="--", linewidth=1,
                   label=f"target {100 * target:g}%")
    ax.set_ylim(0, 102)
    return _save(fig, ax, path, legend=True)


def time_series(series: Mapping[str, tuple[Sequence[float], Sequence[float]]], path: str | Path, *,
                title: str = "", xlabel: str = "time (s)", ylabel: str = "", marker: str = ".") -> Path:
    """Points (time, value) of each series, drawn as markers (latencies are events, not a curve)."""
    fig, ax = _figure(title, xlabel, ylabel)
    for label, (times, values) in series.items():
        ax.plot(list(times), list(values), linestyle="none", marker=marker, markersize=3, label=label)
    return _save(fig, ax, path, legend=len(series) > 1)


def step_series(series: Mapping[str, tuple[Sequence[float], Sequence[float]]], path: str | Path, *,
                title: str = "", xlabel: str = "time (s)", ylabel: str = "") -> Path:
    """A value that holds until its next change (pool sizes, queue lengths), one line per label."""
    fig, ax = _figure(title, xlabel, ylabel)
    for label, (times, values) in series.items():
        ax.step(list(times), list(values), where="post", label=label)
    return _save(fig, ax, path, legend=True)
