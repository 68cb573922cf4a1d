"""The engine-backend contract: what mlsd's runner and KV sink need of an engine, and nothing more.

The built-in torch engine (`engine.engine.Engine`) and the modelled engine
(`engine.modelled_engine.ModelledEngine`) implement it; a third backend (an external engine
driven in-process) implements it without the worker or the KV sink knowing its cache layout:
block ids and cache strides never leave the backend. Life cycle of a request through a backend:
1. `add_request` validates and returns a `Sequence`; `max_tokens_total` says how many tokens it
   can ever hold (the scheduler's block arithmetic uses it with `block_size`).
2. Prompt work: `prefill(seqs, kv_export)` hands each layer's K/V to the hook while later layers
   run, and returns the first tokens; `free` gives the blocks back once the KV has left.
3. Token work: `reserve`, then the KV sink writes each layer through `import_views` (or the raw
   spans of `import_span_pattern`, or `import_kv_layer` for device caches), then
   `finish_import(seq, first_token)`.
4. Decoding: `decode(seqs)`, or the chunked-prefill `step(decodes, chunks)`.
5. `abort` / `free` return the blocks at any point; `num_free_blocks` is the truth the scheduler's
   budget mirrors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch

from engine.model_config import ModelConfig
from engine.sequence import SamplingParams, Sequence

KVExportHook = Callable[[int, list[tuple[Sequence, torch.Tensor]]], None]
"""Called after layer i of a prefill with one (sequence, kv) per request; kv is
[tokens, 2, num_kv_heads, head_dim], contiguous, in the engine's dtype, prompt position order."""


@runtime_checkable
class EngineBackend(Protocol):
    model_config: ModelConfig
    device: torch.device
    dtype: torch.dtype
    max_model_len: int

    @property
    def block_size(self) -> int: ...

    @property
    def num_blocks(self) -> int: ...

    @property
    def num_free_blocks(self) -> int: ...

    @property
    def max_num_seqs(self) -> int: ...

    @property
    def dtype_name(self) -> str: ...

    @property
    def kv_bytes_per_token(self) -> int: ...

    # request life cycle
    def add_request(self, request_id: str, prompt_token_ids: list[int],
                    params: SamplingParams) -> Sequence: ...

    def max_tokens_total(self, seq: Sequence) -> int: ...

    def reserve(self, seq: Sequence, num_tokens: int | None = None) -> None: ...

    def free(self, seq: Sequence) -> None: ...

    def abort(self, seq: Sequence) -> None: ...

    # steps
    def prefill(self, seqs: list[Sequence], kv_export: KVExportHook | None = None) -> list[int]: ...

    def decode(self, seqs: list[Sequence]) -> list[int]: ...

    def step(self, decode_seqs: list[Sequence], chunks: list[tuple[Sequence, int]],
             max_num_tokens: int | None = None) -> list[int | None]: ...

    # KV import (token work)
    def import_views(self, seq: Sequence, layer: int) -> list[torch.Tensor]: ...

    def import_span_pattern(self, seq: Sequence) -> tuple[list[tuple[int, int]], list[int]]: ...

    def import_kv_layer(self, seq: Sequence, layer: int, kv: torch.Tensor) -> None: ...

    def finish_import(self, seq: Sequence, first_token_id: int) -> None: ...
