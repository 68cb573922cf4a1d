"""The KV transfer interface every transport implements.

Life cycle of one request's KV, prompt machine -> token machine:
1. The token machine reserves the request's blocks, then `KVReceiver.expect(spec, sink, deadline)`:
   from now on the receiver accepts this request's layers and writes them into `sink`.
2. The prompt machine opens `KVSender.open(peer_address, spec, deadline)` and, while the prefill
   runs, calls `send_layer(i, kv)` after each layer i (layerwise mode) or all of them after the
   prefill (serialized mode), then `finish(first_token_id)`. Both return at once: bytes move on
   the transport's own thread, never on the engine thread.
3. The receiver's `poll(request_id)` goes WAITING -> RECEIVING -> DONE (with the first token),
   or FAILED with a reason. Every transfer has a deadline: a dead or hung peer shows up as a
   timeout, not as a transport-specific error, and the caller frees the blocks on its side.
4. `cancel(request_id)` (receiver) and `abort()` (sender) end a transfer early; a late layer for
   a cancelled request is dropped, never written.

Wire layout of one layer (transport-neutral, the engine's export layout): [num_tokens, 2,
num_kv_heads, head_dim] in `dtype`, C order, tokens in prompt position order, K at index 0 of the
second axis and V at 1. Block ids never cross machines: the receiver's sink maps tokens to its own
memory.
"""

from __future__ import annotations

import abc
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from enum import IntEnum
from typing import Protocol

import torch

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


class TransferState(IntEnum):
    WAITING = 0
    RECEIVING = 1
    DONE = 2
    FAILED = 3


class KVSpecError(ValueError):
    """A KV header that does not match what the receiver expects; the message names the field."""


@dataclass(frozen=True)
class KVSpec:
    request_id: str
    num_layers: int
    num_tokens: int
    num_kv_heads: int
    head_dim: int
    dtype: str  # "float32", "bfloat16" or "float16"

    def __post_init__(self) -> None:
        if not self.request_id:
            raise KVSpecError("request_id is empty")
        for name in ("num_layers", "num_tokens", "num_kv_heads", "head_dim"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise KVSpecError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.dtype not in DTYPE_BYTES:
            raise KVSpecError(f"dtype {self.dtype!r} not one of {sorted(DTYPE_BYTES)}")

    @property
    def layer_shape(self) -> tuple[int, int, int, int]:
        return (self.num_tokens, 2, self.num_kv_heads, self.head_dim)

    @property
    def layer_nbytes(self) -> int:
        return math.prod(self.layer_shape) * DTYPE_BYTES[self.dtype]

    @property
    def total_nbytes(self) -> int:
        return self.layer_nbytes * self.num_layers

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> KVSpec:
        try:
            return cls(**{k: d[k] for k in ("request_id", "num_layers", "num_tokens",
                                             "num_kv_heads", "head_dim", "dtype")})
        except KeyError as e:
            raise KVSpecError(f"KV header lacks field {e.args[0]!r}") from None
        except TypeError as e:
            raise KVSpecError(f"malformed KV header: {e}") from None

    def check_matches(self, other: KVSpec) -> None:
        """Raises KVSpecError naming the first field where `other` (the announced header)
        differs from this (the expected) spec."""
        for name, mine in self.to_dict().items():
            theirs = getattr(other, name)
            if mine != theirs:
                raise KVSpecError(f"KV header field {name} is {theirs!r}, expected {mine!r}")


class KVSink(Protocol):
    """Where a receiver puts one request's KV (implemented by the token machine over its engine)."""

    def layer_buffers(self, layer: int) -> list[torch.Tensor]:
        """Contiguous CPU tensors that together hold exactly one layer's bytes, in wire order."""

    def layer_received(self, layer: int) -> None:
        """Called once the layer's bytes are in the buffers (e.g. to copy host -> device)."""


@dataclass(frozen=True)
class ReceiveStatus:
    state: TransferState
    layers_received: int = 0
    first_token_id: int | None = None
    error: str | None = None


class KVReceiver(abc.ABC):
    transport: str

    @abc.abstractmethod
    def address(self) -> bytes:
        """What a sender needs to reach this receiver (published through the control plane)."""

    @abc.abstractmethod
    def expect(self, spec: KVSpec, sink: KVSink, deadline_s: float,
               transfer_window_s: float | None = None) -> None:
        """Accept `spec.request_id`'s KV: the sender must connect before time.monotonic()
        reaches deadline_s (the start window, which covers the prefill's queueing on the prompt
        machine); once it has, the transfer gets `transfer_window_s` from that moment (None: the
        same deadline_s) to deliver every layer."""

    @abc.abstractmethod
    def poll(self, request_id: str) -> ReceiveStatus:
        """Current state; unknown ids are FAILED with a reason."""

    on_ended: Callable[[str], None] | None = None
    """Set by the owner: called with the request id as soon as a transfer is DONE or FAILED (on
    the receiver's thread, outside its locks), so the owner wakes at once instead of polling.
    It must not block. A transfer that only times out (nobody connected) is seen by `poll`."""

    def _notify_ended(self, request_id: str) -> None:
        callback = self.on_ended
        if callback is not None:
            try:
                callback(request_id)
            except Exception:  # the owner's bug must not fail the transfer
                logging.getLogger("mls.kv").exception("KV receiver on_ended callback failed")

    @abc.abstractmethod
    def cancel(self, request_id: str) -> None:
        """Forget the request; bytes arriving for it later are discarded."""

    @abc.abstractmethod
    def close(self) -> None: ...


class SendHandle(abc.ABC):
    @abc.abstractmethod
    def send_layer(self, layer: int, kv: torch.Tensor) -> None:
        """Queue one layer (the export layout, contiguous); returns at once."""

    @abc.abstractmethod
    def finish(self, first_token_id: int) -> None:
        """All layers are queued; the receiver is told the first token when they have landed."""

    @abc.abstractmethod
    def abort(self, reason: str) -> None: ...

    @abc.abstractmethod
    def wait(self, timeout_s: float | None = None) -> TransferState:
        """Blocks until DONE or FAILED (or the timeout, returning the current state)."""

    @property
    @abc.abstractmethod
    def error(self) -> str | None: ...


MAX_ADDRESS_BYTES = 4096


class KVSender(abc.ABC):
    transport: str

    @abc.abstractmethod
    def open(self, peer_address: bytes, spec: KVSpec, deadline_s: float) -> SendHandle: ...

    def check_address(self, peer_address: bytes) -> None:
        """Raises ValueError naming the problem if `peer_address` cannot be a receiver of this
        transport (checked where a Prefill comes in, before any work is queued)."""
        if not peer_address:
            raise ValueError("kv_address is empty")
        if len(peer_address) > MAX_ADDRESS_BYTES:
            raise ValueError(f"kv_address has {len(peer_address)} bytes; at most {MAX_ADDRESS_BYTES}")

    @abc.abstractmethod
    def close(self) -> None: ...
