"""Mixed machine policy: prompt and token work on one machine, prompts first.

This is colocated continuous batching (the baseline the phase split is measured against):
1. `add` queues a request (bounded).
2. `schedule`: if the head prompts fit (token cap, and KV memory for prompt + max_tokens, which
   stays reserved while the request decodes), the step prefills them; otherwise every running
   request decodes one token.
3. `release` returns a finished request's blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

from mls.policy.common import FifoQueue, Job, blocks_for_tokens


@dataclass(frozen=True)
class MixedPlan:
    prefill: list[Job]
    decode: list[str]


class MixedScheduler:
    def __init__(self, num_blocks: int, block_size: int, prompt_token_cap: int = 2048,
                 max_batch_size: int = 256, max_queue_len: int = 4096):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.prompt_token_cap, self.max_batch_size = prompt_token_cap, max_batch_size
        self.queue = FifoQueue(max_queue_len, "mixed")
        self.running: dict[str, Job] = {}
        self.reserved: dict[str, int] = {}
        self.used_blocks = 0

    @property
    def free_blocks(self) -> int:
        return self.num_blocks - self.used_blocks

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

    def schedule(self) -> MixedPlan:
        prefill: list[Job] = []
        num_tokens = 0
        while (head := self.queue.peek()) is not None:
            if prefill and num_tokens + head.prompt_len > self.prompt_token_cap:
                break
            need = self.blocks_needed(head)
            if need > self.free_blocks or len(self.running) >= self.max_batch_size:
                break
            job = self.queue.pop()
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
        self.used_blocks -= self.reserved.pop(request_id, 0)
