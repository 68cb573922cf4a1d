"""One object per request: its tokens, sampling parameters, status and (engine-private) blocks."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum


class InvalidRequestError(ValueError):
    """A request the engine refuses; the message names the offending field."""


class SeqStatus(IntEnum):
    WAITING = 0
    RUNNING = 1
    # Finished states are grouped at the top: status >= FINISHED_STOPPED means terminal.
    FINISHED_STOPPED = 10
    FINISHED_LENGTH = 11
    FINISHED_ABORTED = 12
    FINISHED_ERROR = 13

    @property
    def finished(self) -> bool:
        return self >= SeqStatus.FINISHED_STOPPED


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0
    """0 means greedy."""
    top_k: int = 0
    """0 or -1 disables top-k."""
    top_p: float = 1.0
    seed: int | None = None
    """Per-request seed: the draw for output index i depends only on (seed, i), so any machine
    that produces token i of this request draws the same sample."""
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def validate(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            raise InvalidRequestError(f"max_tokens must be a positive integer, got {self.max_tokens}")
        if not self.temperature >= 0:  # also rejects NaN
            raise InvalidRequestError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < -1:
            raise InvalidRequestError(f"top_k must be -1, 0 or positive, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Sequence:
    """A request inside one engine. `block_table` never leaves the engine that owns it."""

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams):
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.params = params
        self.status = SeqStatus.WAITING
        self.error: str | None = None
        self.block_table: list[int] = []
        self.num_computed_tokens = 0
        """Tokens whose K and V are in this engine's cache."""

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def finished(self) -> bool:
        return self.status.finished

    @property
    def last_token_id(self) -> int:
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id!r}, prompt_len={self.prompt_len}, "
                f"out={len(self.output_token_ids)}, {self.status.name})")
