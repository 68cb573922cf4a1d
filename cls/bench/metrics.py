"""Benchmark figures from per-request results (pure: results in, numbers out).

Definitions (DESIGN.md section 2 and `vllm bench serve`):
- TTFT: send -> first output chunk. E2EL: send -> last output chunk.
- TPOT of a request: (E2EL - TTFT) / (output tokens - 1), i.e. (last token time - first token
  time) / (tokens - 1); a one-token request has none (it counts as 0 ms for its SLO check, and is
  left out of the TPOT statistics).
- ITL: every gap between consecutive chunks, pooled over all requests.
- Statistics in ms: mean, median, population std and linear-interpolated percentiles (numpy's
  defaults, as vLLM); an empty list gives 0.
- A request meets the SLOs when it succeeded and each given target (ms) holds for it
  (`value <= target`). Goodput (req/s) = such requests / duration; SLO attainment = such requests
  / all requests (failures included).
- Goodput rate of a sweep: the highest tested rate at which attainment stays >= the target at
  that rate and every lower tested rate (DESIGN.md: "stays >= the target").
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from cls.bench.outputs import RequestOutput

PERCENTILE_METRICS = ("ttft", "tpot", "itl", "e2el")
SLO_METRICS = ("ttft", "tpot", "e2el")
DEFAULT_ATTAINMENT_TARGET = 0.9


def parse_goodput(items: Iterable[str]) -> dict[str, float]:
    """["ttft:500", "tpot:50"] -> {"ttft": 500.0, "tpot": 50.0} (ms); ValueError names the item."""
    slo: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition(":")
        if not sep or name not in SLO_METRICS:
            raise ValueError(f"goodput item {item!r} must be NAME:MS with NAME one of "
                             f"{', '.join(SLO_METRICS)}")
        try:
            target = float(value)
        except ValueError:
            raise ValueError(f"goodput item {item!r}: {value!r} is not a number of ms") from None
        if not target > 0 or target == float("inf"):
            raise ValueError(f"goodput item {item!r}: the target must be a finite number of ms > 0")
        if name in slo:
            raise ValueError(f"goodput metric {name} is given twice")
        slo[name] = target
    return slo


def parse_percentile_metrics(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    bad = [n for n in names if n not in PERCENTILE_METRICS]
    if bad or not names:
        raise ValueError(f"percentile metrics {text!r}: choose from {','.join(PERCENTILE_METRICS)}")
    return names


def parse_percentiles(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise ValueError(f"metric percentiles {text!r} must be numbers like 50,90,99") from None
    if not values or any(not 0 <= p <= 100 for p in values):
        raise ValueError(f"metric percentiles {text!r} must be in [0, 100]")
    return values


def percentile_word(p: float) -> str:
    """99 -> '99', 99.9 -> '99.9' (the suffix of vLLM's p<word>_<metric>_ms keys)."""
    return str(int(p)) if int(p) == p else str(p)


def request_tpot_s(o: RequestOutput) -> float:
    return (o.latency_s - o.ttft_s) / (o.output_len - 1) if o.output_len > 1 else 0.0


def request_values_ms(o: RequestOutput) -> dict[str, float]:
    return {"ttft": o.ttft_s * 1e3, "tpot": request_tpot_s(o) * 1e3, "e2el": o.latency_s * 1e3}


def meets_slo(o: RequestOutput, slo_ms: Mapping[str, float]) -> bool:
    if not o.success:
        return False
    values = request_values_ms(o)
    return all(values[name] <= target for name, target in slo_ms.items())


def slo_attainment(outputs: Sequence[RequestOutput], slo_ms: Mapping[str, float]) -> float:
    """Share of all requests (failures included) that meet every target; 0 for no requests."""
    return sum(meets_slo(o, slo_ms) for o in outputs) / len(outputs) if outputs else 0.0


def goodput_rate(rates: Sequence[float], attainments: Sequence[float],
                 target: float = DEFAULT_ATTAINMENT_TARGET) -> float | None:
    """Highest rate whose attainment, and that of every lower rate, is >= target; None if the
    lowest rate already misses."""
    best = None
    for rate, att in sorted(zip(rates, attainments)):
        if att < target:
            break
        best = rate
    return best


@dataclass(frozen=True)
class MetricStats:
    mean_ms: float
    median_ms: float
    std_ms: float
    percentiles_ms: tuple[tuple[float, float], ...]   # (p, value)


def metric_stats(values_s: Sequence[float], percentiles: Sequence[float]) -> MetricStats:
    a = np.asarray(values_s if len(values_s) else [0.0], dtype=float) * 1e3
    return MetricStats(float(a.mean()), float(np.median(a)), float(a.std()),
                       tuple((p, float(np.percentile(a, p))) for p in percentiles))


@dataclass(frozen=True)
class BenchmarkMetrics:
    completed: int
    failed: int
    total_input: int
    total_output: int
    request_throughput: float
    request_goodput: float | None       # None without SLOs
    slo_attainment: float | None        # None without SLOs
    output_throughput: float
    total_token_throughput: float
    stats: dict[str, MetricStats]        # by PERCENTILE_METRICS name


def compute_metrics(outputs: Sequence[RequestOutput], duration_s: float,
                    slo_ms: Mapping[str, float] | None = None,
                    percentiles: Sequence[float] = (99,)) -> BenchmarkMetrics:
    ok = [o for o in outputs if o.success]
    total_input = sum(o.prompt_len for o in ok)
    total_output = sum(o.output_len for o in ok)
    series = {"ttft": [o.ttft_s for o in ok],
              "tpot": [request_tpot_s(o) for o in ok if o.output_len > 1],
              "itl": [gap for o in ok for gap in o.itl_s],
              "e2el": [o.latency_s for o in ok]}
    dur = duration_s if duration_s > 0 else float("inf")
    good = sum(meets_slo(o, slo_ms) for o in ok) if slo_ms else None
    return BenchmarkMetrics(
        completed=len(ok), failed=len(outputs) - len(ok), total_input=total_input,
        total_output=total_output, request_throughput=len(ok) / dur,
        request_goodput=None if good is None else good / dur,
        slo_attainment=None if good is None else (good / len(outputs) if outputs else 0.0),
        output_throughput=total_output / dur, total_token_throughput=(total_input + total_output) / dur,
        stats={name: metric_stats(values, percentiles) for name, values in series.items()})
