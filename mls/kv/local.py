"""In-process KV transport for tests and the simulator: the sender copies into the sink directly.

Life cycle of one transfer:
1. A `LocalReceiver` registers itself in a process-wide registry; `address()` is its key there.
2. `expect(spec, sink, deadline)` registers the request (WAITING).
3. `LocalSender.open(address, spec, deadline)` finds the receiver and the request and checks the
   header by the same rules as the network transports (unknown or cancelled request, header
   mismatch naming the field, a passed deadline): the handle fails at once otherwise, and a
   mismatch fails the receiver's side too. Attached, the transfer is RECEIVING on both sides.
4. `send_layer(i, kv)` copies kv into `sink.layer_buffers(i)` on the caller's thread (a memcpy;
   a thread per transfer would buy tests and the simulator nothing) and calls `layer_received`;
   `finish(token)` makes both sides DONE at the same moment, once every layer is in.
5. Deadlines are checked when either side looks (poll, wait, send_layer, finish); `cancel` and
   `abort` end both sides FAILED. The copy runs under the transfer's write lock, which `cancel`
   also takes, so no byte lands in the sink after `cancel` returns. `cancel` also forgets a
   finished transfer; one nobody cancels is forgotten `retain_finished_s` after it ended.
"""

from __future__ import annotations

import itertools
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from mls.kv.base import KVReceiver, KVSender, KVSink, KVSpec, KVSpecError, ReceiveStatus, SendHandle
from mls.kv.control import DONE, FAILED, RECEIVING, WAITING, Transfer
from mls.kv.wire import TERMINAL, buffer_spans, check_layer_tensor, copy_to_spans

_REGISTRY: dict[bytes, LocalReceiver] = {}
_REGISTRY_LOCK = threading.Lock()
_NEXT_ID = itertools.count(1)


@dataclass(eq=False)
class _LocalTransfer(Transfer):
    done: threading.Event = field(default_factory=threading.Event)
    notify: Callable[[str], None] | None = None

    def end(self, state, reason: str | None = None, first_token_id: int | None = None) -> bool:
        with self.write_lock:  # waits out a copy in progress on another thread
            if self.state in TERMINAL:
                return False
            self.state, self.error, self.first_token_id = state, reason, first_token_id
            self.ended_at_s = time.monotonic()
        self.done.set()
        if self.notify is not None:
            self.notify(self.spec.request_id)
        return True

    def expire(self, deadline_s: float) -> None:
        if self.state not in TERMINAL and time.monotonic() >= deadline_s:
            self.end(FAILED, self.timeout_reason())


class LocalReceiver(KVReceiver):
    transport = "local"

    def __init__(self, retain_finished_s: float = 60.0) -> None:
        self._lock = threading.Lock()
        self._transfers: dict[str, _LocalTransfer] = {}
        self._retain_finished_s = retain_finished_s
        self._address = f"local:{next(_NEXT_ID)}".encode()
        with _REGISTRY_LOCK:
            _REGISTRY[self._address] = self

    def address(self) -> bytes:
        return self._address

    def expect(self, spec: KVSpec, sink: KVSink, deadline_s: float,
               transfer_window_s: float | None = None) -> None:
        with self._lock:
            old = self._transfers.get(spec.request_id)
            if old is not None and old.state not in TERMINAL:
                raise ValueError(f"request {spec.request_id!r} is already expected")
            now = time.monotonic()
            self._transfers[spec.request_id] = _LocalTransfer(spec, sink, deadline_s, now,
                                                              transfer_window_s=transfer_window_s,
                                                              notify=self._notify_ended)
            for rid, t in list(self._transfers.items()):  # bounded even if callers never cancel
                t.expire(t.deadline_s)
                if t.ended_at_s is not None and now - t.ended_at_s > self._retain_finished_s:
                    del self._transfers[rid]

    def poll(self, request_id: str) -> ReceiveStatus:
        with self._lock:
            t = self._transfers.get(request_id)
        if t is None:
            return ReceiveStatus(FAILED, error=f"request {request_id!r} is not expected here")
        t.expire(t.deadline_s)
        with t.write_lock:
            return ReceiveStatus(t.state, len(t.layers), t.first_token_id, t.error)

    def cancel(self, request_id: str) -> None:
        with self._lock:
            t = self._transfers.pop(request_id, None)
        if t is not None:
            t.end(FAILED, "cancelled by the receiver")

    def close(self) -> None:
        with _REGISTRY_LOCK:
            _REGISTRY.pop(self._address, None)
        with self._lock:
            transfers = list(self._transfers.values())
            self._transfers.clear()
        for t in transfers:
            t.end(FAILED, "receiver closed")

    def attach(self, spec: KVSpec) -> _LocalTransfer:
        """The sender's handshake; raises KVSpecError with the reason it is refused."""
        with self._lock:
            t = self._transfers.get(spec.request_id)
        if t is None:
            raise KVSpecError(f"request {spec.request_id!r} is not expected (unknown, cancelled or "
                              "forgotten)")
        t.expire(t.deadline_s)
        with t.write_lock:
            if t.state != WAITING:
                raise KVSpecError(f"request {spec.request_id!r} is already {t.state.name}: {t.error or ''}")
            try:
                t.spec.check_matches(spec)
            except KVSpecError as e:
                t.end(FAILED, str(e))
                raise
            t.state = RECEIVING
            t.connected()
        return t


class LocalSendHandle(SendHandle):
    def __init__(self, spec: KVSpec, deadline_s: float, transfer: _LocalTransfer | None,
                 error: str | None = None):
        self.spec = spec
        self._deadline_s = deadline_s
        self._t = transfer
        self._error = error
        self._queued: set[int] = set()

    def send_layer(self, layer: int, kv: torch.Tensor) -> None:
        check_layer_tensor(self.spec, layer, kv)
        if layer in self._queued:
            raise ValueError(f"layer {layer} queued twice")
        self._queued.add(layer)
        t = self._t
        if t is None:
            return
        t.expire(self._deadline_s)
        with t.write_lock:
            if t.state != RECEIVING:
                return  # cancelled, aborted or timed out: the layer is dropped
            try:
                buffers = t.sink.layer_buffers(layer)  # alive while the spans are used
                copy_to_spans(kv.cpu(), buffer_spans(buffers, self.spec.layer_nbytes))
                t.sink.layer_received(layer)
            except Exception as e:  # a sink bug ends the transfer, not the engine thread
                t.end(FAILED, f"sink failed on layer {layer}: {e!r}")
                return
            t.layers.add(layer)

    def finish(self, first_token_id: int) -> None:
        t = self._t
        if t is None:
            return
        t.expire(self._deadline_s)
        with t.write_lock:
            if t.state != RECEIVING:
                return
            missing = self.spec.num_layers - len(t.layers)
            if missing:
                t.end(FAILED, f"sender finished with {missing} of {self.spec.num_layers} layers missing")
            else:
                t.end(DONE, first_token_id=first_token_id)

    def abort(self, reason: str) -> None:
        if self._t is not None:
            self._t.end(FAILED, f"aborted by the sender: {reason}")

    def wait(self, timeout_s: float | None = None):
        t = self._t
        if t is None:
            return FAILED
        limit = self._deadline_s - time.monotonic()
        t.done.wait(max(0.0, limit if timeout_s is None else min(timeout_s, limit)))
        t.expire(self._deadline_s)
        return t.state

    @property
    def state(self):
        return FAILED if self._t is None else self._t.state

    @property
    def error(self) -> str | None:
        return self._error if self._t is None else self._t.error


class LocalSender(KVSender):
    transport = "local"

    def __init__(self) -> None:
        self._handles: weakref.WeakSet[LocalSendHandle] = weakref.WeakSet()

    def check_address(self, peer_address: bytes) -> None:
        super().check_address(peer_address)
        if not peer_address.startswith(b"local:"):
            raise ValueError(f"kv_address {peer_address[:40]!r} is not a local receiver's")

    def open(self, peer_address: bytes, spec: KVSpec, deadline_s: float) -> LocalSendHandle:
        with _REGISTRY_LOCK:
            receiver = _REGISTRY.get(peer_address)
        if receiver is None:
            return LocalSendHandle(spec, deadline_s, None, f"no local KV receiver at {peer_address!r}")
        try:
            handle = LocalSendHandle(spec, deadline_s, receiver.attach(spec))
        except KVSpecError as e:
            return LocalSendHandle(spec, deadline_s, None, f"rejected by the receiver: {e}")
        self._handles.add(handle)
        return handle

    def close(self) -> None:
        for handle in list(self._handles):
            handle.abort("sender closed")

