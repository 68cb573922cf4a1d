"""Loads a Hugging Face Llama-family checkpoint into the engine's layout.

The engine's layout is chosen for speed on CPU and GPU alike:
- q, k and v projections are fused into one [hidden, q + 2 * kv] matrix, gate and up into one
  [hidden, 2 * intermediate] matrix, so each layer runs four matmuls;
- every layer projection is stored transposed and contiguous ([in, out]): `x @ W_t` reads the weight
  row by row, which makes batch-1 decode (a matrix-vector product) markedly faster on CPU.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from engine.model_config import ModelConfig


class CheckpointError(ValueError):
    """The checkpoint folder is missing a file or a tensor the model needs."""


@dataclass
class LayerWeights:
    input_norm: torch.Tensor  # [H]
    qkv_t: torch.Tensor  # [H, q + 2kv]
    qkv_bias: torch.Tensor | None  # [q + 2kv]
    o_t: torch.Tensor  # [q, H]
    post_norm: torch.Tensor  # [H]
    gate_up_t: torch.Tensor  # [H, 2I]
    down_t: torch.Tensor  # [I, H]


@dataclass
class ModelWeights:
    embed: torch.Tensor  # [V, H]
    layers: list[LayerWeights]
    norm: torch.Tensor  # [H]
    lm_head: torch.Tensor  # [V, H]: F.linear's layout, the faster one for this wide matrix

    @property
    def num_bytes(self) -> int:
        tensors = [self.embed, self.norm, self.lm_head]
        for lw in self.layers:
            tensors += [t for t in vars(lw).values() if t is not None]
        seen, total = set(), 0
        for t in tensors:
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
        return total


def safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        files = [model_dir / n for n in names]
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors weights in {model_dir}")
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"weight file named in the index is missing: {f}")
    return files


class _TensorSource:
    """Name -> tensor over one or more safetensors files, converting dtype and device on read."""

    def __init__(self, files: list[Path], dtype: torch.dtype, device: torch.device):
        self.dtype, self.device = dtype, device
        self._where: dict[str, Path] = {}
        for path in files:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    self._where[name] = path

    def has(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise CheckpointError(f"checkpoint lacks tensor {name!r}")
        with safe_open(str(self._where[name]), framework="pt") as f:
            return f.get_tensor(name).to(dtype=self.dtype, device=self.device)


def load_weights(model_dir: str | Path, cfg: ModelConfig, dtype: torch.dtype,
                 device: torch.device) -> ModelWeights:
    src = _TensorSource(safetensors_files(Path(model_dir)), dtype, device)

    def t(name: str) -> torch.Tensor:  # transposed, contiguous
        return src.get(name).t().contiguous()

    layers = []
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        qkv_t = torch.cat([t(a + "q_proj.weight"), t(a + "k_proj.weight"),
                           t(a + "v_proj.weight")], dim=1)
        bias = None
        if cfg.qkv_bias:
            bias = torch.cat([src.get(a + f"{n}_proj.bias") for n in "qkv"])
        layers.append(LayerWeights(
            input_norm=src.get(p + "input_layernorm.weight"),
            qkv_t=qkv_t,
            qkv_bias=bias,
            o_t=t(a + "o_proj.weight"),
            post_norm=src.get(p + "post_attention_layernorm.weight"),
            gate_up_t=torch.cat([t(p + "mlp.gate_proj.weight"), t(p + "mlp.up_proj.weight")], 1),
            down_t=t(p + "mlp.down_proj.weight"),
        ))
    embed = src.get("model.embed_tokens.weight")
    if cfg.tie_word_embeddings or not src.has("lm_head.weight"):
        if not cfg.tie_word_embeddings:
            raise CheckpointError("checkpoint lacks tensor 'lm_head.weight'")
        lm_head = embed
    else:
        lm_head = src.get("lm_head.weight")
    return ModelWeights(embed=embed, layers=layers, norm=src.get("model.norm.weight"),
                        lm_head=lm_head)
