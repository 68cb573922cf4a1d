"""Shared-memory KV transport (`shm`): on one host the sender copies each layer straight into the
token machine's KV cache, which lives in a named /dev/shm segment (EngineConfig
.kv_cache_shared_memory); the control channel (control.py, over TCP) carries only the handshake,
one placement and a 5-byte frame per layer.

Life cycle of one transfer (the control channel's, with these parts):
1. The header adds `host_id` (boot id + identity of the /dev/shm mount): the sender's host.
2. After ACCEPT the receiver sends one placement (shm_plan.py): the segment's name and size and
   the byte spans of the request's reserved blocks for every layer, plus the time left in its
   window. If the sender is on another host or the sink is not in a segment (a device engine),
   the placement is "inline" and the layer bytes travel over the socket exactly as with `tcp`
   (logged once per reason): slower, never wrong.
3. The sender checks the placement (PlacementError names the bad field or span: a foreign name,
   a size that differs from the file's, a span outside the segment, overlapping spans, spans that
   do not add up to a layer) and maps the segment (cached per segment; dropped once the file is
   unlinked, so a restarted token machine's old cache is not kept alive).
4. Per layer: the sender looks at the socket first (a receiver's ERROR or close stops it before it
   writes) and at the deadline (the earlier of its own and the receiver's), copies the layer into
   the spans (one copy, no staging), then sends LAYER(i); the receiver calls
   `sink.layer_received(i)` and counts it. FINISH/ACK as in control.py.
5. Failure: as tcp. A sender killed mid-layer closes its socket (the kernel does), the receiver
   fails the transfer and its caller frees the blocks. Trust boundary: a sender process frozen
   inside one layer's copy past the receiver's deadline could still finish that copy into blocks
   freed meanwhile; senders are the cluster's own daemons, and each copy is milliseconds.

Measured (benchmarks/kv_transport_bench.py, docs/BENCHMARKS.md): near a same-run memcpy; no thread
but the accept thread, so an idle receiver or sender uses no CPU.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import select
import socket
import stat
import struct
import threading
import time

import torch

from engine.shared_memory import NAME_RE, SHM_DIR
from mls.kv.control import RECEIVING, Transfer
from mls.kv.shm_plan import CopyPlan, PlacementError, check_placement, make_placement
from mls.kv.tcp import TCPReceiver, TCPSender, TCPSendHandle
from mls.kv.wire import (
    FRAME,
    FRAME_LAYER,
    TERMINAL,
    ProtocolError,
    recv_exact,
    remaining_s,
)

MAGIC = b"MLKS"
LENGTH = struct.Struct("!I")
MAX_PLACEMENT_BYTES = 16 * 2**20
log = logging.getLogger("mls.kv.shm")


def host_id() -> str:
    """Same value in two processes iff they share a kernel boot and the /dev/shm mount."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = "unknown-boot"
    st = os.stat(SHM_DIR)
    return f"{boot}/{st.st_dev}:{st.st_ino}"


HOST_ID = host_id()


def send_placement(sock: socket.socket, placement: dict, deadline_s: float) -> None:
    body = json.dumps(placement).encode()
    sock.settimeout(remaining_s(deadline_s))
    sock.sendall(LENGTH.pack(len(body)) + body)


def read_placement(sock: socket.socket, deadline_s: float) -> dict:
    (size,) = LENGTH.unpack(recv_exact(sock, LENGTH.size, deadline_s))
    if size > MAX_PLACEMENT_BYTES:
        raise PlacementError(f"placement of {size} bytes exceeds {MAX_PLACEMENT_BYTES}")
    try:
        placement = json.loads(recv_exact(sock, size, deadline_s))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PlacementError(f"malformed placement: {e}") from None
    if not isinstance(placement, dict) or placement.get("mode") not in ("shm", "inline"):
        raise PlacementError("malformed placement: mode must be 'shm' or 'inline'")
    return placement


class _LogOnce:
    def __init__(self) -> None:
        self._seen: set[str] = set()

    def __call__(self, message: str) -> None:
        if message not in self._seen and len(self._seen) < 64:
            self._seen.add(message)
            log.warning(message)


class ShmReceiver(TCPReceiver):
    transport = "shm"
    magic = MAGIC

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._warn = _LogOnce()

    def _check_header(self, header: dict) -> None:
        hid = header.get("host_id")
        if not isinstance(hid, str) or not 0 < len(hid) <= 256:
            raise ProtocolError("KV header field host_id must be the sender's host id (a string), "
                                f"got {hid!r}")

    def _receive(self, t: Transfer, conn: socket.socket, header: dict) -> None:
        if header["host_id"] != HOST_ID:
            placement = {"mode": "inline", "reason": f"the sender is on another host ({header['host_id']!r},"
                                                     f" this is {HOST_ID!r})"}
        else:
            placement = make_placement(t.spec, t.sink, max(0.0, t.deadline_s - time.monotonic()))
        if placement["mode"] == "inline":
            self._warn(f"shm transport falls back to bytes over the socket: {placement['reason']}")
        send_placement(conn, placement, t.deadline_s)
        if placement["mode"] == "inline":
            super()._receive(t, conn, header)
            return
        while (layer := self.next_layer(t, conn)) is not None:  # the sender wrote it already
            self.check_layer(t, layer)
            with t.write_lock:
                if t.state != RECEIVING:
                    return
                t.sink.layer_received(layer)
            self.layer_done(t, layer)


class ShmSendHandle(TCPSendHandle):
    magic = MAGIC

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._plan: CopyPlan | None = None
        self._poller: select.poll | None = None
        self.mode: str | None = None
        """"shm" (copies into the segment) or "inline" (bytes over the socket) once accepted."""

    def _header(self) -> dict:
        return {**self.spec.to_dict(), "host_id": HOST_ID}

    def _on_accepted(self) -> None:
        self._phase = "reading the receiver's shared-memory placement"
        sock = self._sock
        placement = read_placement(sock, self._deadline_s)
        if placement["mode"] == "inline":
            self._sender.warn(f"shm KV sender sends bytes over the socket: {placement.get('reason')}")
            self.mode = "inline"
            return
        self._phase = "checking the receiver's shared-memory placement"
        window = placement.get("window_s")
        if not isinstance(window, (int, float)) or isinstance(window, bool) or window < 0:
            raise PlacementError(f"placement window_s must be a non-negative number, got {window!r}")
        self._deadline_s = min(self._deadline_s, time.monotonic() + window)
        seg_bytes = self._sender.map_segment(placement.get("segment"))
        self._plan = CopyPlan(seg_bytes, check_placement(self.spec, placement, seg_bytes.numel()))
        self._poller = select.poll()
        self._poller.register(sock, select.POLLIN)
        self.mode = "shm"

    def _send_layer(self, sock: socket.socket, layer: int, kv: torch.Tensor) -> None:
        if self._plan is None:
            super()._send_layer(sock, layer, kv)
            return
        if self._poller.poll(0):  # the receiver failed or cancelled it: write nothing more
            raise ProtocolError(self._peer_reason(sock) or "receiver closed the connection")
        remaining_s(self._deadline_s)
        if self._state in TERMINAL:
            return
        self._plan.copy(layer, kv if kv.device.type == "cpu" else kv.cpu())
        sock.settimeout(remaining_s(self._deadline_s))
        sock.sendall(FRAME.pack(FRAME_LAYER, layer))


class ShmSender(TCPSender):
    transport = "shm"
    handle_cls = ShmSendHandle

    def __init__(self, *args, directory: str = SHM_DIR, **kwargs):
        super().__init__(*args, **kwargs)
        self._dir = directory
        self._maps: dict[str, tuple[int, torch.Tensor]] = {}  # name -> (inode, bytes)
        self._maps_lock = threading.Lock()
        self.warn = _LogOnce()

    def map_segment(self, name) -> torch.Tensor:
        """The named segment as a uint8 tensor (mapped once, then cached)."""
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise PlacementError(f"placement segment {name!r} is not a shared-memory segment name")
        path = os.path.join(self._dir, name)
        with self._maps_lock:
            self._prune(keep=name)
            if name in self._maps:
                return self._maps[name][1]
            try:
                fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
            except FileNotFoundError:
                raise PlacementError(f"shared-memory segment {path} does not exist: the shm transport "
                                     "needs the receiver on this host") from None
            except OSError as e:
                raise PlacementError(f"cannot open shared-memory segment {path}: {e}") from None
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode) or st.st_size <= 0:
                    raise PlacementError(f"{path} is not a shared-memory segment")
                mm = mmap.mmap(fd, st.st_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            finally:
                os.close(fd)
            seg = torch.frombuffer(mm, dtype=torch.uint8)
            self._maps[name] = (st.st_ino, seg)
            return seg

    def _prune(self, keep: str) -> None:
        """Drops mappings of unlinked or replaced files (a mapping keeps their memory alive); a
        transfer still copying holds its own reference. `keep` is checked like the others."""
        for name, (ino, _) in list(self._maps.items()):
            try:
                if os.stat(os.path.join(self._dir, name)).st_ino == ino:
                    continue
            except OSError:
                pass
            del self._maps[name]

    def close(self) -> None:
        super().close()
        with self._maps_lock:
            self._maps.clear()
