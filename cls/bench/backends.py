"""The benchmark's backends by name: gRPC (the SDK) and OpenAI HTTP (completions, chat).
Their shared types are in cls/bench/outputs.py."""

from __future__ import annotations

from cls.bench.grpc_backend import GrpcBackend
from cls.bench.openai_backend import OpenAIBackend
from cls.bench.outputs import Backend

BACKENDS = ("grpc", "openai", "openai-chat")


def make_backend(name: str, base_url: str, *, model: str | None, ignore_eos: bool,
                 temperature: float, timeout_s: float | None, endpoint: str | None = None) -> Backend:
    """The backend called `name` (one of BACKENDS), talking to `base_url`."""
    if name == "grpc":
        return GrpcBackend(base_url, ignore_eos=ignore_eos, temperature=temperature,
                           timeout_s=timeout_s)
    if name in ("openai", "openai-chat"):
        return OpenAIBackend(base_url, chat=name == "openai-chat", model=model,
                             ignore_eos=ignore_eos, temperature=temperature, timeout_s=timeout_s,
                             endpoint=endpoint)
    raise ValueError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
