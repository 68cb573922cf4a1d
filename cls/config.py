"""clsd's configuration: one frozen dataclass tree, loaded from YAML (example: configs/clsd.yaml).

Unknown keys and values of the wrong type are errors that name the key (`router.prompt_queue_limit_tokens`).
Secrets come from files named here (`admin_token_file`), never from the command line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mls.config import ConfigError, from_dict, load_yaml


@dataclass(frozen=True)
class RouterSection:
    prompt_queue_limit_tokens: int = 8192
    """A prompt machine with queued work and more pending prompt tokens than this is long-queued."""


@dataclass(frozen=True)
class LimitsSection:
    max_inflight_requests: int = 4096
    """Requests in flight in clsd; past this, Generate answers RESOURCE_EXHAUSTED."""
    default_max_tokens: int = 256
    max_tokens_limit: int = 32768
    request_timeout_s: float = 600.0
    rpc_timeout_s: float = 30.0
    """Deadline of each unary call to a machine (AddDecode, Prefill, Generate, Abort)."""
    max_reroutes: int = 3


@dataclass(frozen=True)
class ClsConfig:
    model: str = "models/SmolLM2-135M-Instruct"
    """Model folder: clsd reads only its tokenizer and chat template."""
    host: str = "127.0.0.1"
    grpc_port: int = 50050
    metrics_port: int | None = 0
    """0 picks a free port; null disables the metrics endpoint."""
    admin_token_file: str | None = None
    """File holding the admin bearer token; null refuses every admin call."""
    lease_ttl_s: float = 5.0
    heartbeat_interval_s: float = 1.0
    drain_timeout_s: float = 30.0
    watchdog_interval_s: float = 10.0
    router: RouterSection = field(default_factory=RouterSection)
    limits: LimitsSection = field(default_factory=LimitsSection)

    def __post_init__(self) -> None:
        for key, value in (("lease_ttl_s", self.lease_ttl_s),
                           ("heartbeat_interval_s", self.heartbeat_interval_s),
                           ("drain_timeout_s", self.drain_timeout_s),
                           ("router.prompt_queue_limit_tokens", self.router.prompt_queue_limit_tokens),
                           ("limits.max_inflight_requests", self.limits.max_inflight_requests),
                           ("limits.default_max_tokens", self.limits.default_max_tokens),
                           ("limits.request_timeout_s", self.limits.request_timeout_s),
                           ("limits.rpc_timeout_s", self.limits.rpc_timeout_s)):
            if value <= 0:
                raise ConfigError(f"{key} must be positive, got {value}")
        if self.heartbeat_interval_s >= self.lease_ttl_s:
            raise ConfigError(f"heartbeat_interval_s ({self.heartbeat_interval_s}) must be shorter "
                              f"than lease_ttl_s ({self.lease_ttl_s})")

    def admin_token(self) -> str | None:
        if self.admin_token_file is None:
            return None
        path = Path(self.admin_token_file)
        try:
            token = path.read_text().strip()
        except OSError as e:
            raise ConfigError(f"admin_token_file: cannot read {path}: {e.strerror}") from None
        if not token:
            raise ConfigError(f"admin_token_file: {path} is empty")
        return token

    @classmethod
    def load(cls, path: str | Path, overrides: dict | None = None) -> ClsConfig:
        return from_dict(cls, load_yaml(path, overrides))
