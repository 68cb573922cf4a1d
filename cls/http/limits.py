"""The HTTP server's own defences: what one slow or greedy client may hold.

1. A connection past `max_connections` is answered 503 at once and closed, before any byte is
   read (uvicorn's `limit_concurrency` would only answer once the headers are in, holding the
   descriptor until then). The cap stays under the process's descriptor limit, which the door
   raises to its hard limit first (as vLLM does), so the accept loop never hits EMFILE.
2. Request headers must be complete within `header_timeout_s` of the connection opening or the
   previous response ending (uvicorn has no such timeout: a client trickling headers, or sending
   nothing, would hold its connection forever); then the connection is closed.
3. The body must be complete within `body_timeout_s` of the headers (cls/http/guard.py: 408).
4. An idle keep-alive connection closes after `keep_alive_s` (uvicorn's `timeout_keep_alive`);
   headers are capped at `max_header_bytes` (h11's limit: 400 past it).
Each drop is one rate-limited log line (cls/http/telemetry.py).
"""

from __future__ import annotations

import logging
import resource
from dataclasses import dataclass, fields

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from cls.http.telemetry import DoorMetrics, RateLimitedLog

FD_RESERVE = 512  # descriptors left for gRPC, machine streams, KV and log files
FD_TARGET = 65536


@dataclass(frozen=True)
class HttpLimits:
    """Defaults; `from_section` takes `http.<name>` from clsd's config where that key exists."""
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    keep_alive_s: float = 5.0
    max_connections: int = 4096
    max_header_bytes: int = 64 * 1024

    @classmethod
    def from_section(cls, section) -> HttpLimits:
        return cls(**{f.name: getattr(section, f.name) for f in fields(cls)
                      if getattr(section, f.name, None) is not None})


def raise_fd_limit(target: int = FD_TARGET) -> int:
    """Raises the soft RLIMIT_NOFILE towards the hard limit; returns the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = target if hard == resource.RLIM_INFINITY else min(hard, target)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError):
            pass
    return soft


def connection_cap(limits: HttpLimits, log: logging.Logger) -> int:
    soft = raise_fd_limit()
    if soft == resource.RLIM_INFINITY or limits.max_connections <= soft - FD_RESERVE:
        return limits.max_connections
    cap = max(16, soft - FD_RESERVE)
    log.warning("http: max_connections %d lowered to %d: the descriptor limit is %d",
                limits.max_connections, cap, soft)
    return cap


def _refusal(cap: int) -> bytes:
    body = (b'{"error": {"message": "too many connections (limit %d); retry later", '
            b'"type": "server_error", "param": null, "code": "service_unavailable"}}' % cap)
    return (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
            b"retry-after: 1\r\nconnection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))


def guarded_protocol(limits: HttpLimits, cap: int, events: RateLimitedLog,
                     metrics: DoorMetrics) -> type[H11Protocol]:
    """uvicorn's h11 protocol with the connection cap and the header timeout."""
    refusal = _refusal(cap)

    class GuardedH11Protocol(H11Protocol):
        _refused = False
        _header_timer = None
        _got_bytes = False  # since the timer was armed: an idle connection closes silently

        def connection_made(self, transport) -> None:  # type: ignore[override]
            if len(self.connections) >= cap:
                self._refused, self.transport = True, transport
                transport.write(refusal)
                transport.close()
                metrics.responses.labels("503").inc()
                events.log(logging.WARNING, "http: refused a connection: %d open (limit %d)",
                           len(self.connections), cap)
                return
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc) -> None:
            if self._refused:
                return
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._refused:
                return
            self._got_bytes = True
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:
                self._disarm()  # the headers are in (or the connection is done)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
                self._arm()  # the next request's headers get the same time

        def _arm(self) -> None:
            self._disarm()
            self._got_bytes = False
            self._header_timer = self.loop.call_later(limits.header_timeout_s, self._headers_late)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_late(self) -> None:
            self._header_timer = None
            if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
                return
            client = "{}:{}".format(*self.client) if self.client else "?"
            if self._got_bytes:
                events.log(logging.WARNING, "http: dropped the connection from %s: no complete "
                           "request headers within %.3g s", client, limits.header_timeout_s)
            self.transport.close()

    return GuardedH11Protocol
