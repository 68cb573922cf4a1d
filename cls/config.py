"""clsd's configuration: one frozen dataclass tree, loaded from YAML (example: configs/clsd.yaml).

Unknown keys and values of the wrong type are errors that name the key (`router.prompt_queue_limit_tokens`).
Secrets come from files named here (`admin_token_file`, `http.api_key_file`), never from the command line.
"""

from __future__ import annotations

import os
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
    """The ceiling on requests in flight in clsd. The bound in force is lower when the registered
    machines hold less: `inflight_factor` x the sum over machines of min(`requests_per_machine`,
    KV blocks). Past it, Generate answers RESOURCE_EXHAUSTED at once (HTTP 429)."""
    requests_per_machine: int = 256
    """Requests one machine is counted as running at once (mlsd's engine.max_num_seqs, which the
    machine's registration does not carry); a machine with fewer KV blocks counts its blocks,
    since every request holds at least one."""
    inflight_factor: float = 2.0
    """Requests clsd admits per request the machines can run at once: 1 admits what runs, 2 lets
    as many again wait in the machines' queues."""
    max_prompt_chars: int | None = None
    """Prompts with more characters are refused before tokenizing (INVALID_ARGUMENT). null: what
    the longest context can hold at the tokenizer's most characters per token."""
    tokenizer_threads: int = 2
    """Threads that tokenize long prompts off the event loop (short ones have a thread of their own)."""
    tokenizer_queue: int = 16
    """Long prompts (over 16,384 characters) waiting for or being tokenized; past this, another
    long prompt gets RESOURCE_EXHAUSTED."""
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
    header_timeout_s: float = 10.0
    """A connection that has not sent a whole request head this long after connecting (or after
    its previous response) is closed."""
    body_timeout_s: float = 30.0
    """A body not read in full this long after its headers gets 408 and the connection closes."""
    keep_alive_s: float = 5.0
    max_connections: int = 4096
    """Open connections past this get 503 at once (and never exhaust clsd's file descriptors)."""
    max_header_bytes: int = 65536


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
    state_dir: str | None = None
    """Where clsd keeps what must survive a restart (the operator's pool sizes, pools.json);
    null: $STATE_DIRECTORY (systemd's StateDirectory=) when set, else nothing is kept."""
    router: RouterSection = field(default_factory=RouterSection)
    limits: LimitsSection = field(default_factory=LimitsSection)
    http: HttpSection = field(default_factory=HttpSection)

    def __post_init__(self) -> None:
        for key, value in (("lease_ttl_s", self.lease_ttl_s),
                           ("heartbeat_interval_s", self.heartbeat_interval_s),
                           ("drain_timeout_s", self.drain_timeout_s),
                           ("router.prompt_queue_limit_tokens", self.router.prompt_queue_limit_tokens),
                           ("limits.max_inflight_requests", self.limits.max_inflight_requests),
                           ("limits.requests_per_machine", self.limits.requests_per_machine),
                           ("limits.inflight_factor", self.limits.inflight_factor),
                           ("limits.max_prompt_chars",
                            1 if self.limits.max_prompt_chars is None else self.limits.max_prompt_chars),
                           ("limits.tokenizer_threads", self.limits.tokenizer_threads),
                           ("limits.tokenizer_queue", self.limits.tokenizer_queue),
                           ("limits.default_max_tokens", self.limits.default_max_tokens),
                           ("limits.request_timeout_s", self.limits.request_timeout_s),
                           ("limits.rpc_timeout_s", self.limits.rpc_timeout_s),
                           ("http.max_body_bytes", self.http.max_body_bytes),
                           ("http.max_stop_strings", self.http.max_stop_strings),
                           ("http.header_timeout_s", self.http.header_timeout_s),
                           ("http.body_timeout_s", self.http.body_timeout_s),
                           ("http.keep_alive_s", self.http.keep_alive_s),
                           ("http.max_connections", self.http.max_connections),
                           ("http.max_header_bytes", self.http.max_header_bytes)):
            if not value > 0:  # NaN too
                raise ConfigError(f"{key} must be positive, got {value}")
        if self.heartbeat_interval_s >= self.lease_ttl_s:
            raise ConfigError(f"heartbeat_interval_s ({self.heartbeat_interval_s}) must be shorter "
                              f"than lease_ttl_s ({self.lease_ttl_s})")
        if self.http.port is not None and not 0 <= self.http.port <= 65535:
            raise ConfigError(f"http.port must be in 0..65535 or null, got {self.http.port}")
        if self.http.model_name is not None and not self.http.model_name.strip():
            raise ConfigError("http.model_name must not be empty")

    @property
    def state_path(self) -> Path | None:
        """The state directory in force (see `state_dir`), or None when nothing is kept."""
        directory = self.state_dir or os.environ.get("STATE_DIRECTORY", "").split(":")[0]
        return Path(directory) if directory else None

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
