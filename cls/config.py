"""clsd's configuration: one frozen dataclass tree, loaded from YAML (example: configs/clsd.yaml).

Unknown keys and values of the wrong type are errors that name the key (`router.prompt_queue_limit_tokens`).
Secrets come from files named here (`admin_token_file`, `http.api_key_file`), never from the command line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from daemon.settings import ConfigError, from_dict, load_yaml


@dataclass(frozen=True)
class RouterSection:
    prompt_queue_limit_tokens: int = 8192
    """A prompt machine with queued work and more pending prompt tokens than this is long-queued."""
    colocated: bool = False
    """Route every request to one machine for both phases (JSQ by pending prompt + decode tokens,
    no KV transfer, no borrowing): the colocated baseline the phase split is measured against."""


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
class HttpSection:
    """The OpenAI-compatible HTTP front door (cls/http/server.py)."""

    port: int | None = None
    """0 picks a free port; null disables the HTTP front door."""
    host: str | None = None
    """Bind address; null = clsd's `host`."""
    model_name: str | None = None
    """The model name clients send (`model`); null = the basename of `model`'s folder."""
    api_key_file: str | None = None
    """File holding the bearer API key every /v1 call must send; null = no key needed."""
    max_body_bytes: int = 4 * 2**20
    """A request body past this is refused (413) without being read in full."""
    max_stop_strings: int = 16


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
    http: HttpSection = field(default_factory=HttpSection)

    def __post_init__(self) -> None:
        for key, value in (("lease_ttl_s", self.lease_ttl_s),
                           ("heartbeat_interval_s", self.heartbeat_interval_s),
                           ("drain_timeout_s", self.drain_timeout_s),
                           ("router.prompt_queue_limit_tokens", self.router.prompt_queue_limit_tokens),
                           ("limits.max_inflight_requests", self.limits.max_inflight_requests),
                           ("limits.default_max_tokens", self.limits.default_max_tokens),
                           ("limits.request_timeout_s", self.limits.request_timeout_s),
                           ("limits.rpc_timeout_s", self.limits.rpc_timeout_s),
                           ("http.max_body_bytes", self.http.max_body_bytes),
                           ("http.max_stop_strings", self.http.max_stop_strings)):
            if value <= 0:
                raise ConfigError(f"{key} must be positive, got {value}")
        if self.heartbeat_interval_s >= self.lease_ttl_s:
            raise ConfigError(f"heartbeat_interval_s ({self.heartbeat_interval_s}) must be shorter "
                              f"than lease_ttl_s ({self.lease_ttl_s})")
        if self.http.port is not None and not 0 <= self.http.port <= 65535:
            raise ConfigError(f"http.port must be in 0..65535 or null, got {self.http.port}")
        if self.http.model_name is not None and not self.http.model_name.strip():
            raise ConfigError("http.model_name must not be empty")

    @property
    def served_model_name(self) -> str:
        return self.http.model_name or Path(self.model).resolve().name

    def admin_token(self) -> str | None:
        return _read_secret("admin_token_file", self.admin_token_file)

    def http_api_key(self) -> str | None:
        return _read_secret("http.api_key_file", self.http.api_key_file)

    @classmethod
    def load(cls, path: str | Path, overrides: dict | None = None) -> ClsConfig:
        return from_dict(cls, load_yaml(path, overrides))


def _read_secret(key: str, file: str | None) -> str | None:
    if file is None:
        return None
    path = Path(file)
    try:
        secret = path.read_text().strip()
    except OSError as e:
        raise ConfigError(f"{key}: cannot read {path}: {e.strerror}") from None
    if not secret:
        raise ConfigError(f"{key}: {path} is empty")
    return secret
