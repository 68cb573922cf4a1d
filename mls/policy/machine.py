"""One machine's scheduler: the three work policies over one KV budget, one plan per turn.

Every machine takes three kinds of work (`WorkKind`): prompt work (prefill here, the KV leaves for
a token machine), token work (the KV arrives from a prompt machine, decode here) and mixed work
(both phases here). `MachineScheduler` composes the PromptScheduler, the TokenScheduler and the
MixedScheduler into "what runs next", the way vLLM v1's `schedule()` / `update_from_output()` do;
mlsd's engine worker and the cluster simulator both call it, so a daemon and its simulation make
the same choices. Life cycle of a turn:
1. `add(kind, job)` queues a request with its policy (bounded: `QueueFull`; larger than the
   machine's whole KV memory: `ValueError`). `release(request_id)` frees it in any state.
2. `plan(free_blocks)` returns a `TurnPlan`, in this order: token work admitted FCFS while its
   blocks (prompt + max output) are free (reserve, then accept the KV); one prompt batch FCFS
   under the prompt token cap and the engine's free blocks (they come back in the same turn, once
   the KV has left); then the mixed work: either whole prompts to prefill (`prompt_first`), or
   prompt chunks that share the turn's one engine step with every decode (`chunked`); and the
   decodes: every request whose KV is here, token work first, then mixed work. A prompt_first plan
   runs its prefill before the one decode call; a chunked plan is one engine step.
3. The caller runs the plan (an engine runner, or a latency model in virtual time) and hands back
   a `TurnResult`: which requests got a token, which finished or failed, whose KV arrived.
   `update(result)` moves the counters and frees the blocks of what ended.
4. `load()` is the machine's load report (the cluster router's JSQ measures), `runnable()`
   whether a turn would do engine work now.
Pure: no I/O, no clock, no torch.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from mls.policy.common import BlockBudget, Job, blocks_for_tokens
from mls.policy.mixed import DEFAULT_MAX_NUM_BATCHED_TOKENS, MixedScheduler, PromptChunk
from mls.policy.prompt import PromptScheduler
from mls.policy.token import TokenScheduler


class WorkKind(enum.IntEnum):
    """What a machine does with a request; the names are the pools' (a machine of any role takes
    every kind)."""
    PROMPT = 1
    """Prefill here; the KV leaves, layer by layer, for the token machine (RPC Prefill)."""
    TOKEN = 2
    """The KV arrives from the prompt machine; decode here (RPC AddDecode)."""
    MIXED = 3
    """Prefill and decode here, no KV transfer (RPC Generate: colocated work)."""

    @property
    def label(self) -> str:
        """The metric label and log word."""
        return self.name.lower()


@dataclass(frozen=True)
class TurnPlan:
    """What one turn of a machine runs, in this order."""
    admitted: tuple[Job, ...] = ()
    """Token work admitted now: reserve its blocks and accept its KV."""
    prompt_batch: tuple[Job, ...] = ()
    """Prompt work: one prefill with per-layer KV export; its blocks are freed in the same turn."""
    prefill: tuple[Job, ...] = ()
    """Mixed work, prompt_first: whole prompts prefilled here (their blocks stay reserved)."""
    chunks: tuple[PromptChunk, ...] = ()
    """Mixed work, chunked: prompt chunks in the same engine step as `decode`; a chunk with start
    0 was admitted now (reserve its blocks first)."""
    decode: tuple[str, ...] = ()
    """Requests that decode one token: token work first, then mixed work."""
    chunked: bool = False
    """One mixed engine step (decode + chunks) rather than a prefill followed by a decode."""

    @property
    def has_engine_work(self) -> bool:
        return bool(self.prompt_batch or self.prefill or self.chunks or self.decode)

    def summary(self) -> tuple:
        """The plan by request ids only (what two runs of the same arrivals must agree on)."""
        return (tuple(j.request_id for j in self.admitted),
                tuple(j.request_id for j in self.prompt_batch),
                tuple(j.request_id for j in self.prefill),
                tuple((c.job.request_id, c.start, c.num_tokens) for c in self.chunks),
                self.decode)


@dataclass
class TurnResult:
    """What happened to the machine's requests since the last update."""
    kv_ready: list[str] = field(default_factory=list)
    """Token work whose KV has arrived: it decodes from the next plan on. Its first token (made
    by the prompt machine) counts as generated here."""
    generated: list[str] = field(default_factory=list)
    """Requests that got one token (a decode, or the first token of a mixed prompt)."""
    finished: list[str] = field(default_factory=list)
    """Ended by stop or length: their blocks come back (after `generated` is counted)."""
    failed: list[str] = field(default_factory=list)
    """Ended otherwise (failed transfer or step, aborted): their blocks come back."""
    errors: dict[str, str] = field(default_factory=dict)
    """Why each of `failed` failed (for the request's FAILED event; the policies ignore it)."""
    reserved: list[str] = field(default_factory=list)
    """Token work whose blocks the engine now holds (for the RESERVED event)."""
    sent: list[str] = field(default_factory=list)
    """Prompt work whose KV has left (or failed to): the machine forgets it."""


@dataclass(frozen=True)
class MachineLoad:
    """The policies' part of a machine's load report."""
    prompt_queue_len: int
    pending_prompt_tokens: int
    decode_queue_len: int
    num_running: int
    pending_decode_tokens: int


class MachineScheduler:
    def __init__(self, num_blocks: int, block_size: int, *, prompt_token_cap: int = 2048,
                 max_num_seqs: int = 256, max_queue_len: int = 4096,
                 mixed_policy: str = "prompt_first",
                 max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.budget = BlockBudget(num_blocks)  # one KV pool: token and mixed work share it
        self.prompt = PromptScheduler(prompt_token_cap, max_queue_len)
        self.token = TokenScheduler(num_blocks, block_size, max_num_seqs, max_queue_len,
                                    budget=self.budget)
        self.mixed = MixedScheduler(num_blocks, block_size, prompt_token_cap, max_num_seqs,
                                    max_queue_len, budget=self.budget, policy=mixed_policy,
                                    max_num_batched_tokens=max_num_batched_tokens)
        self._kind: dict[str, WorkKind] = {}

    @property
    def chunked(self) -> bool:
        return self.mixed.chunked

    def kind_of(self, request_id: str) -> WorkKind | None:
        return self._kind.get(request_id)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._kind

    # -- arrivals and departures ----------------------------------------------------------------

    def add(self, kind: WorkKind, job: Job) -> None:
        """Queues `job` as `kind` work. Raises QueueFull (the queue's bound) or ValueError (the
        request can never fit this machine's KV memory, or its id is here already)."""
        if job.request_id in self._kind:
            raise ValueError(f"request {job.request_id!r} is already on this machine")
        if kind is WorkKind.PROMPT:
            need = blocks_for_tokens(job.prompt_len, self.block_size)
            if need > self.num_blocks:
                raise ValueError(f"prompt of {job.prompt_len} tokens needs {need} KV blocks; this "
                                 f"machine has {self.num_blocks}")
            self.prompt.add(job)
        elif kind is WorkKind.TOKEN:
            self.token.add(job)
        else:
            self.mixed.add(job)
        self._kind[job.request_id] = kind

    def release(self, request_id: str) -> None:
        """Finished, aborted or failed, in any state: its queue slot and blocks come back. Unknown
        ids are ignored."""
        kind = self._kind.pop(request_id, None)
        if kind is WorkKind.PROMPT:
            self.prompt.remove(request_id)
        elif kind is WorkKind.TOKEN:
            self.token.release(request_id)
        elif kind is WorkKind.MIXED:
            self.mixed.release(request_id)

    # -- the turn -------------------------------------------------------------------------------

    def admit(self) -> tuple[Job, ...]:
        """Token work admitted FCFS while memory allows (the first part of every plan; the
        simulator also calls it between turns, where clsd's reservation would land)."""
        return tuple(self.token.schedule().admitted)

    def plan(self, free_blocks: int | None = None) -> TurnPlan:
        """The next turn. `free_blocks`: the engine's free KV blocks at the start of the turn,
        which bound the prompt batch (after this plan's token admissions take theirs); None: the
        prompt batch is bounded by the token cap only (the simulator, which does not hold a
        prompt's transient blocks)."""
        admitted = self.admit()
        if free_blocks is not None:
            free_blocks = max(0, free_blocks - sum(self.token.blocks_needed(j) for j in admitted))
        batch = self.prompt.schedule(free_blocks, self.block_size)
        prompt_batch = tuple(batch.jobs) if batch is not None else ()
        for job in prompt_batch:  # prompt work leaves this scheduler once it runs
            del self._kind[job.request_id]
        token_decode = tuple(self.token.ready)
        if self.chunked:
            mp = self.mixed.schedule(num_other_decodes=len(token_decode))
            return TurnPlan(admitted, prompt_batch, (), tuple(mp.chunks),
                            token_decode + tuple(mp.decode), chunked=True)
        mp = self.mixed.schedule()
        return TurnPlan(admitted, prompt_batch, tuple(mp.prefill), (),
                        token_decode + tuple(mp.decode))

    def update(self, result: TurnResult) -> None:
        token_ready, mixed_running = self.token.ready, self.mixed.running
        for rid in result.kv_ready:
            self.token.kv_ready(rid)
            token_ready[rid].num_generated += 1  # the prompt machine's first token
        # The hot path of a large simulation: one dict lookup per token where one kind decodes.
        jobs = mixed_running if not token_ready else token_ready if not mixed_running else None
        if jobs is not None:
            for rid in result.generated:
                jobs[rid].num_generated += 1
        else:
            for rid in result.generated:
                (token_ready.get(rid) or mixed_running[rid]).num_generated += 1
        for rid in result.finished:
            self.release(rid)
        for rid in result.failed:
            self.release(rid)

    # -- what the machine reports -----------------------------------------------------------------

    def runnable(self, free_blocks: int | None = None) -> bool:
        """Whether `plan(free_blocks)` now would do engine work or admit token work. Work that
        waits for memory waits for the turn or the command that frees it, rather than spinning."""
        tp, mp = self.token, self.mixed
        return (bool(tp.ready) or bool(mp.running) or tp.can_admit() or mp.can_start()
                or self.prompt.can_start(free_blocks, self.block_size))

    def load(self) -> MachineLoad:
        tp, mp = self.token, self.mixed
        return MachineLoad(
            prompt_queue_len=len(self.prompt.queue) + len(mp.queue) + len(mp.prefilling),
            pending_prompt_tokens=self.prompt.pending_tokens + mp.pending_prompt_tokens,
            decode_queue_len=len(tp.queue),
            num_running=len(tp.ready) + len(tp.receiving) + len(mp.running) + len(mp.prefilling),
            pending_decode_tokens=tp.pending_tokens + mp.pending_decode_tokens,
        )

    def is_prefilling(self, request_id: str) -> bool:
        """Mixed work whose prompt is partly computed (chunked)."""
        return request_id in self.mixed.prefilling
