"""The routing part's schedulers and load of benchmarks/cls_bench.py: the sorted router (clsd's
own cls.router over cls.pools, with clsd's calls around it), the brute-force O(n) JSQ reference,
a checker that runs both on the same state, the simulated clusters (realistic KV sizes) and the
request mix and background load the steady loop replays."""

from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import dataclass, field

from cls.pools import Machine, Pools
from cls.router import Router
from proto.roles import Role

BLOCK_SIZE = 16
# KV blocks of 16 tokens a machine holds after weights and activations, bf16:
# Llama-3.1-8B on one H100 80 GB (128 KiB per token, ~56 GiB free) and Llama-3.1-70B on 8 H100s
# (320 KiB per token, ~420 GiB free).
KV_BLOCKS = (28_000, 85_000)
MAX_MODEL_LEN = 131_072
PROMPT_QUEUE_LIMIT = 8192


# -- the two schedulers under test ----------------------------------------------------------------

class SortedJsq:
    """The real thing: cls.router.Router over cls.pools.Pools, with clsd's calls around it (a
    borrowed machine is offered its way home after each credit and each load report)."""

    def __init__(self, machines: list[Machine]):
        self.pools = Pools()
        for m in machines:
            self.pools.add(m.machine_id, m.home, m.kv_blocks_total, m.block_size, m.max_model_len)
            self.report(m.machine_id, m.pending_prompt_tokens, m.prompt_queue_len,
                        m.pending_decode_tokens, m.kv_blocks_free)
        self.router = Router(self.pools, PROMPT_QUEUE_LIMIT)
        self.machines = self.pools.machines

    def route(self, prompt_len: int, max_tokens: int) -> tuple[str, str, int]:
        r = self.router.route(prompt_len, max_tokens)
        return r.prompt_machine, r.token_machine, r.num_blocks

    def credit_prompt(self, machine_id: str, num_tokens: int) -> None:
        self.pools.credit_prompt(machine_id, num_tokens)
        if self.machines[machine_id].role == Role.MIXED:
            self.pools.return_idle(machine_id)

    def credit_decode(self, machine_id: str, num_tokens: int, num_blocks: int) -> None:
        self.pools.credit_decode(machine_id, num_tokens, num_blocks)
        if self.machines[machine_id].role == Role.MIXED:
            self.pools.return_idle(machine_id)

    def report(self, machine_id: str, prompt: int, queue: int, decode: int, free: int) -> None:
        self.pools.update_load(machine_id, pending_prompt_tokens=prompt, prompt_queue_len=queue,
                               pending_decode_tokens=decode, kv_blocks_free=free)
        self.pools.return_idle(machine_id)


class LinearJsq:
    """The brute-force reference: the same JSQ choice as a linear min over every machine, the same
    bookkeeping as plain field updates (no index to maintain)."""

    def __init__(self, machines: list[Machine]):
        self.machines = {m.machine_id: Machine(**vars(m)) for m in machines}
        self.prompt_pool = [m for m in self.machines.values() if m.role == Role.PROMPT]
        self.token_pool = [m for m in self.machines.values() if m.role == Role.TOKEN]

    def route(self, prompt_len: int, max_tokens: int) -> tuple[str, str, int]:
        need = prompt_len + max_tokens
        # where none qualifies, the least-loaded machine (the router would borrow one instead)
        pm = linear_prompt(self.prompt_pool, prompt_len) or \
            min(self.prompt_pool, key=lambda m: (m.pending_prompt_tokens, m.machine_id))
        tm = linear_token(self.token_pool, need) or \
            min(self.token_pool, key=lambda m: (m.pending_decode_tokens, m.machine_id))
        blocks = tm.blocks_for(need)
        pm.pending_prompt_tokens += prompt_len
        pm.prompt_queue_len += 1
        tm.pending_decode_tokens += max_tokens
        tm.kv_blocks_free = max(0, tm.kv_blocks_free - blocks)
        return pm.machine_id, tm.machine_id, blocks

    def credit_prompt(self, machine_id: str, num_tokens: int) -> None:
        m = self.machines[machine_id]
        m.pending_prompt_tokens = max(0, m.pending_prompt_tokens - num_tokens)
        m.prompt_queue_len = max(0, m.prompt_queue_len - 1)
        if not (m.pending_prompt_tokens and m.prompt_queue_len):
            m.pending_prompt_tokens = m.prompt_queue_len = 0

    def credit_decode(self, machine_id: str, num_tokens: int, num_blocks: int) -> None:
        m = self.machines[machine_id]
        m.pending_decode_tokens = max(0, m.pending_decode_tokens - num_tokens)
        m.kv_blocks_free = min(m.kv_blocks_total, m.kv_blocks_free + num_blocks)

    def report(self, machine_id: str, prompt: int, queue: int, decode: int, free: int) -> None:
        m = self.machines[machine_id]
        m.pending_prompt_tokens, m.prompt_queue_len = prompt, queue
        m.pending_decode_tokens, m.kv_blocks_free = decode, free


def linear_prompt(pool: list[Machine], prompt_len: int) -> Machine | None:
    """JSQ by brute force: the fewest pending prompt tokens among machines not long-queued."""
    limit = PROMPT_QUEUE_LIMIT - prompt_len
    ok = [m for m in pool if not (m.prompt_queue_len and m.pending_prompt_tokens > limit)]
    return min(ok, key=lambda m: (m.pending_prompt_tokens, m.machine_id)) if ok else None


def linear_token(pool: list[Machine], num_tokens: int) -> Machine | None:
    """JSQ by brute force: the least pending decode work among machines with the KV memory free."""
    ok = [m for m in pool if m.blocks_for(num_tokens) <= m.kv_blocks_free]
    return min(ok, key=lambda m: (m.pending_decode_tokens, m.machine_id)) if ok else None


class CheckedJsq:
    """SortedJsq with every decision checked against the brute force on the same state, on each
    side where that pool's own JSQ decides (no borrowing, not the mixed pool)."""

    def __init__(self, fast: SortedJsq):
        self.fast, self.machines = fast, fast.machines
        self.credit_prompt, self.credit_decode = fast.credit_prompt, fast.credit_decode
        self.report = fast.report
        self.agree = self.checked = 0

    def route(self, prompt_len: int, max_tokens: int) -> tuple[str, str, int]:
        pools = self.fast.pools
        pm = linear_prompt(pools.members(Role.PROMPT), prompt_len)
        tm = linear_token(pools.members(Role.TOKEN), prompt_len + max_tokens)
        r = self.fast.router.route(prompt_len, max_tokens)
        if not r.borrowed:
            for expected, got in ((pm, r.prompt_machine), (tm, r.token_machine)):
                if expected is not None:
                    self.checked += 1
                    self.agree += expected.machine_id == got
        return r.prompt_machine, r.token_machine, r.num_blocks


# -- workload -------------------------------------------------------------------------------------

def make_cluster(num_machines: int, rng: random.Random) -> list[Machine]:
    """Half prompt, half token machines, each with a random background load already reported."""
    machines = []
    for i in range(num_machines):
        home = Role.PROMPT if i < num_machines // 2 else Role.TOKEN
        total = rng.choice(KV_BLOCKS)
        m = Machine(f"{home.value[0]}{i:05d}", home, home, total, BLOCK_SIZE, MAX_MODEL_LEN)
        if home == Role.PROMPT:
            m.prompt_queue_len = rng.choice([0, 0, 0, 1])
            m.pending_prompt_tokens = prompt_len(rng) if m.prompt_queue_len else 0
            m.kv_blocks_free = total - rng.randint(0, total // 10)
        else:
            m.pending_decode_tokens = rng.randint(0, 20_000)
            m.kv_blocks_free = total - rng.randint(0, total // 2)
        machines.append(m)
    return machines


def prompt_len(rng: random.Random) -> int:
    # Splitwise's traces: conversation prompts ~1k tokens (median), coding ~1.5k, a long tail
    return min(16_000, max(8, int(rng.lognormvariate(math.log(1100), 0.9))))


def output_len(rng: random.Random) -> int:
    return min(4096, max(1, int(rng.lognormvariate(math.log(120), 1.0))))


@dataclass
class Workload:
    """What the machines really hold: their background load plus the requests routed to them and
    not yet done. Heartbeats report it; between them the router's own charges and credits rule."""

    background: dict[str, tuple[int, int, int, int]]
    """machine id -> (prompt tokens, prompt queue length, decode tokens, KV blocks in use)"""
    prompt_lag: int
    """A request's prefill is done this many decisions after it was routed..."""
    decode_lag: int
    """...and it finishes this many decisions after it was routed."""
    prefilling: deque = field(default_factory=deque)  # (prompt machine, prompt tokens)
    decoding: deque = field(default_factory=deque)  # (token machine, max tokens, blocks)
    live: dict[str, list[int]] = field(default_factory=dict)  # like `background`, in-flight requests

    @classmethod
    def of(cls, machines: list[Machine], prompt_lag: int, decode_lag: int) -> Workload:
        bg = {m.machine_id: (m.pending_prompt_tokens, m.prompt_queue_len, m.pending_decode_tokens,
                             m.kv_blocks_used) for m in machines}
        return cls(bg, prompt_lag, decode_lag, live={mid: [0, 0, 0, 0] for mid in bg})

    def copy(self) -> Workload:
        return Workload(self.background, self.prompt_lag, self.decode_lag, deque(self.prefilling),
                        deque(self.decoding), {mid: list(v) for mid, v in self.live.items()})
