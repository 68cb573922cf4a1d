"""Token work (AddDecode) of the engine worker (mls/worker.py): blocks reserved FCFS while memory
allows (RESERVED event), the receiver filling them, a request whose transfer is DONE joining the
decode batch and a FAILED one ending FAILED with its blocks freed; one decode call per turn.

A mixin of EngineWorker: it uses the worker's engine, cfg, metrics, policies, receiver and
request maps, and runs only on the worker thread."""

from __future__ import annotations

import time

from engine.kv_cache import KVCacheExhausted
from mls.kv.base import TransferState
from mls.kv.sink import EngineSink, kv_spec_for
from mls.requests import MlsRequest, resolve


class TokenWork:
    """See the module docstring."""

    def _admit_decodes(self) -> None:
        plan = self.token_policy.schedule()
        for job in plan.admitted:
            r = self.requests[job.request_id]
            try:
                self.engine.reserve(r.seq)
            except KVCacheExhausted as e:  # the policy mirrors the pool: this is a bug
                self._fail(r, f"KV reservation failed: {e}")
                continue
            # Start window: the prefill may queue on the prompt machine first; transfer window:
            # from the sender's first contact to the last layer.
            self.receiver.expect(kv_spec_for(self.engine, r.seq), EngineSink(self.engine, r.seq),
                                 time.monotonic() + self.cfg.kv_transfer.start_timeout_s,
                                 transfer_window_s=r.timeout_s)
            self._receiving[r.request_id] = r
            r.transfer_start_s = time.monotonic()
            self._events.append((r.request_id, "RESERVED", "", "", 0))
            if r.future is not None:
                resolve(r.future, True)


    def _poll_receives(self) -> None:
        """KV arrived (the request joins the decode batch) or its transfer failed."""
        for rid, r in list(self._receiving.items()):
            st = self.receiver.poll(rid)
            if st.state == TransferState.DONE:
                del self._receiving[rid]
                self.receiver.cancel(rid)  # forget the finished transfer (no-op on its bytes)
                self.metrics.transfer_s.observe(time.monotonic() - r.transfer_start_s)
                self.metrics.kv_bytes.inc(r.seq.prompt_len * self.engine.model_config.kv_bytes_per_token(
                    self.engine.kv.tensor.element_size()))
                self.engine.finish_import(r.seq, st.first_token_id)
                self.token_policy.kv_ready(rid)
                self._after_tokens([r], [], publish=False)
            elif st.state == TransferState.FAILED:
                self.metrics.failed_transfers.inc()
                self._fail(r, f"KV transfer failed: {st.error}")

    def _decode_step(self, reqs: list[MlsRequest]) -> None:
        if not reqs:
            return
        start = time.monotonic()
        self.engine.decode([r.seq for r in reqs])
        self.metrics.decode_step.observe(time.monotonic() - start)
        self.metrics.batch_tokens.labels("decode").observe(len(reqs))
        self._after_tokens(reqs, [len(r.seq.output_token_ids) - 1 for r in reqs])

