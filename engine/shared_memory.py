"""Named shared-memory segments: a tensor's bytes in a file under /dev/shm that another process on
the same host can map (the `shm` KV transport writes a prompt machine's KV straight into a token
machine's cache this way).

Life cycle of one segment:
1. `SharedSegment(nbytes)` first sweeps stale segments, then creates `/dev/shm/mls-kv-<pid>-<hex>`
   (mode 0600, O_EXCL), sizes it and maps it. Pages are not touched: like `torch.empty`, memory is
   taken only where something is written. It refuses, naming the sizes, a segment larger than the
   free space of the shm file system (writing past it would SIGBUS the process, not raise).
2. The owner holds a shared flock on the file for the segment's life. A later sweep (any new
   segment) removes files whose flock nobody holds: segments of owners that were SIGKILLed. The
   kernel drops a dead process's locks, so this works across PID namespaces, unlike a pid check.
3. `close()`, garbage collection of the segment, or interpreter exit (also a SIGTERM that the
   daemon turns into a normal exit) unlinks the file; a forked child never unlinks its parent's.
   Mappings made before stay valid until their tensors are freed.
4. `find_segment(address)` tells which live segment of this process holds an address (a KV
   receiver turns sink addresses into segment offsets for the sender).
"""

from __future__ import annotations

import fcntl
import mmap
import os
import re
import secrets
import threading
import weakref

import torch

SHM_DIR = "/dev/shm"
PREFIX = "mls-kv-"
NAME_RE = re.compile(r"^mls-kv-[0-9]+-[0-9a-f]{12}$")

_LIVE: weakref.WeakValueDictionary[str, SharedSegment] = weakref.WeakValueDictionary()
_LIVE_LOCK = threading.Lock()


class SharedSegment:
    """A writable byte tensor (`self.bytes`, uint8, nbytes long) backed by a named file."""

    def __init__(self, nbytes: int, directory: str = SHM_DIR):
        if nbytes <= 0:
            raise ValueError(f"shared segment size must be positive, got {nbytes}")
        sweep_stale(directory)
        st = os.statvfs(directory)
        free_bytes = st.f_bavail * st.f_frsize
        if nbytes > free_bytes:
            raise MemoryError(f"shared-memory segment of {nbytes} bytes does not fit in {directory} "
                              f"({free_bytes} bytes free): shrink the KV cache or enlarge {directory}")
        self.name = f"{PREFIX}{os.getpid()}-{secrets.token_hex(6)}"
        self.path = os.path.join(directory, self.name)
        self.nbytes = nbytes
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)  # "alive" for sweep_stale; dropped when we die
            os.ftruncate(fd, nbytes)  # sparse: no page is allocated yet
            self._mmap = mmap.mmap(fd, nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            _unlink(self.path, os.getpid())
            raise
        self.bytes = torch.frombuffer(self._mmap, dtype=torch.uint8)
        self.address = self.bytes.data_ptr()
        self._finalizer = weakref.finalize(self, _release, fd, self.path, os.getpid())
        with _LIVE_LOCK:
            _LIVE[self.name] = self

    def tensor(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """The segment as one C-contiguous tensor (it must fill the segment exactly)."""
        return self.bytes.view(dtype).view(shape)

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def close(self) -> None:
        """Unlinks the file (idempotent); tensors already made keep their memory until freed."""
        with _LIVE_LOCK:
            if _LIVE.get(self.name) is self:
                del _LIVE[self.name]
        self._finalizer()


def find_segment(address: int, nbytes: int = 1) -> tuple[SharedSegment, int] | None:
    """(segment, offset) of the live segment holding [address, address + nbytes), or None."""
    with _LIVE_LOCK:
        segments = list(_LIVE.values())
    for seg in segments:
        if seg.address <= address and address + nbytes <= seg.address + seg.nbytes and not seg.closed:
            return seg, address - seg.address
    return None


def sweep_stale(directory: str = SHM_DIR) -> list[str]:
    """Unlinks segments whose owner is gone (nobody holds their flock); returns their names."""
    removed = []
    try:
        names = [n for n in os.listdir(directory) if NAME_RE.match(n)]
    except OSError:
        return removed
    for name in names:
        path = os.path.join(directory, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue  # gone already, or not ours to open
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # a live owner holds it
        else:
            try:
                os.unlink(path)
                removed.append(name)
            except OSError:
                pass
        finally:
            os.close(fd)
    return removed


def _release(fd: int, path: str, owner_pid: int) -> None:
    _unlink(path, owner_pid)
    if os.getpid() == owner_pid:
        os.close(fd)


def _unlink(path: str, owner_pid: int) -> None:
    if os.getpid() != owner_pid:
        return  # a forked child: the segment is its parent's
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
