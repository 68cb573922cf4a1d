"""The end-of-run summary in `vllm bench serve`'s layout, and the result JSON with its key names.

Summary: a 50-wide `=` title line, `label:` left-aligned in 40 columns and the value after it,
then one `-` headed block per selected latency metric (mean, median, each percentile), and a
closing `=` line. JSON: vLLM's keys (duration, completed, total_input_tokens, ...,
mean_ttft_ms, median_ttft_ms, std_ttft_ms, p99_ttft_ms, ... for ttft, tpot, itl and e2el; the
per-request lists input_lens, output_lens, ttfts, itls, generated_texts, errors; times in the
lists in seconds as vLLM writes them), plus `failed` and the run's settings.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from cls.bench.metrics import BenchmarkMetrics, percentile_word
from cls.bench.outputs import RequestOutput

WIDTH = 50
HEADERS = {"ttft": ("TTFT", "Time to First Token"),
           "tpot": ("TPOT", "Time per Output Token (excl. 1st token)"),
           "itl": ("ITL", "Inter-token Latency"),
           "e2el": ("E2EL", "End-to-end Latency")}


def _row(label: str, value, fmt: str = "") -> str:
    return f"{label:<40} {value:<10{fmt}}".rstrip()


def format_summary(m: BenchmarkMetrics, duration_s: float, *, request_rate: float,
                   max_concurrency: int | None, selected: Sequence[str],
                   title: str = " Serving Benchmark Result ") -> str:
    lines = [f"{title:=^{WIDTH}}",
             _row("Successful requests:", m.completed),
             _row("Failed requests:", m.failed)]
    if max_concurrency is not None:
        lines.append(_row("Maximum request concurrency:", max_concurrency))
    if not math.isinf(request_rate):
        lines.append(_row("Request rate configured (RPS):", request_rate, ".2f"))
    lines += [_row("Benchmark duration (s):", duration_s, ".2f"),
              _row("Total input tokens:", m.total_input),
              _row("Total generated tokens:", m.total_output),
              _row("Request throughput (req/s):", m.request_throughput, ".2f")]
    if m.request_goodput is not None:
        lines.append(_row("Request goodput (req/s):", m.request_goodput, ".2f"))
        lines.append(_row("SLO attainment (%):", 100 * m.slo_attainment, ".2f"))
    lines += [_row("Output token throughput (tok/s):", m.output_throughput, ".2f"),
              _row("Total Token throughput (tok/s):", m.total_token_throughput, ".2f")]
    for name in selected:
        short, header = HEADERS[name]
        s = m.stats[name]
        lines += [f"{header:-^{WIDTH}}",
                  _row(f"Mean {short} (ms):", s.mean_ms, ".2f"),
                  _row(f"Median {short} (ms):", s.median_ms, ".2f")]
        lines += [_row(f"P{percentile_word(p)} {short} (ms):", v, ".2f") for p, v in s.percentiles_ms]
    lines.append("=" * WIDTH)
    return "\n".join(lines)


def format_sweep(rates: Sequence[float], results: Sequence[BenchmarkMetrics], slo_ms: Mapping[str, float],
                 goodput_rate: float | None, target: float) -> str:
    """The table of a rate sweep: attainment and goodput at each rate, then the goodput rate."""
    slo = " ".join(f"{k}:{v:g}" for k, v in slo_ms.items())
    lines = [f"{' SLO Sweep Result ':=^{WIDTH}}", _row("SLOs (ms):", slo),
             f"{'rate (req/s)':>14} {'attainment (%)':>16} {'goodput (req/s)':>17}"]
    lines += [f"{r:>14.2f} {100 * m.slo_attainment:>16.2f} {m.request_goodput:>17.2f}"
              for r, m in zip(rates, results)]
    best = "none (the lowest rate misses)" if goodput_rate is None else f"{goodput_rate:.2f}"
    lines += [_row(f"Goodput (req/s, >= {100 * target:g}% attainment):", best), "=" * WIDTH]
    return "\n".join(lines)


def result_json(m: BenchmarkMetrics, outputs: Sequence[RequestOutput], duration_s: float,
                settings: Mapping) -> dict:
    """The run as vLLM's result file holds it (see the module docstring)."""
    result = dict(settings)
    result.update({
        "duration": duration_s, "completed": m.completed, "failed": m.failed,
        "total_input_tokens": m.total_input, "total_output_tokens": m.total_output,
        "request_throughput": m.request_throughput, "request_goodput": m.request_goodput,
        "slo_attainment": m.slo_attainment, "output_throughput": m.output_throughput,
        "total_token_throughput": m.total_token_throughput,
        "input_lens": [o.prompt_len for o in outputs],
        "output_lens": [o.output_len if o.success else 0 for o in outputs],
        "ttfts": [o.ttft_s if o.success else 0.0 for o in outputs],
        "itls": [list(o.itl_s) if o.success else [] for o in outputs],
        "generated_texts": [o.generated_text for o in outputs],
        "errors": [o.error for o in outputs],
    })
    for name, s in m.stats.items():
        result[f"mean_{name}_ms"] = s.mean_ms
        result[f"median_{name}_ms"] = s.median_ms
        result[f"std_{name}_ms"] = s.std_ms
        for p, v in s.percentiles_ms:
            result[f"p{percentile_word(p)}_{name}_ms"] = v
    return result
