"""clsd's gRPC services: clients (Generate), operators (admin, bearer token) and machines (registry).

Life cycle of a Generate call:
0. The request's bytes are parsed by the service's own handler (cls/checked_rpc.py): bytes that
   are no GenerateRequest get INVALID_ARGUMENT.
1. Validate: the in-flight bound (cls/admission.py: it follows the registered machines' capacity),
   exactly one of text / token ids, UTF-8, a prompt's characters or token count against the
   longest context, sampling values, max_tokens range, a request id not already in flight; each
   failure is INVALID_ARGUMENT, RESOURCE_EXHAUSTED or ALREADY_EXISTS at once, with a message
   naming the field or the limit.
2. Tokenize (chat template on request) on a tokenizer thread, never on the event loop; check the
   tokens against the machines' context and KV memory; hand the request to the Dispatcher, whose
   attempt ids carry this clsd's incarnation (a machine may still hold an attempt of the same
   request id from before a restart).
3. Stream each batch of new tokens with its text (incremental detokenizer); the last message
   carries the finish reason, the machines and the timing (TTFT, TPOT, max TBT, E2E).
4. A client that cancels the stream cancels the dispatcher's run, which aborts the request on
   its machines.
Steps 1-2 and the run are `ClusterState.admit` / `generate`, which the OpenAI HTTP front door
(cls/http/server.py) calls too, so both doors validate, bound and abort requests the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import secrets
import time

import grpc

from cls.admission import Admission
from cls.cluster_request import ClusterRequest, RequestError
from cls.config import ClsConfig
from cls.dispatcher import Dispatcher
from cls.metrics import ClsMetrics
from cls.pool_targets import PoolTargets
from cls.pools import PoolError, Pools
from cls.registry import RegistrationError, Registry
from cls.router import Router
from engine.tokenizer import IncrementalDetokenizer, Tokenizer
from proto import clsd_pb2 as pb
from proto import clsd_pb2_grpc
from proto.roles import Role

log = logging.getLogger("clsd.service")



class ClusterState:
    """What the services share: pools, router, registry, dispatcher, in-flight requests."""

    def __init__(self, cfg: ClsConfig, tokenizer: Tokenizer, metrics: ClsMetrics):
        self.cfg, self.tokenizer, self.metrics = cfg, tokenizer, metrics
        self.incarnation = secrets.token_hex(4)
        """This clsd process's name for itself: attempt ids carry it (`<request id>#<incarnation>.<n>`),
        so an attempt a machine still holds from before a restart never collides with a new one."""
        self.pools = Pools()
        self.pool_targets = PoolTargets.load(cfg.state_path)
        self.router = Router(self.pools, cfg.router.prompt_queue_limit_tokens, cfg.router.colocated)
        self.dispatcher: Dispatcher | None = None
        self.registry = Registry(self.pools, cfg.lease_ttl_s, self._on_events, self._on_lost,
                                 self.pool_targets.home_of)
        self.dispatcher = Dispatcher(self.pools, self.router, self.registry, cfg.limits.rpc_timeout_s,
                                     cfg.limits.max_reroutes, metrics)
        self.dispatcher.incarnation = self.incarnation
        self.inflight: dict[str, ClusterRequest] = {}
        self.admitting: set[str] = set()
        """Request ids being tokenized: in flight for the bound and the duplicate check."""
        self.admission = Admission(cfg, tokenizer, self.pools, self.router)
        self.tokenizers, self.encoder = self.admission.tokenizers, self.admission.encoder
        """The tokenizer threads, and the encoder that does not hold the GIL (cls/admission.py);
        the HTTP door renders and encodes chat messages with them too."""
        self.chars_per_token = self.admission.chars_per_token
        """The most characters one token stands for (None: unbounded); see cls/admission.py."""
        self.draining = False
        self.admin_token = cfg.admin_token()

    def keep_pool_sizes(self) -> None:
        """Keeps the operator's pool sizes (every machine's home now) for the next clsd."""
        homes = {mid: m.home for mid, m in self.pools.machines.items()}
        num_prompt = sum(home == Role.PROMPT for home in homes.values())
        try:
            self.pool_targets.save(num_prompt, len(homes) - num_prompt, homes)
        except OSError as e:
            log.error("the pool sizes hold until clsd restarts: cannot keep them in %s: %s",
                      self.pool_targets.path, e)

    def _on_events(self, machine_id, msg) -> None:
        self.dispatcher.on_events(machine_id, msg)

    def _on_lost(self, machine_id, reason) -> None:
        self.dispatcher.on_lost(machine_id, reason)

    def machine_status(self, machine_id: str) -> pb.MachineStatus:
        m = self.pools.get(machine_id)
        link = self.registry.links[machine_id]
        return pb.MachineStatus(
            machine_id=machine_id, address=link.address, home=m.home.to_pb(), role=m.role.to_pb(),
            draining=m.draining, pending_prompt_tokens=m.pending_prompt_tokens,
            pending_decode_tokens=m.pending_decode_tokens, kv_blocks_free=m.kv_blocks_free,
            kv_blocks_total=m.kv_blocks_total, num_requests=len(link.requests),
            lease_expires_in_s=max(0.0, link.expires_at - time.monotonic()))

    # -- requests: the one path both front doors (gRPC Generate, OpenAI HTTP) take ----------------

    async def admit(self, r: pb.GenerateRequest) -> ClusterRequest:
        """Validates and tokenizes a request (off the event loop) and registers it as in flight,
        or raises RequestError (`param` names the offending field). The caller must then iterate
        `generate(req)` or call `release(req, ...)`."""
        a = self.admission
        try:
            self._refuse_if_draining()
            rid, text = a.check(r, self.num_inflight, self.is_live)
            self.admitting.add(rid)
            try:
                prompt_ids = list(r.prompt_token_ids) if text is None else \
                    await a.tokenize(text, r.apply_chat_template)
                self._refuse_if_draining()  # the drain may have begun while it was tokenized
                req = a.request(r, rid, prompt_ids)
            finally:
                self.admitting.discard(rid)
        except RequestError:
            self.metrics.requests.labels("rejected").inc()
            raise
        self.inflight[req.request_id] = req
        self.metrics.inflight.set(len(self.inflight))
        return req

    @property
    def num_inflight(self) -> int:
        """Requests in flight, those being tokenized included."""
        return len(self.inflight) + len(self.admitting)

    def is_live(self, request_id: str) -> bool:
        """Whether a request of this id is in flight (or being tokenized) in this clsd."""
        return request_id in self.inflight or request_id in self.admitting

    def _refuse_if_draining(self) -> None:
        if self.draining:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, "clsd is draining; retry on another instance")

    async def generate(self, req: ClusterRequest):
        """Runs an admitted request; yields (new token ids, their text) and returns when it has
        finished (req.finish_reason). Raises RequestError; a consumer that stops early (aclose,
        cancellation) aborts the request on its machines. Releases the request however it ends."""
        detok = IncrementalDetokenizer(self.tokenizer, req.prompt_ids)
        outcome = "cancelled"
        try:
            async with asyncio.timeout(self.cfg.limits.request_timeout_s), \
                    contextlib.aclosing(self.dispatcher.run(req)) as run:
                async for new in run:
                    self._observe_tokens(req, len(new))
                    yield new, detok.add(new)
            outcome = "finished"
            self.metrics.e2e.observe((req.token_times[-1] if req.token_times else time.monotonic())
                                     - req.arrival_s)
        except RequestError:
            outcome = "failed"
            raise
        except TimeoutError:
            outcome = "timeout"
            raise RequestError(grpc.StatusCode.DEADLINE_EXCEEDED,
                               f"request {req.request_id} ran past {self.cfg.limits.request_timeout_s} s") \
                from None
        finally:
            self.release(req, outcome)

    def release(self, req: ClusterRequest, outcome: str) -> None:
        """Ends an admitted request's stay in flight (idempotent: counts the outcome once)."""
        if self.inflight.pop(req.request_id, None) is not None:
            self.metrics.inflight.set(len(self.inflight))
            self.metrics.requests.labels(outcome).inc()

    def _observe_tokens(self, req: ClusterRequest, num_new: int) -> None:
        times, m = req.token_times, self.metrics
        start = len(times) - num_new
        if start == 0:
            m.ttft.observe(times[0] - req.arrival_s)
            start = 1
        for i in range(start, len(times)):
            m.tbt.observe(times[i] - times[i - 1])


# --- clients ---------------------------------------------------------------------------------


class ClientService(clsd_pb2_grpc.ClientServiceServicer):
    def __init__(self, state: ClusterState):
        self.s = state

    async def Generate(self, request: pb.GenerateRequest, context):
        try:
            req = await self.s.admit(request)
        except RequestError as e:
            await context.abort(e.code, e.message)
        try:
            first, last = True, None
            async for new, text in self.s.generate(req):
                if last is not None:
                    yield last
                msg = pb.GenerateResponse(request_id=req.request_id, index=len(req.tokens) - len(new),
                                          token_ids=new, text=text,
                                          num_prompt_tokens=len(req.prompt_ids) if first else 0)
                first = False
                if req.finish_reason:
                    # The run has ended (FINISHED came with these tokens): this message is the last
                    # one and carries the end too, one client message fewer. It goes out once the
                    # run has returned, i.e. at once (the run yields nothing more).
                    last = self._last(req, msg)
                else:
                    yield msg
            yield last if last is not None else self._last(req)
        except RequestError as e:
            await context.abort(e.code, e.message)
        finally:
            self.s.release(req, "cancelled")  # a no-op unless the stream ended before generate ran

    def _last(self, req: ClusterRequest, msg: pb.GenerateResponse | None = None) -> pb.GenerateResponse:
        """The end of the stream: finish reason, timing and route, on `msg` (the last tokens) or
        on a message of its own."""
        route = req.route
        last = msg if msg is not None else pb.GenerateResponse(request_id=req.request_id,
                                                               index=len(req.tokens))
        last.finish_reason, last.num_reroutes = req.finish_reason, req.num_reroutes
        last.timing.CopyFrom(timing(req))
        last.prompt_machine = route.prompt_machine if route else ""
        last.token_machine = route.token_machine if route else ""
        return last


def timing(req: ClusterRequest) -> pb.Timing:
    times = req.token_times
    now = time.monotonic()
    return pb.Timing(
        ttft_s=times[0] - req.arrival_s if times else 0.0,
        e2e_s=(times[-1] if times else now) - req.arrival_s,
        tpot_s=(times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else 0.0,
        max_tbt_s=max((b - a for a, b in zip(times, times[1:])), default=0.0),
        queue_s=(req.prefill_start_s - req.arrival_s) if req.prefill_start_s else 0.0)


# --- operators -------------------------------------------------------------------------------


class AdminService(clsd_pb2_grpc.AdminServiceServicer):
    def __init__(self, state: ClusterState):
        self.s = state

    async def _authorize(self, context) -> None:
        expected = self.s.admin_token
        if expected is None:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                "admin calls are disabled: clsd has no admin_token_file")
        got = dict(context.invocation_metadata()).get("authorization", "")
        if not got.startswith("Bearer ") or not hmac.compare_digest(got[7:].encode(), expected.encode()):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "missing or wrong admin token (metadata authorization: Bearer <token>)")

    async def ListMachines(self, request, context):
        await self._authorize(context)
        return pb.ListMachinesReply(machines=[self.s.machine_status(mid)
                                              for mid in sorted(self.s.pools.machines)])

    async def ListPools(self, request, context):
        await self._authorize(context)
        pools = self.s.pools
        return pb.ListPoolsReply(
            pools=[pb.PoolStatus(role=p.to_pb(), machine_ids=sorted(m.machine_id for m in pools.members(p)),
                                 pending_tokens=pools.pending_tokens(p)) for p in Role],
            num_borrowed=pools.num_borrowed, num_returned=pools.num_returned)

    async def ResizePools(self, request: pb.ResizePoolsRequest, context):
        await self._authorize(context)
        try:
            moves = self.s.pools.resize(
                request.num_prompt if request.HasField("num_prompt") else None,
                request.num_token if request.HasField("num_token") else None)
        except PoolError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        for mv in moves:
            log.info("resize: machine %s moves from the %s pool to the %s pool", mv.machine_id,
                     mv.from_pool, mv.to_pool)
        self.s.keep_pool_sizes()
        return pb.ResizePoolsReply(moves=[pb.PoolMove(machine_id=mv.machine_id,
                                                      from_pool=mv.from_pool.to_pb(),
                                                      to_pool=mv.to_pool.to_pb()) for mv in moves])

    async def DrainMachine(self, request, context):
        return await self._set_draining(request, context, True)

    async def UndrainMachine(self, request, context):
        return await self._set_draining(request, context, False)

    async def _set_draining(self, request, context, draining: bool):
        await self._authorize(context)
        try:
            self.s.pools.set_draining(request.machine_id, draining)
        except PoolError as e:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(e))
        log.info("machine %s %s by the operator", request.machine_id, "drained" if draining else "undrained")
        return pb.DrainReply(machine=self.s.machine_status(request.machine_id))


# --- machines --------------------------------------------------------------------------------


class RegistryService(clsd_pb2_grpc.RegistryServiceServicer):
    def __init__(self, state: ClusterState):
        self.s = state

    async def Register(self, request: pb.RegisterRequest, context):
        if self.s.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "clsd is draining")
        try:
            link = await self.s.registry.register(request.info, request.address)
        except RegistrationError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return pb.RegisterReply(lease_id=link.lease_id, lease_ttl_s=self.s.cfg.lease_ttl_s,
                                heartbeat_interval_s=self.s.cfg.heartbeat_interval_s)

    async def Heartbeat(self, request: pb.HeartbeatRequest, context):
        return pb.HeartbeatReply(known=self.s.registry.heartbeat(request.lease_id, request.load))
