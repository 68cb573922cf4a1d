"""The process's one UCX worker (ucxx) and the thread that progresses it, for the ucx KV transport.

How an operation goes through it:
1. Any thread posts a tag send or receive (`send`, `recv`): the worker is created with
   UCS_THREAD_MODE_MULTI, so posting needs no hop; the op is tracked and the progress thread is
   woken through an eventfd.
2. The progress thread calls ucp_worker_progress once per pass and runs the callbacks of the ops
   that completed (on its own thread: they only hand the result on). With nothing left to do it
   arms the worker and sleeps in epoll on the worker's event fd and the eventfd, so an idle
   process, or one waiting for a peer, burns no core (ucxx's own progress modes spin while a
   request is pending: measured at 98% of a core).
3. Ops nobody waits for any more (`abandon`) are completed after a grace period by a one-byte
   message the worker sends itself; ucxx has no per-request cancel, and dropping a request
   object would cancel it while UCX may still be writing into its buffer.

Endpoints are made from worker addresses with error handling off: the listener path turns it on,
and with it UCX uses TCP lanes only (see ../shared/NOTES.md); peer failure is left to the
transport's control channel and deadlines.
"""

from __future__ import annotations

import atexit
import collections
import logging
import os
import select
import threading
import time
from dataclasses import dataclass

# Measured with benchmarks/kv_transport_bench.py (30 layers of 4096 tokens, contiguous sink, loopback):
# the receiver fetching (get_zcopy, the default) reached 5.0-5.4 GB/s over shared memory/CMA and
# 1.2 GB/s over TCP lanes; the sender putting reached 6.6-6.9 and 3.3. UCX_PROTO_ENABLE=n was
# 3.9-7.7 (no better, far noisier); UCX_TLS=sm,self or posix,self no better than the default.
UCX_ENV = {
    "UCX_WARN_UNUSED_ENV_VARS": "n",  # ucxx sets variables this UCX build does not know
    "UCX_RNDV_SCHEME": "put_zcopy",
}
for _key, _value in UCX_ENV.items():
    os.environ.setdefault(_key, _value)

import ucxx._lib.libucxx as ucx_api  # noqa: E402
from ucxx._lib.arr import Array  # noqa: E402
from ucxx.types import Tag  # noqa: E402

log = logging.getLogger(__name__)
MAX_ENDPOINTS = 64


@dataclass(eq=False)
class Op:
    request: object  # ucxx UCXRequest: dropping it would cancel it, so the runtime holds it
    buffer: object  # the memory UCX reads or writes: alive until the request completes
    tag: int
    callback: object  # callable(error: str | None) on the progress thread, or None
    abandon_at_s: float | None = None


class UCXRuntime:
    """The process's UCX worker and its progress thread. Other threads post operations (the
    worker is UCS_THREAD_MODE_MULTI) and wake the thread through an eventfd."""

    def __init__(self) -> None:
        self.context = ucx_api.UCXContext({}, (ucx_api.Feature.TAG, ucx_api.Feature.WAKEUP))
        self.worker = ucx_api.UCXWorker(self.context)
        self.worker.init_blocking_progress_mode()
        self.address = self.worker.address.tobytes()
        self._lock = threading.Lock()
        self._ops: list[Op] = []
        self._endpoints: collections.OrderedDict[bytes, object] = collections.OrderedDict()
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._stopping = False
        self._one_byte = bytearray(1)
        self._thread = threading.Thread(target=self._loop, daemon=True, name="kv-ucx-progress")
        self._thread.start()

    def recv(self, buffer, tag: int, callback) -> Op:
        return self._track(self.worker.tag_recv(Array(buffer), Tag(tag)), buffer, tag, callback)

    def send(self, peer: bytes, buffer, tag: int, callback) -> Op:
        request = self._endpoint(peer).tag_send(Array(buffer), Tag(tag))
        return self._track(request, buffer, tag, callback)

    def abandon(self, ops: list[Op], grace_s: float) -> None:
        """Receives nobody waits for any more: completed by a self-sent byte after grace_s."""
        with self._lock:
            for op in ops:
                op.callback, op.abandon_at_s = None, time.monotonic() + grace_s
        os.eventfd_write(self._wake, 1)

    def stop(self) -> None:
        """At exit: UCX aborts the process if it is torn down under a running progress thread
        or with requests still posted, so stop the thread, then cancel what is left."""
        self._stopping = True
        os.eventfd_write(self._wake, 1)
        self._thread.join(timeout=2.0)
        with self._lock:
            ops, self._ops = self._ops, []
        del ops  # dropping a ucxx request cancels it
        self.worker.progress()

    def _track(self, request, buffer, tag: int, callback) -> Op:
        op = Op(request, buffer, tag, callback)
        with self._lock:
            self._ops.append(op)
        os.eventfd_write(self._wake, 1)
        return op

    def _endpoint(self, peer: bytes):
        with self._lock:
            ep = self._endpoints.get(peer)
            if ep is None:
                address = ucx_api.UCXAddress.create_from_buffer(peer)
                ep = ucx_api.UCXEndpoint.create_from_worker_address(self.worker, address, False)
                self._endpoints[peer] = ep
                if len(self._endpoints) > MAX_ENDPOINTS:  # requests in flight keep their endpoint
                    self._endpoints.popitem(last=False)
            self._endpoints.move_to_end(peer)
            return ep

    def _loop(self) -> None:
        poller = select.epoll()
        poller.register(self.worker.epoll_file_descriptor, select.EPOLLIN)
        poller.register(self._wake, select.EPOLLIN)
        while not self._stopping:
            try:
                sleep_s = self._pass()
            except Exception:  # this thread must survive: every UCX transfer depends on it
                log.exception("KV UCX progress pass failed")
                sleep_s = 0.01
            if sleep_s is None:
                continue
            poller.poll(sleep_s)
            try:
                os.eventfd_read(self._wake)
            except BlockingIOError:
                pass

    def _pass(self) -> float | None:
        """One progress pass; returns how long the thread may sleep, None to go on at once."""
        # One ucp_worker_progress per pass: ucxx's progress() drains until UCX is idle, which
        # under a steady stream means until the transfer ends, holding back every completion.
        progressed = self.worker.progress_once()
        now = time.monotonic()
        with self._lock:
            done = [op for op in self._ops if op.request.completed]
            if done:
                self._ops = [op for op in self._ops if op not in done]
            expired = [op for op in self._ops if op.abandon_at_s is not None and op.abandon_at_s <= now]
            next_s = min((op.abandon_at_s for op in self._ops if op.abandon_at_s is not None), default=None)
        for op in done:
            if op.callback is not None:
                try:
                    op.callback(_error_of(op.request))
                except Exception:
                    log.exception("KV UCX completion callback failed")
        for op in expired:
            op.abandon_at_s = None  # the byte sent here completes it on a later pass
            self._track(self._endpoint(self.address).tag_send(Array(self._one_byte), Tag(op.tag)),
                        self._one_byte, op.tag, None)
        if progressed or done or expired or not self.worker.arm():
            return None  # more may be ready: UCX must be drained before it can be armed
        return 1.0 if next_s is None else max(0.0, next_s - now)


def _error_of(request) -> str | None:
    try:
        request.check_error()
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return None


_RUNTIME: UCXRuntime | None = None
_RUNTIME_LOCK = threading.Lock()


def runtime() -> UCXRuntime:
    global _RUNTIME
    with _RUNTIME_LOCK:
        if _RUNTIME is None:
            _RUNTIME = UCXRuntime()
            atexit.register(_RUNTIME.stop)
        return _RUNTIME
