"""mlsd's configuration: one frozen dataclass tree, loaded from YAML.

Unknown keys and values of the wrong type are errors that name the key (`engine.block_size`).
Derived values are properties. Example: configs/mlsd-prompt.yaml. The loading itself (YAML,
`--set` overrides, `ConfigError`) is daemon/settings.py, shared with clsd; `ConfigError`,
`from_dict` and `load_yaml` stay importable from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from daemon.settings import ConfigError, from_dict, load_yaml
from mls.policy.mixed import DEFAULT_MAX_NUM_BATCHED_TOKENS, MIXED_POLICIES
from proto.roles import Role

ROLES = tuple(Role)  # their values: "prompt", "token", "mixed"
TRANSPORTS = ("tcp", "ucx", "local", "shm")
BACKENDS = ("torch", "modelled")


@dataclass(frozen=True)
class ModelledSection:
    """engine.backend modelled: whose step times the machine replays (engine/modelled_engine.py)."""
    profile: str | None = "../shared/profiles/splitwise_perf_model.csv"
    """Splitwise-format profile CSV; null: the roofline model."""
    model: str = "llama2-70b"
    hardware: str = "h100-80gb"
    tensor_parallel: int = 8
    decode_axis: str = "context"
    time_scale: float = 1.0
    """Multiplies every modelled step time (0.1: ten times faster than the modelled machine)."""


@dataclass(frozen=True)
class EngineSection:
    model: str = "models/SmolLM2-135M-Instruct"
    """The checkpoint folder; with backend modelled only its shape and vocabulary are used."""
    backend: str = "torch"
    """torch (the real model) or modelled (sleeps for the modelled step time; see `modelled`)."""
    modelled: ModelledSection = field(default_factory=ModelledSection)
    dtype: str = "auto"
    device: str = "cpu"
    block_size: int = 16
    kv_cache_bytes: int | None = None
    kv_cache_memory_fraction: float = 0.5
    max_num_seqs: int = 256
    max_model_len: int | None = None
    num_threads: int | None = None
    seed: int = 0


@dataclass(frozen=True)
class SchedulerSection:
    prompt_token_cap: int = 2048
    max_queue_len: int = 1024
    mixed_policy: str = "prompt_first"
    """How colocated (Generate) work is batched: `prompt_first` prefills whole prompts and decodes
    in the steps between; `chunked` mixes decode tokens and prompt chunks in every step under
    `max_num_batched_tokens` (chunked prefill)."""
    max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS
    """chunked: tokens per step, decodes and prompt chunks together (at least engine.max_num_seqs,
    so the token work's decodes alone always fit)."""


@dataclass(frozen=True)
class KVTransferSection:
    transport: str = "tcp"
    host: str = "127.0.0.1"
    port: int = 0
    layerwise_min_prompt_tokens: int = 256
    timeout_s: float = 30.0
    """Transfer window: from the sender's first contact to the last layer (per request too)."""
    start_timeout_s: float = 120.0
    """Start window on the token machine: from the KV reservation to the sender's first contact
    (covers the prefill's queueing on the prompt machine)."""
    early_connect_wait_s: float = 10.0
    """How long the receiver holds a sender that arrives before the request's reservation (clsd
    sends the prefill together with the decode work) before refusing it as unknown; tcp/ucx/shm."""


@dataclass(frozen=True)
class MlsConfig:
    machine_id: str
    role: str
    host: str = "127.0.0.1"
    grpc_port: int = 0
    metrics_port: int | None = 0
    """0 picks a free port; null disables the metrics endpoint."""
    drain_timeout_s: float = 30.0
    watchdog_interval_s: float = 10.0
    cls_address: str | None = None
    """host:port of clsd's gRPC server, to register with and heartbeat to; null = standalone."""
    advertise_address: str | None = None
    """host:port that clsd dials for this machine; null = host and the bound grpc_port."""
    orphan_grace_s: float = 10.0
    """How long the machine keeps its requests while clsd is unreachable; then it aborts them
    (nobody is left to read their tokens). A lease clsd no longer knows aborts them at once."""
    engine: EngineSection = field(default_factory=EngineSection)
    scheduler: SchedulerSection = field(default_factory=SchedulerSection)
    kv_transfer: KVTransferSection = field(default_factory=KVTransferSection)

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ConfigError(f"role must be one of {tuple(map(str, ROLES))}, got {self.role!r}")
        if self.engine.backend not in BACKENDS:
            raise ConfigError(f"engine.backend must be one of {BACKENDS}, got {self.engine.backend!r}")
        if self.engine.backend == "modelled":
            _check_modelled(self.engine.modelled)
        if self.kv_transfer.transport not in TRANSPORTS:
            raise ConfigError(f"kv_transfer.transport must be one of {TRANSPORTS}, "
                              f"got {self.kv_transfer.transport!r}")
        if self.scheduler.mixed_policy not in MIXED_POLICIES:
            raise ConfigError(f"scheduler.mixed_policy must be one of {MIXED_POLICIES}, "
                              f"got {self.scheduler.mixed_policy!r}")
        if (self.scheduler.mixed_policy == "chunked"
                and self.scheduler.max_num_batched_tokens < self.engine.max_num_seqs):
            raise ConfigError(f"scheduler.max_num_batched_tokens ({self.scheduler.max_num_batched_tokens})"
                              f" must be at least engine.max_num_seqs ({self.engine.max_num_seqs}) "
                              "with mixed_policy chunked: every decode of a full batch must fit a step")
        for key, value in (("scheduler.prompt_token_cap", self.scheduler.prompt_token_cap),
                           ("scheduler.max_num_batched_tokens", self.scheduler.max_num_batched_tokens),
                           ("scheduler.max_queue_len", self.scheduler.max_queue_len),
                           ("kv_transfer.timeout_s", self.kv_transfer.timeout_s),
                           ("kv_transfer.start_timeout_s", self.kv_transfer.start_timeout_s),
                           ("drain_timeout_s", self.drain_timeout_s),
                           ("orphan_grace_s", self.orphan_grace_s)):
            if value <= 0:
                raise ConfigError(f"{key} must be positive, got {value}")
        if self.kv_transfer.early_connect_wait_s < 0:
            raise ConfigError("kv_transfer.early_connect_wait_s must be >= 0, got "
                              f"{self.kv_transfer.early_connect_wait_s}")
        for key, value in (("cls_address", self.cls_address),
                           ("advertise_address", self.advertise_address)):
            host, sep, port = (value or "").rpartition(":")
            if value is not None and not (sep and host and port.isdigit()):
                raise ConfigError(f"{key} must be host:port, got {value!r}")

    @classmethod
    def load(cls, path: str | Path, overrides: dict | None = None) -> MlsConfig:
        return from_dict(cls, load_yaml(path, overrides))


def _check_modelled(m: ModelledSection) -> None:
    from engine.modelled import DECODE_AXES, HARDWARE

    if m.hardware not in HARDWARE:
        raise ConfigError(f"engine.modelled.hardware must be one of {sorted(HARDWARE)}, got {m.hardware!r}")
    if m.decode_axis not in DECODE_AXES:
        raise ConfigError(f"engine.modelled.decode_axis must be one of {DECODE_AXES}, got {m.decode_axis!r}")
    if not m.time_scale > 0 or m.tensor_parallel < 1:
        raise ConfigError(f"engine.modelled.time_scale must be > 0 and tensor_parallel >= 1, got "
                          f"{m.time_scale} and {m.tensor_parallel}")
    if m.profile is not None and not Path(m.profile).is_file():
        raise ConfigError(f"engine.modelled.profile: {m.profile} not found (null: the roofline)")
