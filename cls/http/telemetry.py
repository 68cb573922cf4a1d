"""What the HTTP door tells operators: rate-limited log lines and its own Prometheus counters.

- `RateLimitedLog`: at most `lines_per_s` lines a second (bursts of bad requests, slow clients or
  refused connections cannot fill the disk); the next line let through says how many were held
  back. One instance is shared by the door's events and uvicorn's own warnings (`filter_logger`).
- `DoorMetrics`: `clsd_http_responses_total{status}` (every answer, 4xx and 5xx included) and
  `clsd_http_unknown_fields_total{field}` (request fields ignored as unknown), on clsd's
  registry. Field names come from clients, so only the first `MAX_FIELD_LABELS` get a label of
  their own and each is logged once per process; later ones count under "_other".
"""

from __future__ import annotations

import logging
import threading
import time
import weakref

from prometheus_client import CollectorRegistry, Counter

MAX_FIELD_LABELS = 64
_logged: set[str] = set()  # unknown field names logged so far: each once per process


class RateLimitedLog:
    def __init__(self, logger: logging.Logger, lines_per_s: int = 5, clock=time.monotonic):
        self.logger, self.lines_per_s, self.clock = logger, lines_per_s, clock
        self._window_start, self._in_window, self.suppressed = -1e18, 0, 0
        self._lock = threading.Lock()  # uvicorn's filter may run on another thread in tests

    def allow(self) -> int | None:
        """None: hold this line back. Otherwise the number of lines held back before it (0)."""
        with self._lock:
            now = self.clock()
            if now - self._window_start >= 1.0:
                self._window_start, self._in_window = now, 0
            if self._in_window >= self.lines_per_s:
                self.suppressed += 1
                return None
            self._in_window += 1
            held, self.suppressed = self.suppressed, 0
            return held

    def log(self, level: int, msg: str, *args) -> None:
        held = self.allow()
        if held is None:
            return
        if held:
            msg += f" ({held} similar lines suppressed before this one)"
        self.logger.log(level, msg, *args)

    def filter_logger(self, logger: logging.Logger) -> None:
        """Rate-limits another logger's warnings (uvicorn's "Invalid HTTP request received."),
        in place of an earlier door's limit."""
        for f in [f for f in logger.filters if isinstance(f, _LimitFilter)]:
            logger.removeFilter(f)
        logger.addFilter(_LimitFilter(self))


class _LimitFilter(logging.Filter):
    def __init__(self, limiter: RateLimitedLog):
        super().__init__()
        self.limiter = limiter

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True  # errors are ours to fix, never hidden
        held = self.limiter.allow()
        if held:
            record.msg = f"{record.msg} ({held} similar lines suppressed before this one)"
        return held is not None


class DoorMetrics:
    _by_registry: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __init__(self, registry: CollectorRegistry):
        self.responses = Counter("clsd_http_responses", "HTTP answers of the OpenAI door by status code",
                                 ["status"], registry=registry)
        self.unknown_fields = Counter("clsd_http_unknown_fields", "Request fields ignored as unknown "
                                      "(the first 64 names by name, the rest as _other)", ["field"],
                                      registry=registry)
        self._labelled: set[str] = set()

    @classmethod
    def of(cls, registry: CollectorRegistry) -> DoorMetrics:
        """The door's counters on `registry`, created once (a registry refuses a second copy)."""
        if registry not in cls._by_registry:
            cls._by_registry[registry] = cls(registry)
        return cls._by_registry[registry]

    def unknown(self, names, log: logging.Logger, endpoint: str) -> None:
        """Counts ignored fields; logs each name the first time this process sees it."""
        for name in names:
            name = name[:100]
            if name in self._labelled or len(self._labelled) < MAX_FIELD_LABELS:
                self._labelled.add(name)
                self.unknown_fields.labels(name).inc()
            else:
                self.unknown_fields.labels("_other").inc()
            if name not in _logged and len(_logged) < MAX_FIELD_LABELS:
                _logged.add(name)
                log.warning("ignoring the unknown request field %r (first seen on %s; logged once)",
                            name, endpoint)
                if len(_logged) == MAX_FIELD_LABELS:
                    log.warning("%d unknown field names seen: further ones are counted, not logged",
                                MAX_FIELD_LABELS)
