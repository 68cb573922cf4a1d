"""What the engine worker publishes after each turn: typed, one message per turn.

The service turns a `TurnOutput` into one `MachineEvents` proto message for every subscriber
(clsd); nothing else crosses from the worker thread to the event loop.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class EventKind(enum.IntEnum):
    """A request's milestones on a machine (the proto's RequestEvent.Kind, by name)."""
    RESERVED = 1
    """Token work: its blocks are reserved; the KV may come."""
    FINISHED = 2
    FAILED = 3
    ABORTED = 4


@dataclass(frozen=True)
class TokenOut:
    """Output token `index` of a request (indices count from its first output token)."""
    request_id: str
    index: int
    token_id: int


@dataclass(frozen=True)
class RequestEvent:
    request_id: str
    kind: EventKind
    finish_reason: str = ""
    """FINISHED: "stop" or "length"."""
    message: str = ""
    """FAILED: what went wrong."""
    num_output_tokens: int = 0


@dataclass
class TurnOutput:
    tokens: list[TokenOut] = field(default_factory=list)
    events: list[RequestEvent] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.tokens or self.events)
