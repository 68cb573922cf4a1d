"""Mixed machine policy: prompt and token work on one machine, prompts first.

This is colocated continuous batching (the baseline the phase split is measured against):
1. `add` queues a request (bounded).
2. `schedule`: if the head prompts fit (token cap, and KV memory for prompt + max_tokens, which
   stays reserved while the request decodes), the step prefills them; otherwise every running
   request decodes one token.
3. `release` returns a finished request's blocks.
Memory comes from a `BlockBudget`, which the machine may share with its TokenScheduler (one KV
pool per machine); without one the scheduler has a budget of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

from mls.policy.common import BlockBudget, FifoQueue, Job, blocks_for_tokens, budget_for


@dataclass(frozen=True)
class MixedPlan:
    prefill: list[Job]
    decode: list[str]


class MixedScheduler:
    def __init__(self, num_blocks: int, block_size: int, prompt_token_cap: int = 2048,
                 max_batch_size: int = 256, max_queue_len: int = 4096,
                 budget: BlockBudget | None = None):
        self.budget = budget_for(num_blocks, budget)
        self.block_size = block_size
        self.prompt_token_cap, self.max_batch_size = prompt_token_cap, max_batch_size
        self.queue = FifoQueue(max_queue_len, "mixed")
        self.running: dict[str, Job] = {}
        self.reserved: dict[str, int] = {}
        self.used_blocks = 0
        """Blocks this policy holds (the budget's `used` also counts other policies')."""

    @property
    def num_blocks(self) -> int:
        return self.budget.num_blocks

    @property
    def free_blocks(self) -> int:
        """Free in the machine's budget: what the next prefill may take."""
        return self.budget.free

    @property
    def pending_prompt_tokens(self) -> int:
        return sum(j.prompt_len for j in self.queue)

    @property
    def pending_decode_tokens(self) -> int:
        return sum(j.max_tokens - j.num_generated for j in self.running.values())

    def blocks_needed(self, job: Job) -> int:
        return blocks_for_tokens(job.max_total_tokens, self.block_size)

    def add(self, job: Job) -> None:
        if self.blocks_needed(job) > self.num_blocks:
            raise ValueError(f"request {job.request_id!r} needs {self.blocks_needed(job)} KV blocks;"
                             f" this machine has {self.num_blocks}")
        self.queue.push(job)

    def can_start(self) -> bool:
        """Whether `schedule` would prefill the head of the queue now."""
        head = self.queue.peek()
        return (head is not None and self.blocks_needed(head) <= self.free_blocks
                and len(self.running) < self.max_batch_size)

    def schedule(self) -> MixedPlan:
        prefill: list[Job] = []
        num_tokens = 0
        while self.can_start():
            head = self.queue.peek()
            if prefill and num_tokens + head.prompt_len > self.prompt_token_cap:
                break
            job = self.queue.pop()
            need = self.blocks_needed(job)
            self.budget.take(need)
            self.reserved[job.request_id] = need
            self.used_blocks += need
            self.running[job.request_id] = job
            prefill.append(job)
            num_tokens += job.prompt_len
        if prefill:
            return MixedPlan(prefill=prefill, decode=[])
        return MixedPlan(prefill=[], decode=list(self.running))

    def token_generated(self, request_id: str, count: int = 1) -> None:
        self.running[request_id].num_generated += count

    def release(self, request_id: str) -> None:
        self.queue.remove(request_id)
        self.running.pop(request_id, None)
        blocks = self.reserved.pop(request_id, 0)
        self.budget.give(blocks)
        self.used_blocks -= blocks
