"""EngineConfig: everything one engine instance needs, frozen. No YAML here: daemons build it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class EngineConfig:
    model: str
    """Hugging Face-format checkpoint folder (config.json, *.safetensors, tokenizer.json)."""
    dtype: str = "auto"
    """float32, bfloat16, float16, or auto: bfloat16 where the device computes it fast, else float32."""
    device: str = "cpu"
    block_size: int = 16
    kv_cache_bytes: int | None = None
    """KV memory budget in bytes; None sizes it from free device memory."""
    kv_cache_memory_fraction: float = 0.5
    """Share of free device memory (after weights) given to the KV cache when kv_cache_bytes is None."""
    kv_cache_headroom_bytes: int = 512 * 2**20
    """Memory kept back for activations when sizing from free memory."""
    max_num_seqs: int = 256
    prompt_token_cap: int = 2048
    """Prompt tokens in one prefill batch of the offline `LLM` helper (a longer prompt runs
    alone); mlsd's machines take it from `scheduler.prompt_token_cap`."""
    max_model_len: int | None = None
    num_threads: int | None = None
    skip_tokenizer_init: bool = False
    seed: int = 0
    kv_cache_shared_memory: bool = False
    """Allocate the KV cache in a named file under /dev/shm (CPU only), so that a same-host KV
    sender (transport shm) writes straight into reserved blocks; unlinked when the engine exits."""

    def __post_init__(self) -> None:
        if not Path(self.model).is_dir():
            raise FileNotFoundError(f"model folder not found: {self.model}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be auto or one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a positive power of two, got {self.block_size}")
        if not 0 < self.kv_cache_memory_fraction <= 1:
            raise ValueError("kv_cache_memory_fraction must be in (0, 1]")
        if self.kv_cache_bytes is not None and self.kv_cache_bytes <= 0:
            raise ValueError("kv_cache_bytes must be positive")
        if self.kv_cache_shared_memory and self.torch_device.type != "cpu":
            raise ValueError(f"kv_cache_shared_memory needs device cpu, got {self.device!r}")
        for name in ("max_num_seqs", "prompt_token_cap"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype != "auto":
            return DTYPES[self.dtype]
        return torch.bfloat16 if fast_bfloat16(self.torch_device) else torch.float32


def fast_bfloat16(device: torch.device) -> bool:
    """True where bfloat16 matmuls run natively: CUDA with bf16 support, or AVX512-BF16/AMX CPUs."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags
