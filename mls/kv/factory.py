"""Builds a KV receiver or sender by transport name ("local", "tcp", "ucx", "shm").

The ucx transport imports ucxx lazily, so the others work on hosts without it. `shm` needs both
ends on one host (across hosts it falls back to bytes over its TCP control channel). A machine
builds both ends (`make_endpoints`): any machine may prefill for another or decode for another.
"""

from __future__ import annotations

from mls.kv.base import KVReceiver, KVSender

TRANSPORTS = ("local", "tcp", "ucx", "shm")


def make_receiver(transport: str, **opts) -> KVReceiver:
    """opts go to the receiver's constructor (tcp/ucx/shm: host, port, handshake_timeout_s, ...)."""
    return _classes(transport)[0](**opts)


def make_sender(transport: str, **opts) -> KVSender:
    return _classes(transport)[1](**opts)


def make_endpoints(transport: str, host: str = "127.0.0.1", port: int = 0,
                   early_connect_wait_s: float = 10.0) -> tuple[KVReceiver, KVSender]:
    """A machine's receiver (listening on host:port for the network transports) and sender."""
    opts = {} if transport == "local" else {"host": host, "port": port,
                                            "early_connect_wait_s": early_connect_wait_s}
    receiver = make_receiver(transport, **opts)
    try:
        return receiver, make_sender(transport)
    except BaseException:
        receiver.close()
        raise


def _classes(transport: str) -> tuple[type[KVReceiver], type[KVSender]]:
    if transport == "local":
        from mls.kv.local import LocalReceiver, LocalSender
        return LocalReceiver, LocalSender
    if transport == "tcp":
        from mls.kv.tcp import TCPReceiver, TCPSender
        return TCPReceiver, TCPSender
    if transport == "shm":
        from mls.kv.shm import ShmReceiver, ShmSender
        return ShmReceiver, ShmSender
    if transport == "ucx":
        try:
            from mls.kv.ucx import UCXReceiver, UCXSender
        except ImportError as e:
            raise ImportError(f"KV transport 'ucx' needs ucxx (pip install ucxx-cu12): {e}") from e
        return UCXReceiver, UCXSender
    raise ValueError(f"unknown KV transport {transport!r}; choose one of {', '.join(TRANSPORTS)}")
