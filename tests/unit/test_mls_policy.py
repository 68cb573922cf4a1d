"""The pure machine-level policies: prompt batching, token batching by memory, mixed."""

from __future__ import annotations

import random

import pytest

from mls.policy import BlockBudget, Job, MixedPlan, MixedScheduler, PromptScheduler, QueueFull, TokenScheduler


def job(i: int, prompt_len: int, max_tokens: int = 8) -> Job:
    return Job(f"r{i}", prompt_len, max_tokens, arrival_s=float(i))


def test_prompt_batches_are_fcfs_and_never_exceed_the_cap():
    rng = random.Random(0)
    sched = PromptScheduler(prompt_token_cap=2048)
    lengths = [rng.choice([3, 50, 400, 900, 1500, 2047, 2048, 3000, 5000]) for _ in range(300)]
    for i, n in enumerate(lengths):
        sched.add(job(i, n))
    assert sched.pending_tokens == sum(lengths)
    order = []
    while (batch := sched.schedule()) is not None:
        ids = [j.request_id for j in batch.jobs]
        order += ids
        if len(ids) > 1:
            assert batch.num_tokens <= 2048
        else:  # a prompt longer than the cap runs alone, never with company
            assert batch.num_tokens <= 2048 or len(batch.jobs) == 1
        # greedy: the next prompt would not have fitted
        if sched.queue.peek() is not None and batch.num_tokens <= 2048:
            assert batch.num_tokens + sched.queue.peek().prompt_len > 2048
    assert order == [f"r{i}" for i in range(300)]
    assert sched.pending_tokens == 0


def test_prompt_schedule_respects_free_memory_and_removal():
    sched = PromptScheduler(prompt_token_cap=2048)
    for i, n in enumerate([100, 100, 100]):
        sched.add(job(i, n))
    batch = sched.schedule(free_blocks=14, block_size=16)  # 7 blocks each: two fit
    assert [j.request_id for j in batch.jobs] == ["r0", "r1"]
    assert sched.remove("r2").prompt_len == 100 and sched.pending_tokens == 0
    assert sched.schedule() is None


def test_queues_are_bounded():
    sched = PromptScheduler(max_queue_len=2)
    sched.add(job(0, 5))
    sched.add(job(1, 5))
    with pytest.raises(QueueFull, match="prompt queue is full"):
        sched.add(job(2, 5))
    with pytest.raises(ValueError, match="already queued"):
        sched.add(job(0, 5))


def test_token_batch_grows_to_fill_memory_then_queues_and_drains():
    sched = TokenScheduler(num_blocks=20, block_size=16, max_num_seqs=64)
    for i in range(10):
        sched.add(job(i, prompt_len=40, max_tokens=24))  # 64 tokens = 4 blocks
    plan = sched.schedule()
    assert [j.request_id for j in plan.admitted] == ["r0", "r1", "r2", "r3", "r4"]
    assert sched.free_blocks == 0 and len(sched.queue) == 5 and plan.decode == []
    for j in plan.admitted:
        sched.kv_ready(j.request_id)
    assert sched.schedule().decode == ["r0", "r1", "r2", "r3", "r4"]
    sched.release("r1")
    plan = sched.schedule()
    assert [j.request_id for j in plan.admitted] == ["r5"]  # FCFS: the head gets the memory
    finished = 0
    while sched.reserved:
        for rid in list(sched.receiving):
            sched.kv_ready(rid)
        rid = next(iter(sched.ready))
        sched.release(rid)
        finished += 1
        sched.schedule()
        assert sched.used_blocks <= sched.num_blocks
    assert finished == 9 and sched.used_blocks == 0 and len(sched.queue) == 0


def test_token_scheduler_rejects_a_request_larger_than_memory():
    sched = TokenScheduler(num_blocks=4, block_size=16)
    with pytest.raises(ValueError, match="needs 5 KV blocks; this machine has 4"):
        sched.add(job(0, prompt_len=70, max_tokens=10))


def test_token_pending_tokens_counts_remaining_decode_work():
    sched = TokenScheduler(num_blocks=100, block_size=16)
    sched.add(job(0, 10, max_tokens=20))
    sched.add(job(1, 10, max_tokens=5))
    sched.schedule()
    sched.kv_ready("r0")
    sched.token_generated("r0", 3)
    assert sched.pending_tokens == 17 + 5


def test_mixed_runs_prompts_first_then_decodes_within_memory():
    sched = MixedScheduler(num_blocks=8, block_size=16, prompt_token_cap=100)
    for i in range(4):
        sched.add(job(i, prompt_len=40, max_tokens=24))  # 4 blocks each
    plan = sched.schedule()
    assert [j.request_id for j in plan.prefill] == ["r0", "r1"]  # cap 100: two prompts of 40
    plan = sched.schedule()
    assert plan.prefill == [] and plan.decode == ["r0", "r1"]  # memory full: decode
    sched.release("r0")
    assert [j.request_id for j in sched.schedule().prefill] == ["r2"]


def test_block_budget_take_and_give_refuse_misuse():
    budget = BlockBudget(10)
    budget.take(7)
    assert (budget.used, budget.free) == (7, 3)
    with pytest.raises(ValueError, match="cannot take 4 KV blocks; 3 of 10 are free"):
        budget.take(4)
    with pytest.raises(ValueError, match="cannot give back 8"):
        budget.give(8)
    with pytest.raises(ValueError):
        budget.take(-1)
    budget.give(7)
    assert (budget.used, budget.free) == (0, 10)
    with pytest.raises(ValueError, match="disagrees with the shared budget"):
        TokenScheduler(num_blocks=11, block_size=16, budget=budget)


def test_token_and_mixed_work_share_one_budget():
    budget = BlockBudget(10)
    token = TokenScheduler(num_blocks=10, block_size=16, budget=budget)
    mixed = MixedScheduler(num_blocks=10, block_size=16, budget=budget)
    token.add(job(0, prompt_len=40, max_tokens=24))  # 4 blocks
    assert [j.request_id for j in token.schedule().admitted] == ["r0"]
    mixed.add(job(1, prompt_len=80, max_tokens=16))  # 6 blocks: the rest
    mixed.add(job(2, prompt_len=8, max_tokens=8))  # 1 block: waits until someone leaves
    assert [j.request_id for j in mixed.schedule().prefill] == ["r1"]
    token.add(job(3, prompt_len=8, max_tokens=8))
    assert budget.free == 0 and not token.can_admit() and not mixed.can_start()
    assert token.schedule().admitted == [] and mixed.schedule() == MixedPlan(prefill=[], decode=["r1"])
    assert (token.used_blocks, mixed.used_blocks) == (4, 6)
    token.release("r0")  # the token request's blocks go to whichever policy asks next
    assert budget.free == 4 and [j.request_id for j in mixed.schedule().prefill] == ["r2"]
    assert [j.request_id for j in token.schedule().admitted] == ["r3"]
    for rid in ("r1", "r2"):
        mixed.release(rid)
    token.release("r3")
    assert budget.used == 0 and token.used_blocks == mixed.used_blocks == 0


def test_token_and_mixed_on_one_budget_never_exceed_it():
    rng = random.Random(7)
    budget = BlockBudget(64)
    token = TokenScheduler(num_blocks=64, block_size=16, budget=budget)
    mixed = MixedScheduler(num_blocks=64, block_size=16, prompt_token_cap=512, budget=budget)
    finished = 0
    for i in range(400):
        policy = rng.choice([token, mixed])
        policy.add(job(i, prompt_len=rng.randint(1, 300), max_tokens=rng.randint(1, 200)))
        for rid in list(token.receiving):
            token.kv_ready(rid)
        token.schedule()
        mixed.schedule()
        assert token.used_blocks + mixed.used_blocks == budget.used <= budget.num_blocks
        for p, running in ((token, token.ready), (mixed, mixed.running)):
            for rid in [r for r in running if rng.random() < 0.3]:
                p.release(rid)
                finished += 1
    while token.reserved or len(token.queue) or mixed.running or len(mixed.queue):
        for rid in list(token.receiving):
            token.kv_ready(rid)
        for rid in [*token.ready, *mixed.running]:
            (token if rid in token.ready else mixed).release(rid)
            finished += 1
        token.schedule()
        mixed.schedule()
        assert budget.used <= budget.num_blocks
    assert finished == 400 and budget.used == 0


# -- chunked prefill (mixed machines, chunked mode) ---------------------------------------------


def chunked(num_blocks: int = 1000, budget: int = 64, **kw) -> MixedScheduler:
    return MixedScheduler(num_blocks=num_blocks, block_size=16, policy="chunked",
                          max_num_batched_tokens=budget, **kw)


def test_prompt_first_stays_the_default_and_bad_modes_are_refused():
    assert MixedScheduler(num_blocks=8, block_size=16).policy == "prompt_first"
    with pytest.raises(ValueError, match="mixed policy must be one of"):
        MixedScheduler(num_blocks=8, block_size=16, policy="sarathi")
    with pytest.raises(ValueError, match="max_num_batched_tokens must be positive"):
        chunked(budget=0)
    with pytest.raises(ValueError, match="num_other_decodes must not be negative"):
        chunked().schedule(-1)


def test_chunked_decodes_keep_running_while_a_long_prompt_is_prefilled_in_chunks():
    sched = chunked(budget=64)
    sched.add(job(0, prompt_len=10, max_tokens=50))
    sched.add(job(1, prompt_len=12, max_tokens=50))
    plan = sched.schedule()  # both short prompts fit one step, whole
    assert [(c.job.request_id, c.start, c.num_tokens, c.last) for c in plan.chunks] == [
        ("r0", 0, 10, True), ("r1", 0, 12, True)] and plan.decode == []
    sched.add(job(2, prompt_len=200, max_tokens=4))
    steps = []
    while "r2" not in sched.running:
        plan = sched.schedule()
        assert plan.decode == ["r0", "r1"] and plan.num_tokens <= 64  # decodes never stall
        steps.append([(c.start, c.num_tokens) for c in plan.chunks])
    assert steps == [[(0, 62)], [(62, 62)], [(124, 62)], [(186, 14)]]
    assert sched.schedule().decode == ["r0", "r1", "r2"]
    assert sched.pending_prompt_tokens == 0


def test_chunked_other_decodes_come_off_the_budget_and_surplus_decodes_take_turns():
    sched = chunked(budget=4)
    for i in range(6):
        sched.add(job(i, prompt_len=1, max_tokens=100))
    plan = sched.schedule(num_other_decodes=1)  # three one-token prompts fill the rest
    assert [c.job.request_id for c in plan.chunks] == ["r0", "r1", "r2"]
    plan = sched.schedule(num_other_decodes=1)
    assert plan.decode == ["r0", "r1", "r2"] and plan.chunks == []  # budget spent on decodes
    sched.schedule(num_other_decodes=4)  # nothing left for this policy
    plan = sched.schedule(num_other_decodes=0)
    assert plan.decode == ["r0", "r1", "r2"] and [c.job.request_id for c in plan.chunks] == ["r3"]
    seen = [sched.schedule(num_other_decodes=2).decode for _ in range(4)]
    assert seen == [["r0", "r1"], ["r2", "r3"], ["r0", "r1"], ["r2", "r3"]]  # round robin


def test_chunked_prompts_wait_for_memory_fcfs_and_release_mid_prompt_returns_blocks():
    budget = BlockBudget(10)
    sched = MixedScheduler(num_blocks=10, block_size=16, policy="chunked",
                           max_num_batched_tokens=32, budget=budget)
    sched.add(job(0, prompt_len=100, max_tokens=12))  # 7 blocks
    sched.add(job(1, prompt_len=40, max_tokens=8))  # 3 blocks
    sched.add(job(2, prompt_len=1, max_tokens=1))  # 1 block: behind r1, waits (strict FCFS)
    plan = sched.schedule()
    assert [(c.job.request_id, c.num_tokens) for c in plan.chunks] == [("r0", 32)]
    assert budget.used == 7
    sched.schedule(), sched.schedule()  # r0 at 96 of 100
    plan = sched.schedule()  # r0 finishes its prompt; r1 is admitted with the rest of the budget
    assert [(c.job.request_id, c.start, c.num_tokens) for c in plan.chunks] == [
        ("r0", 96, 4), ("r1", 0, 28)]
    assert budget.free == 0 and not sched.can_admit() and len(sched.queue) == 1
    sched.release("r1")  # aborted mid-prompt
    assert budget.used == 7 and "r1" not in sched.prefilling and sched.num_prefilled == {}
    plan = sched.schedule()
    assert plan.decode == ["r0"] and [c.job.request_id for c in plan.chunks] == ["r2"]
    for rid in ("r0", "r2"):
        sched.release(rid)
    assert budget.used == 0 and sched.used_blocks == 0


def test_chunked_random_workload_brute_force():
    """Random arrivals, lengths, other-policy decodes and aborts (queued, mid-prompt, decoding);
    every plan is checked against the rules by brute force, step by step."""
    rng = random.Random(11)
    num_blocks, cap = 120, 96
    sched = chunked(num_blocks=num_blocks, budget=cap, max_num_seqs=12)
    want: dict[str, Job] = {}
    done_prompt: dict[str, int] = {}  # request -> prompt tokens scheduled so far
    order_admitted: list[str] = []
    arrived: list[str] = []
    finished = aborted = 0
    for step in range(3000):
        if step < 2000 and rng.random() < 0.3:
            i = len(arrived)
            j = job(i, prompt_len=rng.choice([1, 2, 15, 16, 17, 60, 95, 96, 97, 300]),
                    max_tokens=rng.randint(1, 30))
            sched.add(j)
            want[j.request_id] = j
            arrived.append(j.request_id)
        other = rng.choice([0, 0, 0, 3, 20, cap])
        decoding_before = set(sched.running)
        head = sched.queue.peek()
        plan = sched.schedule(num_other_decodes=other)
        # The budget: never exceeded, decodes first, and left over only when no prompt could use it.
        assert plan.prefill == [] and plan.num_tokens <= max(0, cap - other)
        assert len(set(plan.decode)) == len(plan.decode) and set(plan.decode) <= decoding_before
        assert len(plan.decode) == min(len(decoding_before), max(0, cap - other))
        if plan.chunks:
            assert len(plan.decode) == len(decoding_before)
        if plan.num_tokens < cap - other:  # budget left: no prompt work could take it
            assert not sched.prefilling and not sched.can_admit()
        for c in plan.chunks:
            rid = c.job.request_id
            assert rid not in plan.decode and c.num_tokens > 0
            assert c.start == done_prompt.get(rid, 0)  # contiguous, from where it stopped
            assert c.end <= c.job.prompt_len
            if c.start == 0:
                order_admitted.append(rid)
            done_prompt[rid] = c.end
        # FCFS: a request is admitted only once everyone who arrived before it was (or left);
        # at most one prompt is left partial.
        live = [r for r in arrived if r in want]
        admitted = set(order_admitted)
        for c in plan.chunks:
            if c.start == 0:
                earlier = arrived[:arrived.index(c.job.request_id)]
                assert all(r in admitted or r not in want for r in earlier)
        if head is not None and head.request_id not in admitted:
            assert not any(c.start == 0 for c in plan.chunks)  # nobody overtook the head
        assert len(sched.prefilling) <= 1
        # Memory: the reservations add up and fit.
        assert sched.used_blocks == sum(sched.reserved.values()) == sched.budget.used <= num_blocks
        assert set(sched.reserved) == set(sched.running) | set(sched.prefilling)
        assert len(sched.reserved) <= 12
        for rid in plan.decode:
            sched.token_generated(rid)
        for c in plan.chunks:
            if c.last:
                sched.token_generated(c.job.request_id)
        for rid in list(sched.running):
            if sched.running[rid].num_generated >= want[rid].max_tokens:
                sched.release(rid)
                del want[rid]
                finished += 1
        if live and rng.random() < 0.03:  # abort anything, in any state
            rid = rng.choice([r for r in live if r in want])
            sched.release(rid)
            del want[rid]
            aborted += 1
        for rid, n in done_prompt.items():
            if rid in sched.prefilling:
                assert sched.num_prefilled[rid] == n
    assert not want, want
    assert finished + aborted == len(arrived) and sched.budget.used == 0 and len(sched.queue) == 0
    assert sched.pending_prompt_tokens == 0 == sched.pending_decode_tokens
