"""The benchmark loop: send each request at its arrival time, at most `max_concurrency` at once.

1. Request i becomes due `offsets_s[i]` after the start; a task is created for it then, whatever
   the concurrency bound (as in vLLM, the bound delays the send, not the arrival pattern).
2. The task waits for a concurrency slot, sends, and records the result; a failed request is a
   result with its error, never an exception that stops the run.
3. The duration is start -> the last result; `start_s` of every result is made relative to the
   start, so the results' clocks line up for the plots.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from cls.bench.datasets import BenchRequest
from cls.bench.outputs import Backend, RequestOutput
from cls.cli.progress import Progress


@dataclass
class RunResult:
    outputs: list[RequestOutput]   # in request order
    duration_s: float
    max_concurrent: int            # the most requests in flight at once


async def run_requests(backend: Backend, requests: list[BenchRequest], offsets_s: list[float], *,
                       max_concurrency: int | None = None, progress: Progress | None = None) -> RunResult:
    if len(offsets_s) != len(requests):
        raise ValueError(f"{len(requests)} requests but {len(offsets_s)} arrival times")
    slots = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    outputs: list[RequestOutput | None] = [None] * len(requests)
    inflight = peak = 0

    async def one(i: int) -> None:
        nonlocal inflight, peak
        if slots is not None:
            await slots.acquire()
        inflight += 1
        peak = max(peak, inflight)
        try:
            outputs[i] = out = await backend.send(requests[i])
        finally:
            inflight -= 1
            if slots is not None:
                slots.release()
        if progress is not None:
            progress.update(out.success)

    start = time.perf_counter()
    tasks = []
    for i, offset in enumerate(offsets_s):
        delay = start + offset - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i)))
    await asyncio.gather(*tasks)
    duration_s = time.perf_counter() - start
    if progress is not None:
        progress.close()
    for out in outputs:
        out.start_s -= start
    return RunResult(outputs, duration_s, peak)
