"""clsd's end of one machine's Work stream: the request data path, multiplexed and batched.

1. `WorkStream.call(request, timeout_s)` (an AddDecode, Prefill, Generate or Abort request; the
   message's type is the op, proto/work_items.py) adds a WorkItem with a fresh call id to the
   batch being gathered and awaits the reply with that id. Every item added in one event-loop turn
   (and while the previous write is in flight) leaves in ONE WorkBatch message: per request clsd
   pays a protobuf item, not a unary gRPC call.
2. The stream opens on the first call and stays open; a writer task sends the batches, a reader
   task resolves the waiting calls from the WorkResults that come back (a nonzero code becomes a
   `WorkError` with that status).
3. Deadlines are per call: past `timeout_s` the call raises DEADLINE_EXCEEDED (the caller then
   aborts the request on the machine, as it does for any unfinished attempt).
4. When the stream ends or breaks, every waiting call fails with the stream's status (UNAVAILABLE
   when it ended without one) and the next call opens a new stream; the machine, for its part,
   aborts every item it had not answered. `close()` (the machine left) fails them the same way.
"""

from __future__ import annotations

import asyncio
import itertools
import logging

import grpc
from google.protobuf.message import Message

from proto import mlsd_pb2 as mpb
from proto import mlsd_pb2_grpc
from proto.work_items import REPLY_TYPE, result_reply, work_item

log = logging.getLogger("clsd.work")

_CODES = {c.value[0]: c for c in grpc.StatusCode}


class WorkError(Exception):
    """A failed Work item; `code()` and `details()` read like grpc.aio.AioRpcError's."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class WorkStream:
    def __init__(self, stub: mlsd_pb2_grpc.MachineServiceStub, machine_id: str):
        self.stub, self.machine_id = stub, machine_id
        self._pending: dict[int, tuple[type[Message], asyncio.Future]] = {}  # expected reply type
        self._ids = itertools.count(1)
        self._batch = mpb.WorkBatch()
        self._wake = asyncio.Event()
        self._call = None
        self._tasks: tuple[asyncio.Task, ...] = ()
        self._closed = False
        self.num_batches = self.num_items = 0

    async def call(self, request: Message, timeout_s: float) -> Message:
        """Sends one item and returns its reply message; raises WorkError."""
        if self._closed:
            raise WorkError(grpc.StatusCode.UNAVAILABLE, f"machine {self.machine_id} left")
        if self._call is None:
            self._open()
        call_id = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._pending[call_id] = (REPLY_TYPE[type(request)], fut)
        self._batch.items.append(work_item(call_id, request))
        self._wake.set()
        try:
            async with asyncio.timeout(timeout_s):
                return await fut
        except TimeoutError:
            raise WorkError(grpc.StatusCode.DEADLINE_EXCEEDED,
                            f"no reply within {timeout_s:g} s") from None
        finally:
            self._pending.pop(call_id, None)

    @property
    def is_open(self) -> bool:
        return self._call is not None

    def close(self) -> None:
        self._closed = True
        self._break(self._call, grpc.StatusCode.UNAVAILABLE, f"machine {self.machine_id} left")

    # -- the stream -----------------------------------------------------------------------------

    def _open(self) -> None:
        call = self.stub.Work()
        self._call = call
        self._tasks = (asyncio.create_task(self._write_loop(call)),
                       asyncio.create_task(self._read_loop(call)))

    async def _write_loop(self, call) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                if not self._batch.items:
                    continue
                batch, self._batch = self._batch, mpb.WorkBatch()
                self.num_batches += 1
                self.num_items += len(batch.items)
                await call.write(batch)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - the call is done or broken: fail what waits on it
            log.debug("work stream to %s: write failed: %s", self.machine_id, e)
            self._break(call, grpc.StatusCode.UNAVAILABLE, f"its work stream failed: {e}")

    async def _read_loop(self, call) -> None:
        code, details = grpc.StatusCode.UNAVAILABLE, "its work stream ended"
        try:
            while True:
                msg = await call.read()
                if msg is grpc.aio.EOF:
                    break
                for r in msg.results:
                    entry = self._pending.get(r.call_id)
                    if entry is None or entry[1].done():
                        continue  # the caller gave up (deadline, cancellation) meanwhile
                    reply_type, fut = entry
                    reply = result_reply(r)
                    if r.code:
                        fut.set_exception(WorkError(_CODES.get(r.code, grpc.StatusCode.UNKNOWN), r.message))
                    elif not isinstance(reply, reply_type):
                        fut.set_exception(WorkError(grpc.StatusCode.INTERNAL, f"expected a "
                                                    f"{reply_type.__name__}, got {type(reply).__name__}"))
                    else:
                        fut.set_result(reply)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                return  # our own task is being cancelled (by _break or close): nothing to report
            code, details = grpc.StatusCode.CANCELLED, "its work stream was cancelled"
        except grpc.aio.AioRpcError as e:
            code, details = e.code(), f"its work stream failed: {e.details()}"
        self._break(call, code, details)

    def _break(self, call, code: grpc.StatusCode, details: str) -> None:
        """Fails every waiting call of `call` (the current stream) and forgets the stream."""
        if call is None or call is not self._call:
            return
        self._call = None
        for t in self._tasks:
            if t is not asyncio.current_task():
                t.cancel()
        call.cancel()
        self._batch = mpb.WorkBatch()  # its items' callers are failed below
        pending, self._pending = self._pending, {}
        for _, fut in pending.values():
            if not fut.done():
                fut.set_exception(WorkError(code, f"machine {self.machine_id}: {details}"))
