"""Prompt machine policy: FCFS batches of whole prompts under a token cap.

1. `add` queues a prompt (bounded: `QueueFull` past the bound).
2. `schedule` takes prompts from the head while the batch stays within `prompt_token_cap` and
   the free KV memory; a prompt longer than the cap runs alone. It never reorders.
3. The caller runs the batch; the prompt's KV leaves with the transfer, so nothing is held here.
"""

from __future__ import annotations

from dataclasses import dataclass

from mls.policy.common import FifoQueue, Job, blocks_for_tokens


@dataclass(frozen=True)
class PromptBatch:
    jobs: list[Job]

    @property
    def num_tokens(self) -> int:
        return sum(j.prompt_len for j in self.jobs)


class PromptScheduler:
    def __init__(self, prompt_token_cap: int = 2048, max_queue_len: int = 4096):
        if prompt_token_cap <= 0:
            raise ValueError("prompt_token_cap must be positive")
        self.prompt_token_cap = prompt_token_cap
        self.queue = FifoQueue(max_queue_len, "prompt")
        self.pending_tokens = 0
        """Prompt tokens queued and not yet prefilled: the JSQ measure of a prompt machine."""

    def add(self, job: Job) -> None:
        self.queue.push(job)
        self.pending_tokens += job.prompt_len

    def remove(self, request_id: str) -> Job | None:
        job = self.queue.remove(request_id)
        if job is not None:
            self.pending_tokens -= job.prompt_len
        return job

    def can_start(self, free_blocks: int | None = None, block_size: int = 1) -> bool:
        """Whether `schedule` with the same arguments would return a batch."""
        head = self.queue.peek()
        return head is not None and (free_blocks is None
                                     or blocks_for_tokens(head.prompt_len, block_size) <= free_blocks)

    def schedule(self, free_blocks: int | None = None, block_size: int = 1) -> PromptBatch | None:
        """The next batch, or None if the queue is empty or the head prompt does not fit the
        free KV memory (`free_blocks` of `block_size` tokens; None = no memory limit)."""
        jobs: list[Job] = []
        num_tokens = num_blocks = 0
        while (head := self.queue.peek()) is not None:
            if jobs and num_tokens + head.prompt_len > self.prompt_token_cap:
                break
            need = blocks_for_tokens(head.prompt_len, block_size)
            if free_blocks is not None and num_blocks + need > free_blocks:
                break
            jobs.append(self.queue.pop())
            num_tokens += head.prompt_len
            num_blocks += need
        if not jobs:
            return None
        self.pending_tokens -= num_tokens
        return PromptBatch(jobs)
