"""The machine's end of a Work stream (proto/mlsd.proto): items in, results out, batched.

`WorkServer(run, status_of).serve(request_iterator, context)` serves one stream until the caller
half-closes it (and every item is answered), the caller goes away, or `close()` (the machine is
shutting down: the stream ends once the items in hand are answered):
1. Each WorkItem's request (an AddDecode, Prefill, Generate or Abort message, unwrapped by
   proto/work_items.py) is handed to `run(request)` in arrival order. `run` returns the reply
   message at once, or an awaitable of it, which runs as a task so a slow item (a prefill) never
   holds up the items behind it.
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
from proto.work_items import item_request, work_result

log = logging.getLogger("mlsd.work")


class WorkServer:
    def __init__(self, run: Callable, status_of: Callable[[BaseException], grpc.StatusCode | None]):
        self.run, self.status_of = run, status_of
        self._batch = pb.WorkResults()
        self._ready = asyncio.Event()
        self._tasks: dict[int, asyncio.Task] = {}
        self._closing = False

    def close(self) -> None:
        """Ends the stream once the items already taken are answered; later items are refused."""
        self._closing = True
        self._ready.set()

    async def serve(self, request_iterator, context) -> None:
        reader = asyncio.create_task(self._read(request_iterator))
        try:
            while True:
                if self._batch.results:
                    batch, self._batch = self._batch, pb.WorkResults()
                    await context.write(batch)
                    continue
                if reader.done() and (reader.cancelled() or reader.exception() is not None):
                    break  # the stream broke: nobody will read the answers of the items in hand
                if (reader.done() or self._closing) and not self._tasks:
                    break
                self._ready.clear()
                await self._ready.wait()
            if reader.done() and not reader.cancelled():
                reader.result()  # a broken stream raises here (its status is the caller's)
        finally:
            reader.cancel()
            for t in list(self._tasks.values()):
                t.cancel()

    # -- items ----------------------------------------------------------------------------------

    async def _read(self, request_iterator) -> None:
        try:
            async for batch in request_iterator:
                for item in batch.items:
                    self._take(item)
        finally:
            self._ready.set()

    def _take(self, item: pb.WorkItem) -> None:
        request = item_request(item)
        if request is None:
            return self._fail(item.call_id, grpc.StatusCode.INVALID_ARGUMENT, "work item has no op")
        if self._closing:
            return self._fail(item.call_id, grpc.StatusCode.UNAVAILABLE, "machine is shutting down")
        try:
            res = self.run(request)
        except Exception as e:  # noqa: BLE001 - a bad item fails alone
            return self._failed(item.call_id, e)
        if inspect.isawaitable(res):
            self._tasks[item.call_id] = asyncio.create_task(self._finish(item.call_id, res))
        else:
            self._reply(item.call_id, res)

    async def _finish(self, call_id: int, awaitable) -> None:
        try:
            self._reply(call_id, await awaitable)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - every failure goes back to the caller
            self._failed(call_id, e)
        finally:
            self._tasks.pop(call_id, None)
            self._ready.set()

    def _reply(self, call_id: int, reply) -> None:
        self._batch.results.append(work_result(call_id, reply))
        self._ready.set()

    def _fail(self, call_id: int, code: grpc.StatusCode, message: str) -> None:
        self._batch.results.add(call_id=call_id, code=code.value[0], message=message)
        self._ready.set()

    def _failed(self, call_id: int, e: BaseException) -> None:
        code = self.status_of(e)
        if code is None:
            log.error("work item %d failed", call_id, exc_info=e)
            code = grpc.StatusCode.INTERNAL
        self._fail(call_id, code, str(e))
