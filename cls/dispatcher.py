"""One request's journey through the cluster, driven by clsd (routing, RPCs, re-routing).

1. `Dispatcher.run(req)` is an async generator the client stream reads: it yields lists of new
   tokens (each output index exactly once, in order) and returns when the request finishes.
2. An attempt: the router picks (prompt, token) machines; clsd sends AddDecode to the token
   machine and Prefill to the prompt machine (naming the token machine's KV address) in the same
   turn when the router sees the token machine's memory free (its KV receiver holds a sender
   that comes before the reservation); otherwise it waits for RESERVED before the Prefill, so no
   prompt machine holds KV that cannot land. Both (and Generate, Abort) travel as items on the
   machine's Work stream (cls/work_stream.py), each with the `rpc_timeout_s` deadline; a
   Prefill's grows with its prompt and the machine's queue, at the machine's measured prefill
   rate. The first token comes back in the Prefill reply, the rest on the token machine's event
   stream (`on_events`). A colocated attempt is one Generate on one machine.
3. Each attempt has its own machine-level id (`<request_id>#<incarnation>.<n>`), so a late event
   of an old attempt, or an attempt a machine holds from before a clsd restart, is never taken
   for the current one.
4. A machine lost, a failed transfer or an unreachable machine ends the attempt; the next one
   re-prefills prompt + tokens delivered so far on other machines (up to `max_reroutes`).
5. However the run ends (finished, failed, cancelled by the client), the attempt's machines get an
   Abort if they may still hold it, and the router's charges are credited back (cls/ledger.py).
   A re-route waits for those aborts (up to `rpc_timeout_s`) before its attempt starts.
6. A lost prompt machine ends only the attempts still waiting for their prefill: once the Prefill
   answered, the request lives on its token machine (a cut-short KV send fails there).
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from cls.cluster_request import (
    Attempt,
    AttemptFailed,
    ClusterRequest,
    MachineEvent,
    MachineLost,
    RequestError,
    TokenArrived,
)
from cls.ledger import Ledger
from cls.pools import Pools
from cls.prefill_clock import PrefillClock
from cls.registry import Registry
from cls.router import NoMachine, Router
from cls.work_stream import WorkError
from proto import mlsd_pb2 as mpb

log = logging.getLogger("clsd.requests")

_RETRY_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                grpc.StatusCode.INTERNAL, grpc.StatusCode.CANCELLED,
                grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNKNOWN}
"""Codes of a machine's answer that end the attempt and re-route the request. Not among them:
RESOURCE_EXHAUSTED (a full queue): under overload a re-route would only add load, so the
client is told at once, with the machine's reason."""


class Dispatcher:
    def __init__(self, pools: Pools, router: Router, registry: Registry, rpc_timeout_s: float,
                 max_reroutes: int, metrics=None):
        self.pools, self.router, self.registry = pools, router, registry
        self.ledger = Ledger(pools, on_move=lambda move: log.info(
            "machine %s returns to the %s pool", move.machine_id, move.to_pool))
        self.rpc_timeout_s, self.max_reroutes, self.metrics = rpc_timeout_s, max_reroutes, metrics
        self.attempts: dict[str, Attempt] = {}
        self.incarnation = "0"
        """This clsd process's name in attempt ids (`<request id>#<incarnation>.<n>`): a machine
        may still hold an attempt of the same request id from before a restart."""
        self.prefill_clock = PrefillClock(pools, rpc_timeout_s)
        self._background: set[asyncio.Task] = set()

    # -- events from machines (called by the registry) ----------------------------------------

    def on_events(self, machine_id: str, msg: mpb.MachineEvents) -> None:
        for t in msg.tokens:
            a = self.attempts.get(t.request_id)
            if a is not None:
                a.req.inbox.put_nowait(TokenArrived(a, t.index, t.token_id))
        for e in msg.events:
            a = self.attempts.get(e.request_id)
            if a is not None:
                a.req.inbox.put_nowait(MachineEvent(a, e, machine_id))

    def on_lost(self, machine_id: str, reason: str) -> None:
        for a in list(self.attempts.values()):
            r = a.route
            if machine_id == r.token_machine:
                a.req.inbox.put_nowait(MachineLost(a, machine_id, reason))
            elif machine_id == r.prompt_machine and not a.prompt_credited:
                # Once the prefill answered, the request lives on its token machine: a KV send
                # cut short fails there (FAILED event), a complete one decodes on; no re-prefill.
                a.req.inbox.put_nowait(MachineLost(a, machine_id, reason))

    # -- the run --------------------------------------------------------------------------------

    async def run(self, req: ClusterRequest):
        """Yields lists of new token ids; raises RequestError when the request cannot finish."""
        avoid: set[str] = set()
        while True:
            if self._finished_already(req):
                return
            try:
                async for new in self._attempt(req, frozenset(avoid)):
                    yield new
                return
            except AttemptFailed as e:
                if req.num_reroutes >= self.max_reroutes:
                    raise RequestError(grpc.StatusCode.UNAVAILABLE,
                                       f"request failed after {req.num_reroutes} re-routes: {e}") from None
                req.num_reroutes += 1
                avoid.update(e.machines)
                await self._aborted(req)  # the replaced attempt stops before the next one starts
                if self.metrics:
                    self.metrics.reroutes.inc()
                log.warning("request %s: %s; re-routing (%d)", req.request_id, e, req.num_reroutes)

    async def _aborted(self, req: ClusterRequest) -> None:
        """Waits (up to the RPC deadline) for the aborts of the request's ended attempts, so a
        re-route never leaves two machines working on the same request."""
        if req.aborts:
            await asyncio.wait(req.aborts, timeout=self.rpc_timeout_s)
            req.aborts.clear()

    def _finished_already(self, req: ClusterRequest) -> bool:
        """After a lost attempt: the tokens delivered may already complete the request."""
        if req.tokens and req.tokens[-1] in req.stop_ids:
            req.finish_reason = "stop"
        elif len(req.tokens) >= req.max_tokens:
            req.finish_reason = "length"
        return bool(req.finish_reason)

    async def _attempt(self, req: ClusterRequest, avoid: frozenset[str]):
        offset = len(req.tokens)
        prompt = req.prompt_ids + req.tokens
        remaining = req.max_tokens - offset
        try:
            route = self.router.route(len(prompt), remaining, exclude=avoid)
        except NoMachine as e:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, str(e)) from None
        req.route = route
        if self.metrics:
            self.metrics.routed.labels("colocated" if route.colocated else "split").inc()
            for move in route.borrowed:
                log.info("machine %s borrowed into the mixed pool", move.machine_id)
        a = Attempt(f"{req.request_id}#{self.incarnation}.{req.num_attempts}", req, offset, route,
                     len(prompt))
        req.num_attempts += 1
        self.attempts[a.attempt_id] = a
        sampling = mpb.SamplingParams()
        sampling.CopyFrom(req.sampling)
        sampling.max_tokens = remaining
        spec = mpb.RequestSpec(request_id=a.attempt_id, prompt_token_ids=prompt, sampling=sampling)
        try:
            pm, tm = self._link(route.prompt_machine), self._link(route.token_machine)
            pm.requests.add(a.attempt_id)
            tm.requests.add(a.attempt_id)
            if route.colocated:
                await self._call(tm, mpb.GenerateRequest(request=spec))
            else:
                # Where the token machine has the memory (in the router's view), the prefill
                # starts with the reservation, not one token-machine turn after it: its KV
                # receiver holds a sender that comes first (mls/kv/control.py). Otherwise the
                # prefill waits for RESERVED, so no prompt machine holds KV nobody can take.
                def start_prefill() -> asyncio.Future:
                    req.prefill_start_s = req.prefill_start_s or time.monotonic()
                    return asyncio.ensure_future(self._call(pm, mpb.PrefillRequest(
                        request=spec, kv_address=tm.info.kv_address),
                        self.prefill_clock.timeout_s(route.prompt_machine, len(prompt))))

                prefill = start_prefill() if route.kv_fits else None
                try:
                    reply = await self._call(tm, mpb.AddDecodeRequest(request=spec))
                    if not reply.reserved:
                        async for new in self._until(a, mpb.RequestEvent.RESERVED):
                            yield new
                    prefill = prefill or start_prefill()
                    pre = await prefill
                finally:
                    if prefill is not None and not prefill.done():
                        prefill.cancel()  # the attempt ended first; _end aborts it on the machine
                    elif prefill is not None and not prefill.cancelled():
                        prefill.exception()  # retrieved: a failed prefill of a failed attempt
                self._credit_prompt(a)
                self.prefill_clock.learn(route.prompt_machine, len(prompt), pre.prefill_s)
                new = self._deliver(a, 0, pre.first_token_id)
                if self._finished_already(req):
                    # The first token ends it (max_tokens 1, or a stop token): the client has its
                    # answer now, not a decode step later when the token machine reports FINISHED
                    # (it finishes on its own; nothing is left to abort).
                    self._credit_tokens(a)
                    if new:
                        yield new
                    return
                if new:
                    self._credit_tokens(a)
                    yield new
            async for new in self._until(a, mpb.RequestEvent.FINISHED):
                yield new
        finally:
            self._end(a)

    async def _until(self, a: Attempt, kind: mpb.RequestEvent.Kind.ValueType):
        """Consumes the inbox until an event of `kind` (RESERVED or FINISHED) arrives, yielding
        delivered tokens: all that are already waiting go out as one batch (one client message,
        not one per token). FINISHED is recorded before the last batch goes out, so that batch can
        carry the end."""
        req, new = a.req, []
        while True:
            if new and req.inbox.empty():
                self._credit_tokens(a)
                yield new
                new = []
            item = await req.inbox.get()
            if item.attempt is not a:
                continue  # a late item of an earlier attempt
            if isinstance(item, TokenArrived):
                new += self._deliver(a, item.index, item.token_id)
                continue
            event = item.event if isinstance(item, MachineEvent) else None
            finished = event is not None and event.kind == mpb.RequestEvent.FINISHED
            if finished:
                req.finish_reason = event.finish_reason or "stop"
            if new:  # tokens already placed in req.tokens reach the client before anything ends
                self._credit_tokens(a)
                yield new
                new = []
            if finished:
                return
            if isinstance(item, MachineLost):
                raise AttemptFailed(item.reason, (item.machine_id,))
            if event.kind == kind == mpb.RequestEvent.RESERVED:
                return
            if event.kind in (mpb.RequestEvent.FAILED, mpb.RequestEvent.ABORTED):
                name = mpb.RequestEvent.Kind.Name(event.kind).lower()
                raise AttemptFailed(f"{name} on {item.machine_id}: {event.message}",
                                     (item.machine_id,))

    def _deliver(self, a: Attempt, index: int, token_id: int) -> list[int]:
        """Places a token by index; returns the tokens that became deliverable, in order."""
        req = a.req
        if index == 0 and a.route.colocated:
            self._credit_prompt(a)
        a.ahead[a.offset + index] = token_id
        new = []
        while (i := len(req.tokens)) in a.ahead:
            req.tokens.append(a.ahead.pop(i))
            req.token_times.append(time.monotonic())
            new.append(req.tokens[-1])
        a.produced += len(new)
        return new

    def _credit_tokens(self, a: Attempt) -> None:
        """Credits the router for the tokens delivered since the last credit (once per batch)."""
        if a.produced > a.credited:
            self.ledger.tokens_done(a.route.token_machine, a.produced - a.credited)
            a.credited = a.produced

    # -- machines -------------------------------------------------------------------------------

    def _link(self, machine_id: str):
        link = self.registry.links.get(machine_id)
        if link is None:
            raise AttemptFailed(f"machine {machine_id} left", (machine_id,))
        return link

    async def _call(self, link, request, timeout_s: float | None = None):
        op = type(request).__name__.removesuffix("Request")
        try:
            return await link.work.call(request, timeout_s or self.rpc_timeout_s)
        except WorkError as e:
            if e.code() in _RETRY_CODES:
                raise AttemptFailed(f"{op} on {link.machine_id}: {e.code().name} {e.details()}",
                                     (link.machine_id,)) from None
            if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise RequestError(e.code(), f"the cluster is overloaded ({link.machine_id}: "
                                             f"{e.details()}); retry later") from None
            raise RequestError(e.code(), f"{op} on {link.machine_id}: {e.details()}") from None

    def _credit_prompt(self, a: Attempt) -> None:
        if not a.prompt_credited:
            a.prompt_credited = True
            self.ledger.prompt_done(a.route.prompt_machine, a.prompt_len)

    def _end(self, a: Attempt) -> None:
        """Credits the router and, unless finished, aborts the attempt where it may still live."""
        self.attempts.pop(a.attempt_id, None)
        r = a.route
        self._credit_prompt(a)
        remaining = a.req.max_tokens - a.offset - a.credited  # the uncredited and the unproduced
        self.ledger.request_done(r.token_machine, r.num_blocks, remaining)
        for mid in {r.prompt_machine, r.token_machine}:
            link = self.registry.links.get(mid)
            if link is None:
                continue
            link.requests.discard(a.attempt_id)
            if not a.req.finish_reason:  # failed or cancelled: free what the machine may hold
                a.req.aborts.append(self._spawn(self._abort(link, a.attempt_id)))

    async def _abort(self, link, attempt_id: str) -> None:
        try:
            await link.work.call(mpb.AbortRequest(request_id=attempt_id), self.rpc_timeout_s)
        except WorkError:
            pass  # unknown there (already done) or the machine is gone: nothing is held

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task
