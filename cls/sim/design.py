"""A simulated cluster design from YAML (configs/sim/*.yaml): pools, model, hardware, latency model.

1. `SimDesignConfig.load(path)` reads the file (unknown keys and wrong types are errors naming the
   key, as for the daemons' configs).
2. `build()` turns it into what the simulator takes: a `ClusterDesign` (KV blocks per machine
   from the model shape and the hardware's memory) and a latency model (Splitwise's profile CSV,
   read at run time, or the roofline when `profile` is null).
3. `reference_latency()` is the machine SLOs are measured against (Splitwise: one uncontended
   request on a DGX-A100), from the same profile (or roofline).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

from cls.sim.simulator import ClusterDesign
from daemon.settings import ConfigError, from_dict, load_yaml
from engine.modelled import (
    DECODE_AXES,
    HARDWARE,
    LINKS,
    LatencyModel,
    get_shape,
    kv_capacity_tokens,
    latency_model,
)
from mls.policy.mixed import MIXED_POLICIES

DEFAULT_PROFILE = "../shared/profiles/splitwise_perf_model.csv"
RENAMED_KEYS = {"max_batch_size": "max_num_seqs"}
"""Old design keys and their names now (mlsd's engine.max_num_seqs is the same limit)."""
log = logging.getLogger("clsctl.simulate")


@dataclass(frozen=True)
class SimDesignConfig:
    name: str
    num_prompt: int
    num_token: int
    model: str = "llama2-70b"
    hardware: str = "h100-80gb"
    tensor_parallel: int = 8
    profile: str | None = DEFAULT_PROFILE
    """Splitwise-format profile CSV (relative to the working directory); null: roofline."""
    link: str = "infiniband-400g"
    layerwise_transfer: bool = True
    block_size: int = 16
    prompt_token_cap: int = 2048
    prompt_queue_limit_tokens: int = 8192
    kv_memory_fraction: float = 0.9
    colocated: bool = False
    """Every machine runs both phases (the baseline); num_prompt + num_token machines in all."""
    max_num_seqs: int = 256
    mixed_policy: str = "prompt_first"
    """Colocated work: prompt_first, or chunked (chunked prefill, max_num_batched_tokens a step)."""
    max_num_batched_tokens: int = 512
    decode_axis: str = "context"
    """How the profile times a decode step: by its context tokens, or ("requests") by its number
    of requests as Splitwise's simulator does (engine/modelled.py)."""
    reference_hardware: str = "a100-80gb"
    reference_tensor_parallel: int = 8

    def __post_init__(self) -> None:
        if self.hardware not in HARDWARE:
            raise ConfigError(f"hardware must be one of {sorted(HARDWARE)}, got {self.hardware!r}")
        if self.reference_hardware not in HARDWARE:
            raise ConfigError(f"reference_hardware must be one of {sorted(HARDWARE)}, got "
                              f"{self.reference_hardware!r}")
        for key in ("max_num_seqs", "reference_tensor_parallel", "block_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.mixed_policy not in MIXED_POLICIES:
            raise ConfigError(f"mixed_policy must be one of {', '.join(MIXED_POLICIES)}, got "
                              f"{self.mixed_policy!r}")
        if self.max_num_batched_tokens < 1:
            raise ConfigError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.decode_axis not in DECODE_AXES:
            raise ConfigError(f"decode_axis must be one of {', '.join(DECODE_AXES)}, got "
                              f"{self.decode_axis!r}")
        if self.link not in LINKS:
            raise ConfigError(f"link must be one of {sorted(LINKS)}, got {self.link!r}")
        for key in ("num_prompt", "num_token"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key} must be >= 0, got {getattr(self, key)}")
        if self.num_prompt + self.num_token < 1:
            raise ConfigError("a design needs at least one machine")

    @classmethod
    def load(cls, path: str | Path, overrides: dict | None = None) -> SimDesignConfig:
        raw = load_yaml(path, overrides)
        for old, new in RENAMED_KEYS.items():  # kept for one release, with a warning
            if old in raw:
                warnings.warn(f"{path}: {old} is deprecated; use {new}", DeprecationWarning,
                              stacklevel=2)
                log.warning("%s: %s is deprecated; use %s", path, old, new)
                if new in raw:
                    raise ConfigError(f"{old} and {new} both given; keep {new}")
                raw[new] = raw.pop(old)
        return from_dict(cls, raw)

    def build(self) -> tuple[ClusterDesign, LatencyModel]:
        try:
            shape = get_shape(self.model)
        except (KeyError, ValueError, OSError) as e:
            raise ConfigError(f"model: {e}") from None
        kv_tokens = kv_capacity_tokens(shape, self.hardware, self.tensor_parallel,
                                       memory_fraction=self.kv_memory_fraction)
        design = ClusterDesign(
            num_prompt=self.num_prompt, num_token=self.num_token,
            kv_blocks_per_machine=max(1, kv_tokens // self.block_size), block_size=self.block_size,
            prompt_token_cap=self.prompt_token_cap,
            prompt_queue_limit_tokens=self.prompt_queue_limit_tokens, model_shape=shape,
            link_bytes_s=LINKS[self.link], layerwise_transfer=self.layerwise_transfer,
            tensor_parallel=self.tensor_parallel, colocated=self.colocated,
            max_num_seqs=self.max_num_seqs, mixed_policy=self.mixed_policy,
            max_num_batched_tokens=self.max_num_batched_tokens)
        return design, self._latency(self.hardware, self.tensor_parallel)

    def reference_latency(self) -> LatencyModel:
        return self._latency(self.reference_hardware, self.reference_tensor_parallel)

    def _latency(self, hardware: str, tensor_parallel: int) -> LatencyModel:
        if self.profile is not None and not Path(self.profile).is_file():
            raise ConfigError(f"profile: {self.profile} not found (run from the repository root, with "
                              "../shared beside it, or set profile: null for the roofline)")
        return latency_model(self.profile, self.model, hardware, tensor_parallel, self.decode_axis)
