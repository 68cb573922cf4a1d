"""clsd's Prometheus metrics, on a registry of its own (served by the daemon's metrics port)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from cls.pools import Pools
from proto.roles import Role

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TBT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class ClsMetrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.ttft = Histogram("clsd_ttft_seconds", "Arrival to the first token leaving clsd",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tbt = Histogram("clsd_tbt_seconds", "Gap between consecutive tokens of a request",
                             buckets=_TBT_BUCKETS, registry=r)
        self.e2e = Histogram("clsd_e2e_seconds", "Arrival to the last token",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.requests = Counter("clsd_requests", "Requests by outcome", ["outcome"], registry=r)
        self.routed = Counter("clsd_routed_requests", "Routing decisions", ["kind"], registry=r)
        self.reroutes = Counter("clsd_reroutes", "Re-prefills after a machine failure", registry=r)
        self.pool_events = Counter("clsd_pool_events", "Machines borrowed into the mixed pool and "
                                   "returned home", ["event"], registry=r)
        self.pool_size = Gauge("clsd_pool_size", "Machines per current pool", ["pool"], registry=r)
        self.pending = Gauge("clsd_pending_tokens", "Pending tokens per pool (JSQ measure)", ["pool"],
                             registry=r)
        self.inflight = Gauge("clsd_inflight_requests", "Requests in flight", registry=r)
        self.machines = Gauge("clsd_machines", "Registered machines", registry=r)
        self.inflight_bound = Gauge("clsd_inflight_bound", "Requests clsd admits at once: what the "
                                    "registered machines hold, at most limits.max_inflight_requests",
                                    registry=r)
        self.tokenizer_queue = Gauge("clsd_tokenizer_queue", "Long prompts waiting for or being "
                                     "tokenized", registry=r)
        self._seen = {"borrow": 0, "return": 0}

    def observe_pools(self, pools: Pools) -> None:
        for pool in Role:
            members = pools.members(pool)
            self.pool_size.labels(pool.value).set(len(members))
            self.pending.labels(pool.value).set(
                sum(m.pending_prompt_tokens + m.pending_decode_tokens for m in members))
        self.machines.set(len(pools.machines))
        for event, total in (("borrow", pools.num_borrowed), ("return", pools.num_returned)):
            self.pool_events.labels(event).inc(total - self._seen[event])
            self._seen[event] = total
