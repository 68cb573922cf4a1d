"""The router: picks a prompt machine and a token machine together, JSQ by pending tokens (pure).

One routing decision (`route`):
1. Prompt machine: the prompt pool's machine with the fewest pending prompt tokens, unless it is
   long-queued (queue non-empty and pending + this prompt > `prompt_queue_limit_tokens`); then
   the mixed pool's; then borrow the token-pool machine with the least pending decode work into
   the mixed pool. Still none: the least-loaded long-queued machine (the prompt waits in line).
2. Token machine: the token pool's machine with the least pending decode work whose free KV
   memory holds prompt + max output; then the mixed pool's; then borrow the prompt-pool machine
   with the least KV memory in use. Still none: the least-loaded machine that could ever hold
   the request (it waits there for memory).
3. The same machine for both, or a cluster with one usable machine: colocated (no KV transfer).
4. The choice is charged to both machines at once (pending tokens, reserved blocks), so the next
   decision sees it before the next load report arrives.
A colocated cluster (`colocated=True`: the baseline the phase split is measured against) routes
each request to one machine for both phases: the machine with the fewest pending prompt + decode
tokens whose free KV memory holds prompt + max output, else the least-loaded one that could ever
hold it (it waits there for memory). Pools are not borrowed from in this mode.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cls.pools import Machine, PoolMove, Pools
from proto.roles import Role


class NoMachine(RuntimeError):
    """No machine can serve this request (none registered, all draining, or too large)."""


@dataclass(frozen=True)
class Route:
    prompt_machine: str
    token_machine: str
    num_blocks: int
    """KV blocks charged to the token machine (prompt + max output)."""
    borrowed: list[PoolMove] = field(default_factory=list)
    kv_fits: bool = True
    """Whether the token machine had those blocks free in the router's view when it was chosen
    (False: the fallback to a machine that must first free memory)."""

    @property
    def colocated(self) -> bool:
        return self.prompt_machine == self.token_machine


class Router:
    def __init__(self, pools: Pools, prompt_queue_limit_tokens: int = 8192, colocated: bool = False):
        self.pools = pools
        self.prompt_queue_limit_tokens = prompt_queue_limit_tokens
        self.colocated = colocated

    def route(self, prompt_len: int, max_tokens: int, exclude: frozenset[str] = frozenset()) -> Route:
        """Chooses and charges a (prompt, token) pair; `exclude` skips machines (re-routing)."""
        if self.colocated:
            return self._route_colocated(prompt_len, max_tokens, exclude)
        borrowed: list[PoolMove] = []
        prompt_m = self._choose_prompt(prompt_len, exclude, borrowed)
        token_m = self._choose_token(prompt_len + max_tokens, exclude, borrowed)
        if prompt_m is None and token_m is None:
            raise NoMachine("no machine is available (none registered, or all draining)")
        if token_m is None:  # the last fallback already tried every machine's total KV memory
            for move in borrowed:
                self.pools.return_idle(move.machine_id)
            raise NoMachine(f"no available machine's KV memory can hold {prompt_len + max_tokens} "
                            "tokens (prompt + max_tokens)")
        prompt_m = prompt_m or token_m  # colocated fallback: one machine runs both phases
        token_m = token_m or prompt_m
        blocks = token_m.blocks_for(prompt_len + max_tokens)
        fits = blocks <= token_m.kv_blocks_free
        self.pools.charge_prompt(prompt_m, prompt_len)
        self.pools.charge_decode(token_m, max_tokens, blocks)
        return Route(prompt_m.machine_id, token_m.machine_id, blocks, borrowed, fits)

    def _route_colocated(self, prompt_len: int, max_tokens: int, exclude) -> Route:
        num_tokens = prompt_len + max_tokens
        best = waiting = None
        for pool in Role:
            for m in self.pools.by_total_load(pool):
                if m.machine_id in exclude or m.blocks_for(num_tokens) > m.kv_blocks_total:
                    continue
                if waiting is None or _total_key(m) < _total_key(waiting):
                    waiting = m
                if m.blocks_for(num_tokens) <= m.kv_blocks_free:
                    if best is None or _total_key(m) < _total_key(best):
                        best = m
                    break  # later machines of this pool are more loaded
        m = best or waiting
        if m is None:
            if not any(not x.draining and x.machine_id not in exclude for x in self.pools.machines.values()):
                raise NoMachine("no machine is available (none registered, or all draining)")
            raise NoMachine(f"no available machine's KV memory can hold {num_tokens} tokens "
                            "(prompt + max_tokens)")
        blocks = m.blocks_for(num_tokens)
        self.pools.charge_prompt(m, prompt_len)
        self.pools.charge_decode(m, max_tokens, blocks)
        return Route(m.machine_id, m.machine_id, blocks)

    def fits_anywhere(self, num_tokens: int) -> bool:
        return any(m.blocks_for(num_tokens) <= m.kv_blocks_total and num_tokens <= m.max_model_len
                   for m in self.pools.machines.values() if not m.draining)

    # -- prompt side --------------------------------------------------------------------------

    def _long_queued(self, m: Machine, prompt_len: int) -> bool:
        return m.prompt_queue_len > 0 and \
            m.pending_prompt_tokens + prompt_len > self.prompt_queue_limit_tokens

    def _choose_prompt(self, prompt_len: int, exclude, borrowed: list) -> Machine | None:
        # Checking each pool's least-loaded machine suffices: Pools keeps an empty queue at zero
        # pending tokens, so when it is long-queued, every machine of the pool is.
        fallback = None
        for pool in (Role.PROMPT, Role.MIXED):
            m = self._least_prompt(pool, exclude)
            if m is not None and not self._long_queued(m, prompt_len):
                return m
            if m is not None and (fallback is None
                                  or m.pending_prompt_tokens < fallback.pending_prompt_tokens):
                fallback = m
        lender = next((m for m in self.pools.by_decode_load(Role.TOKEN) if m.machine_id not in exclude), None)
        if lender is not None:
            borrowed.append(self.pools.borrow(lender.machine_id))
            return lender
        return fallback

    def _least_prompt(self, pool: Role, exclude) -> Machine | None:
        if not exclude:
            return self.pools.least_prompt_loaded(pool)
        return next((m for m in self.pools.by_prompt_load(pool) if m.machine_id not in exclude), None)

    # -- token side ---------------------------------------------------------------------------

    def _choose_token(self, num_tokens: int, exclude, borrowed: list) -> Machine | None:
        for pool in (Role.TOKEN, Role.MIXED):
            for m in self.pools.by_decode_load(pool):
                if m.machine_id not in exclude and m.blocks_for(num_tokens) <= m.kv_blocks_free:
                    return m
        lenders = [m for m in self.pools.by_decode_load(Role.PROMPT) if m.machine_id not in exclude
                   and m.blocks_for(num_tokens) <= m.kv_blocks_free]
        if lenders:
            lender = min(lenders, key=lambda m: (m.kv_blocks_used, m.machine_id))
            borrowed.append(self.pools.borrow(lender.machine_id))
            return lender
        for pool in (Role.TOKEN, Role.MIXED, Role.PROMPT):  # none has memory now: wait in line
            for m in self.pools.by_decode_load(pool):
                if m.machine_id not in exclude and m.blocks_for(num_tokens) <= m.kv_blocks_total:
                    if pool == Role.PROMPT:
                        borrowed.append(self.pools.borrow(m.machine_id))
                    return m
        return None


def _total_key(m: Machine) -> tuple[int, str]:
    return (m.pending_prompt_tokens + m.pending_decode_tokens, m.machine_id)
