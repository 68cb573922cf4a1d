"""mlsd's Prometheus metrics, on a registry of its own (served by the daemon's metrics port)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


class MlsMetrics:
    def __init__(self, machine_id: str, role: str):
        self.registry = CollectorRegistry()
        r = self.registry
        self.info = Gauge("mlsd_info", "Constant 1, labelled with the machine's identity",
                          ["machine_id", "role"], registry=r)
        self.info.labels(machine_id, role).set(1)
        self.requests = Counter("mlsd_requests", "Requests accepted", ["kind"], registry=r)
        self.queue_len = Gauge("mlsd_queue_length", "Requests waiting", ["queue"], registry=r)
        self.running = Gauge("mlsd_running_requests", "Requests decoding or receiving KV", registry=r)
        self.pending_tokens = Gauge("mlsd_pending_tokens", "JSQ load measure", ["phase"], registry=r)
        self.kv_blocks = Gauge("mlsd_kv_blocks", "KV cache blocks", ["state"], registry=r)
        self.batch_tokens = Histogram("mlsd_batch_size", "Prompt tokens per prefill batch; "
                                      "requests per decode batch", ["phase"],
                                      buckets=_BATCH_BUCKETS, registry=r)
        self.prefill_step = Histogram("mlsd_prefill_step_seconds", "Prefill step latency",
                                      buckets=_STEP_BUCKETS, registry=r)
        self.decode_step = Histogram("mlsd_decode_step_seconds", "Decode step latency",
                                     buckets=_STEP_BUCKETS, registry=r)
        self.transfer_s = Histogram("mlsd_kv_transfer_seconds", "KV reservation to last layer "
                                    "received (token side)", buckets=_STEP_BUCKETS, registry=r)
        self.kv_bytes = Counter("mlsd_kv_received_bytes", "KV bytes received", registry=r)
        self.failed_transfers = Counter("mlsd_kv_failed_transfers", "KV transfers that failed or "
                                        "timed out", registry=r)

    def observe_load(self, load: dict) -> None:
        self.queue_len.labels("prompt").set(load["prompt_queue_len"])
        self.queue_len.labels("decode").set(load["decode_queue_len"])
        self.running.set(load["num_running"])
        self.pending_tokens.labels("prompt").set(load["pending_prompt_tokens"])
        self.pending_tokens.labels("decode").set(load["pending_decode_tokens"])
        self.kv_blocks.labels("used").set(load["kv_blocks_used"])
        self.kv_blocks.labels("free").set(load["kv_blocks_free"])
