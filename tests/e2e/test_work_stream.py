"""The Work stream between clsd (cls/work_stream.py) and a machine (mls/work.py), over a real
loopback gRPC server: replies matched by call id, items of one loop turn in one batch, errors as
status codes, per-call deadlines, and what happens when the stream ends or breaks on either side.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from cls.work_stream import WorkError, WorkStream
from mls.work import WorkServer
from proto import mlsd_pb2 as pb
from proto import mlsd_pb2_grpc


class Machine(mlsd_pb2_grpc.MachineServiceServicer):
    """AddDecode answers at once; Prefill of request id "hang..." waits until cancelled; Prefill
    without kv_address fails with INVALID_ARGUMENT; the first `end_first` streams end after one
    batch without answering it."""

    def __init__(self, end_first: int = 0):
        self.cancelled: list[str] = []
        self.started: list[str] = []  # hangs the machine has begun (its handler is running)
        self.streams = self.ended = 0
        self.servers: list[WorkServer] = []
        self.end_first = end_first

    def _run(self, request):
        if isinstance(request, pb.AddDecodeRequest):
            return pb.AddDecodeReply(reserved=request.request.request_id.endswith("r"))
        if isinstance(request, pb.PrefillRequest):
            if not request.kv_address:
                raise ValueError("kv_address is empty")
            return self._hang(request.request.request_id)
        raise NotImplementedError(type(request).__name__)

    async def _hang(self, rid: str):
        self.started.append(rid)
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled.append(rid)
            raise

    async def Work(self, request_iterator, context):
        self.streams += 1
        if self.streams <= self.end_first:
            async for _ in request_iterator:
                return
        server = WorkServer(self._run,
                            lambda e: grpc.StatusCode.INVALID_ARGUMENT if isinstance(e, ValueError) else None)
        self.servers.append(server)
        await server.serve(request_iterator, context)
        self.ended += 1


async def start(machine: Machine):
    server = grpc.aio.server()
    mlsd_pb2_grpc.add_MachineServiceServicer_to_server(machine, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    return server, channel, WorkStream(mlsd_pb2_grpc.MachineServiceStub(channel), "m0")


def decode(rid: str) -> pb.AddDecodeRequest:
    return pb.AddDecodeRequest(request=pb.RequestSpec(request_id=rid, prompt_token_ids=[1, 2]))


async def wait_for(cond, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def test_replies_batches_errors_and_deadlines():
    async def main():
        machine = Machine()
        server, channel, ws = await start(machine)
        try:
            rids = [f"q{i}{'r' if i % 2 else ''}" for i in range(20)]
            replies = await asyncio.gather(*(ws.call(decode(r), 5.0) for r in rids))
            assert [rep.reserved for rep in replies] == [r.endswith("r") for r in rids]
            assert (ws.num_batches, ws.num_items) == (1, 20)  # one loop turn, one message

            with pytest.raises(WorkError) as e:
                await ws.call(pb.PrefillRequest(request=decode("p").request), 5.0)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "kv_address" in e.value.details()

            t0 = time.monotonic()
            with pytest.raises(WorkError) as e:
                await ws.call(pb.PrefillRequest(request=decode("hang-1").request,
                                                           kv_address=b"x"), 0.3)
            assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert 0.25 < time.monotonic() - t0 < 5.0
            assert machine.cancelled == []  # the machine still holds it: the caller aborts it

            # The link closes (the machine left clsd): waiting calls fail at once, and the machine
            # cancels every item it had not answered.
            waiting = asyncio.ensure_future(ws.call(pb.PrefillRequest(
                request=decode("hang-2").request, kv_address=b"x"), 30.0))
            await wait_for(lambda: ws.num_items == 23)
            ws.close()
            with pytest.raises(WorkError) as e:
                await waiting
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            await wait_for(lambda: sorted(machine.cancelled) == ["hang-1", "hang-2"])
            with pytest.raises(WorkError):
                await ws.call(decode("late"), 5.0)
        finally:
            await channel.close()
            await server.stop(grace=None)

    asyncio.run(main())


def test_stream_ended_by_the_machine_fails_waiting_calls_and_reopens():
    async def main():
        machine = Machine(end_first=1)
        server, channel, ws = await start(machine)
        try:
            with pytest.raises(WorkError) as e:
                await ws.call(decode("a"), 10.0)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            reply = await ws.call(decode("br"), 10.0)  # a new stream
            assert reply.reserved and machine.streams == 2
            # The machine shuts down its stream (mlsd after its drain): it ends, clsd notices, and
            # the next call opens a new one.
            machine.servers[-1].close()
            await wait_for(lambda: machine.ended == 1 and not ws.is_open)
            assert (await ws.call(decode("cr"), 10.0)).reserved and machine.streams == 3
        finally:
            ws.close()
            await channel.close()
            await server.stop(grace=None)

    asyncio.run(main())


def test_machine_gone_fails_waiting_calls_before_their_deadline():
    async def main():
        machine = Machine()
        server, channel, ws = await start(machine)
        try:
            waiting = asyncio.ensure_future(ws.call(pb.PrefillRequest(
                request=decode("hang-3").request, kv_address=b"x"), 30.0))
            # The machine has taken the item (not only the client sent it): its stop must cancel it.
            await wait_for(lambda: "hang-3" in machine.started)
            t0 = time.monotonic()
            await server.stop(grace=None)
            with pytest.raises(WorkError) as e:
                await waiting
            assert e.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
            assert time.monotonic() - t0 < 10.0
            assert machine.cancelled == ["hang-3"]
        finally:
            ws.close()
            await channel.close()

    asyncio.run(main())
