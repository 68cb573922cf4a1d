"""How long clsd waits for a Prefill: the deadline follows the work (pure).

An 8,000-token prompt on a CPU machine takes far longer than the RPC deadline, and a deadline
that ignores that re-routes the prompt to a second and a third machine. So:
1. `timeout_s(machine, prompt_len)`: the RPC deadline plus PREFILL_SAFETY times the machine's
   expected prefill time for the prompt tokens queued there (the router's view) and this prompt.
2. `learn(machine, prompt_len, prefill_s)`: each Prefill reply moves the machine's measured
   seconds per prompt token (a moving average). A dead or hung machine is found by its lease
   meanwhile, not by this deadline.
"""

from __future__ import annotations

from cls.pools import Pools

DEFAULT_PREFILL_S_PER_TOKEN = 0.005
"""A machine's prefill rate until its first Prefill answers (5 ms a token: a CPU machine)."""
PREFILL_SAFETY = 4.0
"""How many times its expected prefill time a Prefill may take before it counts as lost."""


class PrefillClock:
    def __init__(self, pools: Pools, rpc_timeout_s: float):
        self.pools, self.rpc_timeout_s = pools, rpc_timeout_s
        self.s_per_token: dict[str, float] = {}
        """Per prompt machine, its measured prefill seconds per prompt token."""

    def timeout_s(self, machine_id: str, prompt_len: int) -> float:
        m = self.pools.machines.get(machine_id)
        queued = m.pending_prompt_tokens if m is not None else 0
        rate = self.s_per_token.get(machine_id, DEFAULT_PREFILL_S_PER_TOKEN)
        return self.rpc_timeout_s + PREFILL_SAFETY * rate * (queued + prompt_len)

    def learn(self, machine_id: str, prompt_len: int, prefill_s: float) -> None:
        if prompt_len > 0 and prefill_s > 0:
            sample = prefill_s / prompt_len
            old = self.s_per_token.get(machine_id)
            self.s_per_token[machine_id] = sample if old is None else 0.8 * old + 0.2 * sample
