"""mlsd's gRPC service: validates, hands work to the engine worker, streams events out.

1. Work (Prefill / AddDecode / Generate / Abort), as a unary RPC or as an item on the Work stream
   (mls/work.py), is checked here (draining, ids, sampling values) and submitted to the worker;
   the worker's typed error becomes a status code with a message that names the problem. A
   client that goes away (a cancelled call, a Work stream that ends) aborts its request.
2. StreamEvents: every subscriber gets each worker turn's tokens and events as one message.
3. GetInfo / GetLoad answer with `info()` / `load_report()`, the same messages the machine
   registers and heartbeats with (mls/registration.py).
"""

from __future__ import annotations

import asyncio
import logging
import math

import grpc

from engine.engine import Engine
from engine.sequence import SamplingParams
from mls.config import MlsConfig
from mls.errors import Aborted, BadRequest, Draining, Failed, MlsError, Overloaded
from mls.events import EventKind, TurnOutput
from mls.work import WorkServer
from mls.worker import EngineWorker
from proto import mlsd_pb2 as pb
from proto import mlsd_pb2_grpc
from proto.roles import Role

log = logging.getLogger("mlsd.service")

STATUS = {BadRequest: grpc.StatusCode.INVALID_ARGUMENT, Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
          Draining: grpc.StatusCode.UNAVAILABLE, Aborted: grpc.StatusCode.CANCELLED,
          Failed: grpc.StatusCode.INTERNAL}
EVENT_KINDS = {k: pb.RequestEvent.Kind.Value(k.name) for k in EventKind}  # the one conversion
SUBSCRIBER_QUEUE_LEN = 4096


async def _unary(work, context):
    """Runs one kind of work for a unary RPC: an MlsError becomes the call's status."""
    try:
        return await work
    except MlsError as e:
        await context.abort(STATUS[type(e)], str(e))


def sampling_from_proto(sp: pb.SamplingParams) -> SamplingParams:
    for name in ("temperature", "top_p"):
        if not math.isfinite(getattr(sp, name)):
            raise BadRequest(f"sampling.{name} must be finite")
    return SamplingParams(max_tokens=sp.max_tokens, temperature=sp.temperature, top_k=sp.top_k,
                          top_p=sp.top_p or 1.0, seed=sp.seed if sp.HasField("seed") else None,
                          stop_token_ids=tuple(sp.stop_token_ids), ignore_eos=sp.ignore_eos)


class _Subscriber:
    def __init__(self):
        self.queue: asyncio.Queue = asyncio.Queue(SUBSCRIBER_QUEUE_LEN)
        self.overflowed = self.closed = False


class MachineService(mlsd_pb2_grpc.MachineServiceServicer):
    def __init__(self, cfg: MlsConfig, engine: Engine, worker: EngineWorker, kv_address: bytes):
        self.cfg, self.engine, self.worker, self.kv_address = cfg, engine, worker, kv_address
        self.draining = False
        self._subscribers: set[_Subscriber] = set()
        self._work_servers: set[WorkServer] = set()
        self._loop = asyncio.get_running_loop()

    # -- work ---------------------------------------------------------------------------------

    # Each kind of work is one coroutine that raises MlsError; the unary RPCs and the Work stream
    # (mls/work.py) both run them, so the checks and the abort-on-cancel are the same on both.

    async def Prefill(self, request: pb.PrefillRequest, context) -> pb.PrefillReply:
        return await _unary(self._prefill(request), context)

    async def AddDecode(self, request: pb.AddDecodeRequest, context) -> pb.AddDecodeReply:
        return await _unary(self._add_decode(request), context)

    async def Generate(self, request: pb.GenerateRequest, context) -> pb.GenerateReply:
        return await _unary(self._generate(request), context)

    async def Abort(self, request: pb.AbortRequest, context) -> pb.AbortReply:
        return await _unary(self._abort(request), context)

    async def Work(self, request_iterator, context) -> None:
        handlers = {pb.PrefillRequest: self._prefill, pb.AddDecodeRequest: self._add_decode,
                    pb.GenerateRequest: self._generate, pb.AbortRequest: self._abort}
        server = WorkServer(lambda r: handlers[type(r)](r), lambda e: STATUS.get(type(e)))
        self._work_servers.add(server)
        try:
            await server.serve(request_iterator, context)
        finally:
            self._work_servers.discard(server)

    def _prefill(self, request: pb.PrefillRequest):
        async def run(rid, prompt, params):
            self.worker.check_kv_address(request.kv_address)
            res = await asyncio.wrap_future(self.worker.add_prefill(
                rid, prompt, params, request.kv_address, request.transfer_timeout_s))
            return pb.PrefillReply(request_id=rid, first_token_id=res.first_token_id,
                                   kv_mode=res.kv_mode, queue_s=res.queue_s, prefill_s=res.prefill_s)
        return self._work(request.request, run)

    def _add_decode(self, request: pb.AddDecodeRequest):
        async def run(rid, prompt, params):
            reserved = await asyncio.wrap_future(self.worker.add_decode(
                rid, prompt, params, request.transfer_timeout_s))
            return pb.AddDecodeReply(reserved=reserved)
        return self._work(request.request, run)

    def _generate(self, request: pb.GenerateRequest):
        async def run(rid, prompt, params):
            await asyncio.wrap_future(self.worker.add_generate(rid, prompt, params))
            return pb.GenerateReply()
        return self._work(request.request, run)

    async def _abort(self, request: pb.AbortRequest) -> pb.AbortReply:
        return pb.AbortReply(found=await asyncio.wrap_future(self.worker.abort(request.request_id)))

    async def _work(self, spec: pb.RequestSpec, run):
        try:
            if self.draining:
                raise Draining("machine is draining")
            if not spec.request_id:
                raise BadRequest("request.request_id is empty")
            if not spec.HasField("sampling"):
                raise BadRequest("request.sampling is missing")
            params = sampling_from_proto(spec.sampling)
            return await run(spec.request_id, list(spec.prompt_token_ids), params)
        except asyncio.CancelledError:  # the caller went away: free what it held
            self.worker.abort(spec.request_id)
            raise

    # -- events -------------------------------------------------------------------------------

    def emit(self, out: TurnOutput) -> None:
        """Called on the worker thread once per turn."""
        self._loop.call_soon_threadsafe(self._broadcast, out)

    def _broadcast(self, out: TurnOutput) -> None:
        msg = pb.MachineEvents(
            tokens=[pb.TokenDelta(request_id=t.request_id, index=t.index, token_id=t.token_id)
                    for t in out.tokens],
            events=[pb.RequestEvent(request_id=e.request_id, kind=EVENT_KINDS[e.kind],
                                    finish_reason=e.finish_reason, message=e.message,
                                    num_output_tokens=e.num_output_tokens) for e in out.events])
        for sub in list(self._subscribers):
            try:
                sub.queue.put_nowait(msg)
            except asyncio.QueueFull:  # a subscriber that stopped reading is cut off, not buffered
                log.warning("event subscriber fell %d messages behind; closing it", SUBSCRIBER_QUEUE_LEN)
                sub.overflowed = True
                self._subscribers.discard(sub)

    def close_streams(self) -> None:
        """At shutdown, after the drain: event streams end now, Work streams once answered."""
        for server in list(self._work_servers):
            server.close()
        for sub in list(self._subscribers):
            sub.closed = True
            if not sub.queue.full():
                sub.queue.put_nowait(None)
        self._subscribers.clear()

    async def StreamEvents(self, request, context):
        sub = _Subscriber()
        self._subscribers.add(sub)
        # Headers now: the subscriber sees the call connected only once it is registered here.
        await context.send_initial_metadata(())
        try:
            while not sub.closed:
                if sub.overflowed and sub.queue.empty():
                    await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                        "event stream consumer too slow; resubscribe")
                msg = await sub.queue.get()
                if msg is None:
                    return
                yield msg
        finally:
            self._subscribers.discard(sub)

    # -- state --------------------------------------------------------------------------------

    # The one place these two messages are built: GetLoad / GetInfo answer with them, and the
    # registration with clsd sends them (mls/registration.py). `role` is the home role.

    def load_report(self) -> pb.LoadReport:
        return pb.LoadReport(machine_id=self.cfg.machine_id, role=Role(self.cfg.role).to_pb(),
                             draining=self.draining, **self.worker.load())

    def info(self) -> pb.MachineInfo:
        e, mc = self.engine, self.engine.model_config
        return pb.MachineInfo(
            machine_id=self.cfg.machine_id, role=Role(self.cfg.role).to_pb(), model=self.cfg.engine.model,
            dtype=str(e.dtype).removeprefix("torch."), max_model_len=e.max_model_len,
            vocab_size=mc.vocab_size, kv_block_size=e.kv.block_size, kv_num_blocks=e.num_blocks,
            kv_transport=self.cfg.kv_transfer.transport, kv_address=self.kv_address,
            num_layers=mc.num_layers, num_kv_heads=mc.num_kv_heads, head_dim=mc.head_dim)

    async def GetLoad(self, request, context) -> pb.LoadReport:
        return self.load_report()

    async def GetInfo(self, request, context) -> pb.MachineInfo:
        return self.info()
