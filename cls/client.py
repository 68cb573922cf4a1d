"""The Python SDK of the cluster: generate through clsd, and its admin calls.

    from cls.client import ClsClient

    with ClsClient("127.0.0.1:50050") as client:
        for delta in client.generate_stream("What is the capital of France?", chat=True):
            print(delta.text, end="", flush=True)
        done = client.generate([1, 2, 3], max_tokens=16)   # token ids in, a Completion out
        print(done.text, done.finish_reason, done.timing.ttft_s)

    async with AsyncClsClient() as client:                # the same methods, awaited
        async for delta in client.generate_stream("Hello"):
            ...

Contracts:
- `generate_stream` returns a handle that starts the RPC at once and iterates `Delta`s. Leaving
  it early (break, `close()`/`aclose()`, `cancel()`, leaving its `with` block, the handle being
  garbage collected, or cancelling the task that reads it) cancels the RPC, which makes clsd
  abort the request on its machines. Reading after `cancel()` raises `Cancelled`.
- Every gRPC error is raised as a `ClsError` subclass named after its status code, carrying the
  server's message. `timeout_s` is the RPC deadline (None: no client deadline on `generate*`;
  admin calls default to the client's `admin_timeout_s`).
- Admin calls send `authorization: Bearer <token>`; the token is `admin_token=` or the stripped
  contents of `admin_token_file=` (read at the first admin call). With neither, the call goes out
  without a token and clsd answers UNAUTHENTICATED.

The address defaults to $CLSD_ADDRESS, else 127.0.0.1:50050. This module needs only grpc and the
generated proto modules (no torch).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import grpc.aio

from proto import clsd_pb2 as pb
from proto import clsd_pb2_grpc, mlsd_pb2

DEFAULT_ADDRESS = "127.0.0.1:50050"
DEFAULT_ADMIN_TIMEOUT_S = 30.0


def default_address() -> str:
    return os.environ.get("CLSD_ADDRESS") or DEFAULT_ADDRESS


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


def _from_rpc(e: grpc.RpcError) -> ClsError:
    code = e.code() if callable(getattr(e, "code", None)) else grpc.StatusCode.UNKNOWN
    details = e.details() if callable(getattr(e, "details", None)) else str(e)
    return error_for(code or grpc.StatusCode.UNKNOWN, details or "")


def _cancelled_here() -> Cancelled:
    return Cancelled(grpc.StatusCode.CANCELLED, "the stream was cancelled by this client")


# --- results --------------------------------------------------------------------------------

ROLE_NAMES = {mlsd_pb2.ROLE_UNSPECIFIED: "unspecified", mlsd_pb2.PROMPT: "prompt",
              mlsd_pb2.TOKEN: "token", mlsd_pb2.MIXED: "mixed"}


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


def _delta(m: pb.GenerateResponse) -> Delta:
    timing = None
    if m.HasField("timing"):
        t = m.timing
        timing = Timing(t.ttft_s, t.e2e_s, t.tpot_s, t.max_tbt_s, t.queue_s)
    return Delta(m.request_id, m.index, tuple(m.token_ids), m.text, m.finish_reason,
                 m.num_prompt_tokens, timing, m.prompt_machine, m.token_machine, m.num_reroutes)


def _machine(m: pb.MachineStatus) -> MachineStatus:
    return MachineStatus(m.machine_id, m.address, ROLE_NAMES.get(m.home, str(m.home)),
                         ROLE_NAMES.get(m.role, str(m.role)), m.draining, m.pending_prompt_tokens,
                         m.pending_decode_tokens, m.kv_blocks_free, m.kv_blocks_total,
                         m.num_requests, m.lease_expires_in_s)


def _pools(r: pb.ListPoolsReply) -> Pools:
    return Pools(tuple(PoolStatus(ROLE_NAMES.get(p.role, str(p.role)), tuple(p.machine_ids),
                                  p.pending_tokens) for p in r.pools),
                 r.num_borrowed, r.num_returned)


def _moves(r: pb.ResizePoolsReply) -> list[PoolMove]:
    return [PoolMove(m.machine_id, ROLE_NAMES.get(m.from_pool, str(m.from_pool)),
                     ROLE_NAMES.get(m.to_pool, str(m.to_pool))) for m in r.moves]


@dataclass
class _Collector:
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


def build_request(prompt: str | Sequence[int], *, max_tokens: int = 0, temperature: float = 0.0,
                  top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                  stop_token_ids: Sequence[int] = (), ignore_eos: bool = False, chat: bool = False,
                  request_id: str | None = None) -> pb.GenerateRequest:
    """The GenerateRequest for a text prompt (sent UTF-8 encoded) or a list of token ids."""
    req = pb.GenerateRequest(apply_chat_template=chat, max_tokens=max_tokens,
                             temperature=temperature, top_k=top_k, top_p=top_p,
                             stop_token_ids=list(stop_token_ids), ignore_eos=ignore_eos,
                             request_id=request_id or "")
    if isinstance(prompt, str):
        req.prompt = prompt.encode("utf-8")
    elif isinstance(prompt, (bytes, bytearray)):
        raise TypeError("prompt must be a str or a list of token ids, not bytes")
    else:
        req.prompt_token_ids.extend(int(t) for t in prompt)
    if seed is not None:
        req.seed = seed
    return req


def _read_token_file(path: str | os.PathLike) -> str:
    try:
        token = Path(path).read_text().strip()
    except FileNotFoundError:
        raise Unauthenticated(grpc.StatusCode.UNAUTHENTICATED,
                              f"admin token file {path} does not exist") from None
    except OSError as e:
        raise Unauthenticated(grpc.StatusCode.UNAUTHENTICATED,
                              f"admin token file {path} cannot be read: {e.strerror}") from None
    if not token:
        raise Unauthenticated(grpc.StatusCode.UNAUTHENTICATED, f"admin token file {path} is empty")
    return token


class _Base:
    def __init__(self, address: str | None, admin_token: str | None,
                 admin_token_file: str | os.PathLike | None, admin_timeout_s: float):
        self.address = address or default_address()
        self._admin_token = admin_token
        self._admin_token_file = admin_token_file
        self.admin_timeout_s = admin_timeout_s

    def _admin_metadata(self) -> tuple[tuple[str, str], ...]:
        if self._admin_token is None and self._admin_token_file is not None:
            self._admin_token = _read_token_file(self._admin_token_file)
        if not self._admin_token:
            return ()
        return (("authorization", f"Bearer {self._admin_token}"),)

    def _timeout(self, timeout_s: float | None) -> float:
        return self.admin_timeout_s if timeout_s is None else timeout_s


# --- sync -----------------------------------------------------------------------------------


class GenerateStream:
    """An iterator of Deltas over one running Generate RPC (see the module's contracts)."""

    def __init__(self, call):
        self._call = call
        self._cancelled = False
        self._done = False
        self._collector = _Collector()

    def __iter__(self) -> GenerateStream:
        return self

    def __next__(self) -> Delta:
        if self._cancelled:
            raise _cancelled_here()
        if self._done:
            raise StopIteration
        try:
            msg = next(self._call)
        except StopIteration:
            self._done = True
            raise
        except grpc.RpcError as e:
            self._done = True
            if self._cancelled:
                raise _cancelled_here() from None
            raise _from_rpc(e) from None
        d = _delta(msg)
        self._collector.add(d)
        return d

    def cancel(self) -> None:
        """Cancels the RPC unless it has already ended; clsd aborts the request."""
        if not self._done and not self._cancelled:
            self._cancelled = True
            self._call.cancel()

    close = cancel

    def completion(self) -> Completion:
        """The whole result, once the stream has been read to its end."""
        return self._collector.completion()

    def __enter__(self) -> GenerateStream:
        return self

    def __exit__(self, *exc) -> None:
        self.cancel()

    def __del__(self) -> None:
        try:
            self.cancel()
        except Exception:
            pass


class ClsClient(_Base):
    """Blocking client over one gRPC channel; thread-safe; use as a context manager or close()."""

    def __init__(self, address: str | None = None, *, admin_token: str | None = None,
                 admin_token_file: str | os.PathLike | None = None,
                 admin_timeout_s: float = DEFAULT_ADMIN_TIMEOUT_S):
        super().__init__(address, admin_token, admin_token_file, admin_timeout_s)
        self._channel = grpc.insecure_channel(self.address)
        self._client = clsd_pb2_grpc.ClientServiceStub(self._channel)
        self._admin = clsd_pb2_grpc.AdminServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> ClsClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def generate_stream(self, prompt: str | Sequence[int], *, timeout_s: float | None = None,
                        **sampling) -> GenerateStream:
        req = build_request(prompt, **sampling)
        return GenerateStream(self._client.Generate(req, timeout=timeout_s))

    def generate(self, prompt: str | Sequence[int], *, timeout_s: float | None = None,
                 **sampling) -> Completion:
        with self.generate_stream(prompt, timeout_s=timeout_s, **sampling) as stream:
            for _ in stream:
                pass
            return stream.completion()

    def _unary(self, method, request, timeout_s: float | None):
        metadata = self._admin_metadata()
        try:
            return method(request, timeout=self._timeout(timeout_s), metadata=metadata)
        except grpc.RpcError as e:
            raise _from_rpc(e) from None

    def list_machines(self, *, timeout_s: float | None = None) -> list[MachineStatus]:
        reply = self._unary(self._admin.ListMachines, pb.ListMachinesRequest(), timeout_s)
        return [_machine(m) for m in reply.machines]

    def list_pools(self, *, timeout_s: float | None = None) -> Pools:
        return _pools(self._unary(self._admin.ListPools, pb.ListPoolsRequest(), timeout_s))

    def resize_pools(self, num_prompt: int | None = None, num_token: int | None = None, *,
                     timeout_s: float | None = None) -> list[PoolMove]:
        req = pb.ResizePoolsRequest(num_prompt=num_prompt, num_token=num_token)
        return _moves(self._unary(self._admin.ResizePools, req, timeout_s))

    def drain(self, machine_id: str, *, timeout_s: float | None = None) -> MachineStatus:
        reply = self._unary(self._admin.DrainMachine, pb.DrainRequest(machine_id=machine_id),
                            timeout_s)
        return _machine(reply.machine)

    def undrain(self, machine_id: str, *, timeout_s: float | None = None) -> MachineStatus:
        reply = self._unary(self._admin.UndrainMachine, pb.DrainRequest(machine_id=machine_id),
                            timeout_s)
        return _machine(reply.machine)


# --- async ----------------------------------------------------------------------------------


class AsyncGenerateStream:
    """An async iterator of Deltas over one running Generate RPC (see the module's contracts)."""

    def __init__(self, call: grpc.aio.UnaryStreamCall):
        self._call = call
        self._cancelled = False
        self._done = False
        self._collector = _Collector()

    def __aiter__(self) -> AsyncGenerateStream:
        return self

    async def __anext__(self) -> Delta:
        if self._cancelled:
            raise _cancelled_here()
        if self._done:
            raise StopAsyncIteration
        try:
            msg = await self._call.read()
        except asyncio.CancelledError:
            if self._cancelled:  # our own cancel() surfaced as CancelledError inside grpc
                raise _cancelled_here() from None
            self.cancel()  # the reading task was cancelled: take the RPC down with it
            raise
        except grpc.RpcError as e:
            self._done = True
            if self._cancelled:
                raise _cancelled_here() from None
            raise _from_rpc(e) from None
        if msg is grpc.aio.EOF:
            self._done = True
            raise StopAsyncIteration
        d = _delta(msg)
        self._collector.add(d)
        return d

    def cancel(self) -> None:
        if not self._done and not self._cancelled:
            self._cancelled = True
            self._call.cancel()

    async def aclose(self) -> None:
        self.cancel()

    def completion(self) -> Completion:
        return self._collector.completion()

    async def __aenter__(self) -> AsyncGenerateStream:
        return self

    async def __aexit__(self, *exc) -> None:
        self.cancel()

    def __del__(self) -> None:
        try:
            self.cancel()
        except Exception:
            pass


class AsyncClsClient(_Base):
    """asyncio client (grpc.aio); create it inside the event loop that uses it."""

    def __init__(self, address: str | None = None, *, admin_token: str | None = None,
                 admin_token_file: str | os.PathLike | None = None,
                 admin_timeout_s: float = DEFAULT_ADMIN_TIMEOUT_S):
        super().__init__(address, admin_token, admin_token_file, admin_timeout_s)
        self._channel = grpc.aio.insecure_channel(self.address)
        self._client = clsd_pb2_grpc.ClientServiceStub(self._channel)
        self._admin = clsd_pb2_grpc.AdminServiceStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClsClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def generate_stream(self, prompt: str | Sequence[int], *, timeout_s: float | None = None,
                        **sampling) -> AsyncGenerateStream:
        req = build_request(prompt, **sampling)
        return AsyncGenerateStream(self._client.Generate(req, timeout=timeout_s))

    async def generate(self, prompt: str | Sequence[int], *, timeout_s: float | None = None,
                       **sampling) -> Completion:
        async with self.generate_stream(prompt, timeout_s=timeout_s, **sampling) as stream:
            async for _ in stream:
                pass
            return stream.completion()

    async def _unary(self, method, request, timeout_s: float | None):
        metadata = self._admin_metadata()
        try:
            return await method(request, timeout=self._timeout(timeout_s), metadata=metadata)
        except grpc.RpcError as e:
            raise _from_rpc(e) from None

    async def list_machines(self, *, timeout_s: float | None = None) -> list[MachineStatus]:
        reply = await self._unary(self._admin.ListMachines, pb.ListMachinesRequest(), timeout_s)
        return [_machine(m) for m in reply.machines]

    async def list_pools(self, *, timeout_s: float | None = None) -> Pools:
        return _pools(await self._unary(self._admin.ListPools, pb.ListPoolsRequest(), timeout_s))

    async def resize_pools(self, num_prompt: int | None = None, num_token: int | None = None, *,
                           timeout_s: float | None = None) -> list[PoolMove]:
        req = pb.ResizePoolsRequest(num_prompt=num_prompt, num_token=num_token)
        return _moves(await self._unary(self._admin.ResizePools, req, timeout_s))

    async def drain(self, machine_id: str, *, timeout_s: float | None = None) -> MachineStatus:
        reply = await self._unary(self._admin.DrainMachine, pb.DrainRequest(machine_id=machine_id),
                                  timeout_s)
        return _machine(reply.machine)

    async def undrain(self, machine_id: str, *, timeout_s: float | None = None) -> MachineStatus:
        reply = await self._unary(self._admin.UndrainMachine,
                                  pb.DrainRequest(machine_id=machine_id), timeout_s)
        return _machine(reply.machine)
