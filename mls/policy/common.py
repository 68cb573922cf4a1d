"""What every machine-level policy shares: the job record, bounded queues, block arithmetic."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


class QueueFull(RuntimeError):
    """The bounded queue is at its limit; the caller answers RESOURCE_EXHAUSTED."""


@dataclass
class Job:
    """One request as a policy sees it: sizes only, never tokens."""
    request_id: str
    prompt_len: int
    max_tokens: int
    arrival_s: float = 0.0
    num_generated: int = 0

    @property
    def max_total_tokens(self) -> int:
        return self.prompt_len + self.max_tokens


def blocks_for_tokens(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class FifoQueue:
    """A bounded FCFS queue of jobs with O(1) removal by request id."""

    def __init__(self, max_len: int, name: str):
        if max_len <= 0:
            raise ValueError(f"{name} queue bound must be positive")
        self.max_len, self.name = max_len, name
        self._jobs: OrderedDict[str, Job] = OrderedDict()

    def __len__(self) -> int:
        return len(self._jobs)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._jobs

    def __iter__(self):
        return iter(self._jobs.values())

    def push(self, job: Job) -> None:
        if job.request_id in self._jobs:
            raise ValueError(f"request {job.request_id!r} is already queued")
        if len(self._jobs) >= self.max_len:
            raise QueueFull(f"{self.name} queue is full ({self.max_len} requests)")
        self._jobs[job.request_id] = job

    def peek(self) -> Job | None:
        return next(iter(self._jobs.values()), None)

    def pop(self) -> Job:
        return self._jobs.popitem(last=False)[1]

    def remove(self, request_id: str) -> Job | None:
        return self._jobs.pop(request_id, None)
