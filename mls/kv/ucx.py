"""UCX KV transport (ucxx): the control channel over TCP, the layer bytes over UCX tag messages.

Life cycle of one transfer (the control channel's, control.py, plus the UCX data path):
1. The process's one UCX worker (ucx_runtime.py) is created on first use. The receiver's
   `address()` is b"host:port|" followed by the worker address bytes.
2. `open()` returns a handle at once; its thread connects to host:port and sends the header
   with a random 64-bit tag base (low 16 bits zero) for this transfer; the receiver accepts or
   rejects it as the tcp transport does (magic b"MLKU").
3. For each queued layer the sender posts a UCX tag send (tag base | layer) of the layer bytes
   to an endpoint made from the receiver's worker address, then a LAYER frame with no payload.
   At most `window_layers` sends are in flight per transfer.
4. On each LAYER frame the receiver posts a tag receive into a pooled staging buffer; when it
   completes, the connection thread copies it into `sink.layer_buffers(layer)` under the
   transfer's write lock and calls `layer_received`. Staging, not the sink, is what UCX writes:
   ucxx cannot cancel one posted receive, so a late message of a cancelled or failed transfer
   lands in staging and is dropped, never in blocks already given back. (The copy runs on
   another core while UCX moves the next layer; the sink's per-block views cost more.)
5. FINISH, ACK, deadlines, cancel and abort work as in the control channel. A failed transfer
   leaves receives posted for every missing layer, so that the sender's sends in flight still
   complete; the runtime completes the leftovers after `abandon_grace_s`. Sends towards a
   receiver process that died never complete (UCX error handling is off) and keep their layer
   alive: at most `window_layers` per transfer.

UCX settings (ucx_runtime.UCX_ENV, overridable from the environment) were measured with
benchmarks/kv_transport_bench.py.
"""

from __future__ import annotations

import hashlib
import os
import select
import socket
import threading

import torch

from mls.kv.control import DONE, RECEIVING, ControlReceiver, Transfer
from mls.kv.control_sender import ControlSender, ControlSendHandle
from mls.kv.ucx_runtime import Op, runtime
from mls.kv.wire import (
    FRAME,
    FRAME_FINISH,
    FRAME_LAYER,
    Mailbox,
    ProtocolError,
    copy_to_spans,
    parse_host_port,
    read_frame,
    remaining_s,
)

MAGIC = b"MLKU"
LAYER_BITS = 16  # a tag is the transfer's random base with the layer index in the low bits


class _StagingPool:
    """Reused host buffers: fresh memory pays page faults on first touch (about 2 GB/s here)."""

    def __init__(self, max_bytes: int):
        self._lock = threading.Lock()
        self._free: list[torch.Tensor] = []
        self._max_bytes = max_bytes

    def take(self, nbytes: int) -> torch.Tensor:
        with self._lock:
            fits = [(b.numel(), i) for i, b in enumerate(self._free) if b.numel() >= nbytes]
            if fits:
                return self._free.pop(min(fits)[1])  # the smallest that fits
        return torch.empty(nbytes, dtype=torch.uint8)

    def give(self, buffer: torch.Tensor) -> None:
        with self._lock:
            if sum(b.numel() for b in self._free) + buffer.numel() <= self._max_bytes:
                self._free.append(buffer)


class UCXReceiver(ControlReceiver):
    transport = "ucx"
    magic = MAGIC

    def __init__(self, host: str = "127.0.0.1", port: int = 0, staging_pool_bytes: int = 256 * 2**20,
                 abandon_grace_s: float = 5.0, **opts):
        self._runtime = runtime()
        self._pool = _StagingPool(staging_pool_bytes)
        self._abandon_grace_s = abandon_grace_s
        self._scratch = bytearray(1)
        super().__init__(host, port, **opts)

    def address(self) -> bytes:
        return super().address() + b"|" + self._runtime.address

    def _check_header(self, header: dict) -> None:
        tag = header.get("tag")
        if not isinstance(tag, int) or not 0 <= tag < 2**64 or tag % 2**LAYER_BITS:
            raise ProtocolError(f"bad UCX tag base {tag!r} in the KV header")

    def _receive(self, t: Transfer, conn: socket.socket, header: dict) -> None:
        tag, nbytes, completions = header["tag"], t.spec.layer_nbytes, Mailbox()
        posted: dict[int, tuple[torch.Tensor, Op, list[torch.Tensor], list[tuple[int, int]]]] = {}
        finish_token = None
        poller = select.poll()
        poller.register(conn, select.POLLIN)
        poller.register(completions.fd, select.POLLIN)
        try:
            while finish_token is None or posted:
                item = completions.get()
                if item is not None:
                    layer, error = item
                    staging, _, buffers, spans = posted.pop(layer)  # buffers: keep the spans alive
                    if error is not None:
                        raise ProtocolError(f"UCX receive of layer {layer} failed: {error}")
                    with t.write_lock:  # cancel/fail wait for this block: no write lands after them
                        if t.state != RECEIVING:
                            return
                        copy_to_spans(staging, spans)
                        t.sink.layer_received(layer)
                    self.layer_done(t, layer)
                    self._pool.give(staging)
                    continue
                ready = poller.poll(remaining_s(t.deadline_s) * 1000)
                if not any(fd == conn.fileno() for fd, _ in ready):
                    continue
                kind, arg = read_frame(conn, t.deadline_s)
                if finish_token is not None or kind not in (FRAME_LAYER, FRAME_FINISH):
                    raise ProtocolError(f"unexpected frame kind {kind}")
                if kind == FRAME_FINISH:
                    finish_token = arg
                    if (missing := t.spec.num_layers - len(t.layers) - len(posted)) > 0:
                        raise ProtocolError(f"sender finished with {missing} of {t.spec.num_layers} "
                                            "layers missing")
                    continue
                if arg in posted or not 0 <= arg < t.spec.num_layers:
                    raise ProtocolError(f"layer {arg} sent twice or outside [0, {t.spec.num_layers})")
                staging = self._pool.take(nbytes)
                op = self._runtime.recv(staging[:nbytes].numpy(), tag | arg,
                                        lambda error, layer=arg: completions.put((layer, error)))
                posted[arg] = (staging, op, [], [])  # tracked before anything else can raise
                # The sink's views cost about 2 us a block: build them while UCX moves the bytes.
                posted[arg] = (staging, op, *self.layer_spans(t, arg))
            self.finish(t, conn, finish_token)
        finally:
            if t.state != DONE:
                self._drain(t, tag, posted)
            completions.close()

    def _drain(self, t: Transfer, tag: int, posted: dict) -> None:
        """A failed transfer may still have UCX sends in flight towards us; unmatched, they would
        never complete on the sender. Posted receives stay (their staging is never reused) and
        every other missing layer gets a one-byte receive, which a late send completes
        (truncated); the runtime completes the rest itself after the grace period."""
        ops = [entry[1] for entry in posted.values()]
        ops += [self._runtime.recv(self._scratch, tag | layer, None) for layer in range(t.spec.num_layers)
                if layer not in t.layers and layer not in posted]
        self._runtime.abandon(ops, self._abandon_grace_s)


class UCXSendHandle(ControlSendHandle):
    magic = MAGIC

    def __init__(self, sender: UCXSender, *args):
        self._inflight: dict[int, Op] = {}
        self._runtime = runtime()
        self._window_layers = sender.window_layers
        super().__init__(sender, *args)

    def _parse_address(self, peer_address: bytes) -> tuple[str, int]:
        control, sep, worker = peer_address.partition(b"|")
        if not sep or not worker:
            raise ValueError(f"UCX KV address {peer_address[:40]!r}... lacks the worker address")
        self._worker_address = worker
        return parse_host_port(control)

    def _header(self) -> dict:
        digest = hashlib.blake2b(self.spec.request_id.encode() + os.urandom(8), digest_size=8).digest()
        self._tag = int.from_bytes(digest, "big") >> LAYER_BITS << LAYER_BITS
        return {**self.spec.to_dict(), "tag": self._tag}

    def _send_layer(self, sock: socket.socket, layer: int, kv: torch.Tensor) -> None:
        data = (kv if kv.device.type == "cpu" else kv.cpu()).view(torch.uint8).reshape(-1).numpy()
        self._inflight[layer] = self._runtime.send(
            self._worker_address, data, self._tag | layer,
            lambda error: self._mailbox.put(("sent", layer, error)))
        sock.settimeout(remaining_s(self._deadline_s))
        sock.sendall(FRAME.pack(FRAME_LAYER, layer))

    def _can_send(self) -> bool:
        return len(self._inflight) < self._window_layers

    def _flushed(self) -> bool:
        return not self._inflight

    def _on_item(self, item: tuple) -> None:
        if item[0] != "sent":
            super()._on_item(item)
        _, layer, error = item
        del self._inflight[layer]
        if error is not None:
            raise ProtocolError(f"UCX send of layer {layer} failed: {error}")


class UCXSender(ControlSender):
    transport = "ucx"
    handle_cls = UCXSendHandle

    def check_address(self, peer_address: bytes) -> None:
        control, sep, worker = peer_address.partition(b"|")
        if not sep or not worker:
            raise ValueError(f"UCX KV address {peer_address[:40]!r}... lacks the worker address")
        super().check_address(control)

    def __init__(self, window_layers: int = 4, **opts):
        """window_layers: UCX sends in flight per transfer (1 to 8 measured alike on loopback)."""
        runtime()  # the first transfer should not pay for creating the UCX context
        self.window_layers = window_layers
        super().__init__(**opts)

