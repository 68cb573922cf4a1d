"""The sending side of the KV control channel (life cycle and wire format: control.py, wire.py).

One `ControlSendHandle` per transfer: `send_layer`/`finish` only append to a mailbox and return;
the handle's thread connects, sends the header, waits for ACCEPT, then streams what was queued
(`_send_layer` is the transport's part) and finally waits for the receiver's ACK. While idle it
also watches the socket, so a receiver that cancels or fails is noticed at once, not at the
deadline. Every wait is bounded by the transfer's deadline.

The FINISH frame is the one message left after a layerwise prefill, so it is what the token
machine waits on: when every layer has already left (and the transport says a sent layer is a
delivered one, `_direct_finish`), `finish()` writes those 5 bytes itself, without blocking
(a write to the non-blocking descriptor), rather than waking the handle's thread for them.
Waking a thread costs 0.1-0.3 ms on a busy 2-core host, and the caller (mlsd's engine thread)
keeps the GIL for its next turn.
Anything the non-blocking write did not take, the handle's thread sends.
"""

from __future__ import annotations

import collections
import os
import select
import socket
import threading
import time

import torch

from mls.kv.base import KVSender, KVSpec, SendHandle, TransferState
from mls.kv.control import DONE, FAILED, RECEIVING, WAITING
from mls.kv.wire import (
    FRAME,
    FRAME_FINISH,
    FRAME_LAYER,
    TERMINAL,
    Mailbox,
    ProtocolError,
    check_layer_tensor,
    encode_preamble,
    parse_host_port,
    read_status,
    remaining_s,
    shutdown,
    tune,
)


class ControlSendHandle(SendHandle):
    """One transfer's sending side: a thread connects, sends the header, then streams what the
    caller queues (send_layer/finish only append to a mailbox, never touch the network)."""
    magic = b"NONE"
    _direct_finish = False
    """True where `_send_layer` returning means the layer is on the wire (tcp, shm): then
    `finish()` may write the FINISH frame itself once every layer is sent."""

    def __init__(self, sender: ControlSender, peer_address: bytes, spec: KVSpec, deadline_s: float):
        self.spec = spec
        self._sender = sender
        self._deadline_s = deadline_s
        self._budget_s = deadline_s - time.monotonic()
        self._host, self._port = self._parse_address(peer_address)
        self._lock = threading.Lock()
        self._state = WAITING
        self._error: str | None = None
        self._done = threading.Event()
        self._mailbox = Mailbox()
        self._queued: set[int] = set()
        self._finish_queued = False
        self._sock: socket.socket | None = None
        self._sock_lock = threading.Lock()  # the caller's direct FINISH write vs closing the socket
        self._streaming = False  # accepted and streaming: the socket carries frames
        self._layers_sent = 0
        self._direct_claimed = False  # finish() writes FINISH itself (decided under _lock)
        self._direct_written = threading.Event()
        self._direct_bytes = 0  # how much of the FINISH frame that write took
        self._direct_token = 0
        self._phase = f"connecting to {self._host}:{self._port}"

    # -- SendHandle ----------------------------------------------------------------------------

    def send_layer(self, layer: int, kv: torch.Tensor) -> None:
        check_layer_tensor(self.spec, layer, kv)
        with self._lock:
            if layer in self._queued or self._finish_queued:
                raise ValueError(f"layer {layer} queued twice or after finish()")
            self._queued.add(layer)
            if self._state in TERMINAL:
                return  # the transfer is over: the layer is dropped
        self._mailbox.put((FRAME_LAYER, layer, kv))

    def finish(self, first_token_id: int) -> None:
        if not 0 <= first_token_id < 2**32:
            raise ValueError(f"first token id {first_token_id} outside [0, 2**32)")
        with self._lock:
            if self._finish_queued:
                raise ValueError("finish() called twice")
            self._finish_queued = True
            direct = self._direct_claimed = (self._direct_finish and self._streaming
                                             and self._state == RECEIVING
                                             and self._layers_sent == self.spec.num_layers)
            self._direct_token = first_token_id
        if direct:  # the thread wakes on the receiver's answer, not on the mailbox
            self._direct_bytes = self._write_now(FRAME.pack(FRAME_FINISH, first_token_id))
            self._direct_written.set()
            if self._direct_bytes == FRAME.size:
                return
        self._mailbox.put((FRAME_FINISH, first_token_id))

    def _write_now(self, frame: bytes) -> int:
        """Writes what the socket takes without blocking; the handle's thread sends the rest."""
        with self._sock_lock:
            sock = self._sock
            if sock is None or sock.fileno() < 0:
                return 0
            fd = sock.fileno()
            try:
                # Not sock.send: on a socket with a timeout, Python waits (up to the timeout) for
                # room when the buffer is full, MSG_DONTWAIT or not. The handle's thread gave the
                # socket a timeout, so its descriptor is non-blocking and os.write never waits.
                if os.get_blocking(fd):
                    return 0
                return os.write(fd, frame)
            except OSError:  # full or failing: the handle's thread sends it or sees the error
                return 0

    def abort(self, reason: str) -> None:
        self._end(FAILED, f"aborted by the sender: {reason}")

    def wait(self, timeout_s: float | None = None) -> TransferState:
        self._done.wait(timeout_s)
        return self.state

    @property
    def state(self) -> TransferState:
        return self._state

    @property
    def error(self) -> str | None:
        return self._error

    # -- for the transports ------------------------------------------------------------------

    def _parse_address(self, peer_address: bytes) -> tuple[str, int]:
        return _host_port(peer_address)

    def _header(self) -> dict:
        return self.spec.to_dict()

    def _on_accepted(self) -> None: ...

    def _send_layer(self, sock: socket.socket, layer: int, kv: torch.Tensor) -> None:
        raise NotImplementedError

    def _can_send(self) -> bool:
        return True

    def _flushed(self) -> bool:
        return True

    def _on_item(self, item: tuple) -> None:
        raise ProtocolError(f"unexpected mailbox item {item[0]!r}")

    # -- internals -----------------------------------------------------------------------------

    def start(self) -> None:
        threading.Thread(target=self._run, daemon=True, name="kv-send").start()

    def _end(self, state: TransferState, error: str | None = None) -> bool:
        with self._lock:
            if self._state in TERMINAL:
                return False
            self._state, self._error, sock = state, error, self._sock
        if state == FAILED and sock is not None:
            shutdown(sock)  # unblocks the thread: a sendall or poll fails at once
        self._done.set()
        self._sender.forget(self)
        return True

    def _run(self) -> None:
        sock = None
        try:
            sock = socket.create_connection((self._host, self._port), timeout=remaining_s(self._deadline_s))
            with self._lock:
                self._sock = sock
                if self._state in TERMINAL:
                    return
            tune(sock)
            self._phase = "waiting for the receiver to accept the header"
            sock.settimeout(remaining_s(self._deadline_s))
            sock.sendall(encode_preamble(self.magic, self._header()))
            ok, message = read_status(sock, self._deadline_s)
            if not ok:
                self._end(FAILED, f"rejected by the receiver: {message}")
                return
            with self._lock:
                if self._state == WAITING:
                    self._state = RECEIVING
            self._on_accepted()
            self._stream(sock)
        except TimeoutError:
            self._end(FAILED, f"timed out after {self._budget_s:.2f} s {self._phase}")
        except (OSError, ProtocolError) as e:
            self._end(FAILED, f"{self._phase}: {self._peer_reason(sock) or e}")
        except Exception as e:  # a bug must still end the transfer
            self._end(FAILED, f"{self._phase}: unexpected {e!r}")
        finally:
            if sock is not None:
                with self._sock_lock:
                    sock.close()
            self._mailbox.close()

    def _stream(self, sock: socket.socket) -> None:
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        poller.register(self._mailbox.fd, select.POLLIN)
        layers: collections.deque = collections.deque()
        finish_token = None
        with self._lock:
            self._streaming = True
        while True:
            while layers and self._can_send():
                layer, kv = layers.popleft()
                self._phase = f"sending layer {layer}"
                self._send_layer(sock, layer, kv)
                with self._lock:
                    self._layers_sent += 1
            if finish_token is not None and not layers and self._flushed():
                self._phase = "waiting for the receiver's acknowledgement"
                frame = FRAME.pack(FRAME_FINISH, finish_token)
                if self._direct_claimed:  # finish() wrote it (or part of it) on its own thread
                    self._direct_written.wait(remaining_s(self._deadline_s))
                    frame = frame[self._direct_bytes:]
                sock.settimeout(remaining_s(self._deadline_s))
                if frame:
                    sock.sendall(frame)
                ok, message = read_status(sock, self._deadline_s)
                self._end(DONE if ok else FAILED, None if ok else f"receiver failed the transfer: {message}")
                return
            item = self._mailbox.get()
            if item is None:
                self._phase = self._waiting_phase(bool(layers) or finish_token is not None)
                ready = poller.poll(remaining_s(self._deadline_s) * 1000)
                if any(fd == sock.fileno() for fd, _ in ready):
                    if not self._direct_claimed:
                        raise ProtocolError(self._peer_reason(sock) or "receiver closed the connection")
                    finish_token = self._direct_token  # finish() wrote FINISH: this is the answer
                if self._state in TERMINAL:
                    return
            elif item[0] == FRAME_LAYER:
                layers.append(item[1:])
            elif item[0] == FRAME_FINISH:
                finish_token = item[1]
            else:
                self._on_item(item)

    def _waiting_phase(self, delivering: bool) -> str:
        if delivering:  # layers (or finish) are queued here behind the transport's window
            return "waiting for in-flight layers to be delivered"
        with self._lock:
            missing = next((i for i in range(self.spec.num_layers) if i not in self._queued), None)
        return "waiting for finish()" if missing is None else f"waiting for layer {missing}"

    def _peer_reason(self, sock: socket.socket | None) -> str | None:
        """The receiver's ERROR status, if it sent one before closing (it says why)."""
        if sock is None or self._state in TERMINAL:
            return None
        try:
            ok, message = read_status(sock, time.monotonic() + 0.1)
        except (OSError, ProtocolError):
            return None
        return None if ok else f"receiver ended the transfer: {message}"


class ControlSender(KVSender):
    """Opens handles of `handle_cls`; bounded, and `close()` aborts every transfer in flight."""
    transport = "control"
    handle_cls: type[ControlSendHandle] = ControlSendHandle

    def __init__(self, max_transfers: int = 1024):
        self._lock = threading.Lock()
        self._active: set[ControlSendHandle] = set()
        self._closed = False
        self._max_transfers = max_transfers

    def check_address(self, peer_address: bytes) -> None:
        super().check_address(peer_address)
        _host_port(peer_address)

    def open(self, peer_address: bytes, spec: KVSpec, deadline_s: float) -> ControlSendHandle:
        if self._closed:
            raise RuntimeError("KV sender is closed")
        handle = self.handle_cls(self, peer_address, spec, deadline_s)
        with self._lock:
            admitted = not self._closed and len(self._active) < self._max_transfers
            if admitted:
                self._active.add(handle)
        if admitted:
            handle.start()
        else:
            limit = self._max_transfers
            handle._end(FAILED, "sender closed" if self._closed else
                        f"too many KV transfers in flight (limit {limit})")
            handle._mailbox.close()
        return handle

    def forget(self, handle: ControlSendHandle) -> None:
        with self._lock:
            self._active.discard(handle)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            handles = list(self._active)
        for h in handles:
            h.abort("sender closed")


def _host_port(address: bytes) -> tuple[str, int]:
    """host:port, with a message naming what is wrong (not a UnicodeDecodeError)."""
    try:
        return parse_host_port(address)
    except UnicodeDecodeError:
        raise ValueError(f"kv_address {address[:40]!r} is not text") from None
