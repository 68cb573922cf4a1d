"""What a simulated run produces: one record per request and the run's result (pure).

`RequestRecord` keeps a request's first and last token times, count and largest gap (every
token's time only when asked: memory at scale); `SimResult` holds them all, the global list of
token gaps, pool moves and per-machine busy time, and derives percentiles, utilization, pool
sizes over time and a summary.
"""

from __future__ import annotations

import statistics
from array import array
from dataclasses import dataclass

import numpy as np

from cls.pools import PoolMove
from proto.roles import Role


@dataclass(slots=True)
class RequestRecord:
    request_id: str
    arrival_s: float
    prompt_len: int
    output_len: int
    prompt_machine: str = ""
    token_machine: str = ""
    num_blocks: int = 0
    colocated: bool = False
    token_times_s: list[float] | None = None
    """Every token's time; kept only when the simulator is asked to (memory at scale)."""
    first_token_s: float | None = None
    last_token_s: float | None = None
    num_tokens: int = 0
    max_tbt_s: float = 0.0
    finish_s: float | None = None

    @property
    def ttft_s(self) -> float:
        return self.first_token_s - self.arrival_s

    @property
    def tbts_s(self) -> list[float]:
        if self.token_times_s is None:
            raise ValueError("token times were not kept (Simulator(keep_token_times=True))")
        t = self.token_times_s
        return [b - a for a, b in zip(t, t[1:])]

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first; None for a one-token request."""
        if self.num_tokens < 2:
            return None
        return (self.last_token_s - self.first_token_s) / (self.num_tokens - 1)

    @property
    def e2e_s(self) -> float:
        return self.finish_s - self.arrival_s


def percentile(values, p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); NaN for no values."""
    if len(values) == 0:
        return float("nan")
    return float(np.percentile(np.asarray(values, dtype=np.float64), p))


@dataclass
class SimResult:
    requests: list[RequestRecord]
    rejected: list[str]
    pool_events: list[tuple[float, PoolMove]]
    """Every pool move in time order: borrows into the mixed pool and returns home."""
    end_s: float
    tbt_gaps_s: array
    """Every gap between two consecutive tokens of one request, of all requests."""
    busy_s: dict[str, float]
    """Per machine, the virtual seconds it spent running steps."""
    initial_roles: dict[str, Role]

    @property
    def borrow_events(self) -> list[tuple[float, PoolMove]]:
        return [(t, m) for t, m in self.pool_events if m.to_pool == Role.MIXED]

    @property
    def finished(self) -> list[RequestRecord]:
        return [r for r in self.requests if r.finish_s is not None]

    def ttft_s(self, p: float) -> float:
        return percentile([r.ttft_s for r in self.finished], p)

    def tbt_s(self, p: float) -> float:
        return percentile(np.frombuffer(self.tbt_gaps_s, dtype=np.float64), p)

    def e2e_s(self, p: float) -> float:
        return percentile([r.e2e_s for r in self.finished], p)

    def utilization(self) -> dict[str, float]:
        """Per machine, the share of the run's virtual time it was busy."""
        return {mid: (b / self.end_s if self.end_s > 0 else 0.0) for mid, b in self.busy_s.items()}

    def pool_sizes(self) -> list[tuple[float, dict[str, int]]]:
        """(time, machines per pool) at the start and after every pool move."""
        roles = dict(self.initial_roles)

        def count() -> dict[str, int]:
            out = {str(p): 0 for p in Role}
            for role in roles.values():
                out[str(role)] += 1
            return out

        timeline = [(0.0, count())]
        for t, move in self.pool_events:
            roles[move.machine_id] = move.to_pool
            timeline.append((t, count()))
        return timeline

    def summary(self) -> dict[str, float]:
        out: dict[str, float] = {"num_finished": len(self.finished), "num_rejected": len(self.rejected),
                                 "num_borrows": len(self.borrow_events), "end_s": self.end_s}
        for p in (50, 90, 99):
            out[f"ttft_p{p}_s"], out[f"tbt_p{p}_s"] = self.ttft_s(p), self.tbt_s(p)
            out[f"e2e_p{p}_s"] = self.e2e_s(p)
        if self.finished:
            out["mean_tbt_s"] = float(np.mean(self.tbt_gaps_s)) if len(self.tbt_gaps_s) else 0.0
        util = list(self.utilization().values())
        if util:
            out["mean_utilization"] = statistics.fmean(util)
        return out
