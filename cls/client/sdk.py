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
generated proto modules (no torch). The typed results and errors are in cls/client/types.py;
`cls.client` re-exports the public names of both.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from pathlib import Path

import grpc
import grpc.aio

from cls.client.types import (
    Collector,
    Completion,
    Delta,
    MachineStatus,
    PoolMove,
    Pools,
    Unauthenticated,
    cancelled_here,
    delta_from_pb,
    error_from_rpc,
    machine_from_pb,
    moves_from_pb,
    pools_from_pb,
)
from proto import clsd_pb2 as pb
from proto import clsd_pb2_grpc

DEFAULT_ADDRESS = "127.0.0.1:50050"
DEFAULT_ADMIN_TIMEOUT_S = 30.0


def default_address() -> str:
    return os.environ.get("CLSD_ADDRESS") or DEFAULT_ADDRESS


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
        self._collector = Collector()

    def __iter__(self) -> GenerateStream:
        return self

    def __next__(self) -> Delta:
        if self._cancelled:
            raise cancelled_here()
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
                raise cancelled_here() from None
            raise error_from_rpc(e) from None
        d = delta_from_pb(msg)
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
            raise error_from_rpc(e) from None

    def list_machines(self, *, timeout_s: float | None = None) -> list[MachineStatus]:
        reply = self._unary(self._admin.ListMachines, pb.ListMachinesRequest(), timeout_s)
        return [machine_from_pb(m) for m in reply.machines]

    def list_pools(self, *, timeout_s: float | None = None) -> Pools:
        return pools_from_pb(self._unary(self._admin.ListPools, pb.ListPoolsRequest(), timeout_s))

    def resize_pools(self, num_prompt: int | None = None, num_token: int | None = None, *,
                     timeout_s: float | None = None) -> list[PoolMove]:
        req = pb.ResizePoolsRequest(num_prompt=num_prompt, num_token=num_token)
        return moves_from_pb(self._unary(self._admin.ResizePools, req, timeout_s))

    def drain(self, machine_id: str, *, timeout_s: float | None = None) -> MachineStatus:
        reply = self._unary(self._admin.DrainMachine, pb.DrainRequest(machine_id=machine_id),
                            timeout_s)
        return machine_from_pb(reply.machine)

    def undrain(self, machine_id: str, *, timeout_s: float | None = None) -> MachineStatus:
        reply = self._unary(self._admin.UndrainMachine, pb.DrainRequest(machine_id=machine_id),
                            timeout_s)
        return machine_from_pb(reply.machine)


# --- async ----------------------------------------------------------------------------------


class AsyncGenerateStream:
    """An async iterator of Deltas over one running Generate RPC (see the module's contracts)."""

    def __init__(self, call: grpc.aio.UnaryStreamCall):
        self._call = call
        self._cancelled = False
        self._done = False
        self._collector = Collector()

    def __aiter__(self) -> AsyncGenerateStream:
        return self

    async def __anext__(self) -> Delta:
        if self._cancelled:
            raise cancelled_here()
        if self._done:
            raise StopAsyncIteration
        try:
            msg = await self._call.read()
        except asyncio.CancelledError:
            if self._cancelled:  # our own cancel() surfaced as CancelledError inside grpc
                raise cancelled_here() from None
            self.cancel()  # the reading task was cancelled: take the RPC down with it
            raise
        except grpc.RpcError as e:
            self._done = True
            if self._cancelled:
                raise cancelled_here() from None
            raise error_from_rpc(e) from None
        if msg is grpc.aio.EOF:
            self._done = True
            raise StopAsyncIteration
        d = delta_from_pb(msg)
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
            raise error_from_rpc(e) from None

    async def list_machines(self, *, timeout_s: float | None = None) -> list[MachineStatus]:
        reply = await self._unary(self._admin.ListMachines, pb.ListMachinesRequest(), timeout_s)
        return [machine_from_pb(m) for m in reply.machines]

    async def list_pools(self, *, timeout_s: float | None = None) -> Pools:
        return pools_from_pb(await self._unary(self._admin.ListPools, pb.ListPoolsRequest(), timeout_s))

    async def resize_pools(self, num_prompt: int | None = None, num_token: int | None = None, *,
                           timeout_s: float | None = None) -> list[PoolMove]:
        req = pb.ResizePoolsRequest(num_prompt=num_prompt, num_token=num_token)
        return moves_from_pb(await self._unary(self._admin.ResizePools, req, timeout_s))

    async def drain(self, machine_id: str, *, timeout_s: float | None = None) -> MachineStatus:
        reply = await self._unary(self._admin.DrainMachine, pb.DrainRequest(machine_id=machine_id),
                                  timeout_s)
        return machine_from_pb(reply.machine)

    async def undrain(self, machine_id: str, *, timeout_s: float | None = None) -> MachineStatus:
        reply = await self._unary(self._admin.UndrainMachine,
                                  pb.DrainRequest(machine_id=machine_id), timeout_s)
        return machine_from_pb(reply.machine)
