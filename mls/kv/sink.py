"""EngineSink: where a KV receiver writes one request's layers on a token machine."""

from __future__ import annotations

import torch

from engine.backend import EngineBackend
from engine.sequence import Sequence
from mls.kv.base import KVSpec


def kv_spec_for(engine: EngineBackend, seq: Sequence) -> KVSpec:
    """The transfer header of seq's prompt KV as this engine lays it out."""
    mc = engine.model_config
    return KVSpec(seq.request_id, mc.num_layers, seq.prompt_len, mc.num_kv_heads, mc.head_dim,
                  engine.dtype_name)


class EngineSink:
    """CPU engines: the receiver writes straight into the request's reserved block memory.
    Device engines: into a host staging buffer, copied to the device when the layer is complete.
    The engine says where its memory is (`import_views`, `import_span_pattern`); its cache
    layout stays its own."""

    def __init__(self, engine: EngineBackend, seq: Sequence):
        self.engine, self.seq = engine, seq
        self.on_device = engine.device.type != "cpu"
        self._pattern: tuple[list[tuple[int, int]], list[int]] | None = None
        if self.on_device:
            mc = engine.model_config
            self._staging = torch.empty(seq.prompt_len, 2, mc.num_kv_heads, mc.head_dim,
                                        dtype=engine.dtype, pin_memory=torch.cuda.is_available())

    def layer_buffers(self, layer: int) -> list[torch.Tensor]:
        if self.on_device:
            return [self._staging]
        return self.engine.import_views(self.seq, layer)

    def layer_spans(self, layer: int) -> list[tuple[int, int]]:
        """(address, nbytes) of what `layer_buffers` returns, adjacent blocks merged, without
        building a view per block (the shm transport's placement)."""
        spans0, shifts = self.span_pattern()
        if not 0 <= layer < len(shifts):
            raise ValueError(f"layer {layer} outside [0, {len(shifts)})")
        return [(addr + shifts[layer], size) for addr, size in spans0]

    def span_pattern(self) -> tuple[list[tuple[int, int]], list[int]]:
        """Layer 0's spans and each layer's address shift from them: the shm placement without
        listing every layer."""
        if self._pattern is None:
            if self.on_device:
                st = self._staging
                self._pattern = ([(st.data_ptr(), st.numel() * st.element_size())],
                                 [0] * self.engine.model_config.num_layers)  # one staging buffer
            else:
                self._pattern = self.engine.import_span_pattern(self.seq)
        return self._pattern

    def layer_received(self, layer: int) -> None:
        if self.on_device:
            self.engine.import_kv_layer(self.seq, layer, self._staging)
