"""The router's books: what routing charged each machine, taken back as requests progress (pure).

`Router.route` charges the machines it picks: the prompt's tokens to the prompt machine, the
request's decode work (its max output tokens) and KV blocks to the token machine, so the next
decision sees them before any load report does. The `Ledger` is the one place those charges are
credited back, and where a machine borrowed into the mixed pool is sent home once it has no work
of the other kind. clsd's dispatcher (real time) and the simulator (virtual time) both keep their
books here. Life cycle of one routed request:
1. `prompt_done(prompt_machine, prompt_len)`: the prefill ran (its first token exists).
2. `tokens_done(token_machine, n)`: n more output tokens exist (per token, or batched per step).
3. `request_done(token_machine, num_blocks, num_tokens_left)`: the request (or its attempt) ended;
   its blocks and the decode work it will never do come back.
"""

from __future__ import annotations

from collections.abc import Callable

from cls.pools import PoolMove, Pools
from proto.roles import Role


class Ledger:
    def __init__(self, pools: Pools, on_move: Callable[[PoolMove], None] | None = None):
        """`on_move` sees every machine the ledger sends home (logs, the simulator's record)."""
        self.pools, self.on_move = pools, on_move

    def prompt_done(self, machine_id: str, prompt_len: int) -> None:
        self.pools.credit_prompt(machine_id, prompt_len)
        self._return_idle(machine_id)

    def tokens_done(self, machine_id: str, num_tokens: int) -> None:
        if num_tokens:
            self.pools.credit_decode(machine_id, num_tokens)

    def request_done(self, machine_id: str, num_blocks: int, num_tokens_left: int = 0) -> None:
        self.pools.credit_decode(machine_id, max(0, num_tokens_left), num_blocks)
        self._return_idle(machine_id)

    def _return_idle(self, machine_id: str) -> None:
        m = self.pools.machines.get(machine_id)
        if m is not None and m.role == Role.MIXED:
            for move in self.pools.return_idle(machine_id):
                if self.on_move is not None:
                    self.on_move(move)
