"""SLO reports for simulated runs: slowdowns against an uncontended reference machine, Splitwise's
nine percentile targets, and goodput from a rate sweep (pure: results in, numbers out).

1. `Reference` gives, per request, its latency alone on the reference machine (Splitwise: one
   uncontended request on a DGX-A100): TTFT = one prefill of its prompt; TBT = one batch-1 decode
   step at its mean context; E2E = TTFT + (output - 1) x TBT. No KV transfer: it is colocated.
2. `slowdowns` divides each finished request's TTFT, TPOT (its mean time between tokens) and E2E
   by its reference.
3. `SloReport` takes the P50/P90/P99 of each slowdown and checks them against the targets
   (default: TTFT 2x/3x/6x, TBT and E2E 1.25x/1.5x/5x); a run meets its SLOs when all hold.
4. `goodput_rate` is the highest swept rate whose run met every target.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from cls.sim.result import SimResult
from engine.modelled import LatencyModel

METRICS = ("ttft", "tbt", "e2e")
PERCENTILES = (50, 90, 99)
SPLITWISE_SLO = {
    "ttft_p50": 2.0, "ttft_p90": 3.0, "ttft_p99": 6.0,
    "tbt_p50": 1.25, "tbt_p90": 1.5, "tbt_p99": 5.0,
    "e2e_p50": 1.25, "e2e_p90": 1.5, "e2e_p99": 5.0,
}


class SloError(ValueError):
    """A malformed SLO specification; the message names the key."""


def parse_slo(spec: str | None) -> dict[str, float]:
    """'ttft_p99=4,tbt_p50=1.5' -> Splitwise's targets with those replaced. Keys are
    METRIC_pP for METRIC in ttft/tbt/e2e and P in 50/90/99; values are slowdowns > 0."""
    targets = dict(SPLITWISE_SLO)
    if not spec:
        return targets
    for item in spec.split(","):
        key, sep, value = item.strip().partition("=")
        if not sep:
            raise SloError(f"SLO item {item!r} is not KEY=SLOWDOWN (e.g. ttft_p99=6)")
        if key not in SPLITWISE_SLO:
            raise SloError(f"unknown SLO key {key!r}; keys are {', '.join(SPLITWISE_SLO)}")
        try:
            targets[key] = float(value)
        except ValueError:
            raise SloError(f"SLO {key}: {value!r} is not a number") from None
        if not targets[key] > 0:
            raise SloError(f"SLO {key} must be > 0, got {value}")
    return targets


class Reference:
    """Uncontended latencies on the reference machine, cached per request shape."""

    def __init__(self, latency: LatencyModel):
        self.latency = latency
        self.ttft_s = functools.lru_cache(maxsize=1 << 16)(self._ttft_s)
        self.tbt_s = functools.lru_cache(maxsize=1 << 16)(self._tbt_s)

    def _ttft_s(self, prompt_len: int) -> float:
        return self.latency.prefill_s(prompt_len, 1)

    def _tbt_s(self, prompt_len: int, output_len: int) -> float:
        return self.latency.decode_s(1, prompt_len + output_len // 2)

    def e2e_s(self, prompt_len: int, output_len: int) -> float:
        return self.ttft_s(prompt_len) + (output_len - 1) * self.tbt_s(prompt_len, output_len)


def slowdowns(result: SimResult, reference: Reference) -> dict[str, np.ndarray]:
    """Per finished request: TTFT, TBT (TPOT; requests of two or more tokens) and E2E slowdowns."""
    ttft, tbt, e2e = [], [], []
    for r in result.finished:
        ttft.append(r.ttft_s / reference.ttft_s(r.prompt_len))
        e2e.append(r.e2e_s / reference.e2e_s(r.prompt_len, r.output_len))
        if r.tpot_s is not None:
            tbt.append(r.tpot_s / reference.tbt_s(r.prompt_len, r.output_len))
    return {"ttft": np.array(ttft), "tbt": np.array(tbt), "e2e": np.array(e2e)}


@dataclass(frozen=True)
class SloReport:
    values: dict[str, float]
    """'ttft_p50' -> that percentile of the TTFT slowdown (NaN when no request finished)."""
    targets: dict[str, float]

    @classmethod
    def of(cls, result: SimResult, reference: Reference, targets: dict[str, float]) -> SloReport:
        sd = slowdowns(result, reference)
        values = {}
        for metric in METRICS:
            for p in PERCENTILES:
                v = sd[metric]
                values[f"{metric}_p{p}"] = float(np.percentile(v, p)) if len(v) else float("nan")
        return cls(values, dict(targets))

    @property
    def met(self) -> dict[str, bool]:
        # NaN (nothing finished) never meets a target.
        return {k: bool(self.values[k] <= t) for k, t in self.targets.items()}

    @property
    def num_met(self) -> int:
        return sum(self.met.values())

    @property
    def all_met(self) -> bool:
        return all(self.met.values())

    @property
    def worst_ratio(self) -> float:
        """max(value / target): <= 1 when every target holds; how far the run is from them."""
        return max(self.values[k] / t for k, t in self.targets.items())

    def to_dict(self) -> dict:
        return {"slowdown": self.values, "targets": self.targets, "met": self.met,
                "num_met": self.num_met, "all_met": self.all_met}


def goodput_rate(points: list[tuple[float, SloReport]]) -> float | None:
    """The highest rate whose report met every target; None when none did."""
    met = [rate for rate, report in points if report.all_met]
    return max(met) if met else None
