"""What one benchmark request produced, and the interface every backend implements.

Timing follows `vllm bench serve`: `ttft_s` is send -> first chunk carrying output, `itl_s` the
gaps between later output-carrying chunks (one entry per chunk: tokens that arrive together
count as one gap), `latency_s` send -> last output-carrying chunk. So TPOT =
(latency - ttft) / (output_len - 1) is (last token time - first token time) / (tokens - 1),
DESIGN.md's definition. A failed request has `success=False` and `error` set; its timings are
not used.

A backend is an async context manager with `name` and `async send(request) -> RequestOutput`;
`send` never raises for a failed request (errors are results), only for a bug.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from cls.bench.datasets import BenchRequest


@dataclass
class RequestOutput:
    prompt_len: int
    success: bool = False
    output_len: int = 0            # output tokens received (usage, or token ids on gRPC)
    generated_text: str = ""
    ttft_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    latency_s: float = 0.0
    start_s: float = 0.0           # perf_counter() when sent; the runner makes it run-relative
    error: str = ""

    def token_times_s(self) -> list[float]:
        """Arrival time of each output chunk, on the same clock as `start_s`."""
        if not self.success:
            return []
        t = self.start_s + self.ttft_s
        times = [t]
        for gap in self.itl_s:
            t += gap
            times.append(t)
        return times


class Backend(Protocol):
    name: str

    async def __aenter__(self) -> Backend: ...

    async def __aexit__(self, *exc) -> None: ...

    async def send(self, request: BenchRequest) -> RequestOutput: ...
