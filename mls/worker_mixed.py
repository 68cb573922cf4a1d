"""Colocated work (Generate) of the engine worker (mls/worker.py): a prompt prefilled here and
decoded here, either whole prompts first (`scheduler.mixed_policy: prompt_first`) or as chunks
that share one engine step with every decode (`chunked`).

A mixin of EngineWorker: it uses the worker's engine, cfg, metrics and policies, and runs only
on the worker thread."""

from __future__ import annotations

import time

from engine.kv_cache import KVCacheExhausted
from mls.policy.mixed import PromptChunk
from mls.requests import MlsRequest


class ColocatedWork:
    """See the module docstring."""

    def _local_prefill(self, reqs: list[MlsRequest]) -> None:
        ok = []
        for r in reqs:
            try:
                self.engine.reserve(r.seq)
            except KVCacheExhausted as e:  # the budget mirrors the pool: this is a bug
                self._fail(r, f"KV reservation failed: {e}")
                continue
            ok.append(r)
        if ok:
            self._run_prefill(ok, hook=None)
            self._after_tokens(ok, [0] * len(ok))

    def _mixed_step(self, decoding: list[MlsRequest], chunks: list[PromptChunk]) -> None:
        """Chunked prefill: every decode and the plan's prompt chunks in ONE engine step. A
        request's blocks (prompt + max_tokens) are reserved with its first chunk, as the policy
        took them from the budget; its first token comes with its last chunk."""
        now = time.monotonic()
        work: list[tuple[MlsRequest, int]] = []
        for c in chunks:
            r = self.requests[c.job.request_id]
            if c.start == 0:
                try:
                    self.engine.reserve(r.seq)
                except KVCacheExhausted as e:  # the budget mirrors the pool: this is a bug
                    self._fail(r, f"KV reservation failed: {e}")
                    continue
                r.prefill_start_s = now
            work.append((r, c.num_tokens))
        if not decoding and not work:
            return
        out = self.engine.step([r.seq for r in decoding], [(r.seq, n) for r, n in work],
                               max_num_tokens=self.cfg.scheduler.max_num_batched_tokens)
        elapsed_s = time.monotonic() - now
        # The step's latency is what its decodes see as TBT and what its chunks add to TTFT.
        num_chunk_tokens = sum(n for _, n in work)
        if decoding:
            self.metrics.decode_step.observe(elapsed_s)
            self.metrics.batch_tokens.labels("decode").observe(len(decoding))
        if work:
            self.metrics.prefill_step.observe(elapsed_s)
            self.metrics.batch_tokens.labels("prefill").observe(num_chunk_tokens)
        self.metrics.batch_tokens.labels("mixed").observe(len(decoding) + num_chunk_tokens)
        self._after_tokens(decoding, [len(r.seq.output_token_ids) - 1 for r in decoding])
        first = [r for (r, _), tok in zip(work, out[len(decoding):]) if tok is not None]
        self._after_tokens(first, [0] * len(first))

