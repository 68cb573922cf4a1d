"""A fast fake mlsd for measuring clsd alone: no model, no KV, tokens on a fixed step clock.

1. `FakeMachine.start()` serves MachineService on 127.0.0.1 (port 0), registers with clsd and
   heartbeats a load report computed from its own requests.
2. AddDecode reserves at once; Prefill answers the first token at once. A decode step every
   `step_s` emits the next token of every active request (token i is `i`), one MachineEvents
   message per step, then FINISHED after max_tokens; Generate does both phases the same way.
3. Abort forgets the request. Work (clsd's data path) answers the same four kinds of items on
   one bidirectional stream, through mlsd's own stream server (mls/work.py); the unary RPCs stay
   for direct callers. Nothing here touches clsd's internals: only the public protos.
4. Counters for benchmarks: `tokens_emitted` (put on the event stream by the step clock),
   `tokens_sent` (taken off it by the gRPC stream, i.e. handed to clsd), `max_backlog` (the most
   step messages queued behind a slow reader), `num_steps`, `num_prefills`.
"""

from __future__ import annotations

import asyncio

import grpc

from mls.work import WorkServer
from proto import clsd_pb2 as cpb
from proto import clsd_pb2_grpc, mlsd_pb2_grpc
from proto import mlsd_pb2 as pb


class FakeMachine(mlsd_pb2_grpc.MachineServiceServicer):
    def __init__(self, machine_id: str, role: int, cls_address: str, step_s: float = 0.005,
                 kv_num_blocks: int = 1 << 20, block_size: int = 16):
        self.machine_id, self.role, self.cls_address, self.step_s = machine_id, role, cls_address, step_s
        self.kv_num_blocks, self.block_size = kv_num_blocks, block_size
        self.active: dict[str, list[int]] = {}  # request id -> [next index, max_tokens]
        self.subscribers: set[asyncio.Queue] = set()
        self._tasks: list[asyncio.Task] = []
        self.tokens_emitted = self.tokens_sent = self.max_backlog = self.num_steps = self.num_prefills = 0

    async def start(self) -> FakeMachine:
        self.server = grpc.aio.server()
        mlsd_pb2_grpc.add_MachineServiceServicer_to_server(self, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        self.cls_channel = grpc.aio.insecure_channel(self.cls_address)
        self.registry = clsd_pb2_grpc.RegistryServiceStub(self.cls_channel)
        reply = await self.registry.Register(cpb.RegisterRequest(
            info=self.info(), address=f"127.0.0.1:{self.port}"), timeout=30)
        self._tasks = [asyncio.create_task(self._heartbeat(reply.lease_id, reply.heartbeat_interval_s)),
                       asyncio.create_task(self._step_loop())]
        return self

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.server.stop(grace=None)
        await self.cls_channel.close()

    def info(self) -> pb.MachineInfo:
        return pb.MachineInfo(machine_id=self.machine_id, role=self.role, model="fake", dtype="none",
                              max_model_len=1 << 20, vocab_size=1 << 16, kv_block_size=self.block_size,
                              kv_num_blocks=self.kv_num_blocks, kv_transport="none", kv_address=b"fake")

    async def _heartbeat(self, lease_id: str, interval_s: float) -> None:
        while True:
            pending = sum(m - i for i, m in self.active.values())
            try:
                await self.registry.Heartbeat(cpb.HeartbeatRequest(lease_id=lease_id, load=pb.LoadReport(
                    machine_id=self.machine_id, role=self.role, pending_decode_tokens=pending,
                    num_running=len(self.active), kv_blocks_free=self.kv_num_blocks)), timeout=5)
            except grpc.aio.AioRpcError:
                pass  # clsd is busy or gone (stopped first at the end of a benchmark): try again later
            await asyncio.sleep(interval_s)

    async def _step_loop(self) -> None:
        while True:
            await asyncio.sleep(self.step_s)
            if not self.active or not self.subscribers:
                continue
            self.num_steps += 1
            msg = pb.MachineEvents()
            for rid, state in list(self.active.items()):
                index, max_tokens = state
                if index < max_tokens:
                    msg.tokens.add(request_id=rid, index=index, token_id=index)
                    state[0] += 1
                if state[0] >= max_tokens:
                    msg.events.add(request_id=rid, kind=pb.RequestEvent.FINISHED, finish_reason="length",
                                   num_output_tokens=max_tokens)
                    del self.active[rid]
            self.tokens_emitted += len(msg.tokens)
            for q in self.subscribers:
                q.put_nowait(msg)
                self.max_backlog = max(self.max_backlog, q.qsize())

    # The work itself, shared by the unary RPCs and the Work stream: answered at once.

    def _add_decode(self, request: pb.AddDecodeRequest) -> pb.AddDecodeReply:
        self.active[request.request.request_id] = [1, request.request.sampling.max_tokens]
        return pb.AddDecodeReply(reserved=True)

    def _prefill(self, request: pb.PrefillRequest) -> pb.PrefillReply:
        self.num_prefills += 1
        return pb.PrefillReply(request_id=request.request.request_id, first_token_id=0,
                               kv_mode="serialized")

    def _generate(self, request: pb.GenerateRequest) -> pb.GenerateReply:
        self.active[request.request.request_id] = [0, request.request.sampling.max_tokens]
        return pb.GenerateReply()

    def _abort(self, request: pb.AbortRequest) -> pb.AbortReply:
        return pb.AbortReply(found=self.active.pop(request.request_id, None) is not None)

    async def AddDecode(self, request, context):
        return self._add_decode(request)

    async def Prefill(self, request, context):
        return self._prefill(request)

    async def Generate(self, request, context):
        return self._generate(request)

    async def Abort(self, request, context):
        return self._abort(request)

    async def Work(self, request_iterator, context):
        handlers = {pb.AddDecodeRequest: self._add_decode, pb.PrefillRequest: self._prefill,
                    pb.GenerateRequest: self._generate, pb.AbortRequest: self._abort}
        await WorkServer(lambda r: handlers[type(r)](r), lambda e: None).serve(request_iterator, context)

    async def StreamEvents(self, request, context):
        q: asyncio.Queue = asyncio.Queue()
        self.subscribers.add(q)
        await context.send_initial_metadata(())
        try:
            while True:
                msg = await q.get()
                self.tokens_sent += len(msg.tokens)
                yield msg
        finally:
            self.subscribers.discard(q)

    async def GetInfo(self, request, context):
        return self.info()
