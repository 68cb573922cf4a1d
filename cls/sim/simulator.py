"""A discrete-event cluster simulator in virtual time that drives the daemons' own policy objects.

The router (`cls.router.Router` over `cls.pools.Pools`) and, per machine, mlsd's
`MachineScheduler` (the prompt, token and mixed policies over one KV budget) are the very objects
clsd and mlsd run; only the clock and the engine are modelled (an `engine.modelled` latency model
gives each engine call's time, `kv_transfer_s` the KV transfer's). Life cycle of a request:
1. Arrival: the router picks and charges a (prompt, token) machine pair.
2. Disaggregated: the token machine queues it as token work and admits it when its KV blocks
   (prompt + max output) are free; then its prompt goes to the prompt machine as prompt work
   (clsd starts the prefill with the reservation when the token machine has the memory).
   Colocated: the machine queues it as mixed work.
3. A machine runs one turn at a time, the turn its MachineScheduler plans, as mlsd's worker does:
   the prompt batch, then (prompt_first) the mixed prefill and one decode call, or (chunked) one
   step of every decode plus prompt chunks; the turn takes the sum of its engine calls.
4. The prompt batch's end: the router is credited the prompts (the machine may return home) and
   each KV arrives `kv_transfer_s` later; the first token exists then, and the request joins the
   token machine's decodes.
5. The turn's end: every decode (and every prompt completed here) has one more token; the router
   is credited the turn's tokens at once (what per-token credits would leave before the next
   decision); `MachineScheduler.update` takes the turn's result.
6. Finish (output_len tokens): the blocks go back, the router is credited the request's blocks
   (the token machine may return home), and queued token work may be admitted.
"""

from __future__ import annotations

import heapq
from array import array
from collections.abc import Callable
from dataclasses import dataclass

from cls.ledger import Ledger
from cls.pools import PoolMove, Pools
from cls.router import NoMachine, Router
from cls.sim.result import RequestRecord, SimResult
from cls.sim.traces import Arrival
from engine.modelled import LINKS, LatencyModel, ModelShape, kv_transfer_s
from mls.policy import Job, MachineScheduler, TurnPlan, TurnResult, WorkKind
from proto.roles import Role

_UNBOUNDED_QUEUE = 1 << 40  # the simulator measures queueing; it never turns requests away
_ARRIVAL, _PROMPT_DONE, _TURN_DONE, _KV_READY = 0, 1, 2, 3


@dataclass(frozen=True)
class ClusterDesign:
    num_prompt: int
    num_token: int
    kv_blocks_per_machine: int
    block_size: int = 16
    prompt_token_cap: int = 2048
    prompt_queue_limit_tokens: int = 8192
    max_model_len: int = 1 << 20
    max_num_seqs: int = 256
    model_shape: ModelShape | None = None
    """For the KV transfer time; None: transfers take no time."""
    link_bytes_s: float = LINKS["infiniband-400g"]
    layerwise_transfer: bool = True
    tensor_parallel: int = 1
    colocated: bool = False
    """Every machine runs both phases of each request it gets (the colocated baseline: the
    router's colocated mode, the machine's mixed policy, no KV transfer)."""
    mixed_policy: str = "prompt_first"
    """The mixed policy's mode: prompt_first, or chunked (chunked prefill under a budget)."""
    max_num_batched_tokens: int = 512
    """chunked: the per-step token budget."""

    def __post_init__(self):
        if self.num_prompt < 0 or self.num_token < 0 or self.num_prompt + self.num_token < 1:
            raise ValueError(f"a design needs at least one machine and no negative pool, got "
                             f"num_prompt={self.num_prompt} num_token={self.num_token}")
        if self.kv_blocks_per_machine < 1 or self.block_size < 1:
            raise ValueError("kv_blocks_per_machine and block_size must be >= 1")

    @property
    def num_machines(self) -> int:
        return self.num_prompt + self.num_token


class _Machine:
    """One simulated machine: mlsd's MachineScheduler (the three policies over one KV pool) and
    whether a turn is running."""

    def __init__(self, machine_id: str, d: ClusterDesign):
        self.machine_id = machine_id
        self.sched = MachineScheduler(
            d.kv_blocks_per_machine, d.block_size, prompt_token_cap=d.prompt_token_cap,
            max_num_seqs=d.max_num_seqs, max_queue_len=_UNBOUNDED_QUEUE,
            mixed_policy=d.mixed_policy, max_num_batched_tokens=d.max_num_batched_tokens)
        self.busy = False
        self.busy_s = 0.0


@dataclass(frozen=True)
class _Turn:
    """A planned turn in virtual time: its engine calls run back to back from `start_s`."""
    plan: TurnPlan
    start_s: float
    prompt_s: float
    """The prompt batch's prefill (prompt work; first in the turn)."""
    prefill_s: float
    """prompt_first: the mixed work's prefill (after the prompt batch)."""
    step_s: float
    """The decode call (prompt_first), or the one mixed step of decodes and chunks (chunked)."""

    @property
    def duration_s(self) -> float:
        return self.prompt_s + self.prefill_s + self.step_s

    @property
    def prompt_batch_alone(self) -> bool:
        """The turn is only a prompt batch: its end is the prompt batch's end (one event)."""
        p = self.plan
        return not (p.prefill or p.chunks or p.decode)


class Simulator:
    def __init__(self, design: ClusterDesign, latency_model: LatencyModel, seed: int = 0,
                 keep_token_times: bool = True,
                 on_plan: Callable[[str, float, TurnPlan], None] | None = None):
        """`seed` is kept for randomized policies to come; today every step is deterministic.
        `keep_token_times` keeps every token's time per request (tests); at scale only each
        request's first/last token and the global list of token gaps are kept. `on_plan(machine_id,
        now_s, plan)` sees every plan a machine makes (tests compare them with mlsd's)."""
        self.design, self.latency, self.seed = design, latency_model, seed
        self.keep_token_times, self.on_plan = keep_token_times, on_plan

    def run(self, arrivals: list[Arrival],
            progress: Callable[[int], None] | None = None) -> SimResult:
        """Replays `arrivals` (sorted by time here) to the end of the last request. `progress`
        is called with the number of arrivals routed so far, now and then."""
        d = self.design
        self.pools = Pools()
        self.router = Router(self.pools, d.prompt_queue_limit_tokens, colocated=d.colocated)
        self.ledger = Ledger(self.pools, on_move=lambda move: self.pool_events.append((self.now, move)))
        self.machines: dict[str, _Machine] = {}
        for home, n in ((Role.PROMPT, d.num_prompt), (Role.TOKEN, d.num_token)):
            for i in range(n):
                mid = f"{home}-{i}"
                self.pools.add(mid, home, d.kv_blocks_per_machine, d.block_size, d.max_model_len)
                self.machines[mid] = _Machine(mid, d)
        initial_roles = {mid: m.role for mid, m in self.pools.machines.items()}
        self.records: dict[str, RequestRecord] = {}
        self.rejected: list[str] = []
        self.pool_events: list[tuple[float, PoolMove]] = []
        self.tbt_gaps = array("d")
        self._events: list[tuple] = []
        self._seq = 0
        self.now = 0.0
        for i, a in enumerate(sorted(arrivals, key=lambda a: a.arrival_s)):
            self._push(a.arrival_s, _ARRIVAL, (f"r{i}", a))
        num_arrived = 0
        while self._events:  # the event loop: pop -> update -> schedule the next steps
            self.now, _, kind, payload = heapq.heappop(self._events)
            if kind == _ARRIVAL:
                self._arrive(*payload)
                num_arrived += 1
                if progress is not None and num_arrived % 1000 == 0:
                    progress(num_arrived)
            elif kind == _TURN_DONE:
                self._turn_done(*payload)
            elif kind == _PROMPT_DONE:
                self._prompt_done(*payload)
            else:
                self._kv_ready(*payload)
        if progress is not None:
            progress(num_arrived)
        return SimResult(list(self.records.values()), self.rejected, self.pool_events, self.now,
                         self.tbt_gaps, {mid: m.busy_s for mid, m in self.machines.items()},
                         initial_roles)

    # -- events ---------------------------------------------------------------------------------

    def _push(self, at_s: float, kind: int, payload: tuple) -> None:
        self._seq += 1  # ties resolve in push order: deterministic
        heapq.heappush(self._events, (at_s, self._seq, kind, payload))

    def _arrive(self, request_id: str, a: Arrival) -> None:
        try:
            route = self.router.route(a.prompt_len, a.output_len)
        except NoMachine:
            self.rejected.append(request_id)
            return
        self.pool_events += [(self.now, move) for move in route.borrowed]
        self.records[request_id] = RequestRecord(
            request_id, a.arrival_s, a.prompt_len, a.output_len, route.prompt_machine,
            route.token_machine, route.num_blocks, route.colocated,
            [] if self.keep_token_times else None)
        job = Job(request_id, a.prompt_len, a.output_len, arrival_s=a.arrival_s)
        m = self.machines[route.token_machine]
        if route.colocated:
            m.sched.add(WorkKind.MIXED, job)
        else:
            m.sched.add(WorkKind.TOKEN, job)
            self._send_prompts(m.sched.admit())
        self._kick(m)

    def _send_prompts(self, admitted) -> None:
        """Token work reserved on its token machine: its prompt goes to its prompt machine (clsd
        starts the prefill once the token machine has the memory)."""
        for job in admitted:
            pm = self.machines[self.records[job.request_id].prompt_machine]
            pm.sched.add(WorkKind.PROMPT, Job(job.request_id, job.prompt_len, job.max_tokens,
                                              job.arrival_s))
            self._kick(pm)

    def _kick(self, m: _Machine) -> None:
        """Plans and starts m's next turn, unless one is running or there is nothing to run."""
        if m.busy:
            return
        plan = m.sched.plan()
        if self.on_plan is not None:
            self.on_plan(m.machine_id, self.now, plan)
        self._send_prompts(plan.admitted)
        if not plan.has_engine_work:
            return
        turn = self._time(plan)
        m.busy = True
        m.busy_s += turn.duration_s
        if plan.prompt_batch and not turn.prompt_batch_alone:  # the KV leaves mid-turn
            self._push(self.now + turn.prompt_s, _PROMPT_DONE, (m, turn))
        self._push(self.now + turn.duration_s, _TURN_DONE, (m, turn))

    def _time(self, plan: TurnPlan) -> _Turn:
        """How long each engine call of the plan takes on the modelled machine."""
        lat = self.latency
        prompt_s = prefill_s = step_s = 0.0
        if plan.prompt_batch:
            prompt_s = lat.prefill_s(sum(j.prompt_len for j in plan.prompt_batch), len(plan.prompt_batch))
        if plan.prefill:
            prefill_s = lat.prefill_s(sum(j.prompt_len for j in plan.prefill), len(plan.prefill))
        if plan.decode or plan.chunks:
            records = self.records
            context = 0
            for rid in plan.decode:
                r = records[rid]
                context += r.prompt_len + r.num_tokens
            if plan.chunks:
                step_s = lat.mixed_s(sum(c.num_tokens for c in plan.chunks), len(plan.chunks),
                                     len(plan.decode), context)
            else:
                step_s = lat.decode_s(len(plan.decode), context)
        return _Turn(plan, self.now, prompt_s, prefill_s, step_s)

    def _prompt_done(self, m: _Machine, turn: _Turn) -> None:
        """The prompt batch's prefill ended: its prompts are credited, its KV is on the way."""
        for job in turn.plan.prompt_batch:
            self.ledger.prompt_done(m.machine_id, job.prompt_len)
            r = self.records[job.request_id]
            shape = self.design.model_shape
            transfer_s = 0.0 if shape is None else kv_transfer_s(
                job.prompt_len, shape, self.design.link_bytes_s, self.design.layerwise_transfer,
                turn.prompt_s, self.design.tensor_parallel)
            self._push(self.now + transfer_s, _KV_READY, (self.machines[r.token_machine], job))

    def _turn_done(self, m: _Machine, turn: _Turn) -> None:
        plan = turn.plan
        if turn.prompt_batch_alone:
            self._prompt_done(m, turn)
        generated: list[str] = []
        finished: list[RequestRecord] = []
        for c in plan.chunks:  # chunked: a prompt's last chunk makes its first token
            if c.last:
                self.ledger.prompt_done(m.machine_id, c.job.prompt_len)
                self._tokens((c.job.request_id,), self.now, generated, finished)
        if plan.prefill:  # prompt_first: the prefill's token is the first token
            for job in plan.prefill:
                self.ledger.prompt_done(m.machine_id, job.prompt_len)
            self._tokens([j.request_id for j in plan.prefill],
                         turn.start_s + turn.prompt_s + turn.prefill_s, generated, finished)
        self._tokens(plan.decode, self.now, generated, finished)
        # One credit for the turn's tokens (all on this machine): the router's state after the
        # event is what per-token credits would leave, at a fraction of the sorted-list updates.
        self.ledger.tokens_done(m.machine_id, len(generated))
        m.sched.update(TurnResult(generated=generated, finished=[r.request_id for r in finished]))
        self._finish(finished)
        m.busy = False  # only now: the next turn must see every update of this one
        self._kick(m)

    def _kv_ready(self, m: _Machine, job: Job) -> None:
        finished: list[RequestRecord] = []
        self._tokens((job.request_id,), self.now, [], finished)  # the prefill's first token
        m.sched.update(TurnResult(kv_ready=[job.request_id],
                                  finished=[r.request_id for r in finished]))
        self.ledger.tokens_done(m.machine_id, 1)
        self._finish(finished)
        self._kick(m)

    # -- request progress -----------------------------------------------------------------------

    def _tokens(self, request_ids, at_s: float, generated: list[str],
                finished: list[RequestRecord]) -> None:
        """One token for each of `request_ids` exists at `at_s` (the hot loop: locals, no calls).
        Ids go to `generated`; records that reach their output length to `finished`."""
        records, gaps = self.records, self.tbt_gaps
        for request_id in request_ids:
            r = records[request_id]
            if r.num_tokens:
                gap = at_s - r.last_token_s
                gaps.append(gap)
                if gap > r.max_tbt_s:
                    r.max_tbt_s = gap
            else:
                r.first_token_s = at_s
            r.last_token_s = at_s
            r.num_tokens += 1
            if r.token_times_s is not None:
                r.token_times_s.append(at_s)
            if r.num_tokens == r.output_len:
                finished.append(r)
        generated.extend(request_ids)

    def _finish(self, finished: list[RequestRecord]) -> None:
        """Finished requests (released by the machine's update) are credited their blocks; queued
        token work may be admitted."""
        for r in finished:
            r.finish_s = self.now
            self.ledger.request_done(r.token_machine, r.num_blocks)
            m = self.machines[r.token_machine]
            self._send_prompts(m.sched.admit())
            self._kick(m)
