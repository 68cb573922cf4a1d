"""The engine worker: one thread owns the engine and loops plan -> run -> update -> publish.

Every machine takes every kind of work (`WorkKind`: prompt, token, mixed): its configured role is
only its home pool, and the cluster scheduler may lend it to another pool at run time. Life cycle
of a request through it:
1. The gRPC service submits a command (`add_prefill`, `add_decode`, `add_generate`, `abort`); it
   runs on the worker thread at the top of the next turn and resolves a concurrent.futures.Future
   the service awaits. The engine is only ever touched on this thread.
2. `add` makes the request's one record (`MachineRequest`: status, kind, sequence, RPC state) and
   queues its job with the `MachineScheduler` (mls/policy/machine.py).
3. A turn (`turn`): the runner polls transfers in flight (KV arrived or failed; sends done); the
   scheduler plans (`plan`: token admissions, a prompt batch, the mixed prefill or chunks, the
   decodes); the runner executes the plan on the engine (mls/runner.py); the scheduler and the
   records take the result (`update`): tokens out, finished and failed requests ended.
4. The turn ends by publishing its tokens and events as one `TurnOutput` (`emit`).
5. An idle worker sleeps on its condition variable; a command or a received transfer ending (the
   receiver's `on_ended`) wakes it at once.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

from engine.backend import EngineBackend
from engine.sequence import InvalidRequestError, SamplingParams, SeqStatus
from mls.config import MlsConfig
from mls.errors import Aborted, BadRequest, Failed, Overloaded, resolve
from mls.events import EventKind, RequestEvent, TokenOut, TurnOutput
from mls.kv.base import KVReceiver, KVSender
from mls.metrics import MlsMetrics
from mls.policy import Job, MachineScheduler, QueueFull, TurnPlan, TurnResult, WorkKind
from mls.request import MachineRequest, RequestStatus
from mls.runner import EngineRunner

log = logging.getLogger("mlsd.worker")

FINISHED = {SeqStatus.FINISHED_STOPPED: ("stop", RequestStatus.FINISHED_STOPPED),
            SeqStatus.FINISHED_LENGTH: ("length", RequestStatus.FINISHED_LENGTH)}
EmitFn = Callable[[TurnOutput], None]
POLL_S = 0.02  # how often an idle turn looks at transfers in flight (deadlines, finished sends)
_IN_FLIGHT = (RequestStatus.RECEIVING_KV, RequestStatus.SENDING_KV)


class EngineWorker:
    def __init__(self, engine: EngineBackend, cfg: MlsConfig, emit: EmitFn, metrics: MlsMetrics,
                 receiver: KVReceiver, sender: KVSender):
        self.engine, self.cfg = engine, cfg
        self._emit, self.metrics = emit, metrics
        self.receiver = receiver
        sc = cfg.scheduler
        self.scheduler = MachineScheduler(
            engine.num_blocks, engine.block_size, prompt_token_cap=sc.prompt_token_cap,
            max_num_seqs=engine.max_num_seqs, max_queue_len=sc.max_queue_len,
            mixed_policy=sc.mixed_policy, max_num_batched_tokens=sc.max_num_batched_tokens)
        self.runner = EngineRunner(engine, cfg, metrics, receiver, sender)
        self.requests: dict[str, MachineRequest] = {}
        """Every request this machine holds, in any status but ended: the one record of each."""
        self.on_plan: Callable[[TurnPlan], None] | None = None
        """Sees every plan (tests compare them with the simulator's)."""
        self._cmds: list[Callable[[], None]] = []
        self._cv = threading.Condition()
        self._kv_ended = False  # a transfer ended: the next turn polls it at once
        self._stop = False
        self._out = TurnOutput()
        self._new_token_work: list[MachineRequest] = []  # added this turn: AddDecode's answer
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
        return not self.requests

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
        """Prompt work; the future resolves to a PrefillResult once the prefill ran."""
        result: Future = Future()
        accepted = self.submit(self._add, WorkKind.PROMPT, request_id, prompt, params, result,
                               kv_address, timeout_s)
        return _chain(accepted, result)

    def add_decode(self, request_id, prompt, params, timeout_s: float) -> Future:
        """Token work; the future resolves to whether its blocks are reserved now (if not, a
        RESERVED event follows once they are)."""
        result: Future = Future()
        accepted = self.submit(self._add, WorkKind.TOKEN, request_id, prompt, params, result, b"",
                               timeout_s)
        return _chain(accepted, result)

    def add_generate(self, request_id, prompt, params) -> Future:
        """Mixed work; the future resolves once it is queued."""
        return self.submit(self._add, WorkKind.MIXED, request_id, prompt, params, None, b"", 0.0)

    def abort(self, request_id: str) -> Future:
        return self.submit(self._abort, request_id)

    def abort_all(self, reason: str) -> Future:
        """Aborts every request this machine holds (their clsd is gone); resolves to how many."""
        return self.submit(self._abort_all, reason)

    def check_kv_address(self, kv_address: bytes) -> None:
        """Raises BadRequest if a Prefill's kv_address cannot be a receiver of this transport."""
        try:
            self.runner.sender.check_address(kv_address)
        except ValueError as e:
            raise BadRequest(str(e)) from None

    # -- the loop (worker thread) -------------------------------------------------------------

    def _run(self) -> None:
        while (cmds := self._wait_for_work()) is not None:
            self.turn(cmds)

    def turn(self, cmds: list[Callable[[], None]] | None = None) -> TurnPlan | None:
        """One turn: the commands, then plan -> run -> update, then publish. Returns the plan
        (None if the turn failed before planning). Worker thread only (or a test driving turns
        by hand on a worker it did not start)."""
        if cmds is None:
            with self._cv:
                cmds, self._cmds = self._cmds, []
        for cmd in cmds:
            cmd()
        plan, res = None, TurnResult()
        try:
            self._update(self.runner.poll_transfers(self.requests))
            plan = self.scheduler.plan(self.engine.num_free_blocks)
            if self.on_plan is not None:
                self.on_plan(plan)
            self._answer_token_work(plan)
            self.runner.run(plan, self.requests, res)
            self._update(res)
        except Exception:  # a bug must not kill the machine silently
            log.exception("engine turn failed; failing the requests of this turn")
            try:
                self._update(res)  # what happened before the failure (reservations, tokens)
            finally:
                self._fail_all_running("internal error in the engine step")
        self._publish()
        self.last_turn_s = time.monotonic()
        return plan

    def _wait_for_work(self) -> list[Callable[[], None]] | None:
        """The commands to run this turn, once there is something to do; None to stop."""
        with self._cv:
            while not (self._cmds or self._stop or self._kv_ended
                       or self.scheduler.runnable(self.engine.num_free_blocks)):
                # A received transfer that ends wakes this at once (on_ended); transfers in flight
                # are still looked at every POLL_S for deadlines and finished sends.
                busy = any(r.status in _IN_FLIGHT for r in self.requests.values())
                self._cv.wait(POLL_S if busy else 1.0)
                if busy:
                    break
                self.last_turn_s = time.monotonic()
            cmds, self._cmds, self._kv_ended = self._cmds, [], False
            return None if self._stop else cmds

    def _answer_token_work(self, plan: TurnPlan) -> None:
        """AddDecode answers "not reserved yet" for token work this plan did not admit (the
        admitted ones are answered by the runner once their blocks are held)."""
        admitted = {j.request_id for j in plan.admitted}
        for r in self._new_token_work:
            if r.request_id not in admitted and r.future is not None:
                resolve(r.future, False)
        self._new_token_work.clear()

    def _update(self, res: TurnResult) -> None:
        """The scheduler and the records take a result; its tokens and events go out."""
        self.scheduler.update(res)
        out = self._out
        for rid in res.reserved:
            out.events.append(RequestEvent(rid, EventKind.RESERVED))
        for rid in res.generated:
            tokens = self.requests[rid].seq.output_token_ids
            out.tokens.append(TokenOut(rid, len(tokens) - 1, tokens[-1]))
        for rid in res.finished:
            r = self.requests.pop(rid)
            reason, r.status = FINISHED[r.seq.status]
            out.events.append(RequestEvent(rid, EventKind.FINISHED, finish_reason=reason,
                                           num_output_tokens=len(r.seq.output_token_ids)))
        for rid in res.failed:
            self._fail(self.requests[rid], res.errors[rid])
        for rid in res.sent:  # prompt work: the KV has left; nothing of it is held here
            self.requests.pop(rid)

    # -- adding, aborting, failing ---------------------------------------------------------------

    def _add(self, kind: WorkKind, request_id, prompt, params: SamplingParams, result, kv_address,
             timeout_s) -> None:
        if request_id in self.requests:
            raise BadRequest(f"duplicate request id {request_id!r}")
        try:
            seq = self.engine.add_request(request_id, prompt, params)
        except InvalidRequestError as e:
            raise BadRequest(str(e)) from None
        job = Job(request_id, seq.prompt_len, self.engine.max_tokens_total(seq) - seq.prompt_len,
                  time.monotonic())
        try:
            self.scheduler.add(kind, job)
        except (QueueFull, ValueError) as e:  # a full queue, or more than the whole KV memory
            raise Overloaded(str(e)) from None
        req = MachineRequest(seq, job, kind, future=result, kv_address=kv_address,
                             timeout_s=timeout_s or self.cfg.kv_transfer.timeout_s)
        self.requests[request_id] = req
        self.metrics.requests.labels(kind.label).inc()
        if kind is WorkKind.TOKEN:
            self._new_token_work.append(req)

    def _abort(self, request_id: str) -> bool:
        req = self.requests.pop(request_id, None)
        if req is None:
            raise BadRequest(f"unknown request id {request_id!r}")
        self._drop(req)
        req.status = RequestStatus.FINISHED_ABORTED
        if req.future is not None:
            resolve(req.future, error=Aborted(f"request {request_id!r} aborted"))
        self._out.events.append(RequestEvent(request_id, EventKind.ABORTED,
                                             num_output_tokens=len(req.seq.output_token_ids)))
        return True

    def _abort_all(self, reason: str) -> int:
        ids = list(self.requests)
        for rid in ids:
            self._abort(rid)
        if ids:
            log.warning("aborted %d requests: %s", len(ids), reason)
        return len(ids)

    def _drop(self, req: MachineRequest) -> None:
        """Frees everything a request holds here: queue slot, reservation, transfer, blocks."""
        if req.handle is not None:
            req.handle.abort("aborted by the cluster scheduler")
        self.scheduler.release(req.request_id)
        if req.status == RequestStatus.RECEIVING_KV and self.receiver is not None:
            self.receiver.cancel(req.request_id)
        self.engine.abort(req.seq)

    def _fail(self, req: MachineRequest, message: str) -> None:
        self.requests.pop(req.request_id, None)
        self._drop(req)
        req.status = RequestStatus.FINISHED_FAILED
        req.seq.status, req.seq.error = SeqStatus.FINISHED_ERROR, message
        if req.future is not None:
            resolve(req.future, error=Failed(message))
        self._out.events.append(RequestEvent(req.request_id, EventKind.FAILED, message=message,
                                             num_output_tokens=len(req.seq.output_token_ids)))
        log.warning("request %s failed: %s", req.request_id, message)

    def _fail_all_running(self, message: str) -> None:
        """After a failed engine call: every request the turn may have touched fails (decoding,
        mid-prompt, or prompt work not yet sent)."""
        for r in list(self.requests.values()):
            if (r.status in (RequestStatus.RUNNING, RequestStatus.PREFILLING)
                    or (r.kind is WorkKind.PROMPT and r.status == RequestStatus.QUEUED)):
                self._fail(r, message)

    # -- publishing -----------------------------------------------------------------------------

    def _publish(self) -> None:
        if self._out:
            out, self._out = self._out, TurnOutput()
            self._emit(out)
        self.metrics.observe_load(self.load())

    def load(self) -> dict:
        """A snapshot for the load report (read from any thread: plain ints, possibly a turn old)."""
        free = self.engine.num_free_blocks
        return dict(dataclasses.asdict(self.scheduler.load()),
                    kv_blocks_used=self.engine.num_blocks - free, kv_blocks_free=free)


def _chain(accepted: Future, result: Future) -> Future:
    """A future that fails if the command failed, else follows `result`."""
    def on_accepted(f: Future) -> None:
        if not f.cancelled() and f.exception() is not None:
            resolve(result, error=f.exception())
    accepted.add_done_callback(on_accepted)
    return result
