"""A discrete-event cluster simulator in virtual time that drives the daemons' own policy objects.

The router (`cls.router.Router` over `cls.pools.Pools`) and, per machine, the machine policies
(`PromptScheduler`, `TokenScheduler`, `MixedScheduler` over one shared `BlockBudget`) are the very
objects clsd and mlsd run; only the clock and the engine are modelled (an `engine.modelled`
latency model gives each step's time, `kv_transfer_s` the KV transfer's). Life cycle of a request:
1. Arrival: the router picks and charges a (prompt, token) machine pair.
2. Disaggregated: the token machine's TokenScheduler queues it and admits it when its KV blocks
   (prompt + max output) are free; only then does the prompt go to the prompt machine's
   PromptScheduler (clsd sends Prefill after the token machine reserved, as here).
   Colocated: the machine's MixedScheduler queues it and prefills it when its blocks are free.
3. Prefill step ends: the router is credited the prompt (the prompt machine may return home);
   disaggregated, the first token exists once the KV has arrived (`kv_transfer_s` after the
   prefill's end), and the request joins the token machine's decode batch.
4. Each decode step gives every running request one token; the router is credited the step's
   tokens at once (what per-token credits would leave before the next decision).
5. Finish (output_len tokens): the blocks go back, the router is credited the request's blocks
   (the token machine may return home), and queued requests may be admitted.
A machine runs one step at a time: a prefill batch if it has prompts (prompts first, as the mixed
policy does), otherwise one decode step over all its running requests. A machine whose mixed
policy is chunked runs one step of all its decodes plus prompt chunks under the token budget
(its prompt-machine work, when it has some, still runs first as whole prefills).
"""

from __future__ import annotations

import heapq
from array import array
from collections.abc import Callable
from dataclasses import dataclass

from cls.pools import Pool, PoolMove, Pools
from cls.router import NoMachine, Router
from cls.sim_result import RequestRecord, SimResult
from cls.traces import Arrival
from engine.modelled import LINKS, LatencyModel, ModelShape, kv_transfer_s
from mls.policy import BlockBudget, Job, MixedScheduler, PromptScheduler, TokenScheduler

_UNBOUNDED_QUEUE = 1 << 40  # the simulator measures queueing; it never turns requests away
_ARRIVAL, _STEP_DONE, _KV_READY = 0, 1, 2


@dataclass(frozen=True)
class ClusterDesign:
    num_prompt: int
    num_token: int
    kv_blocks_per_machine: int
    block_size: int = 16
    prompt_token_cap: int = 2048
    prompt_queue_limit_tokens: int = 8192
    max_model_len: int = 1 << 20
    max_batch_size: int = 256
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
    """One simulated machine: the mlsd policies over one KV pool, and the step it runs."""

    def __init__(self, machine_id: str, d: ClusterDesign):
        self.machine_id = machine_id
        budget = BlockBudget(d.kv_blocks_per_machine)
        self.prompt = PromptScheduler(d.prompt_token_cap, max_queue_len=_UNBOUNDED_QUEUE)
        self.token = TokenScheduler(d.kv_blocks_per_machine, d.block_size, d.max_batch_size,
                                    _UNBOUNDED_QUEUE, budget)
        self.mixed = MixedScheduler(d.kv_blocks_per_machine, d.block_size, d.prompt_token_cap,
                                    d.max_batch_size, _UNBOUNDED_QUEUE, budget, d.mixed_policy,
                                    d.max_num_batched_tokens)
        self.busy = False
        self.busy_s = 0.0


@dataclass(frozen=True)
class _Step:
    """What a machine runs now: prefill of `prefill` (from the prompt or the mixed policy) or one
    decode token for each of `decode_token` + `decode_mixed`."""
    prefill: list[Job]
    mixed_prefill: bool
    decode_token: list[str]
    decode_mixed: list[str]
    duration_s: float
    chunks_done: list[Job] = ()
    """chunked: prompts whose last chunk ran in this step (their first token comes with it)."""


class Simulator:
    def __init__(self, design: ClusterDesign, latency_model: LatencyModel, seed: int = 0,
                 keep_token_times: bool = True):
        """`seed` is kept for randomized policies to come; today every step is deterministic.
        `keep_token_times` keeps every token's time per request (tests); at scale only each
        request's first/last token and the global list of token gaps are kept."""
        self.design, self.latency, self.seed = design, latency_model, seed
        self.keep_token_times = keep_token_times

    def run(self, arrivals: list[Arrival],
            progress: Callable[[int], None] | None = None) -> SimResult:
        """Replays `arrivals` (sorted by time here) to the end of the last request. `progress`
        is called with the number of arrivals routed so far, now and then."""
        d = self.design
        self.pools = Pools()
        self.router = Router(self.pools, d.prompt_queue_limit_tokens, colocated=d.colocated)
        self.machines: dict[str, _Machine] = {}
        for home, n in ((Pool.PROMPT, d.num_prompt), (Pool.TOKEN, d.num_token)):
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
            elif kind == _STEP_DONE:
                self._step_done(*payload)
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
            m.mixed.add(job)
        else:
            m.token.add(job)
            self._admit(m)
        self._kick(m)

    def _admit(self, m: _Machine) -> None:
        """Admits what the token machine's memory allows; their prompts go to prefill."""
        for job in m.token.schedule().admitted:
            pm = self.machines[self.records[job.request_id].prompt_machine]
            pm.prompt.add(Job(job.request_id, job.prompt_len, job.max_tokens, job.arrival_s))
            self._kick(pm)

    def _kick(self, m: _Machine) -> None:
        if m.busy:
            return
        step = self._schedule(m)
        if step is not None:
            m.busy = True
            m.busy_s += step.duration_s
            self._push(self.now + step.duration_s, _STEP_DONE, (m, step))

    def _schedule(self, m: _Machine) -> _Step | None:
        """Prompts first (the prompt policy's, then the mixed policy's), else one decode step."""
        batch = m.prompt.schedule()
        if batch is not None:
            return _Step(batch.jobs, False, [], [],
                         self.latency.prefill_s(batch.num_tokens, len(batch.jobs)))
        if m.mixed.chunked:
            return self._schedule_chunked(m)
        plan = m.mixed.schedule()
        if plan.prefill:
            return _Step(plan.prefill, True, [], [], self.latency.prefill_s(
                sum(j.prompt_len for j in plan.prefill), len(plan.prefill)))
        decode_token = list(m.token.ready)
        jobs = [m.token.ready[r] for r in decode_token] + [m.mixed.running[r] for r in plan.decode]
        if not jobs:
            return None
        context = sum(j.prompt_len + j.num_generated for j in jobs)
        return _Step([], False, decode_token, plan.decode, self.latency.decode_s(len(jobs), context))

    def _schedule_chunked(self, m: _Machine) -> _Step | None:
        """One step of every decode (token and mixed work) plus prompt chunks under the budget."""
        decode_token = list(m.token.ready)
        plan = m.mixed.schedule(num_other_decodes=len(decode_token))
        jobs = [m.token.ready[r] for r in decode_token] + [m.mixed.running[r] for r in plan.decode]
        if not jobs and not plan.chunks:
            return None
        context = sum(j.prompt_len + j.num_generated for j in jobs)
        if plan.chunks:
            duration = self.latency.mixed_s(sum(c.num_tokens for c in plan.chunks), len(plan.chunks),
                                            len(jobs), context)
        else:
            duration = self.latency.decode_s(len(jobs), context)
        return _Step([], False, decode_token, plan.decode, duration,
                     [c.job for c in plan.chunks if c.last])

    def _step_done(self, m: _Machine, step: _Step) -> None:
        finished: list[tuple[TokenScheduler | MixedScheduler, RequestRecord]] = []
        num_tokens = 0
        for job in step.chunks_done:  # the prompt is prefilled: credited, and its first token
            self.pools.credit_prompt(m.machine_id, job.prompt_len)
            num_tokens += self._token(m.mixed, job.request_id, finished)
        for job in step.prefill:
            self.pools.credit_prompt(m.machine_id, job.prompt_len)
            self._return_idle(m.machine_id)
            if step.mixed_prefill:  # colocated: the prefill's token is the first token
                num_tokens += self._token(m.mixed, job.request_id, finished)
            else:
                r = self.records[job.request_id]
                shape = self.design.model_shape
                transfer_s = 0.0 if shape is None else kv_transfer_s(
                    job.prompt_len, shape, self.design.link_bytes_s, self.design.layerwise_transfer,
                    step.duration_s, self.design.tensor_parallel)
                self._push(self.now + transfer_s, _KV_READY, (self.machines[r.token_machine], job))
        num_tokens += self._tokens(m.token, step.decode_token, finished)
        num_tokens += self._tokens(m.mixed, step.decode_mixed, finished)
        # One credit for the step's tokens (all on this machine): the router's state after the
        # event is what per-token credits would leave, at a fraction of the sorted-list updates.
        if num_tokens:
            self.pools.credit_decode(m.machine_id, num_tokens)
        self._finish(finished)
        m.busy = False  # only now: the next step must see every update of this one
        self._kick(m)

    def _kv_ready(self, m: _Machine, job: Job) -> None:
        m.token.kv_ready(job.request_id)
        finished: list = []
        self.pools.credit_decode(m.machine_id, self._token(m.token, job.request_id, finished))
        self._finish(finished)
        self._kick(m)

    # -- request progress -----------------------------------------------------------------------

    def _token(self, policy: TokenScheduler | MixedScheduler, request_id: str,
               finished: list) -> int:
        """One token of `request_id` exists now. Returns 1, the decode work to credit."""
        return self._tokens(policy, (request_id,), finished)

    def _tokens(self, policy: TokenScheduler | MixedScheduler, request_ids, finished: list) -> int:
        """One token for each of `request_ids` exists now (the hot loop: locals, no calls but
        the policy's). Finished requests are appended to `finished`; returns the token count."""
        records, gaps, now, generated = self.records, self.tbt_gaps, self.now, policy.token_generated
        for request_id in request_ids:
            r = records[request_id]
            generated(request_id)
            if r.num_tokens:
                gap = now - r.last_token_s
                gaps.append(gap)
                if gap > r.max_tbt_s:
                    r.max_tbt_s = gap
            else:
                r.first_token_s = now
            r.last_token_s = now
            r.num_tokens += 1
            if r.token_times_s is not None:
                r.token_times_s.append(now)
            if r.num_tokens == r.output_len:
                finished.append((policy, r))
        return len(request_ids)

    def _finish(self, finished: list) -> None:
        """Finished requests give back their blocks; queued requests may be admitted."""
        for policy, r in finished:
            r.finish_s = self.now
            policy.release(r.request_id)
            self.pools.credit_decode(r.token_machine, 0, r.num_blocks)
            self._return_idle(r.token_machine)
            m = self.machines[r.token_machine]
            self._admit(m)
            self._kick(m)

    def _return_idle(self, machine_id: str) -> None:
        if self.pools.get(machine_id).role == Pool.MIXED:
            self.pool_events += [(self.now, move) for move in self.pools.return_idle(machine_id)]
