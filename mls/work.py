"""The machine's end of a Work stream (proto/mlsd.proto): items in, results out, batched.

`serve_work(request_iterator, context, run, status_of)` serves one stream until the caller
half-closes it (and every item is answered) or goes away:
1. Each WorkItem is handed to `run(op, request)` in arrival order (op: "add_decode", "prefill",
   "generate", "abort"). `run` returns the reply message at once, or an awaitable of it, which
   runs as a task so a slow item (a prefill) never holds up the items behind it.
2. Replies, and failures as (status code, message) with `status_of(exc)` naming the code (None:
   INTERNAL, logged), gather in one WorkResults message, written whenever the previous write is
   done: everything answered meanwhile goes out together.
3. When the stream ends or breaks, the tasks of unanswered items are cancelled, which is how a
   cancelled unary call ends (mlsd aborts the request and frees what it held).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Callable

import grpc

from proto import mlsd_pb2 as pb

log = logging.getLogger("mlsd.work")

OPS = ("add_decode", "prefill", "generate", "abort")


class _Results:
    def __init__(self):
        self.batch = pb.WorkResults()
        self.ready = asyncio.Event()

    def reply(self, call_id: int, op: str, reply) -> None:
        getattr(self.batch.results.add(call_id=call_id), op).CopyFrom(reply)
        self.ready.set()

    def fail(self, call_id: int, code: grpc.StatusCode, message: str) -> None:
        self.batch.results.add(call_id=call_id, code=code.value[0], message=message)
        self.ready.set()

    def take(self) -> pb.WorkResults:
        batch, self.batch = self.batch, pb.WorkResults()
        return batch


async def serve_work(request_iterator, context, run: Callable,
                     status_of: Callable[[BaseException], grpc.StatusCode | None]) -> None:
    out = _Results()
    tasks: dict[int, asyncio.Task] = {}

    def failed(call_id: int, e: BaseException) -> None:
        code = status_of(e)
        if code is None:
            log.error("work item %d failed", call_id, exc_info=e)
            code = grpc.StatusCode.INTERNAL
        out.fail(call_id, code, str(e))

    async def finish(call_id: int, op: str, awaitable) -> None:
        try:
            out.reply(call_id, op, await awaitable)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - every failure goes back to the caller
            failed(call_id, e)
        finally:
            tasks.pop(call_id, None)
            out.ready.set()

    async def read() -> None:
        try:
            async for batch in request_iterator:
                for item in batch.items:
                    op = item.WhichOneof("op")
                    if op is None:
                        out.fail(item.call_id, grpc.StatusCode.INVALID_ARGUMENT, "work item has no op")
                        continue
                    try:
                        res = run(op, getattr(item, op))
                    except Exception as e:  # noqa: BLE001 - a bad item fails alone
                        failed(item.call_id, e)
                        continue
                    if inspect.isawaitable(res):
                        tasks[item.call_id] = asyncio.create_task(finish(item.call_id, op, res))
                    else:
                        out.reply(item.call_id, op, res)
        finally:
            out.ready.set()

    reader = asyncio.create_task(read())
    try:
        while True:
            if out.batch.results:
                await context.write(out.take())
                continue
            if reader.done() and not tasks:
                break
            out.ready.clear()
            await out.ready.wait()
        reader.result()  # a broken stream raises here (its status is the caller's)
    finally:
        reader.cancel()
        for t in list(tasks.values()):
            t.cancel()
