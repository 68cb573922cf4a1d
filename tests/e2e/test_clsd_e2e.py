"""The whole system with real processes: SDK -> clsd -> prompt mlsd -> KV stream -> token mlsd.

Every request's tokens are compared with one engine decoding alone (float32, greedy)."""

from __future__ import annotations

import asyncio
import random
import re
import signal
import time
import urllib.request

import grpc
import pytest

from cls.client import AsyncClsClient, InvalidArgument, ResourceExhausted, Unauthenticated
from engine.config import EngineConfig
from engine.engine import Engine
from engine.llm import LLM
from engine.sequence import SamplingParams
from proto import clsd_pb2 as pb
from proto import clsd_pb2_grpc, mlsd_pb2_grpc
from proto import mlsd_pb2 as mpb
from tests.cls_cluster import ADMIN_TOKEN, Cluster

VOCAB = 49152


def _prompts(n: int, seed: int, lengths=(3, 17, 40, 64, 65, 130, 300, 511)) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, VOCAB) for _ in range(rng.choice(lengths))] for _ in range(n)]


def _reference(model_dir, prompts, max_tokens) -> list[list[int]]:
    eng = Engine(EngineConfig(model=str(model_dir), dtype="float32", kv_cache_bytes=2**30))
    params = [SamplingParams(max_tokens=m, ignore_eos=True) for m in max_tokens]
    return [s.output_token_ids for s in LLM(eng).generate(prompts, params)]


async def _generate_all(address: str, prompts, max_tokens, on_started=None):
    async with AsyncClsClient(address) as client:
        async def one(i):
            return await client.generate(prompts[i], max_tokens=max_tokens[i], ignore_eos=True,
                                         timeout_s=300)
        tasks = [asyncio.create_task(one(i)) for i in range(len(prompts))]
        if on_started is not None:
            await on_started()
        return await asyncio.gather(*tasks)


def _pools(cluster: Cluster) -> dict:
    reply = cluster.admin("ListPools", pb.ListPoolsRequest())
    by_role = {p.role: list(p.machine_ids) for p in reply.pools}
    return {"prompt": by_role.get(1, []), "token": by_role.get(2, []), "mixed": by_role.get(3, []),
            "borrowed": reply.num_borrowed, "returned": reply.num_returned}


def _wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.1)
    return value


@pytest.fixture(scope="module")
def cluster(demo_model_dir, tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("cluster"), demo_model_dir,
                [("prompt-0", "prompt"), ("token-0", "token"), ("token-1", "token")],
                clsd={"router": {"prompt_queue_limit_tokens": 700},
                      "limits": {"max_inflight_requests": 96, "max_tokens_limit": 4096}})
    c.start()
    yield c
    c.stop()


def test_64_concurrent_requests_match_one_engine_and_borrow(cluster, demo_model_dir):
    prompts = _prompts(64, seed=4)
    max_tokens = [6 + i % 7 for i in range(64)]
    reference = _reference(demo_model_dir, prompts, max_tokens)
    results = asyncio.run(_generate_all(cluster.clsd.address, prompts, max_tokens))
    for i, r in enumerate(results):
        assert list(r.token_ids) == reference[i], (i, r, cluster.logs())
        assert r.finish_reason == "length"
        t = r.timing
        assert 0 < t.ttft_s <= t.e2e_s and t.tpot_s >= 0 and t.max_tbt_s >= t.tpot_s - 1e-9
    split = [r for r in results if r.prompt_machine != r.token_machine]
    assert len(split) >= 32, [(r.prompt_machine, r.token_machine) for r in results]
    # 64 prompts of up to 511 tokens at once pass the 700-token queue limit: a token machine was
    # borrowed into the mixed pool, and it goes home once it has no prompt work left.
    pools = _wait_for(lambda: (p := _pools(cluster))["returned"] >= 1 and not p["mixed"] and p, 30,
                      f"borrowed machine never returned: {_pools(cluster)}")
    assert pools["borrowed"] >= 1 and sorted(pools["token"]) == ["token-0", "token-1"]
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{cluster.clsd.ready['metrics_port']}/metrics",
                                     timeout=10).read().decode()
    borrows = re.search(r'clsd_pool_events_total\{event="borrow"\} (\S+)', metrics)
    assert borrows and float(borrows.group(1)) >= 1, metrics[:2000]
    assert re.search(r"clsd_ttft_seconds_count (\S+)", metrics)


def test_admin_needs_the_token(cluster):
    for token in (None, "wrong"):
        with pytest.raises(grpc.RpcError) as e:
            cluster.admin("ListPools", pb.ListPoolsRequest(), token=token)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED

    async def sdk():
        async with AsyncClsClient(cluster.clsd.address, admin_token="nope") as c:
            with pytest.raises(Unauthenticated):
                await c.list_pools()
        async with AsyncClsClient(cluster.clsd.address, admin_token=ADMIN_TOKEN) as c:
            return await c.list_machines()
    machines = asyncio.run(sdk())
    assert sorted(m.machine_id for m in machines) == ["prompt-0", "token-0", "token-1"]


@pytest.mark.parametrize("request_kwargs, fragment", [
    (dict(prompt=b""), "prompt is empty"),
    (dict(prompt=b"\xff\xfe bad"), "UTF-8"),
    (dict(prompt_token_ids=[5] * 9000), "exceeds the context"),
    (dict(prompt=b"hi", max_tokens=5000), "max_tokens"),
    (dict(prompt=b"hi", temperature=-1.0), "temperature"),
    (dict(prompt=b"hi", top_p=1.5), "top_p"),
    (dict(prompt=b"hi", top_k=-7), "top_k"),
    (dict(prompt=b"hi", temperature=float("nan")), "temperature"),
    (dict(prompt_token_ids=[VOCAB + 10]), "vocabulary"),
    (dict(prompt=b"hi", prompt_token_ids=[5]), "not both"),
    (dict(prompt=b"a " * 400_000), "cannot fit: the limit is"),  # refused before tokenizing
    (dict(prompt=b"hi", stop_token_ids=[7] * 2000), "stop_token_ids"),
    (dict(prompt=b"hi", request_id="r" * 300), "request_id"),
])
def test_bad_client_input_is_invalid_argument(cluster, request_kwargs, fragment):
    with grpc.insecure_channel(cluster.clsd.address) as ch:
        stub = clsd_pb2_grpc.ClientServiceStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Generate(pb.GenerateRequest(**request_kwargs), timeout=30))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value
    assert fragment in e.value.details()


def test_sdk_raises_typed_errors_and_flood_is_bounded(cluster):
    async def run():
        async with AsyncClsClient(cluster.clsd.address) as c:
            with pytest.raises(InvalidArgument, match="prompt is empty"):
                await c.generate("   ")
            # 96 in flight is the bound: a flood of 160 long requests gets RESOURCE_EXHAUSTED for
            # the excess instead of growing clsd's memory; the admitted ones are cancelled.
            tasks = [asyncio.create_task(c.generate([7] * 32, max_tokens=2000, ignore_eos=True))
                     for _ in range(160)]
            done, _ = await asyncio.wait(tasks, timeout=60, return_when=asyncio.FIRST_EXCEPTION)
            errors = [t.exception() for t in done if t.exception() is not None]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            return errors
    errors = asyncio.run(run())
    assert errors and all(isinstance(e, ResourceExhausted) for e in errors), errors
    # Cancellation reached the machines: each reports (to us, directly) no work and free KV,
    # and clsd holds nothing for them.
    def idle():
        for proc in cluster.machines.values():
            with grpc.insecure_channel(proc.address) as ch:
                load = mlsd_pb2_grpc.MachineServiceStub(ch).GetLoad(mpb.LoadRequest(), timeout=10)
            if load.kv_blocks_used or load.prompt_queue_len or load.decode_queue_len or load.num_running:
                return False
        return all(m.num_requests == 0 for m in cluster.admin("ListMachines", pb.ListMachinesRequest()).machines)
    _wait_for(idle, 60, f"machines still busy after cancellation:\n{cluster.logs()}")
    assert all("Traceback" not in proc.log() for proc in cluster.machines.values()), cluster.logs()


def test_text_prompt_with_chat_template(cluster):
    async def run():
        async with AsyncClsClient(cluster.clsd.address) as c:
            return await c.generate("What is the capital of France?", chat=True, max_tokens=24)
    r = asyncio.run(run())
    assert "Paris" in r.text and r.finish_reason in ("stop", "length"), r


@pytest.fixture
def own_cluster(demo_model_dir, tmp_path):
    """A cluster of its own, for a test that changes it (resizes it, kills a machine)."""
    c = Cluster(tmp_path, demo_model_dir, [("prompt-0", "prompt"), ("token-0", "token"),
                                           ("token-1", "token")])
    c.start()
    yield c
    c.stop()


def test_resize_while_running_loses_nothing(own_cluster, demo_model_dir):
    c = own_cluster
    prompts = _prompts(24, seed=5, lengths=(20, 90, 200))
    max_tokens = [24] * 24
    reference = _reference(demo_model_dir, prompts, max_tokens)
    moves = []

    async def resize_when_decoding():
        def decoding():
            ms = c.admin("ListMachines", pb.ListMachinesRequest()).machines
            return any(m.pending_decode_tokens > 0 and m.home == 2 for m in ms)
        await asyncio.to_thread(_wait_for, decoding, 60, "no decode work appeared")
        reply = await asyncio.to_thread(c.admin, "ResizePools", pb.ResizePoolsRequest(num_prompt=2))
        moves.extend(reply.moves)

    results = asyncio.run(_generate_all(c.clsd.address, prompts, max_tokens, resize_when_decoding))
    assert len(moves) == 1 and moves[0].from_pool == 2 and moves[0].to_pool == 1, moves
    for i, r in enumerate(results):
        assert list(r.token_ids) == reference[i], (i, r, c.logs())
    pools = _pools(c)
    assert len(pools["prompt"]) == 2 and len(pools["token"]) == 1, pools


def test_killing_a_token_machine_mid_decode_reroutes(own_cluster, demo_model_dir):
    c = own_cluster
    prompts = _prompts(16, seed=6, lengths=(20, 90, 200))
    max_tokens = [40] * 16
    reference = _reference(demo_model_dir, prompts, max_tokens)
    killed = []

    async def kill_when_decoding():
        def busy_token_machine():
            ms = c.admin("ListMachines", pb.ListMachinesRequest()).machines
            return next((m.machine_id for m in ms if m.machine_id.startswith("token")
                         and m.num_requests > 0 and m.pending_decode_tokens > 0), None)
        victim = await asyncio.to_thread(_wait_for, busy_token_machine, 60, "no decode work")
        c.machines[victim].proc.send_signal(signal.SIGKILL)
        killed.append(victim)

    results = asyncio.run(_generate_all(c.clsd.address, prompts, max_tokens, kill_when_decoding))
    for i, r in enumerate(results):
        assert list(r.token_ids) == reference[i], (i, r, c.logs())
    assert any(r.num_reroutes > 0 for r in results)
    machines = c.admin("ListMachines", pb.ListMachinesRequest()).machines
    assert killed[0] not in [m.machine_id for m in machines]
