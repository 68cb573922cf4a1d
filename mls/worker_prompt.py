"""Prompt work (Prefill) of the engine worker (mls/worker.py): FCFS batches under the token cap,
each layer's KV handed to the sender while later layers compute (layerwise) or after the prefill
(serialized), the first token resolving the Prefill, the blocks freed in the same turn.

A mixin of EngineWorker: it uses the worker's engine, cfg, metrics, policies and request maps,
and runs only on the worker thread."""

from __future__ import annotations

import logging
import time

from mls.kv.base import TransferState
from mls.kv.sink import kv_spec_for
from mls.requests import MlsRequest, PrefillResult, resolve

log = logging.getLogger("mlsd.worker")


class PromptWork:
    """See the module docstring."""

    def _prompt_step(self) -> None:
        batch = self.prompt_policy.schedule(self.engine.num_free_blocks, self.engine.kv.block_size)
        if batch is None:
            return
        reqs = [self.requests.pop(j.request_id) for j in batch.jobs]
        for r in reqs:
            r.handle = self.sender.open(r.kv_address, kv_spec_for(self.engine, r.seq),
                                        time.monotonic() + r.timeout_s)
            r.layerwise = r.seq.prompt_len >= self.cfg.kv_transfer.layerwise_min_prompt_tokens
            self._sending[r.request_id] = r
        by_id = {r.request_id: r for r in reqs}

        def export(layer: int, items) -> None:
            for seq, kv in items:
                r = by_id[seq.request_id]
                if r.layerwise:
                    r.handle.send_layer(layer, kv)
                else:
                    r.buffered.append((layer, kv))

        tokens = self._run_prefill(reqs, hook=export)
        for r, tok in zip(reqs, tokens):
            for layer, kv in r.buffered:
                r.handle.send_layer(layer, kv)
            r.buffered.clear()
            r.handle.finish(tok)
            self.engine.free(r.seq)  # the KV now lives in the sender's queue and on the wire
            now = time.monotonic()
            resolve(r.future, PrefillResult(tok, "layerwise" if r.layerwise else "serialized",
                                              queue_s=r.prefill_start_s - r.arrival_s,
                                              prefill_s=now - r.prefill_start_s))

    def _run_prefill(self, reqs: list[MlsRequest], hook) -> list[int]:
        start = time.monotonic()
        for r in reqs:
            r.prefill_start_s = start
        tokens = self.engine.prefill([r.seq for r in reqs], kv_export=hook)
        self.metrics.prefill_step.observe(time.monotonic() - start)
        self.metrics.batch_tokens.labels("prefill").observe(sum(r.seq.prompt_len for r in reqs))
        return tokens


    def _poll_sends(self) -> None:
        """Forgets finished sends (their blocks were freed when the prefill ended)."""
        for rid, r in list(self._sending.items()):
            state = r.handle.wait(0)
            if state in (TransferState.DONE, TransferState.FAILED):
                del self._sending[rid]
                if state == TransferState.FAILED:
                    self.metrics.failed_transfers.inc()
                    log.warning("KV send of %s failed: %s", rid, r.handle.error)

