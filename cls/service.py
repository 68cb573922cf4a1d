"""clsd's gRPC services: clients (Generate), operators (admin, bearer token) and machines (registry).

Life cycle of a Generate call:
1. Validate: exactly one of text / token ids, UTF-8, sampling values, max_tokens range, the
   context length of the machines, the in-flight bound; each failure is INVALID_ARGUMENT or
   RESOURCE_EXHAUSTED with a message naming the field.
2. Tokenize (chat template on request) and hand the request to the Dispatcher.
3. Stream each batch of new tokens with its text (incremental detokenizer); the last message
   carries the finish reason, the machines and the timing (TTFT, TPOT, max TBT, E2E).
4. A client that cancels the stream cancels the dispatcher's run, which aborts the request on
   its machines.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import logging
import math
import time

import grpc

from cls.config import ClsConfig
from cls.metrics import ClsMetrics
from cls.pools import Pool, PoolError, Pools
from cls.registry import RegistrationError, Registry
from cls.requests import ClusterRequest, Dispatcher, RequestError
from cls.router import Router
from engine.sequence import InvalidRequestError
from engine.sequence import SamplingParams as EngineSampling
from engine.tokenizer import IncrementalDetokenizer, Tokenizer
from proto import clsd_pb2 as pb
from proto import clsd_pb2_grpc
from proto import mlsd_pb2 as mpb

log = logging.getLogger("clsd.service")

ROLE_PB = {Pool.PROMPT: mpb.PROMPT, Pool.TOKEN: mpb.TOKEN, Pool.MIXED: mpb.MIXED}


class ClusterState:
    """What the three services share: pools, router, registry, dispatcher, in-flight requests."""

    def __init__(self, cfg: ClsConfig, tokenizer: Tokenizer, metrics: ClsMetrics):
        self.cfg, self.tokenizer, self.metrics = cfg, tokenizer, metrics
        self.pools = Pools()
        self.router = Router(self.pools, cfg.router.prompt_queue_limit_tokens)
        self.dispatcher: Dispatcher | None = None
        self.registry = Registry(self.pools, cfg.lease_ttl_s, self._on_events, self._on_lost)
        self.dispatcher = Dispatcher(self.pools, self.router, self.registry, cfg.limits.rpc_timeout_s,
                                     cfg.limits.max_reroutes, metrics)
        self.inflight: dict[str, ClusterRequest] = {}
        self.draining = False
        self.admin_token = cfg.admin_token()

    def _on_events(self, machine_id, msg) -> None:
        self.dispatcher.on_events(machine_id, msg)

    def _on_lost(self, machine_id, reason) -> None:
        self.dispatcher.on_lost(machine_id, reason)

    def machine_status(self, machine_id: str) -> pb.MachineStatus:
        m = self.pools.get(machine_id)
        link = self.registry.links[machine_id]
        return pb.MachineStatus(
            machine_id=machine_id, address=link.address, home=ROLE_PB[m.home], role=ROLE_PB[m.role],
            draining=m.draining, pending_prompt_tokens=m.pending_prompt_tokens,
            pending_decode_tokens=m.pending_decode_tokens, kv_blocks_free=m.kv_free_blocks,
            kv_blocks_total=m.kv_total_blocks, num_requests=len(link.requests),
            lease_expires_in_s=max(0.0, link.expires_at - time.monotonic()))


# --- clients ---------------------------------------------------------------------------------


class ClientService(clsd_pb2_grpc.ClientServiceServicer):
    _ids = itertools.count()

    def __init__(self, state: ClusterState):
        self.s = state

    async def Generate(self, request: pb.GenerateRequest, context):
        s = self.s
        try:
            req = self._admit(request)
        except RequestError as e:
            s.metrics.requests.labels("rejected").inc()
            await context.abort(e.code, e.message)
        s.inflight[req.request_id] = req
        s.metrics.inflight.set(len(s.inflight))
        detok = IncrementalDetokenizer(s.tokenizer, req.prompt_ids)
        outcome = "cancelled"
        try:
            first = True
            async with asyncio.timeout(s.cfg.limits.request_timeout_s):
                async for new in s.dispatcher.run(req):
                    index = len(req.tokens) - len(new)
                    self._observe_tokens(req, len(new))
                    yield pb.GenerateResponse(request_id=req.request_id, index=index, token_ids=new,
                                              text=detok.add(new),
                                              num_prompt_tokens=len(req.prompt_ids) if first else 0)
                    first = False
            outcome = "finished"
            yield self._last(req, detok)
        except RequestError as e:
            outcome = "failed"
            await context.abort(e.code, e.message)
        except TimeoutError:
            outcome = "timeout"
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                f"request {req.request_id} ran past {s.cfg.limits.request_timeout_s} s")
        finally:
            s.inflight.pop(req.request_id, None)
            s.metrics.inflight.set(len(s.inflight))
            s.metrics.requests.labels(outcome).inc()

    def _admit(self, r: pb.GenerateRequest) -> ClusterRequest:
        s, lim = self.s, self.s.cfg.limits
        bad = grpc.StatusCode.INVALID_ARGUMENT
        if s.draining:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, "clsd is draining; retry on another instance")
        if len(s.inflight) >= lim.max_inflight_requests:
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"{len(s.inflight)} requests in flight (limit {lim.max_inflight_requests})")
        if r.prompt and r.prompt_token_ids:
            raise RequestError(bad, "give prompt or prompt_token_ids, not both")
        if r.prompt_token_ids:
            if r.apply_chat_template:
                raise RequestError(bad, "apply_chat_template needs a text prompt")
            prompt_ids = list(r.prompt_token_ids)
            vocab = s.tokenizer.vocab_size
            if max(prompt_ids) >= vocab:
                raise RequestError(bad, f"prompt_token_ids holds {max(prompt_ids)}, beyond the "
                                        f"vocabulary of {vocab} tokens")
        else:
            try:
                text = r.prompt.decode("utf-8")
            except UnicodeDecodeError as e:
                raise RequestError(bad, f"prompt is not valid UTF-8 (byte {e.start})") from None
            if not text.strip():
                raise RequestError(bad, "prompt is empty")
            prompt_ids = s.tokenizer.encode_chat([{"role": "user", "content": text}]) \
                if r.apply_chat_template else s.tokenizer.encode(text)
        max_tokens = r.max_tokens or lim.default_max_tokens
        if max_tokens > lim.max_tokens_limit:
            raise RequestError(bad, f"max_tokens must be <= {lim.max_tokens_limit}, got {max_tokens}")
        for name in ("temperature", "top_p"):
            if not math.isfinite(getattr(r, name)):
                raise RequestError(bad, f"{name} must be finite")
        try:
            EngineSampling(max_tokens=max_tokens, temperature=r.temperature, top_k=r.top_k,
                           top_p=r.top_p or 1.0).validate()
        except InvalidRequestError as e:
            raise RequestError(bad, str(e)) from None
        if not s.pools.machines:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, "no machines are registered")
        total = len(prompt_ids) + max_tokens
        if not s.router.fits_anywhere(total):
            longest = max(m.max_model_len for m in s.pools.machines.values())
            raise RequestError(bad, f"prompt of {len(prompt_ids)} tokens + max_tokens {max_tokens} "
                                    f"exceeds the context ({longest} tokens) or KV memory of every machine")
        rid = r.request_id or f"cmpl-{next(self._ids)}-{time.monotonic_ns() % 10**6}"
        if rid in s.inflight:
            raise RequestError(bad, f"request_id {rid!r} is already in flight")
        sampling = mpb.SamplingParams(max_tokens=max_tokens, temperature=r.temperature, top_k=r.top_k,
                                      top_p=r.top_p, stop_token_ids=r.stop_token_ids,
                                      ignore_eos=r.ignore_eos)
        if r.HasField("seed"):
            sampling.seed = r.seed
        stop = set(r.stop_token_ids)
        if not r.ignore_eos and s.tokenizer.eos_token_id is not None:
            stop.add(s.tokenizer.eos_token_id)
        return ClusterRequest(rid, prompt_ids, sampling, frozenset(stop))

    def _observe_tokens(self, req: ClusterRequest, num_new: int) -> None:
        times, m = req.token_times, self.s.metrics
        start = len(times) - num_new
        if start == 0:
            m.ttft.observe(times[0] - req.arrival_s)
            start = 1
        for i in range(start, len(times)):
            m.tbt.observe(times[i] - times[i - 1])

    def _last(self, req: ClusterRequest, detok: IncrementalDetokenizer) -> pb.GenerateResponse:
        times = req.token_times
        now = time.monotonic()
        timing = pb.Timing(
            ttft_s=times[0] - req.arrival_s if times else 0.0,
            e2e_s=(times[-1] if times else now) - req.arrival_s,
            tpot_s=(times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else 0.0,
            max_tbt_s=max((b - a for a, b in zip(times, times[1:])), default=0.0),
            queue_s=(req.prefill_start_s - req.arrival_s) if req.prefill_start_s else 0.0)
        self.s.metrics.e2e.observe(timing.e2e_s)
        route = req.route
        return pb.GenerateResponse(
            request_id=req.request_id, index=len(req.tokens), text=detok.add([]),
            finish_reason=req.finish_reason, timing=timing, num_reroutes=req.num_reroutes,
            prompt_machine=route.prompt_machine if route else "",
            token_machine=route.token_machine if route else "")


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
            pools=[pb.PoolStatus(role=ROLE_PB[p], machine_ids=sorted(m.machine_id for m in pools.members(p)),
                                 pending_tokens=pools.pending_tokens(p)) for p in Pool],
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
        return pb.ResizePoolsReply(moves=[pb.PoolMove(machine_id=mv.machine_id,
                                                      from_pool=ROLE_PB[mv.from_pool],
                                                      to_pool=ROLE_PB[mv.to_pool]) for mv in moves])

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
