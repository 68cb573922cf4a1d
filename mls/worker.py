"""The engine worker: one thread owns the engine and loops schedule -> engine step -> update.

Every machine takes every kind of work: its configured role is only its home pool, and the
cluster scheduler may lend it to another pool at run time. Life cycle of a request through it:
1. The gRPC service submits a command (`add_prefill`, `add_decode`, `add_generate`, `abort`);
   it runs on the worker thread at the top of the next loop turn and resolves a
   concurrent.futures.Future the service awaits. The engine is only ever touched here.
2. Prefill (prompt work): the PromptScheduler forms FCFS batches under the token cap; the prefill
   exports each layer to the KV sender while later layers compute (layerwise) or after it
   (serialized); the first token resolves the Prefill future, and the blocks are freed at once.
3. AddDecode (token work): the TokenScheduler reserves blocks FCFS (RESERVED event), the KV
   receiver fills them, and a request whose transfer is DONE joins the decode batch; a FAILED
   transfer (peer dead or hung past the deadline) frees the blocks and ends the request FAILED.
4. Generate (colocated work): the MixedScheduler prefills it locally, then it decodes here; with
   `scheduler.mixed_policy: prompt_first` whole prompts run first, with `chunked` every step
   carries the decodes plus prompt chunks under `scheduler.max_num_batched_tokens`.
5. One turn (`_run`) serves all three: admit decodes, one prompt batch, then either the mixed
   plan's prefill and ONE decode call for every request that is decoding, token and mixed alike
   (prompt_first), or ONE mixed step of every decode and the plan's prompt chunks (chunked).
   Token and mixed reservations share one BlockBudget (one KV pool per machine); a prompt batch
   uses the engine's actual free blocks, since its blocks are freed in the same turn.
6. Each turn ends by publishing the turn's tokens and events as one message (`emit`).
7. An idle worker sleeps on its condition variable; a command or a received transfer ending
   (the receiver's `on_ended`) wakes it at once.

Each path's steps are in their own file, mixed into EngineWorker: mls/worker_prompt.py (2),
mls/worker_token.py (3), mls/worker_mixed.py (4); this file holds the loop, the commands and
what every path shares (adding, aborting, failing, publishing).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

from engine.engine import Engine
from engine.sequence import InvalidRequestError, SamplingParams, SeqStatus
from mls.config import MlsConfig
from mls.kv.base import KVReceiver, KVSender
from mls.metrics import MlsMetrics
from mls.policy import BlockBudget, Job, MixedScheduler, PromptScheduler, QueueFull, TokenScheduler
from mls.requests import Aborted, BadRequest, Failed, MlsRequest, Overloaded, resolve
from mls.worker_mixed import ColocatedWork
from mls.worker_prompt import PromptWork
from mls.worker_token import TokenWork

log = logging.getLogger("mlsd.worker")

FINISH_REASONS = {SeqStatus.FINISHED_STOPPED: "stop", SeqStatus.FINISHED_LENGTH: "length"}
# Events published per turn: (tokens [(request_id, index, token_id)], events [(request_id, kind,
# finish_reason, message, num_output_tokens)]).
EmitFn = Callable[[list[tuple], list[tuple]], None]
POLL_S = 0.02  # how often an idle turn looks at transfers in flight (deadlines, finished sends)


class EngineWorker(PromptWork, TokenWork, ColocatedWork):
    def __init__(self, engine: Engine, cfg: MlsConfig, emit: EmitFn, metrics: MlsMetrics,
                 receiver: KVReceiver, sender: KVSender):
        self.engine, self.cfg = engine, cfg
        self._emit, self.metrics = emit, metrics
        self.receiver, self.sender = receiver, sender
        bs, n = engine.kv.block_size, engine.num_blocks
        sc = cfg.scheduler
        budget = BlockBudget(n)  # one KV pool: token and mixed reservations never double-count
        self.prompt_policy = PromptScheduler(sc.prompt_token_cap, sc.max_queue_len)
        self.token_policy = TokenScheduler(n, bs, engine.config.max_num_seqs, sc.max_queue_len,
                                           budget=budget)
        self.mixed_policy = MixedScheduler(n, bs, sc.prompt_token_cap, engine.config.max_num_seqs,
                                           sc.max_queue_len, budget=budget, policy=sc.mixed_policy,
                                           max_num_batched_tokens=sc.max_num_batched_tokens)
        self.requests: dict[str, MlsRequest] = {}
        self._receiving: dict[str, MlsRequest] = {}
        self._sending: dict[str, MlsRequest] = {}
        self._cmds: list[Callable[[], None]] = []
        self._cv = threading.Condition()
        self._kv_ended = False  # a transfer ended: the next turn polls it at once
        self._stop = False
        self._tokens: list[tuple] = []
        self._events: list[tuple] = []
        self.last_turn_s = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="engine-worker", daemon=True)
        if receiver is not None:
            receiver.on_ended = self._transfer_ended

    # -- commands (any thread) ----------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout_s)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def idle(self) -> bool:
        return not self.requests and not self._sending

    def _transfer_ended(self, _request_id: str) -> None:
        with self._cv:
            self._kv_ended = True
            self._cv.notify()

    def submit(self, fn: Callable[..., object], *args) -> Future:
        fut: Future = Future()

        def run() -> None:
            try:
                resolve(fut, fn(*args))
            except Exception as e:  # noqa: BLE001 - every error goes back to the caller
                resolve(fut, error=e)

        with self._cv:
            self._cmds.append(run)
            self._cv.notify()
        return fut

    def add_prefill(self, request_id, prompt, params, kv_address: bytes, timeout_s: float) -> Future:
        result: Future = Future()
        accepted = self.submit(self._add, "prefill", request_id, prompt, params, result,
                               kv_address, timeout_s)
        return _chain(accepted, result)

    def add_decode(self, request_id, prompt, params, timeout_s: float) -> Future:
        result: Future = Future()
        accepted = self.submit(self._add, "decode", request_id, prompt, params, result, b"",
                               timeout_s)
        return _chain(accepted, result)

    def add_generate(self, request_id, prompt, params) -> Future:
        return self.submit(self._add, "generate", request_id, prompt, params, None, b"", 0.0)

    def abort(self, request_id: str) -> Future:
        return self.submit(self._abort, request_id)

    # -- the loop (worker thread) -------------------------------------------------------------

    def _run(self) -> None:
        """The hot loop: one turn serves every kind of work the machine holds."""
        while (cmds := self._wait_for_work()) is not None:
            for cmd in cmds:
                cmd()
            try:
                self._poll_receives()  # KV arrived (joins the decode batch) or failed
                self._poll_sends()
                self._admit_decodes()  # token work: reserve blocks FCFS; the KV may start to arrive
                self._prompt_step()  # prompt work: one batch; its KV leaves, its blocks come back
                if self.mixed_policy.chunked:  # colocated work: decodes + prompt chunks, one step
                    plan = self.mixed_policy.schedule(len(self.token_policy.ready))
                    decoding = [*self.token_policy.ready, *plan.decode]
                    self._mixed_step([self.requests[i] for i in decoding], plan.chunks)
                else:  # colocated work: prompts first
                    plan = self.mixed_policy.schedule()
                    if plan.prefill:
                        self._local_prefill([self.requests[j.request_id] for j in plan.prefill])
                    decoding = [*self.token_policy.ready, *plan.decode]  # ONE decode call for all
                    self._decode_step([self.requests[i] for i in decoding])
            except Exception:  # a bug must not kill the machine silently
                log.exception("engine step failed; failing the requests of this step")
                self._fail_all_running("internal error in the engine step")
            self._publish()
            self.last_turn_s = time.monotonic()

    def _wait_for_work(self) -> list[Callable[[], None]] | None:
        """The commands to run this turn, once there is something to do; None to stop."""
        with self._cv:
            while not (self._cmds or self._stop or self._kv_ended or self._runnable()):
                # A received transfer that ends wakes this at once (on_ended); transfers in flight
                # are still looked at every POLL_S for deadlines and finished sends.
                busy = self._receiving or self._sending
                self._cv.wait(POLL_S if busy else 1.0)
                if busy:
                    break
                self.last_turn_s = time.monotonic()
            cmds, self._cmds, self._kv_ended = self._cmds, [], False
            return None if self._stop else cmds

    def _runnable(self) -> bool:
        """Whether a turn would do engine work now. Work waiting for memory waits for the turn or
        the command that frees it, rather than spinning."""
        tp, mp = self.token_policy, self.mixed_policy
        return (bool(tp.ready) or bool(mp.running) or tp.can_admit() or mp.can_start()
                or self.prompt_policy.can_start(self.engine.num_free_blocks, self.engine.kv.block_size))

    # -- adding and aborting ------------------------------------------------------------------

    def _add(self, kind, request_id, prompt, params: SamplingParams, result, kv_address,
             timeout_s) -> None:
        if request_id in self.requests or request_id in self._sending:
            raise BadRequest(f"duplicate request id {request_id!r}")
        try:
            seq = self.engine.add_request(request_id, prompt, params)
        except InvalidRequestError as e:
            raise BadRequest(str(e)) from None
        job = Job(request_id, seq.prompt_len, self.engine.max_tokens_total(seq) - seq.prompt_len,
                  time.monotonic())
        policy = {"prefill": self.prompt_policy, "decode": self.token_policy,
                  "generate": self.mixed_policy}[kind]
        if kind == "prefill" and -(-seq.prompt_len // self.engine.kv.block_size) > self.engine.num_blocks:
            raise Overloaded(f"prompt of {seq.prompt_len} tokens exceeds this machine's KV memory")
        try:
            policy.add(job)
        except QueueFull as e:
            raise Overloaded(str(e)) from None
        except ValueError as e:  # larger than the machine's whole KV memory
            raise Overloaded(str(e)) from None
        req = MlsRequest(seq, job, kind, future=result, kv_address=kv_address,
                         timeout_s=timeout_s or self.cfg.kv_transfer.timeout_s)
        self.requests[request_id] = req
        self.metrics.requests.labels(kind).inc()
        if kind == "decode":
            self._admit_decodes()
            if request_id not in self._receiving and result is not None:
                resolve(result, False)  # queued for memory; RESERVED follows on the stream

    def _abort(self, request_id: str) -> bool:
        req = self.requests.pop(request_id, None) or self._sending.pop(request_id, None)
        if req is None:
            raise BadRequest(f"unknown request id {request_id!r}")
        if req.handle is not None:
            req.handle.abort("aborted by the cluster scheduler")
        self._drop(req)
        if req.future is not None:
            resolve(req.future, error=Aborted(f"request {request_id!r} aborted"))
        self._events.append((request_id, "ABORTED", "", "", len(req.seq.output_token_ids)))
        return True

    def _drop(self, req: MlsRequest) -> None:
        """Frees everything a request holds here: queue slot, reservation, transfer, blocks."""
        rid = req.request_id
        for policy in (self.prompt_policy, self.token_policy, self.mixed_policy):
            if hasattr(policy, "release"):
                policy.release(rid)
            else:
                policy.remove(rid)
        if self._receiving.pop(rid, None) is not None and self.receiver is not None:
            self.receiver.cancel(rid)
        self.engine.abort(req.seq)

    def _after_tokens(self, reqs: list[MlsRequest], indices: list[int], publish: bool = True) -> None:
        """Publishes each request's newest token (at `indices`) and retires finished ones."""
        for i, r in enumerate(reqs):
            policy = self.token_policy if r.kind == "decode" else self.mixed_policy
            if publish:
                self._tokens.append((r.request_id, indices[i], r.seq.output_token_ids[indices[i]]))
            policy.token_generated(r.request_id)
            if r.seq.finished:
                policy.release(r.request_id)
                del self.requests[r.request_id]
                self._events.append((r.request_id, "FINISHED", FINISH_REASONS[r.seq.status], "",
                                     len(r.seq.output_token_ids)))

    # -- failures and publishing --------------------------------------------------------------

    def _fail(self, req: MlsRequest, message: str) -> None:
        self.requests.pop(req.request_id, None)
        self._drop(req)
        req.seq.status, req.seq.error = SeqStatus.FINISHED_ERROR, message
        if req.future is not None:
            resolve(req.future, error=Failed(message))
        self._events.append((req.request_id, "FAILED", "", message, len(req.seq.output_token_ids)))
        log.warning("request %s failed: %s", req.request_id, message)

    def _fail_all_running(self, message: str) -> None:
        for r in list(self.requests.values()):
            if (r.seq.status == SeqStatus.RUNNING or r.kind == "prefill"
                    or r.request_id in self.mixed_policy.prefilling):  # mid-prompt (chunked)
                self._fail(r, message)

    def _publish(self) -> None:
        if self._tokens or self._events:
            tokens, events, self._tokens, self._events = self._tokens, self._events, [], []
            self._emit(tokens, events)
        self.metrics.observe_load(self.load())

    def load(self) -> dict:
        """A snapshot for the load report (read from any thread: plain ints, possibly a turn old)."""
        tp, mp = self.token_policy, self.mixed_policy
        return dict(
            prompt_queue_len=len(self.prompt_policy.queue) + len(mp.queue) + len(mp.prefilling),
            pending_prompt_tokens=self.prompt_policy.pending_tokens + mp.pending_prompt_tokens,
            decode_queue_len=len(tp.queue),
            num_running=len(tp.ready) + len(tp.receiving) + len(mp.running) + len(mp.prefilling),
            pending_decode_tokens=tp.pending_tokens + mp.pending_decode_tokens,
            kv_blocks_used=self.engine.num_blocks - self.engine.num_free_blocks,
            kv_blocks_free=self.engine.num_free_blocks,
        )


def _chain(accepted: Future, result: Future) -> Future:
    """A future that fails if the command failed, else follows `result`."""
    def on_accepted(f: Future) -> None:
        if not f.cancelled() and f.exception() is not None:
            resolve(result, error=f.exception())
    accepted.add_done_callback(on_accepted)
    return result
