"""EngineSink: where a KV receiver writes one request's layers on a token machine."""

from __future__ import annotations

import torch

from engine.engine import Engine
from engine.sequence import Sequence
from mls.kv.base import KVSpec


def kv_spec_for(engine: Engine, seq: Sequence) -> KVSpec:
    """The transfer header of seq's prompt KV as this engine lays it out."""
    mc = engine.model_config
    return KVSpec(seq.request_id, mc.num_layers, seq.prompt_len, mc.num_kv_heads, mc.head_dim,
                  str(engine.dtype).removeprefix("torch."))


class EngineSink:
    """CPU engines: the receiver writes straight into the request's reserved block memory.
    Device engines: into a host staging buffer, copied to the device when the layer is complete."""

    def __init__(self, engine: Engine, seq: Sequence):
        self.engine, self.seq = engine, seq
        self.on_device = engine.device.type != "cpu"
        self._spans: list[tuple[int, int]] | None = None  # layer 0's, relative to the cache
        if self.on_device:
            mc = engine.model_config
            self._staging = torch.empty(seq.prompt_len, 2, mc.num_kv_heads, mc.head_dim,
                                        dtype=engine.dtype, pin_memory=torch.cuda.is_available())

    def layer_buffers(self, layer: int) -> list[torch.Tensor]:
        if self.on_device:
            return [self._staging]
        return self.engine.import_views(self.seq, layer)

    def layer_spans(self, layer: int) -> list[tuple[int, int]]:
        """(address, nbytes) of what `layer_buffers` returns, adjacent blocks merged, computed from
        the block table without building a view per block (the shm transport's placement)."""
        if self.on_device:
            return [(self._staging.data_ptr(), self._staging.numel() * self._staging.element_size())]
        if self._spans is None:
            self.engine.import_views(self.seq, 0)  # its checks: blocks reserved for the import
            cache, bs, n = self.engine.kv.tensor, self.engine.kv.block_size, self.seq.prompt_len
            token_bytes = cache.stride(1) * cache.element_size()
            spans: list[tuple[int, int]] = []
            for i, b in enumerate(self.seq.block_table[: -(-n // bs)]):
                off, size = b * bs * token_bytes, min(bs, n - i * bs) * token_bytes
                if spans and spans[-1][0] + spans[-1][1] == off:
                    spans[-1] = (spans[-1][0], spans[-1][1] + size)
                else:
                    spans.append((off, size))
            self._spans = spans
        cache = self.engine.kv.tensor
        if not 0 <= layer < cache.shape[0]:
            raise ValueError(f"layer {layer} outside [0, {cache.shape[0]})")
        base = cache.data_ptr() + layer * cache.stride(0) * cache.element_size()
        return [(base + off, size) for off, size in self._spans]

    def span_pattern(self) -> tuple[list[tuple[int, int]], list[int]]:
        """Layer 0's spans and each layer's address shift from them (one block table, a fixed
        layer stride): the shm placement without listing every layer."""
        spans0 = self.layer_spans(0)
        if self.on_device:
            return spans0, [0] * self.engine.model_config.num_layers  # one staging buffer
        cache = self.engine.kv.tensor
        stride = cache.stride(0) * cache.element_size()
        return spans0, [i * stride for i in range(cache.shape[0])]

    def layer_received(self, layer: int) -> None:
        if self.on_device:
            self.engine.import_kv_layer(self.seq, layer, self._staging)
