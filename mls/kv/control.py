"""The per-transfer TCP control channel shared by the `tcp` and `ucx` transports.

Life cycle of one transfer through it (receiver R, sender S; wire format in wire.py):
1. R listens on host:port (port 0 by default) with one accept thread; `expect()` registers the
   request. S's `open()` returns a handle at once; the handle's own thread connects.
2. S sends the preamble and header; R answers ACCEPT, or REJECT with a reason when the request is
   unknown, cancelled, already connected or past its deadline, or when the header differs (the
   KVSpecError text names the field; a mismatching header also fails R's side at once). A header
   for a request R does not expect yet is held up to `early_connect_wait_s` for its `expect()`:
   clsd sends a request's decode and prefill work at the same time, so the prompt machine may
   connect before the token machine has reserved the blocks (which it must before any layer).
   A sender refused that way is remembered: a later `expect()` of its request fails at once
   (the sender will not come back), rather than at the end of the start window.
3. S streams LAYER frames, layers in any order, then FINISH with the first token id; how a
   layer's bytes travel is the transport's part (`ControlReceiver._receive`,
   `ControlSendHandle._send_layer`).
4. R, holding every layer, marks the transfer DONE and answers ACK; only then is S's handle DONE.
   (Should S die after FINISH, R is DONE and S FAILED: a retried request is then decoded twice,
   which the cluster's per-index token delivery makes harmless.)
5. A deadline, a peer closing, R's `cancel`, S's `abort` or a protocol error ends it FAILED on
   both sides: R sends an ERROR status with the reason (best effort) and shuts the socket down;
   S fails as soon as it reads that status or sees the socket close. R's per-transfer write lock
   makes sure nothing lands in the sink once the transfer has left RECEIVING.
6. R's `cancel` also forgets a finished transfer; one nobody cancels is forgotten
   `retain_finished_s` after it ended (poll then says "not expected here").
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, field

import torch

from mls.kv.base import KVReceiver, KVSink, KVSpec, KVSpecError, ReceiveStatus, TransferState
from mls.kv.wire import TERMINAL, ProtocolError, buffer_spans, encode_status, read_preamble, shutdown, tune

FAILED, RECEIVING, WAITING, DONE = (TransferState.FAILED, TransferState.RECEIVING,
                                    TransferState.WAITING, TransferState.DONE)


@dataclass(eq=False)
class Transfer:
    """One expected request on a receiver. The receiver's lock guards the fields; `write_lock` is
    held while bytes go into the sink, so failing a transfer can wait out a write in progress."""
    spec: KVSpec
    sink: KVSink
    deadline_s: float
    expected_at_s: float
    state: TransferState = WAITING
    layers: set[int] = field(default_factory=set)
    first_token_id: int | None = None
    error: str | None = None
    conn: socket.socket | None = None
    ended_at_s: float | None = None
    write_lock: threading.RLock = field(default_factory=threading.RLock)
    transfer_window_s: float | None = None
    connected_at_s: float | None = None

    def connected(self) -> None:
        """The sender is here: the start window ends and the transfer window begins."""
        self.connected_at_s = time.monotonic()
        if self.transfer_window_s is not None:
            self.deadline_s = self.connected_at_s + self.transfer_window_s

    def timeout_reason(self) -> str:
        n = self.spec.num_layers
        if self.connected_at_s is None:
            return (f"timed out after {self.deadline_s - self.expected_at_s:.2f} s waiting for the "
                    f"sender to connect (0 of {n} layers received)")
        waiting = next((f"layer {i}" for i in range(n) if i not in self.layers), "the sender's finish")
        window = self.deadline_s - (self.expected_at_s if self.transfer_window_s is None
                                    else self.connected_at_s)
        return (f"timed out after {window:.2f} s waiting for {waiting} "
                f"({len(self.layers)} of {n} layers received)")


class ControlReceiver(KVReceiver):
    """Listener, registry and handshake; a subclass moves the bytes in `_receive`."""
    transport = "control"
    magic = b"NONE"

    def __init__(self, host: str = "127.0.0.1", port: int = 0, handshake_timeout_s: float = 5.0,
                 max_connections: int = 256, retain_finished_s: float = 60.0,
                 early_connect_wait_s: float = 10.0):
        self._lock = threading.Lock()
        self._expected = threading.Condition(self._lock)  # expect() or close() happened
        self._early_connect_wait_s = early_connect_wait_s
        self._refused: dict[str, float] = {}  # request id -> when its early sender was refused
        self._retain_finished_s = retain_finished_s
        self._next_prune_s = 0.0
        self._transfers: dict[str, Transfer] = {}
        self._conns: set[socket.socket] = set()
        self._closed = False
        self._handshake_timeout_s = handshake_timeout_s
        self._max_connections = max_connections
        self._listener = socket.create_server((host, port), backlog=128)
        self._host, self._port = host, self._listener.getsockname()[1]
        self._accept_thread = threading.Thread(target=self._accept_loop, daemon=True,
                                               name=f"kv-{self.transport}-accept")
        self._accept_thread.start()

    def address(self) -> bytes:
        return f"{self._host}:{self._port}".encode()

    def expect(self, spec: KVSpec, sink: KVSink, deadline_s: float,
               transfer_window_s: float | None = None) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError("KV receiver is closed")
            old = self._transfers.get(spec.request_id)
            if old is not None and old.state not in TERMINAL:
                raise ValueError(f"request {spec.request_id!r} is already expected")
            now = time.monotonic()
            t = self._transfers[spec.request_id] = Transfer(spec, sink, deadline_s, now,
                                                            transfer_window_s=transfer_window_s)
            refused_at = self._refused.pop(spec.request_id, None)
            if refused_at is not None:  # poll() reports it; the caller frees the blocks
                t.state, t.ended_at_s = FAILED, now
                t.error = (f"its sender connected {now - refused_at:.1f} s before this reservation "
                           f"and was refused after waiting {self._early_connect_wait_s:g} s for it")
            self._expected.notify_all()  # a sender that connected early may be waiting for it
            if now >= self._next_prune_s:  # the registry stays bounded if callers never cancel
                self._next_prune_s = now + min(1.0, self._retain_finished_s / 2)
                self._prune(now)

    def poll(self, request_id: str) -> ReceiveStatus:
        with self._lock:
            t = self._transfers.get(request_id)
        if t is None:
            return ReceiveStatus(FAILED, error=f"request {request_id!r} is not expected here")
        if t.state not in TERMINAL and time.monotonic() >= t.deadline_s:
            self.fail(t, t.timeout_reason())  # nobody may be connected to notice the deadline
        with self._lock:
            return ReceiveStatus(t.state, len(t.layers), t.first_token_id, t.error)

    def cancel(self, request_id: str) -> None:
        with self._lock:
            t = self._transfers.pop(request_id, None)
        if t is not None:
            self.fail(t, "cancelled by the receiver")

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            transfers, conns = list(self._transfers.values()), list(self._conns)
            self._transfers.clear()
            self._expected.notify_all()
        shutdown(self._listener)  # wakes the accept thread
        self._listener.close()
        for t in transfers:
            self.fail(t, "receiver closed")
        for conn in conns:
            shutdown(conn)
        self._accept_thread.join(timeout=1.0)

    # -- for the transports ------------------------------------------------------------------

    def fail(self, t: Transfer, reason: str) -> bool:
        """Ends t FAILED (once). Returns only when no write into its sink is in progress."""
        with self._lock:
            if t.state in TERMINAL:
                return False
            t.state, t.error, t.ended_at_s = FAILED, reason, time.monotonic()
            if t.conn is not None:  # closed only under this lock, so the socket is still ours
                try:
                    t.conn.send(encode_status(False, reason), socket.MSG_DONTWAIT)
                except OSError:
                    pass
                shutdown(t.conn)  # wakes the connection thread out of any blocking read
        with t.write_lock:
            pass
        self._notify_ended(t.spec.request_id)
        return True

    @staticmethod
    def check_layer(t: Transfer, layer: int) -> None:
        """An announced layer index must be in range and new; ProtocolError otherwise."""
        n = t.spec.num_layers
        if not 0 <= layer < n:
            raise ProtocolError(f"layer index {layer} outside [0, {n})")
        if layer in t.layers:
            raise ProtocolError(f"layer {layer} sent twice")

    def layer_spans(self, t: Transfer, layer: int) -> tuple[list[torch.Tensor], list[tuple[int, int]]]:
        """The sink's buffers for one announced layer and their spans (see wire.buffer_spans)."""
        self.check_layer(t, layer)
        buffers = t.sink.layer_buffers(layer)
        try:
            return buffers, buffer_spans(buffers, t.spec.layer_nbytes)
        except ValueError as e:
            raise ProtocolError(f"layer {layer}: {e}") from None

    def layer_done(self, t: Transfer, layer: int) -> None:
        with self._lock:
            t.layers.add(layer)

    def finish(self, t: Transfer, conn: socket.socket, first_token_id: int) -> None:
        with self._lock:
            if t.state != RECEIVING:
                return
            missing = t.spec.num_layers - len(t.layers)
            if not missing:
                t.state, t.first_token_id, t.ended_at_s = DONE, first_token_id, time.monotonic()
        if missing:
            self.fail(t, f"sender finished with {missing} of {t.spec.num_layers} layers missing")
        else:
            self._notify_ended(t.spec.request_id)  # the owner wakes before the ACK goes out
            conn.sendall(encode_status(True, "done"))

    def _check_header(self, header: dict) -> None:
        """The transport's own header fields; raises ProtocolError (the sender is rejected)."""

    def _receive(self, t: Transfer, conn: socket.socket, header: dict) -> None:
        """Moves the layers after ACCEPT and ends with `finish`; raising fails the transfer."""
        raise NotImplementedError

    # -- internals -----------------------------------------------------------------------------

    def _prune(self, now: float) -> None:
        """Under the lock: expires unpolled transfers nobody connected for, forgets old ones."""
        for rid, t in list(self._transfers.items()):
            if t.state == WAITING and now >= t.deadline_s:  # no connection: nothing to notify
                t.state, t.error, t.ended_at_s = FAILED, t.timeout_reason(), now
            elif t.ended_at_s is not None and now - t.ended_at_s > self._retain_finished_s:
                del self._transfers[rid]

    def _remember_refused(self, request_id: str) -> None:
        """Under the lock: bounded in size and kept `retain_finished_s`."""
        now = time.monotonic()
        if len(self._refused) >= 4096:
            self._refused = {k: v for k, v in self._refused.items()
                             if now - v < self._retain_finished_s}
            while len(self._refused) >= 4096:
                self._refused.pop(next(iter(self._refused)))
        self._refused[request_id] = now

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # the listener was closed
            with self._lock:
                admitted = not self._closed and len(self._conns) < self._max_connections
                if admitted:
                    self._conns.add(conn)
            if not admitted:
                try:
                    limit = self._max_connections
                    conn.send(encode_status(False, f"too many KV connections (limit {limit})"))
                except OSError:
                    pass
                conn.close()
                continue
            threading.Thread(target=self._serve, args=(conn,), daemon=True,
                             name=f"kv-{self.transport}-conn").start()

    def _serve(self, conn: socket.socket) -> None:
        t = None
        try:
            tune(conn)
            try:
                header = read_preamble(conn, self.magic, time.monotonic() + self._handshake_timeout_s)
                spec = KVSpec.from_dict(header)
                self._check_header(header)
            except (KVSpecError, ProtocolError) as e:
                conn.sendall(encode_status(False, str(e)))
                return
            t, reason = self._claim(spec, conn)
            if t is None:
                conn.sendall(encode_status(False, reason))
                return
            conn.sendall(encode_status(True, "accepted"))
            self._receive(t, conn, header)
        except TimeoutError:
            if t is not None:
                self.fail(t, t.timeout_reason())
        except (ProtocolError, KVSpecError) as e:
            if t is not None:
                self.fail(t, str(e))
        except OSError as e:
            if t is not None and time.monotonic() >= t.deadline_s:
                self.fail(t, t.timeout_reason())  # the sender gave up at the same deadline first
            elif t is not None:
                self.fail(t, f"sender closed the connection after {len(t.layers)} of "
                             f"{t.spec.num_layers} layers (it aborted or died: {e})")
        except Exception as e:  # a sink or transport bug must still end the transfer
            if t is not None:
                self.fail(t, f"receive failed: {e!r}")
        finally:
            with self._lock:
                self._conns.discard(conn)
                if t is not None and t.conn is conn:
                    t.conn = None
                conn.close()

    def _claim(self, spec: KVSpec, conn: socket.socket) -> tuple[Transfer | None, str]:
        with self._lock:
            t = self._transfers.get(spec.request_id)
            give_up_s = time.monotonic() + self._early_connect_wait_s
            while t is None and not self._closed and (left := give_up_s - time.monotonic()) > 0:
                self._expected.wait(left)  # the sender came before the reservation
                t = self._transfers.get(spec.request_id)
            if t is None:
                self._remember_refused(spec.request_id)
                waited = f" within {self._early_connect_wait_s:g} s" if self._early_connect_wait_s > 0 else ""
                return None, (f"request {spec.request_id!r} is not expected{waited} (unknown, "
                              "cancelled or forgotten)")
            if t.state != WAITING:
                return None, f"request {spec.request_id!r} is already {t.state.name}"
            try:
                t.spec.check_matches(spec)
                if time.monotonic() >= t.deadline_s:
                    raise TimeoutError
            except KVSpecError as e:
                reason = str(e)
            except TimeoutError:
                reason = t.timeout_reason()
            else:
                t.conn, t.state = conn, RECEIVING
                t.connected()
                return t, ""
        self.fail(t, reason)
        return None, reason
