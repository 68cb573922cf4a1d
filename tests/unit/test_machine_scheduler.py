"""MachineScheduler, the machine turn's one composer, in the style of vLLM's
tests/v1/core/test_scheduler.py: hand-built results in; queues, budgets, plans and counters
asserted. No engine, no clock."""

from __future__ import annotations

import pytest

from mls.policy import Job, MachineScheduler, QueueFull, TurnResult, WorkKind

BS = 16


def job(rid: str, prompt_len: int, max_tokens: int = 4) -> Job:
    return Job(rid, prompt_len, max_tokens)


def sched(num_blocks: int = 100, **kw) -> MachineScheduler:
    return MachineScheduler(num_blocks, BS, **kw)


def test_prompt_work_batches_fcfs_under_the_cap_and_leaves_the_scheduler():
    s = sched(prompt_token_cap=100)
    for i, n in enumerate([40, 50, 30]):
        s.add(WorkKind.PROMPT, job(f"p{i}", n))
    assert s.load().pending_prompt_tokens == 120 and s.load().prompt_queue_len == 3
    plan = s.plan()
    assert [j.request_id for j in plan.prompt_batch] == ["p0", "p1"]  # 40 + 50 <= 100 < 120
    assert "p0" not in s and "p2" in s  # planned prompt work is no longer the scheduler's
    assert s.load().pending_prompt_tokens == 30
    assert [j.request_id for j in s.plan().prompt_batch] == ["p2"]
    assert not s.plan().has_engine_work and s.budget.used == 0  # prompt KV is never budgeted


def test_the_engines_free_blocks_bound_the_prompt_batch_after_this_turns_admissions():
    s = sched(num_blocks=10)
    s.add(WorkKind.TOKEN, job("t0", 64, 16))  # 5 blocks
    s.add(WorkKind.PROMPT, job("p0", 48))  # 3 blocks
    s.add(WorkKind.PROMPT, job("p1", 48))  # 3 blocks
    plan = s.plan(free_blocks=10)
    assert [j.request_id for j in plan.admitted] == ["t0"]
    assert [j.request_id for j in plan.prompt_batch] == ["p0"]  # 10 - 5 admitted leaves 5: one fits
    assert s.runnable(free_blocks=5)  # p1 fits once p0's blocks are back
    assert not s.runnable(free_blocks=2)  # it does not now: no spinning on work that cannot run


def test_token_work_is_admitted_by_memory_decodes_after_its_kv_and_frees_on_finish():
    s = sched(num_blocks=10)
    s.add(WorkKind.TOKEN, job("t0", 64, 16))  # 5 blocks each
    s.add(WorkKind.TOKEN, job("t1", 64, 16))
    s.add(WorkKind.TOKEN, job("t2", 64, 16))
    plan = s.plan()
    assert [j.request_id for j in plan.admitted] == ["t0", "t1"] and not plan.decode
    assert s.budget.used == 10 and s.load().decode_queue_len == 1 and s.load().num_running == 2
    assert s.load().pending_decode_tokens == 48
    s.update(TurnResult(kv_ready=["t1"]))  # the prompt machine's first token counts here
    assert s.load().pending_decode_tokens == 47
    plan = s.plan()
    assert plan.decode == ("t1",) and not plan.admitted  # t2 waits for memory, never dropped
    s.update(TurnResult(generated=["t1"], finished=["t1"]))
    assert s.budget.used == 5 and "t1" not in s
    assert [j.request_id for j in s.plan().admitted] == ["t2"]


def test_mixed_prompt_first_prefills_then_decodes_with_the_token_work_in_one_call():
    s = sched(num_blocks=100)
    s.add(WorkKind.TOKEN, job("t0", 32, 8))
    s.plan()
    s.update(TurnResult(kv_ready=["t0"]))
    s.add(WorkKind.MIXED, job("m0", 32, 8))
    plan = s.plan()
    assert [j.request_id for j in plan.prefill] == ["m0"] and plan.decode == ("t0",)
    assert not plan.chunked
    s.update(TurnResult(generated=["m0", "t0"]))
    assert s.plan().decode == ("t0", "m0")  # token work first, then mixed work
    assert s.load().pending_decode_tokens == (8 - 2) + (8 - 1)


def test_chunked_mixed_work_shares_the_step_budget_with_every_decode():
    s = sched(num_blocks=100, mixed_policy="chunked", max_num_batched_tokens=20)
    s.add(WorkKind.TOKEN, job("t0", 16, 8))
    s.plan()
    s.update(TurnResult(kv_ready=["t0"]))
    s.add(WorkKind.MIXED, job("m0", 30, 8))
    plan = s.plan()
    assert plan.chunked and plan.decode == ("t0",)
    assert [(c.job.request_id, c.start, c.num_tokens) for c in plan.chunks] == [("m0", 0, 19)]
    assert s.load().prompt_queue_len == 1  # mid-prompt counts as prompt work still queued
    s.update(TurnResult(generated=["t0"]))
    plan = s.plan()
    assert [(c.start, c.num_tokens, c.last) for c in plan.chunks] == [(19, 11, True)]
    s.update(TurnResult(generated=["t0", "m0"]))  # the last chunk makes m0's first token
    assert s.plan().decode == ("t0", "m0")


def test_release_frees_any_state_and_unknown_ids_are_ignored():
    s = sched(num_blocks=20, mixed_policy="chunked", max_num_batched_tokens=8)
    s.add(WorkKind.TOKEN, job("t0", 64, 16))
    s.add(WorkKind.MIXED, job("m0", 64, 16))
    s.add(WorkKind.PROMPT, job("p0", 64))
    s.plan()  # t0 admitted (receiving), m0 mid-prompt, p0 planned
    assert s.budget.used == 10
    for rid in ("t0", "m0", "p0", "nobody"):
        s.release(rid)
    assert s.budget.used == 0 and s.load() == s.load().__class__(0, 0, 0, 0, 0)


def test_failed_results_free_blocks_and_the_queue_moves():
    s = sched(num_blocks=5)
    s.add(WorkKind.TOKEN, job("t0", 64, 16))
    s.add(WorkKind.TOKEN, job("t1", 64, 16))
    assert [j.request_id for j in s.plan().admitted] == ["t0"]
    s.update(TurnResult(failed=["t0"], errors={"t0": "KV transfer failed"}))
    assert [j.request_id for j in s.plan().admitted] == ["t1"]


def test_bad_additions_name_the_problem():
    s = sched(num_blocks=4, max_queue_len=1)
    with pytest.raises(ValueError, match="prompt of 100 tokens needs 7 KV blocks; this machine has 4"):
        s.add(WorkKind.PROMPT, job("p", 100))
    with pytest.raises(ValueError, match="needs 7 KV blocks"):
        s.add(WorkKind.TOKEN, job("t", 100, 4))
    s.add(WorkKind.MIXED, job("m", 8))
    with pytest.raises(ValueError, match="already on this machine"):
        s.add(WorkKind.TOKEN, job("m", 8))
    with pytest.raises(QueueFull, match="mixed queue is full"):
        s.add(WorkKind.MIXED, job("m2", 8))
