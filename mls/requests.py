"""What mlsd keeps per request, and the typed errors its RPCs map to status codes."""

from __future__ import annotations

import time
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field

from engine.sequence import Sequence
from mls.kv.base import SendHandle
from mls.policy import Job


class MlsError(Exception):
    """Base of errors that become a gRPC status (the mapping lives in mls/service.py)."""


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


@dataclass
class PrefillResult:
    first_token_id: int
    kv_mode: str
    queue_s: float
    prefill_s: float


@dataclass
class MlsRequest:
    seq: Sequence
    job: Job
    kind: str  # "prefill", "decode" or "generate"
    arrival_s: float = field(default_factory=time.monotonic)
    future: Future | None = None  # Prefill: PrefillResult; AddDecode: bool (reserved now)
    kv_address: bytes = b""
    timeout_s: float = 30.0
    handle: SendHandle | None = None  # prompt side, while the KV is being sent
    layerwise: bool = False
    buffered: list = field(default_factory=list)  # serialized mode: (layer, kv) until the end
    prefill_start_s: float = 0.0
    transfer_start_s: float = 0.0

    @property
    def request_id(self) -> str:
        return self.seq.request_id


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
