"""The cluster's machine pools: home pool, current pool, borrowing, resizing, draining (pure).

A machine has a home pool (`prompt` or `token`) and a current pool; borrowing moves it into the
elastic `mixed` pool without changing its home. Life cycle of a machine here:
1. `add` (registered): it joins its home pool.
2. `update_load` (a load report) overwrites its load; the router's own routing adds to it between
   reports (`charge_*`), and request progress takes it away (`credit_*`).
3. `borrow` moves it into the mixed pool; `return_idle` sends it home once it has no work of the
   other kind.
4. `resize` changes home pools to operator targets (the machines with the least work of the role
   they leave move first); a machine keeps finishing the work it holds, but gets no new work of
   the role it left. `drain` takes a machine out of routing; `undrain` puts it back.
5. `remove` (lease expired, or the machine left).

Per pool, machines are kept in three sorted lists (by pending prompt tokens, by pending decode
tokens, by both together for colocated routing) so the router's JSQ choice is O(log n) at
thousands of machines.
"""

from __future__ import annotations

from dataclasses import dataclass

from sortedcontainers import SortedList

from proto.roles import Role


class PoolError(ValueError):
    """A bad pool operation (unknown machine, impossible resize); the message names it."""


@dataclass
class Machine:
    machine_id: str
    home: Role
    role: Role
    kv_blocks_total: int
    block_size: int
    max_model_len: int
    draining: bool = False
    pending_prompt_tokens: int = 0
    prompt_queue_len: int = 0
    pending_decode_tokens: int = 0
    kv_blocks_free: int = 0

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @property
    def kv_blocks_used(self) -> int:
        return self.kv_blocks_total - self.kv_blocks_free


@dataclass(frozen=True)
class PoolMove:
    machine_id: str
    from_pool: Role
    to_pool: Role


class Pools:
    def __init__(self):
        self.machines: dict[str, Machine] = {}
        self._by_prompt = {p: SortedList() for p in Role}  # (pending prompt tokens, id)
        self._by_decode = {p: SortedList() for p in Role}  # (pending decode tokens, id)
        self._by_total = {p: SortedList() for p in Role}  # (pending prompt + decode tokens, id)
        self.num_borrowed = self.num_returned = 0

    # -- membership ---------------------------------------------------------------------------

    def add(self, machine_id: str, home: Role, kv_blocks_total: int, block_size: int,
            max_model_len: int) -> Machine:
        if machine_id in self.machines:
            raise PoolError(f"machine {machine_id!r} is already registered")
        if home == Role.MIXED:
            raise PoolError(f"machine {machine_id!r}: the home pool must be prompt or token")
        m = Machine(machine_id, Role(home), Role(home), kv_blocks_total, block_size, max_model_len,
                    kv_blocks_free=kv_blocks_total)
        self.machines[machine_id] = m
        self._index(m)
        return m

    def remove(self, machine_id: str) -> Machine:
        m = self.get(machine_id)
        self._unindex(m)
        del self.machines[machine_id]
        return m

    def get(self, machine_id: str) -> Machine:
        try:
            return self.machines[machine_id]
        except KeyError:
            raise PoolError(f"unknown machine {machine_id!r}") from None

    def members(self, pool: Role) -> list[Machine]:
        return [m for m in self.machines.values() if m.role == pool]

    def pending_tokens(self, pool: Role) -> int:
        return sum(m.pending_prompt_tokens + m.pending_decode_tokens for m in self.members(pool))

    # -- load ---------------------------------------------------------------------------------

    def update_load(self, machine_id: str, *, pending_prompt_tokens: int, prompt_queue_len: int,
                    pending_decode_tokens: int, kv_blocks_free: int) -> None:
        m = self.get(machine_id)
        m.kv_blocks_free = max(0, min(m.kv_blocks_total, kv_blocks_free))
        self._set_prompt_load(m, pending_prompt_tokens, prompt_queue_len)
        self._set_decode_load(m, pending_decode_tokens)

    def charge_prompt(self, m: Machine, num_tokens: int) -> None:
        self._set_prompt_load(m, m.pending_prompt_tokens + num_tokens, m.prompt_queue_len + 1)

    def credit_prompt(self, machine_id: str, num_tokens: int) -> None:
        m = self.machines.get(machine_id)
        if m is None:
            return
        pending, queue_len = max(0, m.pending_prompt_tokens - num_tokens), max(0, m.prompt_queue_len - 1)
        if not (pending and queue_len):
            # Credits racing a load report can empty one and not the other; pending tokens are
            # the queued prompts' tokens, so either empty means both (the router relies on it).
            pending = queue_len = 0
        self._set_prompt_load(m, pending, queue_len)

    def charge_decode(self, m: Machine, num_tokens: int, num_blocks: int) -> None:
        m.kv_blocks_free = max(0, m.kv_blocks_free - num_blocks)
        self._set_decode_load(m, m.pending_decode_tokens + num_tokens)

    def credit_decode(self, machine_id: str, num_tokens: int, num_blocks: int = 0) -> None:
        m = self.machines.get(machine_id)
        if m is None:
            return
        m.kv_blocks_free = min(m.kv_blocks_total, m.kv_blocks_free + num_blocks)
        self._set_decode_load(m, max(0, m.pending_decode_tokens - num_tokens))

    # -- JSQ lookups (O(log n)) ---------------------------------------------------------------

    def least_prompt_loaded(self, pool: Role) -> Machine | None:
        idx = self._by_prompt[pool]
        return self.machines[idx[0][1]] if idx else None

    def by_prompt_load(self, pool: Role):
        """Machines of `pool`, fewest pending prompt tokens first (a lazy iterator)."""
        for _, machine_id in self._by_prompt[pool]:
            yield self.machines[machine_id]

    def by_decode_load(self, pool: Role):
        """Machines of `pool`, least pending decode work first (a lazy iterator)."""
        for _, machine_id in self._by_decode[pool]:
            yield self.machines[machine_id]

    def by_total_load(self, pool: Role):
        """Machines of `pool`, fewest pending prompt + decode tokens first (a lazy iterator)."""
        for _, machine_id in self._by_total[pool]:
            yield self.machines[machine_id]

    # -- borrowing, resizing, draining --------------------------------------------------------

    def borrow(self, machine_id: str) -> PoolMove:
        m = self.get(machine_id)
        if m.role == Role.MIXED:
            raise PoolError(f"machine {machine_id!r} is already in the mixed pool")
        move = self._move(m, Role.MIXED)
        self.num_borrowed += 1
        return move

    def return_idle(self, machine_id: str | None = None) -> list[PoolMove]:
        """Mixed machines with no work of the other kind go home (one machine, or all)."""
        ids = [machine_id] if machine_id is not None else list(self._mixed_ids())
        moves = []
        for mid in ids:
            m = self.machines.get(mid)
            if m is None or m.role != Role.MIXED:
                continue
            other_work = (m.pending_prompt_tokens or m.prompt_queue_len) if m.home == Role.TOKEN \
                else m.pending_decode_tokens
            if not other_work:
                moves.append(self._move(m, m.home))
                self.num_returned += 1
        return moves

    def resize(self, num_prompt: int | None = None, num_token: int | None = None) -> list[PoolMove]:
        """Sets home-pool sizes; returns the moves (empty when already there)."""
        total = len(self.machines)
        if num_prompt is None and num_token is None:
            raise PoolError("resize needs num_prompt or num_token")
        num_prompt = total - num_token if num_prompt is None else num_prompt
        num_token = total - num_prompt if num_token is None else num_token
        if num_prompt < 0 or num_token < 0 or num_prompt + num_token != total:
            raise PoolError(f"pool sizes must be non-negative and sum to the {total} registered "
                            f"machines, got prompt={num_prompt} token={num_token}")
        homes = {p: [m for m in self.machines.values() if m.home == p] for p in (Role.PROMPT, Role.TOKEN)}
        surplus = len(homes[Role.PROMPT]) - num_prompt
        if surplus == 0:
            return []
        src, dst = (Role.PROMPT, Role.TOKEN) if surplus > 0 else (Role.TOKEN, Role.PROMPT)
        # The machines holding the least work of the role they leave move first.
        key = (lambda m: (m.pending_prompt_tokens, m.machine_id)) if src == Role.PROMPT \
            else (lambda m: (m.pending_decode_tokens, m.machine_id))
        moves = []
        for m in sorted(homes[src], key=key)[:abs(surplus)]:
            m.home = dst
            if m.role != Role.MIXED:  # a borrowed machine returns to its new home when idle
                moves.append(self._move(m, dst))
            else:
                moves.append(PoolMove(m.machine_id, src, dst))
        return moves

    def set_draining(self, machine_id: str, draining: bool) -> Machine:
        m = self.get(machine_id)
        if m.draining != draining:
            self._unindex(m)
            m.draining = draining
            self._index(m)
        return m

    # -- internals ----------------------------------------------------------------------------

    def _mixed_ids(self):
        return [m.machine_id for m in self.machines.values() if m.role == Role.MIXED]

    def _move(self, m: Machine, to: Role) -> PoolMove:
        move = PoolMove(m.machine_id, m.role, to)
        self._unindex(m)
        m.role = to
        self._index(m)
        return move

    # Charges and credits change one measure: only that sorted list is touched.
    def _set_prompt_load(self, m: Machine, pending: int, queue_len: int) -> None:
        if not m.draining and pending != m.pending_prompt_tokens:
            idx = self._by_prompt[m.role]
            idx.remove((m.pending_prompt_tokens, m.machine_id))
            idx.add((pending, m.machine_id))
            self._set_total(m, pending + m.pending_decode_tokens)
        m.pending_prompt_tokens, m.prompt_queue_len = pending, queue_len

    def _set_decode_load(self, m: Machine, pending: int) -> None:
        if not m.draining and pending != m.pending_decode_tokens:
            idx = self._by_decode[m.role]
            idx.remove((m.pending_decode_tokens, m.machine_id))
            idx.add((pending, m.machine_id))
            self._set_total(m, m.pending_prompt_tokens + pending)
        m.pending_decode_tokens = pending

    def _set_total(self, m: Machine, total: int) -> None:
        idx = self._by_total[m.role]
        idx.remove((m.pending_prompt_tokens + m.pending_decode_tokens, m.machine_id))
        idx.add((total, m.machine_id))

    def _index(self, m: Machine) -> None:
        if not m.draining:
            self._by_prompt[m.role].add((m.pending_prompt_tokens, m.machine_id))
            self._by_decode[m.role].add((m.pending_decode_tokens, m.machine_id))
            self._by_total[m.role].add((m.pending_prompt_tokens + m.pending_decode_tokens, m.machine_id))

    def _unindex(self, m: Machine) -> None:
        if not m.draining:
            self._by_prompt[m.role].remove((m.pending_prompt_tokens, m.machine_id))
            self._by_decode[m.role].remove((m.pending_decode_tokens, m.machine_id))
            self._by_total[m.role].remove((m.pending_prompt_tokens + m.pending_decode_tokens,
                                           m.machine_id))
