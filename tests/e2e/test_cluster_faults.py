"""Faults of whole machines and of clsd itself, with real processes (issue 15): a lost prompt
machine spares the requests already decoding elsewhere, and requests orphaned by a lost clsd stop
decoding on their machines within the grace."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
import urllib.request

import grpc

from cls.client import AsyncClsClient, ResourceExhausted
from proto import clsd_pb2 as pb
from proto import mlsd_pb2 as mpb
from proto import mlsd_pb2_grpc
from tests.cls_cluster import Cluster
from tests.e2e.test_clsd_e2e import _prompts, _reference, _wait_for


def _machines(c: Cluster) -> dict:
    return {m.machine_id: m for m in c.admin("ListMachines", pb.ListMachinesRequest()).machines}


def test_losing_a_prompt_machine_does_not_re_prefill_requests_already_decoding(demo_model_dir, tmp_path):
    c = Cluster(tmp_path, demo_model_dir, [("prompt-0", "prompt"), ("prompt-1", "prompt"),
                                           ("token-0", "token")]).start()
    try:
        n = 6
        prompts = _prompts(n, seed=11, lengths=(40, 90, 150))
        max_tokens = [160] * n
        reference = _reference(demo_model_dir, prompts, max_tokens)

        async def one(client, prompt, max_tokens, decoding: asyncio.Event):
            tokens, last = [], None
            async for delta in client.generate_stream(prompt, max_tokens=max_tokens, ignore_eos=True,
                                                      timeout_s=300):
                tokens += delta.token_ids
                last = delta
                if len(tokens) >= 2:  # the token machine's first token: the KV has arrived
                    decoding.set()
            return tokens, last

        async def run():
            async with AsyncClsClient(c.clsd.address) as client:
                decoding = [asyncio.Event() for _ in prompts]
                tasks = [asyncio.create_task(one(client, p, m, e))
                         for p, m, e in zip(prompts, max_tokens, decoding)]
                async with asyncio.timeout(120):
                    for e in decoding:
                        await e.wait()
                c.machines["prompt-0"].proc.send_signal(signal.SIGKILL)
                return await asyncio.gather(*tasks)

        results = asyncio.run(run())
        assert any(last.prompt_machine == "prompt-0" for _, last in results)  # some lost theirs
        for i, (tokens, last) in enumerate(results):
            assert tokens == reference[i], (i, c.logs())
            assert last.num_reroutes == 0, (i, last, c.logs())
        # clsd did see the machine go (its lease expired), and routes nothing to it any more.
        _wait_for(lambda: "prompt-0" not in _machines(c), 30, "prompt-0 still registered")
    finally:
        c.stop()


def test_orphaned_decodes_stop_within_the_grace_after_clsd_dies(demo_model_dir, tmp_path):
    grace_s = 2.0
    c = Cluster(tmp_path, demo_model_dir, [("prompt-0", "prompt"), ("token-0", "token")],
                machine={"orphan_grace_s": grace_s}).start()
    stop_client = threading.Event()
    try:
        prompts = _prompts(4, seed=12, lengths=(30, 60))

        async def run():
            async with AsyncClsClient(c.clsd.address) as client:
                tasks = [asyncio.create_task(client.generate(p, max_tokens=1000, ignore_eos=True,
                                                             timeout_s=120)) for p in prompts]
                await asyncio.to_thread(stop_client.wait, 120)  # the streams break with clsd
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

        client = threading.Thread(target=lambda: asyncio.run(run()), daemon=True)
        client.start()
        def load(mid: str) -> mpb.LoadReport:
            with grpc.insecure_channel(c.machines[mid].address) as ch:
                return mlsd_pb2_grpc.MachineServiceStub(ch).GetLoad(mpb.LoadRequest(), timeout=5)

        # The token machine's own report (the router's charge comes before any decode starts).
        _wait_for(lambda: load("token-0").num_running > 0, 120, "no decoding")
        c.clsd.proc.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()

        assert load("token-0").num_running > 0  # decoding for nobody now
        _wait_for(lambda: load("token-0").num_running == 0, grace_s + 15, "orphans still decode")
        took_s = time.monotonic() - killed_at
        assert took_s < grace_s + 15
        for mid in ("prompt-0", "token-0"):
            report = load(mid)
            assert report.kv_blocks_used == 0 and report.num_running == 0, (mid, report)
        assert "orphaned: clsd unreachable" in c.machines["token-0"].log()
    finally:
        stop_client.set()
        c.stop()


def test_a_prefill_longer_than_the_rpc_deadline_runs_once_and_finishes(demo_model_dir, tmp_path):
    """The Prefill deadline follows the work: with a 1 s RPC deadline, a 3,000-token prompt that
    takes longer than that to prefill on this CPU is neither re-routed nor prefilled twice."""
    c = Cluster(tmp_path, demo_model_dir, [("prompt-0", "prompt"), ("token-0", "token")],
                clsd={"limits": {"rpc_timeout_s": 1.0}},
                engine={"kv_cache_bytes": 512 * 2**20}).start()
    try:
        prompt = _prompts(1, seed=13, lengths=(3000,))[0]

        async def run():
            async with AsyncClsClient(c.clsd.address) as client:
                return await client.generate(prompt, max_tokens=4, ignore_eos=True, timeout_s=300)

        result = asyncio.run(run())
        assert len(result.token_ids) == 4 and result.num_reroutes == 0, (result, c.logs())
        assert result.timing.ttft_s > 1.0, result.timing  # the prefill outlasted the RPC deadline
        metrics = urllib.request.urlopen(
            f"http://127.0.0.1:{c.machines['prompt-0'].ready['metrics_port']}/metrics", timeout=5).read().decode()
        assert _metric(metrics, "mlsd_prefill_step_seconds_count") == 1  # prefilled exactly once
    finally:
        c.stop()


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in metrics")


def test_a_burst_beyond_the_machines_queues_is_refused_at_once_not_re_routed(demo_model_dir, tmp_path):
    """Machine queues of 2: a burst of 40 gets completions and RESOURCE_EXHAUSTED (with the reason)
    within a machine turn; overload never turns into re-routes that add load."""
    c = Cluster(tmp_path, demo_model_dir, [("prompt-0", "prompt"), ("token-0", "token")],
                machine={"scheduler": {"prompt_token_cap": 512, "max_queue_len": 2}}).start()
    try:
        prompts = _prompts(40, seed=14, lengths=(200, 300))

        async def run():
            async with AsyncClsClient(c.clsd.address) as client:
                async def one(p):
                    start = time.monotonic()
                    try:
                        r = await client.generate(p, max_tokens=16, ignore_eos=True, timeout_s=300)
                        return "ok", r.num_reroutes, time.monotonic() - start, ""
                    except ResourceExhausted as e:
                        return "exhausted", 0, time.monotonic() - start, str(e)
                return await asyncio.gather(*(one(p) for p in prompts))

        outcomes = asyncio.run(run())
        kinds = [o[0] for o in outcomes]
        assert kinds.count("ok") > 0 and kinds.count("exhausted") > 0, (kinds, c.logs())
        assert sum(o[1] for o in outcomes) == 0  # no re-route
        refused = [o for o in outcomes if o[0] == "exhausted"]
        # A machine answers a full queue at the top of its next turn (here behind a prefill batch
        # of up to 512 tokens on a loaded 2-core CPU), so "at once" is within a few seconds, far
        # from the minutes a re-routed overload would take.
        assert all(o[2] < 5.0 and "overloaded" in o[3] and "queue is full" in o[3] for o in refused), refused
    finally:
        c.stop()
