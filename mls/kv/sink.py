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
        if self.on_device:
            mc = engine.model_config
            self._staging = torch.empty(seq.prompt_len, 2, mc.num_kv_heads, mc.head_dim,
                                        dtype=engine.dtype, pin_memory=torch.cuda.is_available())

    def layer_buffers(self, layer: int) -> list[torch.Tensor]:
        if self.on_device:
            return [self._staging]
        return self.engine.import_views(self.seq, layer)

    def layer_received(self, layer: int) -> None:
        if self.on_device:
            self.engine.import_kv_layer(self.seq, layer, self._staging)
