"""Wire helpers of the KV control channel (see control.py for the life cycle of a transfer).

Wire format, network byte order:
  preamble  S->R  4-byte magic (one per transport), u16 version, u32 header length, then the
                  header: UTF-8 JSON of KVSpec.to_dict() plus transport fields
  status    R->S  u8 (0 = ok, 1 = error), u32 message length, UTF-8 message
                  (ACCEPT/REJECT after the header; ACK, or ERROR at any time, at the end)
  frame     S->R  u8 kind, u32 argument: LAYER (argument = layer index, then the transport's
                  payload) or FINISH (argument = first token id)
"""

from __future__ import annotations

import collections
import ctypes
import json
import os
import socket
import struct
import threading
import time

import torch

from mls.kv.base import KVSpec, TransferState

VERSION = 1
# Socket buffers: asked for 32 MiB, capped by net.core.{r,w}mem_max (4 MiB here); even capped,
# fixed buffers beat the kernel's autotuning on loopback for small prompts (1.9 vs 1.1 GB/s).
BUFFER_BYTES = 32 * 2**20
MAX_MESSAGE_BYTES = 64 * 2**10
IOV_MAX = 1024  # Linux limit on buffers per recvmsg_into call
PREAMBLE = struct.Struct("!4sHI")
STATUS = struct.Struct("!BI")
FRAME = struct.Struct("!BI")
STATUS_OK, STATUS_ERROR = 0, 1
FRAME_LAYER, FRAME_FINISH = 1, 2
TERMINAL = (TransferState.DONE, TransferState.FAILED)


class ProtocolError(Exception):
    """The peer broke the wire protocol or the transfer's rules; the message says how."""


class PeerClosed(ConnectionError):
    """The peer closed the connection (EOF) in the middle of a message."""


# -- wire helpers ---------------------------------------------------------------------------


def remaining_s(deadline_s: float) -> float:
    left = deadline_s - time.monotonic()
    if left <= 0:
        raise TimeoutError("deadline passed")
    return left


def tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, BUFFER_BYTES)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, BUFFER_BYTES)


def shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed or never connected: either way it is down


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A flat writable byte view of a contiguous CPU tensor; bfloat16 has no numpy dtype, so the
    tensor is viewed as uint8 first."""
    if t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError(f"need a contiguous CPU tensor, got {t.device} contiguous={t.is_contiguous()}")
    return memoryview(t.view(torch.uint8).reshape(-1).numpy())


def parse_host_port(address: bytes) -> tuple[str, int]:
    host, sep, port = address.decode().rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"KV address {address!r} is not host:port")
    return host.strip("[]"), int(port)


def recv_exact(sock: socket.socket, n: int, deadline_s: float) -> bytes:
    buf = bytearray(n)
    recv_views(sock, [memoryview(buf)], deadline_s)
    return bytes(buf)


def recv_views(sock: socket.socket, views: list[memoryview], deadline_s: float) -> None:
    """Fills the views in order straight from the socket (scatter reads, no staging copy)."""
    views = [v for v in views if v.nbytes]
    i = 0
    while i < len(views):
        sock.settimeout(remaining_s(deadline_s))
        n = sock.recvmsg_into(views[i:i + IOV_MAX])[0]
        if n == 0:
            raise PeerClosed("peer closed the connection")
        while n:
            if n >= views[i].nbytes:
                n -= views[i].nbytes
                i += 1
            else:
                views[i], n = views[i][n:], 0


def encode_preamble(magic: bytes, header: dict) -> bytes:
    body = json.dumps(header).encode()
    return PREAMBLE.pack(magic, VERSION, len(body)) + body


def read_preamble(sock: socket.socket, magic: bytes, deadline_s: float) -> dict:
    got, version, size = PREAMBLE.unpack(recv_exact(sock, PREAMBLE.size, deadline_s))
    if got != magic:
        raise ProtocolError(f"bad magic {got!r}, expected {magic!r} (wrong transport or not a KV sender)")
    if version != VERSION:
        raise ProtocolError(f"unsupported KV protocol version {version}, this receiver speaks {VERSION}")
    if size > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"KV header of {size} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        header = json.loads(recv_exact(sock, size, deadline_s))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ProtocolError(f"malformed KV header: {e}") from None
    if not isinstance(header, dict):
        raise ProtocolError(f"malformed KV header: a JSON object expected, got {type(header).__name__}")
    return header


def encode_status(ok: bool, message: str) -> bytes:
    body = message.encode()[:MAX_MESSAGE_BYTES]
    return STATUS.pack(STATUS_OK if ok else STATUS_ERROR, len(body)) + body


def read_status(sock: socket.socket, deadline_s: float) -> tuple[bool, str]:
    code, size = STATUS.unpack(recv_exact(sock, STATUS.size, deadline_s))
    if code not in (STATUS_OK, STATUS_ERROR) or size > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"malformed status from the receiver (code {code}, {size} bytes)")
    return code == STATUS_OK, recv_exact(sock, size, deadline_s).decode(errors="replace")


def read_frame(sock: socket.socket, deadline_s: float) -> tuple[int, int]:
    return FRAME.unpack(recv_exact(sock, FRAME.size, deadline_s))


def check_layer_tensor(spec: KVSpec, layer: int, kv: torch.Tensor) -> None:
    """What every sender checks on the caller's thread: a bad layer is a bug, not a network error."""
    if not 0 <= layer < spec.num_layers:
        raise ValueError(f"layer {layer} outside [0, {spec.num_layers})")
    if tuple(kv.shape) != spec.layer_shape or str(kv.dtype).removeprefix("torch.") != spec.dtype:
        raise ValueError(f"layer {layer} is {tuple(kv.shape)} {kv.dtype}, the header says "
                         f"{spec.layer_shape} {spec.dtype}")
    if not kv.is_contiguous():
        raise ValueError(f"layer {layer} is not contiguous")


def buffer_spans(buffers: list[torch.Tensor], nbytes: int) -> list[tuple[int, int]]:
    """(address, size) of a sink's buffers in order, adjacent ones merged (an engine's blocks are
    often consecutive). Raw addresses, because a tensor view costs microseconds per block and a
    4096-token layer has 256 of them; the caller keeps `buffers` alive while it uses the spans."""
    spans: list[tuple[int, int]] = []
    for b in buffers:
        if b.device.type != "cpu" or not b.is_contiguous():
            raise ValueError(f"sink buffers must be contiguous CPU tensors, got {b.device} "
                             f"contiguous={b.is_contiguous()}")
        addr, size = b.data_ptr(), b.numel() * b.element_size()
        if spans and spans[-1][0] + spans[-1][1] == addr:
            spans[-1] = (spans[-1][0], spans[-1][1] + size)
        else:
            spans.append((addr, size))
    if (total := sum(size for _, size in spans)) != nbytes:
        raise ValueError(f"sink buffers hold {total} bytes, the layer has {nbytes}")
    return spans


def span_views(spans: list[tuple[int, int]]) -> list[memoryview]:
    return [memoryview((ctypes.c_char * size).from_address(addr)).cast("B") for addr, size in spans]


def copy_to_spans(src: torch.Tensor, spans: list[tuple[int, int]]) -> None:
    """Copies a contiguous CPU tensor's bytes into the spans, in order (memmove drops the GIL)."""
    if src.device.type != "cpu" or not src.is_contiguous() or \
            src.numel() * src.element_size() < sum(size for _, size in spans):
        raise ValueError("copy source must be a contiguous CPU tensor holding the whole layer")
    addr = src.data_ptr()
    for dst, size in spans:
        ctypes.memmove(dst, addr, size)
        addr += size


class Mailbox:
    """A deque with an eventfd, so one thread can wait (select.poll) on it and on a socket."""

    def __init__(self) -> None:
        self._items: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self._closed = False
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def put(self, item) -> None:
        with self._lock:  # the fd may be closed (and its number reused) once the owner is done
            if self._closed:
                return
            self._items.append(item)
            os.eventfd_write(self.fd, 1)

    def get(self):
        """The oldest item, or None; clears the wake-up once empty."""
        try:
            return self._items.popleft()
        except IndexError:
            pass
        with self._lock:
            if not self._closed:
                try:
                    os.eventfd_read(self.fd)
                except BlockingIOError:
                    pass
        try:  # an item put between the first check and the read above keeps its turn
            return self._items.popleft()
        except IndexError:
            return None

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                os.close(self.fd)
