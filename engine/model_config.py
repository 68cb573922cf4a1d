"""The shape of a Llama-family model, read from a Hugging Face `config.json`.

Supported architectures: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM. They share one
decoder layout (pre-norm RMSNorm, rotary attention with grouped KV heads, SwiGLU MLP); they differ
in q/k/v bias (Qwen2), head size, tied embeddings and rope scaling. Both the transformers 4.x
(`rope_theta` + `rope_scaling`) and 5.x (`rope_parameters`) spellings are accepted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


class ModelConfigError(ValueError):
    """The checkpoint's config.json describes a model this engine cannot run."""


class AttentionSizes:
    """Sizes derived from the attention heads, for any dataclass with num_layers, num_heads,
    num_kv_heads and head_dim (ModelConfig here, engine.machine_shapes.ModelShape)."""
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """Bytes of K and V one token occupies across all layers (the whole model)."""
        return 2 * self.num_layers * self.kv_size * dtype_bytes


@dataclass(frozen=True)
class ModelConfig(AttentionSizes):
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    rope_theta: float
    rope_scaling: dict = field(default_factory=dict)  # includes "rope_type"; empty means default
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str = "float32"

    @property
    def rope_type(self) -> str:
        return self.rope_scaling.get("rope_type", "default")

    @classmethod
    def from_dict(cls, raw: dict) -> ModelConfig:
        archs = raw.get("architectures") or []
        arch = archs[0] if archs else _arch_from_model_type(raw.get("model_type"))
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ModelConfigError(
                f"unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if raw.get("hidden_act", "silu") != "silu":
            raise ModelConfigError(f"unsupported hidden_act {raw['hidden_act']!r}; only silu")
        num_heads = _require(raw, "num_attention_heads")
        hidden = _require(raw, "hidden_size")
        head_dim = raw.get("head_dim") or hidden // num_heads
        rope = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
        if "type" in rope and "rope_type" not in rope:
            rope["rope_type"] = rope.pop("type")
        rope_theta = float(rope.pop("rope_theta", raw.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ModelConfigError(
                f"unsupported rope scaling type {rope_type!r}; supported: {SUPPORTED_ROPE_TYPES}"
            )
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise ModelConfigError("partial_rotary_factor != 1 is not supported")
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        window = raw.get("sliding_window")
        if arch == "Qwen2ForCausalLM" and not raw.get("use_sliding_window", False):
            window = None
        return cls(
            architecture=arch,
            vocab_size=_require(raw, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=_require(raw, "intermediate_size"),
            num_layers=_require(raw, "num_hidden_layers"),
            num_heads=num_heads,
            num_kv_heads=raw.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=arch == "Qwen2ForCausalLM" or bool(raw.get("attention_bias", False)),
            rope_theta=rope_theta,
            rope_scaling=rope if rope_type != "default" else {},
            sliding_window=window,
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=eos_ids,
            torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "float32"),
        )

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelConfig:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"model config not found: {path}")
        with open(path) as f:
            return cls.from_dict(json.load(f))


def _require(raw: dict, key: str):
    if key not in raw:
        raise ModelConfigError(f"config.json lacks required key {key!r}")
    return raw[key]


def _arch_from_model_type(model_type: str | None) -> str:
    return {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
            "qwen2": "Qwen2ForCausalLM"}.get(model_type or "", str(model_type))
