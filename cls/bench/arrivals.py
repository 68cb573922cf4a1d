"""When each benchmark request is sent (pure, seeded).

As `vllm bench serve` does: the gaps between requests are gamma-distributed with shape
`burstiness` and mean 1 / rate. Burstiness 1 is a Poisson process; below 1 the arrivals come in
bursts, above 1 they are more even. Rate `inf` sends everything at once. The first request goes
at time 0.

A sweep replays one pattern at several rates: `unit_gaps` are drawn once (mean 1 s) and
`offsets_s` divides them by each rate, so every rate sees the same shape of traffic.
"""

from __future__ import annotations

import math
import random


def unit_gaps(num_requests: int, burstiness: float, seed: int) -> list[float]:
    """`num_requests - 1` gaps with mean 1: gamma(shape=burstiness, scale=1/burstiness)."""
    if num_requests < 0:
        raise ValueError(f"num_requests must be >= 0, got {num_requests}")
    if not (burstiness > 0 and math.isfinite(burstiness)):
        raise ValueError(f"burstiness must be a finite number > 0, got {burstiness}")
    rng = random.Random(seed)
    return [rng.gammavariate(burstiness, 1.0 / burstiness) for _ in range(max(0, num_requests - 1))]


def offsets_s(gaps: list[float], rate: float) -> list[float]:
    """Send times in seconds from the start (len(gaps) + 1 of them) at `rate` requests/s."""
    if not rate > 0:
        raise ValueError(f"request rate must be > 0 (or inf), got {rate}")
    if math.isinf(rate):
        return [0.0] * (len(gaps) + 1)
    out, t = [0.0], 0.0
    for g in gaps:
        t += g / rate
        out.append(t)
    return out


def arrival_offsets_s(num_requests: int, rate: float, burstiness: float = 1.0,
                      seed: int = 0) -> list[float]:
    """Send times of `num_requests` requests at `rate` requests/s (see the module docstring)."""
    return offsets_s(unit_gaps(num_requests, burstiness, seed), rate) if num_requests else []
