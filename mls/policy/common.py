"""What every machine-level policy shares: the job record, bounded queues, block arithmetic and
the machine's one pool of KV blocks."""

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


class BlockBudget:
    """A machine's KV blocks as the policies that hold them across steps see them.

    A machine takes token work (KV received, then decoded) and mixed work (prefilled and decoded
    here) at the same time, from one KV pool: both policies take their reservations from the
    same budget, so together they never promise more blocks than the machine has. Misuse (taking
    more than is free, giving back more than was taken) raises: a caller bug, never a sentinel.
    """

    def __init__(self, num_blocks: int):
        if num_blocks < 0:
            raise ValueError(f"num_blocks must not be negative, got {num_blocks}")
        self.num_blocks = num_blocks
        self.used = 0

    @property
    def free(self) -> int:
        return self.num_blocks - self.used

    def take(self, num_blocks: int) -> None:
        if num_blocks < 0 or num_blocks > self.free:
            raise ValueError(f"cannot take {num_blocks} KV blocks; {self.free} of {self.num_blocks} "
                             f"are free")
        self.used += num_blocks

    def give(self, num_blocks: int) -> None:
        if num_blocks < 0 or num_blocks > self.used:
            raise ValueError(f"cannot give back {num_blocks} KV blocks; {self.used} are taken")
        self.used -= num_blocks


def budget_for(num_blocks: int, budget: BlockBudget | None) -> BlockBudget:
    """A policy's budget: the shared one (which must agree on the machine's size) or its own."""
    if budget is None:
        return BlockBudget(num_blocks)
    if budget.num_blocks != num_blocks:
        raise ValueError(f"num_blocks {num_blocks} disagrees with the shared budget's "
                         f"{budget.num_blocks}")
    return budget


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
