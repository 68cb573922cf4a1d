"""Model shapes, hardware peaks, links, KV sizing and KV transfer time (pure, no torch).

What the latency models in engine/modelled.py and the simulator need to know about a machine and
a model besides step times: `ModelShape` (from a name or a config.json), `HARDWARE` (published
peaks), `LINKS` (bytes/s), `kv_bytes_per_token`, `kv_capacity_tokens` and `kv_transfer_s` (formulas
in engine/modelled.py's docstring, section KV).
"""

from __future__ import annotations

import json
import numbers
from dataclasses import dataclass
from pathlib import Path

from engine.model_config import AttentionSizes

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "models" / "SmolLM2-135M-Instruct" / "config.json"


def check_count(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


# --- model shapes and hardware -------------------------------------------------------------------

@dataclass(frozen=True)
class ModelShape(AttentionSizes):
    """What the latency and memory of a dense decoder-only transformer depend on. Parameter
    counts cover the weight matrices; norms and biases (< 0.1%) are left out."""
    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool = False
    gated_mlp: bool = True  # gate, up and down projections (SwiGLU); False: up and down (GELU)

    @property
    def layer_params(self) -> int:
        """Parameters of all decoder layers: q, k, v, o projections and the MLP."""
        h = self.hidden_size
        attention = 2 * h * self.q_size + 2 * h * self.kv_size
        mlp = (3 if self.gated_mlp else 2) * h * self.intermediate_size
        return self.num_layers * (attention + mlp)

    @property
    def lm_head_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def num_params(self) -> int:
        embeddings = self.lm_head_params * (1 if self.tie_word_embeddings else 2)
        return self.layer_params + embeddings

    def weight_bytes(self, dtype_bytes: int = 2) -> int:
        return self.num_params * dtype_bytes

    @classmethod
    def from_config_json(cls, path: str | Path, name: str | None = None) -> ModelShape:
        """Reads a Hugging Face config.json (or the folder holding one): Llama-style keys and
        BLOOM/GPT-2-style ones (n_layer, n_head, n_embed). Mixture-of-experts is not modelled."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            raw = json.loads(path.read_text())
        except OSError as e:
            raise ValueError(f"cannot read model config {path}: {e.strerror}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"model config {path} is not JSON: {e}") from None

        def get(*keys, default=None):
            for key in keys:
                if raw.get(key) is not None:
                    return raw[key]
            if default is None:
                raise ValueError(f"model config {path} lacks {' / '.join(keys)}")
            return default

        if (raw.get("num_local_experts") or raw.get("num_experts") or 1) > 1:
            raise ValueError(f"model config {path}: mixture-of-experts models are not modelled")
        model_type = str(raw.get("model_type", ""))
        hidden = int(get("hidden_size", "n_embed", "n_embd", "d_model"))
        heads = int(get("num_attention_heads", "n_head", "num_heads"))
        return cls(
            name=name or path.parent.name,
            num_layers=int(get("num_hidden_layers", "n_layer", "num_layers")),
            hidden_size=hidden,
            num_heads=heads,
            num_kv_heads=int(get("num_key_value_heads", "num_kv_heads", default=heads)),
            head_dim=int(get("head_dim", default=hidden // heads)),
            intermediate_size=int(get("intermediate_size", "n_inner", "ffn_dim", default=4 * hidden)),
            vocab_size=int(get("vocab_size")),
            # transformers' default is tied, except in these families' config classes
            tie_word_embeddings=bool(raw.get("tie_word_embeddings",
                                             model_type not in {"llama", "mistral", "qwen2"})),
            gated_mlp=model_type not in _PLAIN_MLP_MODEL_TYPES,
        )


_PLAIN_MLP_MODEL_TYPES = {"bloom", "gpt2", "gpt_neox", "gptj", "gpt_bigcode", "opt", "falcon",
                          "mpt", "phi"}

# The profile's models, from their Hugging Face config.json (meta-llama/Llama-2-70b-hf,
# bigscience/bloom), and the demo model (used when its folder is absent).
MODEL_SHAPES = {
    "llama2-70b": ModelShape("llama2-70b", num_layers=80, hidden_size=8192, num_heads=64,
                             num_kv_heads=8, head_dim=128, intermediate_size=28672,
                             vocab_size=32000),
    "bloom-176b": ModelShape("bloom-176b", num_layers=70, hidden_size=14336, num_heads=112,
                             num_kv_heads=112, head_dim=128, intermediate_size=4 * 14336,
                             vocab_size=250880, tie_word_embeddings=True, gated_mlp=False),
    "smollm2-135m": ModelShape("smollm2-135m", num_layers=30, hidden_size=576, num_heads=9,
                               num_kv_heads=3, head_dim=64, intermediate_size=1536,
                               vocab_size=49152, tie_word_embeddings=True),
}


def get_shape(name_or_path: str | Path) -> ModelShape:
    """A preset of MODEL_SHAPES by name (the demo model read from its config.json when present),
    or the shape in a config.json / model folder."""
    if name_or_path == "smollm2-135m" and DEMO_CONFIG.is_file():
        return ModelShape.from_config_json(DEMO_CONFIG, name="smollm2-135m")
    if name_or_path in MODEL_SHAPES:
        return MODEL_SHAPES[name_or_path]
    if Path(name_or_path).exists():
        return ModelShape.from_config_json(name_or_path)
    raise ValueError(f"unknown model {name_or_path!r}: not a preset ({', '.join(MODEL_SHAPES)}) "
                     "and not a config.json or model folder")


@dataclass(frozen=True)
class Hardware:
    """One GPU's published peaks."""
    peak_flops_bf16: float  # dense (no sparsity) bf16 tensor-core FLOP/s
    mem_bw_bytes_s: float   # HBM bandwidth
    mem_bytes: float        # HBM capacity


HARDWARE = {
    # NVIDIA A100 datasheet, SXM4 80GB: 312 TFLOP/s bf16 dense, 2,039 GB/s HBM2e, 80 GB.
    "a100-80gb": Hardware(peak_flops_bf16=312e12, mem_bw_bytes_s=2.039e12, mem_bytes=80e9),
    # NVIDIA H100 datasheet, SXM5: 1,979 TFLOP/s bf16 "with sparsity" = 989 dense, 3.35 TB/s
    # HBM3, 80 GB.
    "h100-80gb": Hardware(peak_flops_bf16=989e12, mem_bw_bytes_s=3.35e12, mem_bytes=80e9),
    # Splitwise's power-capped H100: its profile rows take prompt time x 1.3, token time as is;
    # here the compute peak / 1.3.
    "h100-80gb-pcap": Hardware(peak_flops_bf16=989e12 / 1.3, mem_bw_bytes_s=3.35e12, mem_bytes=80e9),
}

# KV links, bytes/s per GPU in one direction.
LINKS = {
    "infiniband-200g": 200e9 / 8,  # DGX-A100: one 200 Gb/s HDR NIC per GPU (Splitwise's A100s)
    "infiniband-400g": 400e9 / 8,  # DGX-H100: one 400 Gb/s NDR NIC per GPU (Splitwise's H100s)
    "nvlink3": 300e9,              # A100 NVLink: 600 GB/s per GPU, both directions together
    "nvlink4": 450e9,              # H100 NVLink: 900 GB/s per GPU, both directions together
    "tcp-loopback": 3.8e9,         # this project's tcp transport, two processes on one host:
                                   # 3.65-3.98 GB/s measured (docs/BENCHMARKS.md)
}


def get_hardware(hardware: Hardware | str) -> Hardware:
    if isinstance(hardware, Hardware):
        return hardware
    if hardware not in HARDWARE:
        raise ValueError(f"unknown hardware {hardware!r}; known: {', '.join(HARDWARE)}")
    return HARDWARE[hardware]


# --- KV size and transfer ------------------------------------------------------------------------

def kv_bytes_per_token(shape: ModelShape, dtype_bytes: int = 2) -> int:
    """Bytes of K and V one token occupies across all layers (the whole model, all GPUs)."""
    return shape.kv_bytes_per_token(dtype_bytes)


def _kv_bytes_per_token_per_gpu(shape: ModelShape, tensor_parallel: int, dtype_bytes: int) -> int:
    heads_per_gpu = -(-shape.num_kv_heads // tensor_parallel)  # replicated when tp > kv heads
    return 2 * shape.num_layers * heads_per_gpu * shape.head_dim * dtype_bytes


def kv_capacity_tokens(shape: ModelShape, hardware: Hardware | str, tensor_parallel: int = 1,
                       weight_dtype_bytes: int = 2, memory_fraction: float = 0.9,
                       kv_dtype_bytes: int = 2) -> int:
    """Tokens of KV that fit beside the weights in memory_fraction of the GPUs' memory
    (activation headroom not subtracted)."""
    check_count("tensor_parallel", tensor_parallel, 1)
    if not 0 < memory_fraction <= 1:
        raise ValueError(f"memory_fraction must be in (0, 1], got {memory_fraction!r}")
    hw = get_hardware(hardware)
    free_per_gpu = (hw.mem_bytes * memory_fraction
                    - shape.weight_bytes(weight_dtype_bytes) / tensor_parallel)
    if free_per_gpu <= 0:
        raise ValueError(f"{shape.name}'s weights ({shape.weight_bytes(weight_dtype_bytes) / 1e9:.1f}"
                         f" GB) do not fit in {tensor_parallel} x {hardware} at memory_fraction "
                         f"{memory_fraction}")
    return int(free_per_gpu // _kv_bytes_per_token_per_gpu(shape, tensor_parallel, kv_dtype_bytes))


def kv_transfer_s(num_tokens: int, shape: ModelShape, link_bytes_s: float, layerwise: bool,
                  prefill_s: float, tensor_parallel: int = 1, dtype_bytes: int = 2) -> float:
    """Seconds the KV of `num_tokens` prompt tokens keeps arriving after the prefill ends (the
    transfer time not hidden behind the prefill), over a link of `link_bytes_s` per GPU."""
    check_count("num_tokens", num_tokens, 0)
    check_count("tensor_parallel", tensor_parallel, 1)
    if not link_bytes_s > 0 or not prefill_s >= 0:
        raise ValueError(f"link_bytes_s must be > 0 and prefill_s >= 0, got {link_bytes_s!r}, "
                         f"{prefill_s!r}")
    all_s = num_tokens * _kv_bytes_per_token_per_gpu(shape, tensor_parallel, dtype_bytes) / link_bytes_s
    if not layerwise:
        return all_s
    n = shape.num_layers
    return max(all_s / n, all_s - prefill_s * (n - 1) / n)
