"""systemd's notify protocol with the standard library (no-op when not run by systemd).

Both daemons send READY=1, WATCHDOG=1 and STOPPING=1 through daemon/lifecycle.py.
"""

from __future__ import annotations

import os
import socket


def notify(state: str) -> bool:
    """Sends e.g. "READY=1", "STOPPING=1", "WATCHDOG=1"; False when there is no NOTIFY_SOCKET."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):  # abstract namespace
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:  # never block the event loop on a reader that stopped reading
            sock.sendto(state.encode(), socket.MSG_DONTWAIT, path)
        except OSError:
            return False
    return True


def watchdog_interval_s() -> float | None:
    """Half of systemd's WatchdogSec for this process, or None when the watchdog is off."""
    usec, pid = os.environ.get("WATCHDOG_USEC"), os.environ.get("WATCHDOG_PID")
    if not usec or (pid and int(pid) != os.getpid()):
        return None
    return int(usec) / 2e6
