"""What clsd keeps per request and per attempt, the items of a request's inbox, and the errors
that end a request or one attempt of it (cls/dispatcher.py drives them)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import grpc

from cls.router import Route
from proto import mlsd_pb2 as mpb


class RequestError(Exception):
    """Ends a request with a gRPC status for the client; `param` names the offending request
    field, when there is one (the HTTP front door reports it)."""

    def __init__(self, code: grpc.StatusCode, message: str, param: str | None = None):
        super().__init__(message)
        self.code, self.message, self.param = code, message, param


@dataclass(frozen=True)
class TokenArrived:
    """Inbox item: output token `index` of `attempt` (indices count from the attempt's start)."""
    attempt: Attempt
    index: int
    token_id: int


@dataclass(frozen=True)
class MachineEvent:
    """Inbox item: a RESERVED / FINISHED / FAILED / ABORTED event of `attempt` from `machine_id`."""
    attempt: Attempt
    event: mpb.RequestEvent
    machine_id: str


@dataclass(frozen=True)
class MachineLost:
    """Inbox item: a machine of `attempt` left (lease expired, stream broken)."""
    attempt: Attempt
    machine_id: str
    reason: str


InboxItem = TokenArrived | MachineEvent | MachineLost


class AttemptFailed(Exception):
    def __init__(self, message: str, machines: tuple[str, ...] = ()):
        super().__init__(message)
        self.machines = machines  # to avoid on the next attempt


@dataclass
class ClusterRequest:
    request_id: str
    prompt_ids: list[int]
    sampling: mpb.SamplingParams
    stop_ids: frozenset[int]
    arrival_s: float = field(default_factory=time.monotonic)
    tokens: list[int] = field(default_factory=list)
    token_times: list[float] = field(default_factory=list)
    finish_reason: str = ""
    num_reroutes: int = 0
    num_attempts: int = 0
    prefill_start_s: float | None = None
    route: Route | None = None
    inbox: asyncio.Queue[InboxItem] = field(default_factory=asyncio.Queue)
    aborts: list[asyncio.Task] = field(default_factory=list)
    """Aborts of this request's ended attempts still on their way to the machines."""

    @property
    def max_tokens(self) -> int:
        return self.sampling.max_tokens


@dataclass
class Attempt:
    attempt_id: str
    req: ClusterRequest
    offset: int  # output index of this attempt's first token
    route: Route
    prompt_len: int
    prompt_credited: bool = False
    produced: int = 0
    credited: int = 0  # of `produced`, credited to the token machine's pending decode tokens
    ended: bool = False
    ahead: dict[int, int] = field(default_factory=dict)
