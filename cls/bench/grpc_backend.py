"""The `grpc` backend: clsd's Generate stream through the SDK's asyncio client.

Every stream message that carries token ids is one chunk (clsd sends tokens that were already
waiting as one message); the last message carries only the finish reason and is not a chunk.
"""

from __future__ import annotations

import time

from cls.bench.datasets import BenchRequest
from cls.bench.outputs import RequestOutput
from cls.client import AsyncClsClient, ClsError


class GrpcBackend:
    name = "grpc"

    def __init__(self, address: str, *, ignore_eos: bool, temperature: float,
                 timeout_s: float | None):
        self.address = address
        self._sampling = dict(ignore_eos=ignore_eos, temperature=temperature)
        self._timeout_s = timeout_s
        self._client: AsyncClsClient | None = None

    async def __aenter__(self) -> GrpcBackend:
        self._client = AsyncClsClient(self.address)
        return self

    async def __aexit__(self, *exc) -> None:
        if self._client is not None:
            await self._client.close()

    async def send(self, request: BenchRequest) -> RequestOutput:
        out = RequestOutput(prompt_len=request.prompt_len)
        text: list[str] = []
        last = start = out.start_s = time.perf_counter()
        finish = ""
        try:
            stream = self._client.generate_stream(request.prompt, max_tokens=request.output_len,
                                                  timeout_s=self._timeout_s, **self._sampling)
            async with stream:
                async for delta in stream:
                    now = time.perf_counter()
                    text.append(delta.text)
                    finish = delta.finish_reason or finish
                    if not delta.token_ids:
                        continue
                    if out.output_len == 0:
                        out.ttft_s = now - start
                    else:
                        out.itl_s.append(now - last)
                    last = now
                    out.output_len += len(delta.token_ids)
        except (ClsError, Exception) as e:  # a gRPC status, a broken channel: counted, not fatal
            out.error = f"{type(e).__name__}: {e}"
            return out
        out.generated_text = "".join(text)
        if not finish:
            out.error = "the stream ended without a finish reason"
            return out
        if out.output_len == 0:
            out.error = "the stream carried no tokens"
            return out
        out.latency_s = last - start
        out.success = True
        return out
