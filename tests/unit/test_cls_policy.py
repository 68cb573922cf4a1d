"""The pure cluster policies: pools (borrow, return, resize, drain) and the JSQ router.

Every routing decision here is checked against `reference_route`, the documented policy written
as linear scans over `pools.machines`; the router's sorted indexes must agree with it.
"""

from __future__ import annotations

import random

import pytest

from cls.pools import PoolError, PoolMove, Pools
from cls.router import NoMachine, Route, Router
from proto.roles import Role

BLOCK_SIZE = 16
LIMIT = 8192  # prompt_queue_limit_tokens


# -- factory helpers ----------------------------------------------------------------------------

def make_pools(num_prompt: int = 2, num_token: int = 2, kv_blocks: int = 1000,
               max_model_len: int = 32768) -> Pools:
    """`p0..` in the prompt pool, `t0..` in the token pool, all idle with `kv_blocks` free."""
    pools = Pools()
    for i in range(num_prompt):
        pools.add(f"p{i}", Role.PROMPT, kv_blocks, BLOCK_SIZE, max_model_len)
    for i in range(num_token):
        pools.add(f"t{i}", Role.TOKEN, kv_blocks, BLOCK_SIZE, max_model_len)
    return pools


def report(pools: Pools, machine_id: str, prompt: int = 0, queue: int | None = None,
           decode: int = 0, free: int | None = None) -> None:
    """A load report; by default the queue holds one prompt iff prompt tokens are pending."""
    m = pools.get(machine_id)
    pools.update_load(machine_id, pending_prompt_tokens=prompt,
                      prompt_queue_len=(1 if prompt else 0) if queue is None else queue,
                      pending_decode_tokens=decode,
                      kv_blocks_free=m.kv_blocks_total if free is None else free)


def random_report(pools: Pools, machine_id: str, rng: random.Random, skew: float = 1.0) -> None:
    """A report as an mlsd would send it: queued prompts and their tokens come together."""
    m = pools.get(machine_id)
    queue = rng.choice([0, 0, 1, 2, 5]) if rng.random() < skew else 0
    prompt = sum(rng.randint(1, 4000) for _ in range(queue))
    decode = rng.choice([0, rng.randint(0, 500), rng.randint(0, 20000)])
    free = rng.choice([m.kv_blocks_total, rng.randint(0, m.kv_blocks_total), rng.randint(0, 40)])
    report(pools, machine_id, prompt=prompt, queue=queue, decode=decode, free=free)


def assert_indexes_consistent(pools: Pools) -> None:
    """Every pool's sorted lists equal a recomputation from `pools.machines`; fields in range."""
    for pool in Role:
        live = [m for m in pools.machines.values() if m.role == pool and not m.draining]
        assert list(pools._by_prompt[pool]) == sorted((m.pending_prompt_tokens, m.machine_id) for m in live)
        assert list(pools._by_decode[pool]) == sorted((m.pending_decode_tokens, m.machine_id) for m in live)
        assert list(pools._by_total[pool]) == sorted(
            (m.pending_prompt_tokens + m.pending_decode_tokens, m.machine_id) for m in live)
    for m in pools.machines.values():
        assert m.home in (Role.PROMPT, Role.TOKEN)
        assert m.pending_prompt_tokens >= 0 and m.prompt_queue_len >= 0 and m.pending_decode_tokens >= 0
        assert 0 <= m.kv_blocks_free <= m.kv_blocks_total


def reference_route(pools: Pools, prompt_len: int, max_tokens: int, limit: int = LIMIT,
                    exclude: frozenset[str] = frozenset()) -> tuple[str, str, list[str]] | None:
    """The router's documented policy by brute force: (prompt id, token id, borrowed ids), or
    None for NoMachine. Changes nothing."""
    role = {mid: m.role for mid, m in pools.machines.items()}
    live = [m for m in pools.machines.values() if not m.draining and m.machine_id not in exclude]

    def members(pool):
        return [m for m in live if role[m.machine_id] == pool]

    def decode_key(m):
        return m.pending_decode_tokens, m.machine_id

    def long_queued(m):
        return m.prompt_queue_len > 0 and m.pending_prompt_tokens + prompt_len > limit

    borrowed: list[str] = []
    prompt = None
    for pool in (Role.PROMPT, Role.MIXED):
        ok = [m for m in members(pool) if not long_queued(m)]
        if ok:
            prompt = min(ok, key=lambda m: (m.pending_prompt_tokens, m.machine_id))
            break
    if prompt is None and members(Role.TOKEN):
        prompt = min(members(Role.TOKEN), key=decode_key)
        role[prompt.machine_id] = Role.MIXED
        borrowed.append(prompt.machine_id)
    if prompt is None:  # every prompt-capable machine is long-queued: the least-loaded one
        queued = members(Role.PROMPT) + members(Role.MIXED)
        if queued:
            prompt = min(queued, key=lambda m: (m.pending_prompt_tokens, role[m.machine_id] != Role.PROMPT,
                                                m.machine_id))

    need = prompt_len + max_tokens
    token = None
    for pool in (Role.TOKEN, Role.MIXED):
        ok = [m for m in members(pool) if m.blocks_for(need) <= m.kv_blocks_free]
        if ok:
            token = min(ok, key=decode_key)
            break
    if token is None:
        ok = [m for m in members(Role.PROMPT) if m.blocks_for(need) <= m.kv_blocks_free]
        if ok:
            token = min(ok, key=lambda m: (m.kv_blocks_used, m.machine_id))
            borrowed.append(token.machine_id)
    if token is None:  # nothing has the memory now: wait on the least-loaded that ever could
        for pool in (Role.TOKEN, Role.MIXED, Role.PROMPT):
            ok = [m for m in members(pool) if m.blocks_for(need) <= m.kv_blocks_total]
            if ok:
                token = min(ok, key=decode_key)
                if pool == Role.PROMPT:
                    borrowed.append(token.machine_id)
                break
    if token is None:
        return None
    prompt = prompt or token
    return prompt.machine_id, token.machine_id, borrowed


def route_checked(router: Router, prompt_len: int, max_tokens: int,
                  exclude: frozenset[str] = frozenset()) -> Route:
    """route(), asserting it equals the reference and that both machines were charged."""
    pools = router.pools
    expected = reference_route(pools, prompt_len, max_tokens, router.prompt_queue_limit_tokens, exclude)
    before = {mid: (m.pending_prompt_tokens, m.prompt_queue_len, m.pending_decode_tokens, m.kv_blocks_free)
              for mid, m in pools.machines.items()}
    if expected is None:
        with pytest.raises(NoMachine):
            router.route(prompt_len, max_tokens, exclude)
        return None
    r = router.route(prompt_len, max_tokens, exclude)
    assert (r.prompt_machine, r.token_machine, [mv.machine_id for mv in r.borrowed]) == expected
    assert all(mv.to_pool == Role.MIXED for mv in r.borrowed)
    assert not {r.prompt_machine, r.token_machine} & exclude
    pm, tm = pools.get(r.prompt_machine), pools.get(r.token_machine)
    assert r.num_blocks == tm.blocks_for(prompt_len + max_tokens)
    p0, q0, d0, f0 = before[pm.machine_id]
    assert pm.pending_prompt_tokens == p0 + prompt_len and pm.prompt_queue_len == q0 + 1
    p0, q0, d0, f0 = before[tm.machine_id]
    assert tm.pending_decode_tokens == d0 + max_tokens
    assert tm.kv_blocks_free == max(0, f0 - r.num_blocks)
    return r


# -- JSQ ------------------------------------------------------------------------------------------

def test_jsq_matches_brute_force_under_skewed_random_load():
    rng = random.Random(7)
    pools = make_pools(24, 24, kv_blocks=2000)
    router = Router(pools, prompt_queue_limit_tokens=LIMIT)
    ids = list(pools.machines)
    for mid in ids:
        random_report(pools, mid, rng, skew=0.3 if mid.startswith("p1") else 1.0)
    inflight: list[tuple[Route, int, int]] = []
    num_borrowed = 0
    for step in range(1500):
        if step % 50 == 0:  # heartbeats overwrite what the router charged
            for mid in rng.sample(ids, 8):
                random_report(pools, mid, rng)
        prompt_len = rng.choice([16, 300, 1500, 4000, 9000])
        max_tokens = rng.choice([1, 64, 512, 2048])
        r = route_checked(router, prompt_len, max_tokens)
        num_borrowed += len(r.borrowed)
        inflight.append((r, prompt_len, max_tokens))
        if rng.random() < 0.5 and inflight:  # prefill done, and later finished
            done, n, k = inflight.pop(rng.randrange(len(inflight)))
            pools.credit_prompt(done.prompt_machine, n)
            pools.credit_decode(done.token_machine, k, done.num_blocks)
        if step % 100 == 0:
            pools.return_idle()
    assert num_borrowed == pools.num_borrowed > 0  # the load was skewed enough to borrow
    assert_indexes_consistent(pools)


def reference_colocated(pools: Pools, num_tokens: int, exclude=frozenset()) -> str:
    """The colocated policy as a linear scan: least pending prompt + decode tokens among machines
    with free memory for the request, else among those that could ever hold it."""
    live = [m for m in pools.machines.values() if not m.draining and m.machine_id not in exclude
            and m.blocks_for(num_tokens) <= m.kv_blocks_total]
    key = lambda m: (m.pending_prompt_tokens + m.pending_decode_tokens, m.machine_id)  # noqa: E731
    free = [m for m in live if m.blocks_for(num_tokens) <= m.kv_blocks_free]
    return min(free or live, key=key).machine_id


def test_colocated_routing_matches_brute_force_and_never_borrows():
    rng = random.Random(11)
    pools = make_pools(10, 14, kv_blocks=600)
    router = Router(pools, colocated=True)
    ids = list(pools.machines)
    for mid in ids:
        random_report(pools, mid, rng)
    inflight = []
    for step in range(1500):
        if step % 40 == 0:
            for mid in rng.sample(ids, 6):
                random_report(pools, mid, rng)
        if step % 300 == 150:
            pools.set_draining(rng.choice(ids), rng.random() < 0.7)
        prompt_len, max_tokens = rng.choice([16, 300, 1500, 4000]), rng.choice([1, 64, 512, 2048])
        exclude = frozenset(rng.sample(ids, 2)) if rng.random() < 0.1 else frozenset()
        want = reference_colocated(pools, prompt_len + max_tokens, exclude)
        r = router.route(prompt_len, max_tokens, exclude)
        assert r.colocated and r.prompt_machine == want and not r.borrowed, step
        inflight.append((r, prompt_len, max_tokens))
        if rng.random() < 0.5:
            done, n, k = inflight.pop(rng.randrange(len(inflight)))
            pools.credit_prompt(done.prompt_machine, n)
            pools.credit_decode(done.token_machine, k, done.num_blocks)
    assert pools.num_borrowed == 0 and all(m.role == m.home for m in pools.machines.values())
    assert_indexes_consistent(pools)
    with pytest.raises(NoMachine, match="can hold"):
        router.route(600 * BLOCK_SIZE, 1)
    for mid in ids:
        pools.set_draining(mid, True)
    with pytest.raises(NoMachine, match="no machine is available"):
        router.route(10, 10)


def test_successive_decisions_spread_the_load():
    pools = make_pools(4, 3, kv_blocks=100)
    router = Router(pools)
    routes = [route_checked(router, 100, 60) for _ in range(8)]
    assert [r.prompt_machine for r in routes] == ["p0", "p1", "p2", "p3"] * 2
    assert [r.token_machine for r in routes][:6] == ["t0", "t1", "t2"] * 2
    assert all(pools.get(f"p{i}").pending_prompt_tokens == 200 for i in range(4))
    assert [pools.get(f"t{i}").kv_blocks_free for i in range(3)] == [70, 70, 80]
    assert pools.get("t0").pending_decode_tokens == 180 and pools.get("t2").pending_decode_tokens == 120


def test_prompt_choice_is_least_pending_tokens_with_id_breaking_ties():
    pools = make_pools(3, 1)
    report(pools, "p0", prompt=500)
    report(pools, "p1", prompt=200)
    report(pools, "p2", prompt=200)
    assert route_checked(Router(pools), 10, 1).prompt_machine == "p1"


# -- long-queued prompts, borrowing, returning ------------------------------------------------------

def test_long_queued_prompt_machine_sends_the_prompt_to_the_mixed_pool():
    pools = make_pools(1, 3)
    router = Router(pools)
    report(pools, "p0", prompt=8000, queue=3)
    pools.borrow("t2")  # already in the mixed pool
    r = route_checked(router, 500, 10)  # 8000 + 500 > 8192
    assert r.prompt_machine == "t2" and r.borrowed == []
    assert route_checked(router, 192, 10).prompt_machine == "p0"  # 8000 + 192 == limit: not long


def test_long_queued_everywhere_borrows_the_token_machine_with_least_decode_work():
    pools = make_pools(2, 3)
    router = Router(pools)
    for mid in ("p0", "p1"):
        report(pools, mid, prompt=9000, queue=2)
    report(pools, "t0", decode=300)
    report(pools, "t1", decode=100)
    report(pools, "t2", decode=200)
    r = route_checked(router, 100, 10)
    assert r.prompt_machine == "t1"
    assert r.borrowed == [PoolMove("t1", Role.TOKEN, Role.MIXED)]
    t1 = pools.get("t1")
    assert (t1.home, t1.role) == (Role.TOKEN, Role.MIXED) and pools.num_borrowed == 1
    assert [m.machine_id for m in pools.members(Role.MIXED)] == ["t1"]


def test_an_idle_machine_takes_a_prompt_longer_than_the_limit():
    pools = make_pools(2, 1, kv_blocks=2000)
    report(pools, "p0", prompt=100, queue=1)
    r = route_checked(Router(pools), 20000, 10)  # p1's queue is empty: not long-queued
    assert r.prompt_machine == "p1" and r.borrowed == []


def test_nothing_to_borrow_queues_on_the_least_loaded_long_queued_machine():
    pools = make_pools(2, 0)
    pools.borrow("p1")
    report(pools, "p0", prompt=9000, queue=2)
    report(pools, "p1", prompt=8500, queue=2)
    assert route_checked(Router(pools), 1000, 10).prompt_machine == "p1"


def test_return_idle_waits_for_the_work_of_the_other_kind():
    pools = make_pools(2, 2)
    router = Router(pools)
    for mid in ("p0", "p1"):
        report(pools, mid, prompt=9000, queue=2)
    r = route_checked(router, 100, 10)
    lender = r.prompt_machine
    assert r.borrowed and pools.get(lender).role == Role.MIXED
    assert pools.return_idle(lender) == [] and pools.num_returned == 0  # its prompt is queued
    pools.credit_prompt(lender, 100)
    assert pools.return_idle() == [PoolMove(lender, Role.MIXED, Role.TOKEN)]
    assert pools.get(lender).role == Role.TOKEN and pools.num_returned == 1
    assert pools.return_idle() == []  # nothing left in the mixed pool

    pools.borrow("p0")  # a prompt machine borrowed for decode work returns when that is done
    pools.charge_decode(pools.get("p0"), 50, 4)
    assert pools.return_idle("p0") == []
    pools.credit_decode("p0", 50, 4)
    assert pools.return_idle("p0") == [PoolMove("p0", Role.MIXED, Role.PROMPT)]
    assert (pools.num_borrowed, pools.num_returned) == (2, 2)
    pools.borrow("t0")
    with pytest.raises(PoolError, match="already in the mixed pool"):
        pools.borrow("t0")
    assert_indexes_consistent(pools)


# -- token side -----------------------------------------------------------------------------------

def test_token_machines_without_memory_for_prompt_plus_output_are_skipped():
    pools = make_pools(1, 3, kv_blocks=100)
    report(pools, "t0", decode=0, free=10)  # least work, but 10 blocks < 11 needed
    report(pools, "t1", decode=500, free=11)  # exactly enough: 160 + 16 tokens -> 11 blocks
    report(pools, "t2", decode=900, free=100)
    r = route_checked(Router(pools), 160, 16)
    assert (r.token_machine, r.num_blocks) == ("t1", 11)
    assert pools.get("t1").kv_blocks_free == 0


def test_no_token_memory_borrows_the_prompt_machine_with_least_kv_in_use():
    pools = make_pools(3, 2, kv_blocks=100)
    for mid in ("t0", "t1"):
        report(pools, mid, free=2)
    report(pools, "p0", prompt=10, free=40)
    report(pools, "p1", prompt=50, decode=900, free=90)  # most work, least memory in use
    report(pools, "p2", prompt=90, free=5)  # 10 blocks don't fit
    r = route_checked(Router(pools), 100, 60)
    assert (r.prompt_machine, r.token_machine) == ("p0", "p1") and not r.colocated
    assert r.borrowed == [PoolMove("p1", Role.PROMPT, Role.MIXED)]


def test_no_free_memory_anywhere_waits_on_the_least_loaded_machine_that_could_hold_it():
    pools = make_pools(1, 3, kv_blocks=100)
    pools.add("small", Role.TOKEN, 5, BLOCK_SIZE, 32768)  # can never hold 20 blocks
    report(pools, "small", free=0)
    report(pools, "t0", decode=50, free=0)
    report(pools, "t1", decode=10, free=3)
    report(pools, "t2", decode=30, free=0)
    report(pools, "p0", free=0)
    r = route_checked(Router(pools), 300, 20)
    assert r.token_machine == "t1" and r.borrowed == []
    assert pools.get("t1").kv_blocks_free == 0  # charged, clamped at zero


def test_waiting_on_a_prompt_machine_borrows_it():
    pools = make_pools(2, 1, kv_blocks=100)
    pools.remove("t0")
    pools.add("t0", Role.TOKEN, 10, BLOCK_SIZE, 32768)  # too small for this request
    report(pools, "p0", prompt=100, decode=20, free=0)
    report(pools, "p1", prompt=200, decode=10, free=0)
    r = route_checked(Router(pools), 300, 20)
    assert (r.prompt_machine, r.token_machine) == ("p0", "p1")
    assert r.borrowed == [PoolMove("p1", Role.PROMPT, Role.MIXED)]


def test_no_machine_when_empty_all_draining_or_too_large():
    with pytest.raises(NoMachine):
        Router(Pools()).route(10, 10)
    pools = make_pools(1, 1, kv_blocks=100)
    pools.set_draining("p0", True)
    pools.set_draining("t0", True)
    with pytest.raises(NoMachine):
        Router(pools).route(10, 10)
    pools = make_pools(1, 1, kv_blocks=100)
    assert not Router(pools).fits_anywhere(1601)
    assert route_checked(Router(pools), 1600, 1) is None  # 101 blocks: no machine can ever hold them
    assert route_checked(Router(pools), 1599, 1).num_blocks == 100


def test_too_large_for_every_machine_is_no_machine_and_undoes_the_borrow():
    pools = make_pools(1, 1, kv_blocks=100)
    report(pools, "p0", prompt=9000, queue=2)  # long-queued: the prompt side borrows t0
    with pytest.raises(NoMachine, match="can hold 1601 tokens"):
        Router(pools).route(1000, 601)
    assert pools.get("t0").role == Role.TOKEN and (pools.num_borrowed, pools.num_returned) == (1, 1)
    assert pools.get("p0").pending_prompt_tokens == 9000 and pools.get("t0").kv_blocks_free == 100
    assert_indexes_consistent(pools)


def test_credits_racing_a_report_leave_no_phantom_queue():
    """A report that already counts a prefill as done, then that prefill's credit: an empty queue
    with tokens left (or the reverse) must not make the machine look long-queued or loaded."""
    pools = make_pools(2, 1, kv_blocks=2000)
    router = Router(pools)
    report(pools, "p0", prompt=3000, queue=1)
    pools.credit_prompt("p0", 1000)  # an earlier request, already out of the reported queue
    p0 = pools.get("p0")
    assert (p0.pending_prompt_tokens, p0.prompt_queue_len) == (0, 0)
    report(pools, "p1", prompt=500, queue=2)
    pools.credit_prompt("p1", 600)
    assert (pools.get("p1").pending_prompt_tokens, pools.get("p1").prompt_queue_len) == (0, 0)
    r = route_checked(router, 9000, 10)  # longer than the limit: an idle machine takes it
    assert r.prompt_machine == "p0" and r.borrowed == []
    assert_indexes_consistent(pools)


@pytest.mark.parametrize("only", ["p0", "t0"])
def test_one_usable_machine_runs_both_phases(only):
    pools = make_pools(1, 1, kv_blocks=100)
    pools.set_draining("t0" if only == "p0" else "p0", True)
    r = route_checked(Router(pools), 100, 10)
    assert (r.prompt_machine, r.token_machine) == (only, only) and r.colocated
    assert [mv.machine_id for mv in r.borrowed] == [only]
    assert pools.get(only).role == Role.MIXED
    r = route_checked(Router(pools), 100, 10)  # now it is the mixed pool: no second borrow
    assert r.colocated and r.borrowed == []


def test_exclude_never_returns_an_excluded_machine():
    rng = random.Random(3)
    pools = make_pools(6, 6, kv_blocks=500)
    router = Router(pools)
    ids = sorted(pools.machines)
    for step in range(600):
        if step % 20 == 0:
            for mid in ids:
                random_report(pools, mid, rng)
            pools.return_idle()
        exclude = frozenset(rng.sample(ids, rng.randint(0, len(ids))))
        route_checked(router, rng.choice([50, 2000, 7000]), rng.choice([10, 500]), exclude)
    assert_indexes_consistent(pools)


# -- resize, drain, remove, accounting -------------------------------------------------------------

def test_resize_validates_targets():
    pools = make_pools(3, 1)
    with pytest.raises(PoolError, match="num_prompt or num_token"):
        pools.resize()
    with pytest.raises(PoolError, match=r"4 registered machines, got prompt=5 token=1"):
        pools.resize(5, 1)
    with pytest.raises(PoolError, match=r"got prompt=5 token=-1"):
        pools.resize(num_prompt=5)
    with pytest.raises(PoolError, match=r"got prompt=-2 token=6"):
        pools.resize(num_token=6)
    assert pools.resize(3, 1) == [] and pools.resize(num_token=1) == []
    assert [m.home for m in pools.machines.values()] == [Role.PROMPT] * 3 + [Role.TOKEN]


def test_resize_moves_machines_with_the_least_work_of_the_role_they_leave_first():
    pools = make_pools(3, 3)
    report(pools, "p0", prompt=300, decode=0)
    report(pools, "p1", prompt=100, decode=900)
    report(pools, "p2", prompt=200)
    moves = pools.resize(num_prompt=1)
    assert moves == [PoolMove("p1", Role.PROMPT, Role.TOKEN), PoolMove("p2", Role.PROMPT, Role.TOKEN)]
    assert [(m.home, m.role) for m in map(pools.get, ("p1", "p2"))] == [(Role.TOKEN, Role.TOKEN)] * 2
    assert pools.get("p1").pending_prompt_tokens == 100  # it keeps finishing what it holds
    assert {m.machine_id for m in pools.members(Role.PROMPT)} == {"p0"}
    report(pools, "t0", decode=50)
    report(pools, "t1", decode=5)
    report(pools, "t2", decode=5)
    report(pools, "p2", decode=70)
    moves = pools.resize(num_prompt=3, num_token=3)
    assert moves == [PoolMove("t1", Role.TOKEN, Role.PROMPT), PoolMove("t2", Role.TOKEN, Role.PROMPT)]
    assert_indexes_consistent(pools)


def test_resize_changes_a_borrowed_machines_home_and_it_returns_there():
    pools = make_pools(2, 2)
    pools.borrow("t0")
    report(pools, "t0", prompt=100, decode=0)
    report(pools, "t1", decode=300)
    moves = pools.resize(num_prompt=3)
    assert moves == [PoolMove("t0", Role.TOKEN, Role.PROMPT)]
    t0 = pools.get("t0")
    assert (t0.home, t0.role) == (Role.PROMPT, Role.MIXED)
    assert pools.return_idle() == [PoolMove("t0", Role.MIXED, Role.PROMPT)]  # no decode work
    assert_indexes_consistent(pools)


def test_drain_undrain_and_remove_take_machines_out_of_routing():
    pools = make_pools(2, 2)
    router = Router(pools)
    pools.set_draining("p0", True)
    pools.set_draining("t0", True)
    assert pools.set_draining("t0", True).draining  # idempotent
    for _ in range(4):
        r = route_checked(router, 10, 10)
        assert (r.prompt_machine, r.token_machine) == ("p1", "t1")
    pools.charge_prompt(pools.get("p0"), 5)  # a draining machine's counters still move
    pools.set_draining("p0", False)
    assert route_checked(router, 10, 10).prompt_machine == "p0"
    assert_indexes_consistent(pools)
    removed = pools.remove("t1")
    assert removed.machine_id == "t1" and "t1" not in pools.machines
    pools.credit_prompt("t1", 10)  # late progress of a removed machine: ignored
    pools.credit_decode("t1", 10, 1)
    with pytest.raises(PoolError, match="unknown machine 't1'"):
        pools.remove("t1")
    with pytest.raises(PoolError, match="unknown machine 'nope'"):
        pools.update_load("nope", pending_prompt_tokens=0, prompt_queue_len=0, pending_decode_tokens=0,
                          kv_blocks_free=0)
    with pytest.raises(PoolError, match="already registered"):
        pools.add("p0", Role.PROMPT, 10, BLOCK_SIZE, 100)
    with pytest.raises(PoolError, match="home pool must be prompt or token"):
        pools.add("m", Role.MIXED, 10, BLOCK_SIZE, 100)
    pools.set_draining("t0", False)
    assert route_checked(router, 10, 10).token_machine == "t0"
    assert_indexes_consistent(pools)


def test_credits_and_charges_stay_in_range():
    pools = make_pools(1, 1, kv_blocks=100)
    t0, p0 = pools.get("t0"), pools.get("p0")
    pools.charge_decode(t0, 10, 30)
    pools.credit_decode("t0", 4, 20)
    assert (t0.pending_decode_tokens, t0.kv_blocks_free) == (6, 90)
    pools.charge_decode(t0, 4, 150)
    assert t0.kv_blocks_free == 0
    pools.credit_decode("t0", 25, 400)
    assert (t0.pending_decode_tokens, t0.kv_blocks_free) == (0, 100)
    pools.charge_prompt(p0, 30)
    pools.credit_prompt("p0", 100)
    pools.credit_prompt("p0", 100)
    assert (p0.pending_prompt_tokens, p0.prompt_queue_len) == (0, 0)
    assert pools.pending_tokens(Role.PROMPT) == 0
    assert_indexes_consistent(pools)


def test_indexes_stay_consistent_over_a_long_random_sequence():
    rng = random.Random(11)
    pools = make_pools(8, 8, kv_blocks=300)
    router = Router(pools, prompt_queue_limit_tokens=4096)
    inflight: list[Route] = []
    next_id = 0
    for _ in range(3000):
        ids = sorted(pools.machines)
        op = rng.random()
        if op < 0.30 and ids:
            try:
                r = router.route(rng.randint(1, 3000), rng.randint(1, 1000),
                                 frozenset(rng.sample(ids, rng.randint(0, 2))))
                inflight.append(r)
            except NoMachine:
                pass
        elif op < 0.45 and inflight:
            r = inflight.pop(rng.randrange(len(inflight)))
            pools.credit_prompt(r.prompt_machine, rng.randint(0, 3000))
            pools.credit_decode(r.token_machine, rng.randint(0, 1000), r.num_blocks)
        elif op < 0.60 and ids:
            random_report(pools, rng.choice(ids), rng)
        elif op < 0.68 and ids:
            mid = rng.choice(ids)
            if pools.get(mid).role != Role.MIXED:
                pools.borrow(mid)
        elif op < 0.74:
            pools.return_idle(rng.choice(ids + [None]) if ids else None)
        elif op < 0.80 and ids:
            pools.resize(num_prompt=rng.randint(0, len(ids)))
        elif op < 0.88 and ids:
            pools.set_draining(rng.choice(ids), rng.random() < 0.5)
        elif op < 0.94 and len(ids) > 2:
            pools.remove(rng.choice(ids))
        else:
            pools.add(f"n{next_id}", rng.choice([Role.PROMPT, Role.TOKEN]), rng.choice([50, 300]),
                      BLOCK_SIZE, 32768)
            next_id += 1
        assert_indexes_consistent(pools)
