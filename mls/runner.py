"""The engine runner: executes one `TurnPlan` on an engine backend and says what came of it.

It is the only code of mlsd that calls the engine and the KV endpoints (the worker holds the loop,
the scheduler the choices). Life cycle of a turn here, in the plan's order:
1. `poll_transfers` (before the plan): a received KV whose last layer arrived joins the decodes
   (`kv_ready`, the prompt machine's first token included); a failed or late one fails the
   request; a finished send is forgotten, a failed one fails the request (FAILED event: clsd
   re-routes at once instead of the token machine waiting out its start window).
2. Token work admitted: its blocks are reserved and the receiver told to expect the KV
   (RESERVED event; the AddDecode reply says "reserved now").
3. Prompt work: one prefill; each layer's K/V goes to the KV sender while later layers compute
   (layerwise) or after the prefill (serialized); the first token answers the Prefill RPC, and
   the blocks are freed at once: the KV now lives on the wire.
4. Mixed work: prompt_first runs the plan's prefill (blocks reserved for prompt + max output),
   then ONE decode call for every decode, token and mixed work alike; chunked runs ONE engine
   step of every decode plus the plan's prompt chunks.
5. The result: which requests got a token, which finished, which failed (with why). Tokens made
   here are read from each request's sequence.
"""

from __future__ import annotations

import logging
import time

from engine.backend import EngineBackend
from engine.kv_cache import KVCacheExhausted
from mls.config import MlsConfig
from mls.errors import resolve
from mls.kv.base import KVReceiver, KVSender, TransferState
from mls.kv.sink import EngineSink, kv_spec_for
from mls.metrics import MlsMetrics
from mls.policy import TurnPlan, TurnResult
from mls.request import MachineRequest, PrefillResult, RequestStatus

log = logging.getLogger("mlsd.runner")


class EngineRunner:
    def __init__(self, engine: EngineBackend, cfg: MlsConfig, metrics: MlsMetrics,
                 receiver: KVReceiver, sender: KVSender):
        self.engine, self.cfg, self.metrics = engine, cfg, metrics
        self.receiver, self.sender = receiver, sender

    # -- transfers (1) ----------------------------------------------------------------------------

    def poll_transfers(self, requests: dict[str, MachineRequest]) -> TurnResult:
        res = TurnResult()
        for r in list(requests.values()):
            if r.status == RequestStatus.RECEIVING_KV:
                self._poll_receive(r, res)
            elif r.status == RequestStatus.SENDING_KV:
                state = r.handle.wait(0)
                if state == TransferState.DONE:
                    res.sent.append(r.request_id)
                elif state == TransferState.FAILED:  # reported: clsd re-routes at once rather
                    self.metrics.failed_transfers.inc()  # than after the token side's window
                    _fail(res, r, f"KV send to the token machine failed: {r.handle.error}")
        return res

    def _poll_receive(self, r: MachineRequest, res: TurnResult) -> None:
        st = self.receiver.poll(r.request_id)
        if st.state == TransferState.DONE:
            self.receiver.cancel(r.request_id)  # forget the finished transfer (no-op on its bytes)
            self.metrics.transfer_s.observe(time.monotonic() - r.transfer_start_s)
            self.metrics.kv_bytes.inc(r.seq.prompt_len * self.engine.kv_bytes_per_token)
            self.engine.finish_import(r.seq, st.first_token_id)
            r.status = RequestStatus.RUNNING
            res.kv_ready.append(r.request_id)
            if r.seq.finished:  # the first token ends it (max_tokens 1, or a stop token)
                res.finished.append(r.request_id)
        elif st.state == TransferState.FAILED:
            self.metrics.failed_transfers.inc()
            _fail(res, r, f"KV transfer failed: {st.error}")

    # -- the plan (2-5) -----------------------------------------------------------------------------

    def run(self, plan: TurnPlan, requests: dict[str, MachineRequest], res: TurnResult) -> None:
        """Executes `plan`, recording into `res` as it goes (so a failed engine call leaves what
        happened before it in `res`)."""
        for job in plan.admitted:
            self._reserve_for_kv(requests[job.request_id], res)
        if plan.prompt_batch:
            self._prompt_batch([requests[j.request_id] for j in plan.prompt_batch], res)
        decoding = [requests[rid] for rid in plan.decode]
        if plan.chunked:
            self._mixed_step(decoding, [(requests[c.job.request_id], c.start, c.num_tokens)
                                        for c in plan.chunks], res)
        else:
            if plan.prefill:
                self._local_prefill([requests[j.request_id] for j in plan.prefill], res)
            if decoding:
                self._decode(decoding, res)

    def _reserve_for_kv(self, r: MachineRequest, res: TurnResult) -> None:
        try:
            self.engine.reserve(r.seq)
        except KVCacheExhausted as e:  # the scheduler's budget mirrors the pool: this is a bug
            _fail(res, r, f"KV reservation failed: {e}")
            return
        # Start window: the prefill may queue on the prompt machine first; transfer window: from
        # the sender's first contact to the last layer.
        self.receiver.expect(kv_spec_for(self.engine, r.seq), EngineSink(self.engine, r.seq),
                             time.monotonic() + self.cfg.kv_transfer.start_timeout_s,
                             transfer_window_s=r.timeout_s)
        r.status = RequestStatus.RECEIVING_KV
        r.transfer_start_s = time.monotonic()
        res.reserved.append(r.request_id)
        if r.future is not None:
            resolve(r.future, True)

    def _prompt_batch(self, reqs: list[MachineRequest], res: TurnResult) -> None:
        opened = []
        for r in reqs:
            try:  # the address was checked at the RPC; a failure here is this request's alone
                r.handle = self.sender.open(r.kv_address, kv_spec_for(self.engine, r.seq),
                                            time.monotonic() + r.timeout_s)
            except (ValueError, RuntimeError) as e:
                self.metrics.failed_transfers.inc()
                _fail(res, r, f"KV send to the token machine could not start: {e}")
                continue
            r.layerwise = r.seq.prompt_len >= self.cfg.kv_transfer.layerwise_min_prompt_tokens
            opened.append(r)
        reqs = opened
        if not reqs:
            return
        by_id = {r.request_id: r for r in reqs}

        def export(layer: int, items) -> None:
            for seq, kv in items:
                r = by_id[seq.request_id]
                if r.layerwise:
                    r.handle.send_layer(layer, kv)
                else:
                    r.buffered.append((layer, kv))

        tokens = self._prefill(reqs, hook=export)
        for r, tok in zip(reqs, tokens):
            for layer, kv in r.buffered:
                r.handle.send_layer(layer, kv)
            r.buffered.clear()
            r.handle.finish(tok)
            self.engine.free(r.seq)  # the KV now lives in the sender's queue and on the wire
            r.status = RequestStatus.SENDING_KV
            now = time.monotonic()
            resolve(r.future, PrefillResult(tok, "layerwise" if r.layerwise else "serialized",
                                            queue_s=r.prefill_start_s - r.arrival_s,
                                            prefill_s=now - r.prefill_start_s))

    def _prefill(self, reqs: list[MachineRequest], hook) -> list[int]:
        start = time.monotonic()
        for r in reqs:
            r.prefill_start_s = start
        tokens = self.engine.prefill([r.seq for r in reqs], kv_export=hook)
        self.metrics.prefill_step.observe(time.monotonic() - start)
        self.metrics.batch_tokens.labels("prefill").observe(sum(r.seq.prompt_len for r in reqs))
        return tokens

    def _local_prefill(self, reqs: list[MachineRequest], res: TurnResult) -> None:
        ok = []
        for r in reqs:
            try:
                self.engine.reserve(r.seq)
            except KVCacheExhausted as e:  # the budget mirrors the pool: this is a bug
                _fail(res, r, f"KV reservation failed: {e}")
                continue
            ok.append(r)
        if ok:
            self._prefill(ok, hook=None)
            _tokens_made(res, ok)

    def _decode(self, reqs: list[MachineRequest], res: TurnResult) -> None:
        start = time.monotonic()
        self.engine.decode([r.seq for r in reqs])
        self.metrics.decode_step.observe(time.monotonic() - start)
        self.metrics.batch_tokens.labels("decode").observe(len(reqs))
        _tokens_made(res, reqs)

    def _mixed_step(self, decoding: list[MachineRequest],
                    chunks: list[tuple[MachineRequest, int, int]], res: TurnResult) -> None:
        """Chunked prefill: every decode and the plan's prompt chunks in ONE engine step. A
        request's blocks (prompt + max_tokens) are reserved with its first chunk, as the scheduler
        took them from the budget; its first token comes with its last chunk."""
        now = time.monotonic()
        work: list[tuple[MachineRequest, int]] = []
        for r, start, num_tokens in chunks:
            if start == 0:
                try:
                    self.engine.reserve(r.seq)
                except KVCacheExhausted as e:  # the budget mirrors the pool: this is a bug
                    _fail(res, r, f"KV reservation failed: {e}")
                    continue
                r.prefill_start_s = now
                r.status = RequestStatus.PREFILLING
            work.append((r, num_tokens))
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
        _tokens_made(res, decoding)
        _tokens_made(res, [r for (r, _), tok in zip(work, out[len(decoding):]) if tok is not None])


def _tokens_made(res: TurnResult, reqs: list[MachineRequest]) -> None:
    """Each of `reqs` has a new last output token; the finished ones end."""
    for r in reqs:
        res.generated.append(r.request_id)
        if r.seq.finished:
            res.finished.append(r.request_id)
        else:
            r.status = RequestStatus.RUNNING


def _fail(res: TurnResult, r: MachineRequest, message: str) -> None:
    res.failed.append(r.request_id)
    res.errors[r.request_id] = message
