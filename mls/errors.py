"""The typed errors mlsd's RPCs map to status codes (the mapping lives in mls/service.py), and the
one safe way to complete a caller's future from the worker thread."""

from __future__ import annotations

from concurrent.futures import Future, InvalidStateError


class MlsError(Exception):
    """Base of errors that become a gRPC status."""


class BadRequest(MlsError):
    """INVALID_ARGUMENT: the message names the field."""


class Overloaded(MlsError):
    """RESOURCE_EXHAUSTED: a bounded queue is full, or the request exceeds the KV memory."""


class Draining(MlsError):
    """UNAVAILABLE: the daemon is draining and takes no new work."""


class Failed(MlsError):
    """INTERNAL: the engine step failed; the request ended with FAILED."""


class Aborted(MlsError):
    """CANCELLED: the request was aborted before it produced its result."""


def resolve(fut: Future, result=None, error: BaseException | None = None) -> None:
    """Completes `fut` unless it is already done: a caller that went away (its gRPC call was
    cancelled) cancels the future, and that must never kill the worker thread."""
    try:
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)
    except InvalidStateError:
        pass
