"""What mlsd keeps per request: one record, with one status and one work kind."""

from __future__ import annotations

import enum
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

from engine.sequence import Sequence
from mls.kv.base import SendHandle
from mls.policy import Job, WorkKind


class RequestStatus(enum.IntEnum):
    """Where a request is on this machine. The ended states come last (`ended`)."""
    QUEUED = 0
    """Waiting in its policy's queue (for a batch, or for KV memory)."""
    RECEIVING_KV = 1
    """Token work: blocks reserved, the KV arriving from the prompt machine."""
    PREFILLING = 2
    """Mixed work, chunked: part of the prompt computed."""
    RUNNING = 3
    """Decoding here."""
    SENDING_KV = 4
    """Prompt work: prefilled, blocks freed, the KV still leaving for the token machine."""
    FINISHED_STOPPED = 5
    FINISHED_LENGTH = 6
    FINISHED_ABORTED = 7
    FINISHED_FAILED = 8

    @property
    def ended(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED


@dataclass
class PrefillResult:
    """The answer to a Prefill: the first token and how the KV left."""
    first_token_id: int
    kv_mode: str
    queue_s: float
    prefill_s: float


@dataclass
class MachineRequest:
    """One request on this machine: the engine's sequence, the policy's job, and the RPC state."""
    seq: Sequence
    job: Job
    kind: WorkKind
    status: RequestStatus = RequestStatus.QUEUED
    arrival_s: float = field(default_factory=time.monotonic)
    future: Future | None = None
    """Prefill: resolves to a PrefillResult; AddDecode: to whether the blocks are reserved now."""
    kv_address: bytes = b""
    """Prompt work: where the token machine's receiver listens."""
    timeout_s: float = 30.0
    """The KV transfer window."""
    handle: SendHandle | None = None
    """Prompt work, while the KV is being sent."""
    layerwise: bool = False
    buffered: list = field(default_factory=list)
    """Prompt work, serialized mode: (layer, kv) until the prefill's end."""
    prefill_start_s: float = 0.0
    transfer_start_s: float = 0.0

    @property
    def request_id(self) -> str:
        return self.seq.request_id
