"""Mixed machine policy: prompt and token work on one machine (colocated batching), in one of two
modes, both baselines the phase split is measured against.

`prompt_first` (the default): colocated continuous batching.
1. `add` queues a request (bounded).
2. `schedule`: if the head prompts fit (token cap, and KV memory for prompt + max_tokens, which
   stays reserved while the request decodes), the step prefills them whole; otherwise every
   running request decodes one token. A long prompt stalls every decode for its whole prefill.
3. `release` returns a finished request's blocks.

`chunked`: chunked prefill with a per-step token budget (Sarathi-Serve, DeepSpeed-FastGen's
SplitFuse), so a long prompt no longer stalls the decodes.
1. `add` queues a request (bounded), as above.
2. `schedule(num_other_decodes)` fills one step of at most `max_num_batched_tokens` tokens:
   first the decodes (one token each; `num_other_decodes` counts decodes of other policies that
   share the step, e.g. the machine's token work, and come off the budget first), then the rest of
   the budget goes to prompts as chunks, FCFS: the prompt already partly prefilled continues, then
   the queue's head is admitted (its blocks for prompt + max_tokens are taken now, all-or-nothing:
   never OOM, it waits while memory is short) and so on while budget is left. A prompt whose last
   chunk runs in this step decodes from the next step on. If the decodes alone exceed the budget,
   they take turns (round robin) and no chunk runs.
3. `release` returns the blocks at any point: queued, mid-prompt or decoding.
Memory comes from a `BlockBudget`, which the machine may share with its TokenScheduler (one KV
pool per machine); without one the scheduler has a budget of its own.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from itertools import islice

from mls.policy.common import BlockBudget, FifoQueue, Job, blocks_for_tokens, budget_for

MIXED_POLICIES = ("prompt_first", "chunked")
DEFAULT_MAX_NUM_BATCHED_TOKENS = 512
"""Why 512: twice mlsd's default max_num_seqs (256), so a full decode batch still leaves half of
every step to prompts; on the 2-core CPU host it cuts the worst decode gap behind a 1536-token
prompt 2.3x for 7% more time for the same work (docs/BENCHMARKS.md, "Chunked prefill"). A GPU
affords more (Sarathi-Serve works in the 512-2048 range)."""


@dataclass(frozen=True)
class PromptChunk:
    """Prompt tokens [start, start + num_tokens) of `job`, computed in this step."""
    job: Job
    start: int
    num_tokens: int

    @property
    def end(self) -> int:
        return self.start + self.num_tokens

    @property
    def last(self) -> bool:
        """The prompt completes in this step: the step samples the request's first token."""
        return self.end == self.job.prompt_len


@dataclass(frozen=True)
class MixedPlan:
    prefill: list[Job]
    """prompt_first: whole prompts to prefill in this step (then `decode` is empty)."""
    decode: list[str]
    """Request ids that decode one token in this step."""
    chunks: list[PromptChunk] = field(default_factory=list)
    """chunked: prompt chunks run in the same forward pass as `decode`; a chunk with start 0 was
    admitted now (its blocks were just taken)."""

    @property
    def num_tokens(self) -> int:
        """Tokens this plan puts in the step's forward pass."""
        return (sum(j.prompt_len for j in self.prefill) + len(self.decode)
                + sum(c.num_tokens for c in self.chunks))


class MixedScheduler:
    def __init__(self, num_blocks: int, block_size: int, prompt_token_cap: int = 2048,
                 max_num_seqs: int = 256, max_queue_len: int = 4096,
                 budget: BlockBudget | None = None, policy: str = "prompt_first",
                 max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS):
        if policy not in MIXED_POLICIES:
            raise ValueError(f"mixed policy must be one of {MIXED_POLICIES}, got {policy!r}")
        if max_num_batched_tokens <= 0:
            raise ValueError(f"max_num_batched_tokens must be positive, got {max_num_batched_tokens}")
        self.budget = budget_for(num_blocks, budget)
        self.block_size = block_size
        self.prompt_token_cap, self.max_num_seqs = prompt_token_cap, max_num_seqs
        self.policy, self.max_num_batched_tokens = policy, max_num_batched_tokens
        self.queue = FifoQueue(max_queue_len, "mixed")
        self.running: OrderedDict[str, Job] = OrderedDict()
        """Requests whose prompt is computed: they decode."""
        self.prefilling: OrderedDict[str, Job] = OrderedDict()
        """chunked: admitted, prompt partly computed (oldest first)."""
        self.num_prefilled: dict[str, int] = {}
        """chunked: prompt tokens scheduled so far, per request in `prefilling`."""
        self.reserved: dict[str, int] = {}
        self.used_blocks = 0
        """Blocks this policy holds (the budget's `used` also counts other policies')."""

    @property
    def chunked(self) -> bool:
        return self.policy == "chunked"

    @property
    def num_blocks(self) -> int:
        return self.budget.num_blocks

    @property
    def free_blocks(self) -> int:
        """Free in the machine's budget: what the next prefill may take."""
        return self.budget.free

    @property
    def pending_prompt_tokens(self) -> int:
        """Prompt tokens not yet scheduled: queued prompts and the rest of partial ones."""
        partial = sum(j.prompt_len - self.num_prefilled[r] for r, j in self.prefilling.items())
        return sum(j.prompt_len for j in self.queue) + partial

    @property
    def pending_decode_tokens(self) -> int:
        jobs = [*self.running.values(), *self.prefilling.values()]
        return sum(j.max_tokens - j.num_generated for j in jobs)

    def blocks_needed(self, job: Job) -> int:
        return blocks_for_tokens(job.max_total_tokens, self.block_size)

    def add(self, job: Job) -> None:
        if self.blocks_needed(job) > self.num_blocks:
            raise ValueError(f"request {job.request_id!r} needs {self.blocks_needed(job)} KV blocks;"
                             f" this machine has {self.num_blocks}")
        self.queue.push(job)

    def can_admit(self) -> bool:
        """Whether the head of the queue may be admitted now (memory and batch size)."""
        head = self.queue.peek()
        return (head is not None and self.blocks_needed(head) <= self.free_blocks
                and len(self.running) + len(self.prefilling) < self.max_num_seqs)

    def can_start(self) -> bool:
        """Whether `schedule` has prompt work it may run now (budget permitting, in chunked)."""
        return bool(self.prefilling) or self.can_admit()

    def schedule(self, num_other_decodes: int = 0) -> MixedPlan:
        """The next step's plan. `num_other_decodes`: chunked mode only (see the module doc)."""
        if self.chunked:
            return self._schedule_chunked(num_other_decodes)
        prefill: list[Job] = []
        num_tokens = 0
        while self.can_admit():
            head = self.queue.peek()
            if prefill and num_tokens + head.prompt_len > self.prompt_token_cap:
                break
            job = self._admit()
            self.running[job.request_id] = job
            prefill.append(job)
            num_tokens += job.prompt_len
        if prefill:
            return MixedPlan(prefill=prefill, decode=[])
        return MixedPlan(prefill=[], decode=list(self.running))

    def _schedule_chunked(self, num_other_decodes: int) -> MixedPlan:
        if num_other_decodes < 0:
            raise ValueError(f"num_other_decodes must not be negative, got {num_other_decodes}")
        left = max(0, self.max_num_batched_tokens - num_other_decodes)
        decode = list(islice(self.running, left))
        if len(decode) < len(self.running):  # round robin: the skipped ones go first next step
            for rid in decode:
                self.running.move_to_end(rid)
        left -= len(decode)
        chunks: list[PromptChunk] = []
        partial = iter(list(self.prefilling.values()))
        while left > 0:
            job = next(partial, None)
            if job is None:  # no partial prompt left: admit the head (strict FCFS)
                if not self.can_admit():
                    break
                job = self._admit()
                self.prefilling[job.request_id] = job
                self.num_prefilled[job.request_id] = 0
            rid = job.request_id
            start = self.num_prefilled[rid]
            chunk = PromptChunk(job, start, min(job.prompt_len - start, left))
            chunks.append(chunk)
            left -= chunk.num_tokens
            self.num_prefilled[rid] = chunk.end
            if chunk.last:  # decodes from the next step on
                del self.prefilling[rid], self.num_prefilled[rid]
                self.running[rid] = job
        return MixedPlan(prefill=[], decode=decode, chunks=chunks)

    def _admit(self) -> Job:
        job = self.queue.pop()
        need = self.blocks_needed(job)
        self.budget.take(need)
        self.reserved[job.request_id] = need
        self.used_blocks += need
        return job

    def token_generated(self, request_id: str, count: int = 1) -> None:
        self.running[request_id].num_generated += count

    def release(self, request_id: str) -> None:
        """Finished, aborted or failed, in any state; unknown ids are ignored."""
        self.queue.remove(request_id)
        self.running.pop(request_id, None)
        self.prefilling.pop(request_id, None)
        self.num_prefilled.pop(request_id, None)
        blocks = self.reserved.pop(request_id, 0)
        self.budget.give(blocks)
        self.used_blocks -= blocks
