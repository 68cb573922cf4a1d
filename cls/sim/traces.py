"""Arrivals for the simulator: Azure LLM inference traces and synthetic Poisson traffic (pure).

An `Arrival` is a request as the cluster sees it: when it comes (seconds from the trace's start),
how long its prompt is, and how many tokens it generates. Traces are read from where they lie
(../shared/traces/...); nothing is copied into the project.
"""

from __future__ import annotations

import csv
import random
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")


class TraceError(ValueError):
    """A trace that cannot be read; the message names the file, line and column."""


@dataclass(frozen=True)
class Arrival:
    arrival_s: float
    prompt_len: int
    output_len: int


def _parse_timestamp(text: str) -> float:
    """'2023-11-16 18:17:03.9799600' -> POSIX seconds. The fraction may have any number of
    digits (Azure's have 7, more than strptime's %f takes)."""
    base, _, frac = text.strip().partition(".")
    seconds = datetime.strptime(base, "%Y-%m-%d %H:%M:%S").timestamp()
    if frac:
        if not frac.isdigit():
            raise ValueError(f"bad fraction of a second {frac!r}")
        seconds += int(frac) / 10 ** len(frac)
    return seconds


def load_azure_trace(path: str | Path, limit: int | None = None, duration_s: float | None = None,
                     rate: float | None = None, rate_scale: float | None = None) -> list[Arrival]:
    """Reads an Azure trace CSV (TIMESTAMP, ContextTokens, GeneratedTokens).

    Arrival times are seconds from the first row. `limit` keeps the first rows only; `rate`
    (requests/s) scales every inter-arrival gap so the trace's mean rate becomes `rate`, or
    `rate_scale` multiplies the trace's own rate (2: twice as many requests per second);
    `duration_s` then keeps the arrivals before that time. A request that generates 0 tokens
    is counted as generating 1 (the prefill always produces the first token).
    """
    path = Path(path)
    if limit is not None and limit < 1:
        raise TraceError(f"limit must be >= 1, got {limit}")
    if rate is not None and not rate > 0:
        raise TraceError(f"rate must be > 0 requests/s, got {rate}")
    if rate_scale is not None and not rate_scale > 0:
        raise TraceError(f"rate_scale must be > 0, got {rate_scale}")
    if rate is not None and rate_scale is not None:
        raise TraceError("give rate or rate_scale, not both")
    try:
        f = open(path, newline="")
    except OSError as e:
        raise TraceError(f"cannot read trace {path}: {e.strerror}") from None
    times: list[float] = []
    lengths: list[tuple[int, int]] = []
    with f:
        reader = csv.DictReader(f)
        missing = [c for c in AZURE_COLUMNS if c not in (reader.fieldnames or ())]
        if missing:
            raise TraceError(f"trace {path} lacks column(s) {', '.join(missing)}; it has: "
                             f"{', '.join(reader.fieldnames or ()) or 'no header'}")
        for line, row in enumerate(reader, start=2):
            if limit is not None and len(times) >= limit:
                break
            for column in AZURE_COLUMNS:
                value = row[column]
                try:
                    parsed = _parse_timestamp(value) if column == "TIMESTAMP" else int(value)
                except (TypeError, ValueError):
                    raise TraceError(f"trace {path} line {line}: column {column} has a missing "
                                     f"or malformed value {value!r}") from None
                if column == "TIMESTAMP":
                    times.append(parsed)
                elif parsed < 0:
                    raise TraceError(f"trace {path} line {line}: column {column} must be >= 0, "
                                     f"got {parsed}")
            lengths.append((max(1, int(row["ContextTokens"])), max(1, int(row["GeneratedTokens"]))))
    if not times:
        raise TraceError(f"trace {path} has no rows")
    start = times[0]
    offsets = [t - start for t in times]
    if any(b < a for a, b in zip(offsets, offsets[1:])):
        raise TraceError(f"trace {path}: TIMESTAMP is not in non-decreasing order")
    if rate is not None and len(offsets) > 1 and offsets[-1] > 0:
        scale = (len(offsets) - 1) / offsets[-1] / rate  # trace's mean rate / target rate
        offsets = [t * scale for t in offsets]
    elif rate_scale is not None:
        offsets = [t / rate_scale for t in offsets]
    arrivals = [Arrival(t, p, o) for t, (p, o) in zip(offsets, lengths)]
    if duration_s is not None:
        arrivals = [a for a in arrivals if a.arrival_s < duration_s]
    return arrivals


LengthSpec = int | tuple[int, int] | list[tuple[int, int]]
"""A fixed count, an inclusive (low, high) range drawn uniformly, or (prompt, output) pairs to
draw from (e.g. a trace's lengths, `trace_lengths`)."""


def poisson_arrivals(rate: float, duration_s: float, prompt_len: int | tuple[int, int],
                     output_len: int | tuple[int, int], seed: int = 0) -> list[Arrival]:
    """Poisson arrivals at `rate` requests/s for `duration_s` seconds. A length is a fixed
    count or an inclusive (low, high) range drawn uniformly. The same seed gives the same list."""
    return gamma_arrivals(rate, duration_s, prompt_len, output_len, burstiness=1.0, seed=seed)


def gamma_arrivals(rate: float, duration_s: float, prompt_len: LengthSpec,
                   output_len: LengthSpec | None, burstiness: float = 1.0,
                   seed: int = 0) -> list[Arrival]:
    """Arrivals at mean `rate` requests/s with gamma inter-arrival gaps of shape `burstiness`
    (1: Poisson; below 1 burstier, above 1 more regular, as vLLM's benchmark defines it). When
    `prompt_len` is a list of (prompt, output) pairs, each request draws one pair and
    `output_len` must be None. The same seed gives the same list."""
    if not rate > 0 or not duration_s > 0:
        raise ValueError(f"rate and duration_s must be > 0, got {rate}, {duration_s}")
    if not burstiness > 0:
        raise ValueError(f"burstiness must be > 0, got {burstiness}")
    pairs = isinstance(prompt_len, list)
    if pairs and (not prompt_len or output_len is not None):
        raise ValueError("length pairs need a non-empty list and no separate output_len")
    rng = random.Random(seed)

    def draw(spec: int | tuple[int, int]) -> int:
        return rng.randint(*spec) if isinstance(spec, tuple) else spec

    def gap() -> float:
        return rng.gammavariate(burstiness, 1.0 / (rate * burstiness))

    arrivals, t = [], gap()
    while t < duration_s:
        p, o = rng.choice(prompt_len) if pairs else (draw(prompt_len), draw(output_len))
        arrivals.append(Arrival(t, p, o))
        t += gap()
    return arrivals


def trace_lengths(path: str | Path, limit: int | None = None) -> list[tuple[int, int]]:
    """The (prompt, output) lengths of a trace's requests, for synthetic arrivals."""
    return [(a.prompt_len, a.output_len) for a in load_azure_trace(path, limit=limit)]
