"""Token machine policy: FCFS continuous batching sized by KV memory.

Life cycle of a request here:
1. `add`: queued, waiting for memory (bounded: `QueueFull` past the bound).
2. `schedule` admits from the head, FCFS, while its blocks (prompt + max_tokens) are free: the
   admitted request's memory is reserved before the first KV layer arrives, so decoding can never
   run out of memory. When memory is short, requests wait; none is dropped.
3. `kv_ready`: its KV has arrived; it joins the decode batch at the next step.
4. `release`: finished, aborted or failed; its blocks return and the queue moves.
Memory comes from a `BlockBudget`, which the machine may share with its MixedScheduler (one KV
pool per machine); without one the scheduler has a budget of its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mls.policy.common import BlockBudget, FifoQueue, Job, blocks_for_tokens, budget_for


@dataclass(frozen=True)
class TokenPlan:
    admitted: list[Job] = field(default_factory=list)
    """Newly reserved: reserve their blocks and accept their KV now."""
    decode: list[str] = field(default_factory=list)
    """Request ids that decode one token in this step."""


class TokenScheduler:
    def __init__(self, num_blocks: int, block_size: int, max_num_seqs: int = 256,
                 max_queue_len: int = 4096, budget: BlockBudget | None = None):
        self.budget = budget_for(num_blocks, budget)
        self.block_size, self.max_num_seqs = block_size, max_num_seqs
        self.queue = FifoQueue(max_queue_len, "token")
        self.reserved: dict[str, int] = {}  # request id -> blocks, for admitted requests
        self.ready: dict[str, Job] = {}  # admitted and KV arrived: the decode batch
        self.receiving: dict[str, Job] = {}  # admitted, KV not yet complete
        self.used_blocks = 0
        """Blocks this policy holds (the budget's `used` also counts other policies')."""

    @property
    def num_blocks(self) -> int:
        return self.budget.num_blocks

    @property
    def free_blocks(self) -> int:
        """Free in the machine's budget: what the next admission may take."""
        return self.budget.free

    @property
    def pending_tokens(self) -> int:
        """Decode work left (max output tokens not yet produced), running and queued: the JSQ
        measure of a token machine."""
        jobs = [*self.queue, *self.receiving.values(), *self.ready.values()]
        return sum(j.max_tokens - j.num_generated for j in jobs)

    def blocks_needed(self, job: Job) -> int:
        return blocks_for_tokens(job.max_total_tokens, self.block_size)

    def fits_ever(self, job: Job) -> bool:
        return self.blocks_needed(job) <= self.num_blocks

    def add(self, job: Job) -> None:
        if not self.fits_ever(job):
            raise ValueError(f"request {job.request_id!r} needs {self.blocks_needed(job)} KV blocks;"
                             f" this machine has {self.num_blocks}")
        if job.request_id in self.reserved:
            raise ValueError(f"request {job.request_id!r} is already admitted")
        self.queue.push(job)

    def can_admit(self) -> bool:
        """Whether `schedule` would admit the head of the queue now."""
        head = self.queue.peek()
        return (head is not None and self.blocks_needed(head) <= self.free_blocks
                and len(self.reserved) < self.max_num_seqs)

    def schedule(self) -> TokenPlan:
        admitted = []
        while self.can_admit():  # strict FCFS: a head that does not fit holds up everyone behind it
            job = self.queue.pop()
            need = self.blocks_needed(job)
            self.budget.take(need)
            self.reserved[job.request_id] = need
            self.used_blocks += need
            self.receiving[job.request_id] = job
            admitted.append(job)
        return TokenPlan(admitted=admitted, decode=list(self.ready))

    def kv_ready(self, request_id: str) -> None:
        job = self.receiving.pop(request_id)
        self.ready[request_id] = job

    def token_generated(self, request_id: str, count: int = 1) -> None:
        self.ready[request_id].num_generated += count

    def release(self, request_id: str) -> None:
        """Finished, aborted or failed, in any state; unknown ids are ignored."""
        self.queue.remove(request_id)
        self.receiving.pop(request_id, None)
        self.ready.pop(request_id, None)
        blocks = self.reserved.pop(request_id, 0)
        self.budget.give(blocks)
        self.used_blocks -= blocks

