"""The SDK's typed errors and result types, and their conversion from the protos.

`cls.client` re-exports the user-facing names here; import them from there. The `*_from_pb`
converters, `error_from_rpc`, `cancelled_here` and `Collector` are the SDK's own helpers
(cls/client/sdk.py), not part of its public surface.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc

from proto import clsd_pb2 as pb
from proto import mlsd_pb2
from proto.roles import Role

# --- errors ---------------------------------------------------------------------------------


class ClsError(Exception):
    """A failed call: `code` is the gRPC status code, `message` the server's details."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return self.message or self.code.name


class InvalidArgument(ClsError): ...
class NotFound(ClsError): ...
class AlreadyExists(ClsError): ...
class ResourceExhausted(ClsError): ...
class Unauthenticated(ClsError): ...
class PermissionDenied(ClsError): ...
class FailedPrecondition(ClsError): ...
class Unavailable(ClsError): ...
class DeadlineExceeded(ClsError): ...
class Cancelled(ClsError): ...
class Internal(ClsError): ...


_ERRORS: dict[grpc.StatusCode, type[ClsError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.INTERNAL: Internal,
}


def error_for(code: grpc.StatusCode, message: str) -> ClsError:
    return _ERRORS.get(code, ClsError)(code, message)


def error_from_rpc(e: grpc.RpcError) -> ClsError:
    code = e.code() if callable(getattr(e, "code", None)) else grpc.StatusCode.UNKNOWN
    details = e.details() if callable(getattr(e, "details", None)) else str(e)
    return error_for(code or grpc.StatusCode.UNKNOWN, details or "")


def cancelled_here() -> Cancelled:
    return Cancelled(grpc.StatusCode.CANCELLED, "the stream was cancelled by this client")


# --- results --------------------------------------------------------------------------------

ROLE_NAMES = {mlsd_pb2.ROLE_UNSPECIFIED: "unspecified", **{r.to_pb(): str(r) for r in Role}}
"""Proto role values and their names (proto/roles.py has the one conversion)."""


@dataclass(frozen=True)
class Timing:
    ttft_s: float
    e2e_s: float
    tpot_s: float
    max_tbt_s: float
    queue_s: float


@dataclass(frozen=True)
class Delta:
    """One stream message. `index` is the output index of `token_ids[0]`; the last message has
    a non-empty `finish_reason` ("stop" or "length"), the timing and where the phases ran."""

    request_id: str
    index: int
    token_ids: tuple[int, ...]
    text: str
    finish_reason: str = ""
    num_prompt_tokens: int = 0
    timing: Timing | None = None
    prompt_machine: str = ""
    token_machine: str = ""
    num_reroutes: int = 0


@dataclass(frozen=True)
class Completion:
    request_id: str
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str
    timing: Timing
    num_prompt_tokens: int
    prompt_machine: str
    token_machine: str
    num_reroutes: int


@dataclass(frozen=True)
class MachineStatus:
    machine_id: str
    address: str
    home: str       # "prompt" / "token"
    role: str       # "prompt" / "token" / "mixed"
    draining: bool
    pending_prompt_tokens: int
    pending_decode_tokens: int
    kv_blocks_free: int
    kv_blocks_total: int
    num_requests: int
    lease_expires_in_s: float


@dataclass(frozen=True)
class PoolStatus:
    role: str
    machine_ids: tuple[str, ...]
    pending_tokens: int


@dataclass(frozen=True)
class Pools:
    pools: tuple[PoolStatus, ...]
    num_borrowed: int
    num_returned: int


@dataclass(frozen=True)
class PoolMove:
    machine_id: str
    from_pool: str
    to_pool: str


def delta_from_pb(m: pb.GenerateResponse) -> Delta:
    timing = None
    if m.HasField("timing"):
        t = m.timing
        timing = Timing(t.ttft_s, t.e2e_s, t.tpot_s, t.max_tbt_s, t.queue_s)
    return Delta(m.request_id, m.index, tuple(m.token_ids), m.text, m.finish_reason,
                 m.num_prompt_tokens, timing, m.prompt_machine, m.token_machine, m.num_reroutes)


def machine_from_pb(m: pb.MachineStatus) -> MachineStatus:
    return MachineStatus(m.machine_id, m.address, ROLE_NAMES.get(m.home, str(m.home)),
                         ROLE_NAMES.get(m.role, str(m.role)), m.draining, m.pending_prompt_tokens,
                         m.pending_decode_tokens, m.kv_blocks_free, m.kv_blocks_total,
                         m.num_requests, m.lease_expires_in_s)


def pools_from_pb(r: pb.ListPoolsReply) -> Pools:
    return Pools(tuple(PoolStatus(ROLE_NAMES.get(p.role, str(p.role)), tuple(p.machine_ids),
                                  p.pending_tokens) for p in r.pools),
                 r.num_borrowed, r.num_returned)


def moves_from_pb(r: pb.ResizePoolsReply) -> list[PoolMove]:
    return [PoolMove(m.machine_id, ROLE_NAMES.get(m.from_pool, str(m.from_pool)),
                     ROLE_NAMES.get(m.to_pool, str(m.to_pool))) for m in r.moves]


@dataclass
class Collector:
    """Accumulates deltas into a Completion."""

    request_id: str = ""
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    last: Delta | None = None
    num_prompt_tokens: int = 0

    def add(self, d: Delta) -> None:
        self.request_id = self.request_id or d.request_id
        self.num_prompt_tokens = self.num_prompt_tokens or d.num_prompt_tokens
        self.text.append(d.text)
        self.token_ids.extend(d.token_ids)
        self.last = d

    def completion(self) -> Completion:
        d = self.last
        if d is None or not d.finish_reason:
            raise Internal(grpc.StatusCode.INTERNAL,
                           f"the stream of request {self.request_id or '?'} ended without a finish reason")
        return Completion(self.request_id, "".join(self.text), tuple(self.token_ids),
                          d.finish_reason, d.timing or Timing(0.0, 0.0, 0.0, 0.0, 0.0),
                          self.num_prompt_tokens, d.prompt_machine, d.token_machine, d.num_reroutes)
