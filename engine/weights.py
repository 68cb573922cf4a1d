"""Loads a Hugging Face Llama-family checkpoint into the engine's layout.

The engine's layout: q, k and v projections are fused into one [q + 2 * kv, hidden] matrix, gate
and up into one [2 * intermediate, hidden] matrix, so each layer runs four matmuls, each through
`engine.linear.Linear` (pre-packed for oneDNN on CPU).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from engine.linear import Linear
from engine.model_config import ModelConfig


class CheckpointError(ValueError):
    """The checkpoint folder is missing a file or a tensor the model needs."""


@dataclass
class LayerWeights:
    input_norm: torch.Tensor  # [H]
    qkv: Linear  # H -> q + 2kv
    o: Linear  # q -> H
    post_norm: torch.Tensor  # [H]
    gate_up: Linear  # H -> 2I
    down: Linear  # I -> H


@dataclass
class ModelWeights:
    embed: torch.Tensor  # [V, H]
    layers: list[LayerWeights]
    norm: torch.Tensor  # [H]
    lm_head_weight: torch.Tensor  # [V, H] (the embedding itself when tied)
    lm_head: Linear  # H -> V

    @property
    def num_bytes(self) -> int:
        """Bytes of distinct weights (a tied LM head counts once): what one decode step reads."""
        total = sum(t.numel() * t.element_size() for t in (self.embed, self.norm))
        if self.lm_head_weight.data_ptr() != self.embed.data_ptr():
            total += self.lm_head.num_bytes
        for lw in self.layers:
            total += sum(x.num_bytes if isinstance(x, Linear) else x.numel() * x.element_size()
                         for x in vars(lw).values())
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

    def cat(*names: str) -> torch.Tensor:
        return torch.cat([src.get(n) for n in names])

    layers = []
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        bias = cat(*(a + f"{n}_proj.bias" for n in "qkv")) if cfg.qkv_bias else None
        layers.append(LayerWeights(
            input_norm=src.get(p + "input_layernorm.weight"),
            qkv=Linear(cat(*(a + f"{n}_proj.weight" for n in "qkv")), bias),
            o=Linear(src.get(a + "o_proj.weight")),
            post_norm=src.get(p + "post_attention_layernorm.weight"),
            gate_up=Linear(cat(p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight")),
            down=Linear(src.get(p + "mlp.down_proj.weight")),
        ))
    embed = src.get("model.embed_tokens.weight")
    if cfg.tie_word_embeddings:
        lm_head = embed
    else:
        lm_head = src.get("lm_head.weight")
    return ModelWeights(embed=embed, layers=layers, norm=src.get("model.norm.weight"),
                        lm_head_weight=lm_head, lm_head=Linear(lm_head))
