"""Real mlsd processes on loopback: a prompt machine and a token machine, driven as the cluster
scheduler would drive them."""

from __future__ import annotations

import asyncio
import glob
import os
import random
import subprocess
import sys
import time
import urllib.request

import grpc
import pytest

from engine.config import EngineConfig
from engine.engine import Engine
from engine.llm import LLM
from engine.sequence import SamplingParams
from proto import mlsd_pb2 as pb
from tests.mls_driver import ROOT, Driver, MachineProc

TRANSPORTS = ["tcp", "ucx", "shm"]


def _machine_config(model_dir, role: str, transport: str, **engine) -> dict:
    return {
        "machine_id": f"{role}-0", "role": role, "drain_timeout_s": 20,
        "engine": {"model": str(model_dir), "dtype": "float32", "block_size": 16,
                   "kv_cache_bytes": 256 * 2**20, **engine},
        "scheduler": {"prompt_token_cap": 512, "max_queue_len": 64},
        "kv_transfer": {"transport": transport, "layerwise_min_prompt_tokens": 64, "timeout_s": 20},
    }


def _skip_without(transport: str) -> None:
    if transport == "ucx":
        pytest.importorskip("ucxx", reason="ucxx (ucxx-cu12) is not installed")


@pytest.fixture(scope="module")
def prompts(demo_model_dir):
    rng = random.Random(3)
    vocab = 49152
    lengths = [rng.choice([3, 17, 40, 64, 65, 130, 300, 511]) for _ in range(32)]
    return [[rng.randrange(100, vocab) for _ in range(n)] for n in lengths]


@pytest.fixture(scope="module")
def reference(demo_model_dir, prompts):
    """One engine decoding alone, float32."""
    eng = Engine(EngineConfig(model=str(demo_model_dir), dtype="float32", kv_cache_bytes=2**30))
    params = [SamplingParams(max_tokens=8 + i % 5, ignore_eos=True) for i in range(len(prompts))]
    return [s.output_token_ids for s in LLM(eng).generate(prompts, params)]


def _sampling(i: int) -> pb.SamplingParams:
    return pb.SamplingParams(max_tokens=8 + i % 5, ignore_eos=True)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_32_concurrent_requests_match_one_engine(demo_model_dir, tmp_path, prompts, reference,
                                                 transport):
    _skip_without(transport)
    configs = [_machine_config(demo_model_dir, role, transport) for role in ("prompt", "token")]
    for cfg in configs:  # all 32 reserve at once, then wait for the whole prompt queue: on a
        cfg["kv_transfer"]["timeout_s"] = 120  # small shared CPU host that exceeds 20 s
    prompt_m = MachineProc(tmp_path, "prompt", configs[0])
    token_m = MachineProc(tmp_path, "token", configs[1])
    try:
        prompt_m.start()
        token_m.start()

        async def run():
            async with Driver(prompt_m.address, token_m.address) as d:
                results = await asyncio.gather(*[d.generate(p, _sampling(i))
                                                 for i, p in enumerate(prompts)])
                loads = [await s.GetLoad(pb.LoadRequest()) for s in (d.prompt, d.token)]
                return results, loads

        results, loads = asyncio.run(run())
        segments = [glob.glob(f"/dev/shm/mls-kv-{m.proc.pid}-*") for m in (prompt_m, token_m)]
        if transport == "shm":  # the KV caches live in shared memory while the daemons run
            assert all(len(s) == 1 for s in segments), segments
        for i, r in enumerate(results):
            assert r.status == "FINISHED", (r, token_m.log()[-2000:])
            assert r.tokens == reference[i], i
        modes = {r.kv_mode for r in results}
        assert modes == {"layerwise", "serialized"}
        for load in loads:
            assert load.kv_blocks_used == 0, load
        metrics = urllib.request.urlopen(
            f"http://127.0.0.1:{token_m.ready['metrics_port']}/metrics", timeout=5).read().decode()
        assert "mlsd_kv_received_bytes_total" in metrics and "mlsd_decode_step_seconds" in metrics
        assert prompt_m.stop() == 0 and token_m.stop() == 0
        assert not [p for s in segments for p in s if os.path.exists(p)], "a segment outlived SIGTERM"
    finally:
        prompt_m.kill()
        token_m.kill()


@pytest.fixture(scope="module")
def pair(demo_model_dir, tmp_path_factory):
    """A prompt and a token machine over TCP, with a small KV memory on the token side (room for
    about four of the test requests at once) and short queues and deadlines."""
    tmp = tmp_path_factory.mktemp("pair")
    prompt_cfg = _machine_config(demo_model_dir, "prompt", "tcp")
    # float32 SmolLM2: 2 x 30 layers x 3 kv heads x 64 dims x 4 bytes = 46,080 bytes per token.
    token_cfg = _machine_config(demo_model_dir, "token", "tcp", kv_cache_bytes=160 * 16 * 46080,
                                max_model_len=4096)
    token_cfg["scheduler"]["max_queue_len"] = 24
    for cfg in (prompt_cfg, token_cfg):
        cfg["kv_transfer"]["timeout_s"] = 10.0
        cfg["kv_transfer"]["start_timeout_s"] = 20.0  # prefills queue behind each other here
        cfg["kv_transfer"]["early_connect_wait_s"] = 1.0  # an unknown request is refused in 1 s
    prompt_m = MachineProc(tmp, "prompt", prompt_cfg).start()
    token_m = MachineProc(tmp, "token", token_cfg).start()
    yield prompt_m, token_m
    prompt_m.kill()
    token_m.kill()


async def _loads(d: Driver):
    return [await s.GetLoad(pb.LoadRequest()) for s in (d.prompt, d.token)]


def test_token_batch_fills_memory_then_queues_and_loses_nothing(pair):
    prompt_m, token_m = pair
    # 160 blocks of 16 tokens; each request holds 300 + 40 tokens = 22 blocks: 7 fit at once.
    rng = random.Random(5)
    prompts = [[rng.randrange(100, 40000) for _ in range(300)] for _ in range(20)]
    sampling = pb.SamplingParams(max_tokens=40, ignore_eos=True)

    async def run():
        async with Driver(prompt_m.address, token_m.address) as d:
            peak = {"running": 0, "queued": 0}

            async def watch():
                while True:
                    load = await d.token.GetLoad(pb.LoadRequest())
                    peak["running"] = max(peak["running"], load.num_running)
                    peak["queued"] = max(peak["queued"], load.decode_queue_len)
                    assert load.kv_blocks_used <= 160
                    await asyncio.sleep(0.05)

            watcher = asyncio.create_task(watch())
            results = await asyncio.gather(*[d.generate(p, sampling) for p in prompts])
            watcher.cancel()
            return results, peak, await _loads(d)

    results, peak, loads = asyncio.run(run())
    assert [r.status for r in results] == ["FINISHED"] * 20
    assert all(len(r.tokens) == 40 for r in results)
    assert peak["running"] == 7 and peak["queued"] > 0, peak
    assert [load.kv_blocks_used for load in loads] == [0, 0]
    metrics = urllib.request.urlopen(
        f"http://127.0.0.1:{prompt_m.ready['metrics_port']}/metrics", timeout=5).read().decode()
    # Prompt batches never exceed the cap (512): every batch falls in the le=512 bucket.
    count = _metric(metrics, 'mlsd_batch_size_count{phase="prefill"}')
    assert count > 0 and _metric(metrics, 'mlsd_batch_size_bucket{le="512.0",phase="prefill"}') == count


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in metrics")


def test_every_machine_takes_every_kind_of_work_and_the_tokens_match_one_engine(pair, prompts,
                                                                              reference):
    """The configured role is only the home pool. At the same time the prompt machine prefills
    for the token machine, decodes for it (roles reversed: the token machine prefills) and runs
    Generate (both phases locally); every request still produces one engine's tokens, and the
    KV memory comes back on both machines."""
    prompt_m, token_m = pair
    idx = list(range(12))

    async def run():
        async with Driver(prompt_m.address, token_m.address) as forward, \
                Driver(token_m.address, prompt_m.address) as reverse:
            work = [forward.generate(prompts[i], _sampling(i)) for i in idx[0:4]]
            work += [reverse.generate(prompts[i], _sampling(i)) for i in idx[4:8]]
            work += [reverse.generate_colocated(prompts[i], _sampling(i)) for i in idx[8:12]]
            results = await asyncio.gather(*work)
            return results, await _loads(reverse)

    results, loads = asyncio.run(run())
    for i, r in zip(idx, results):
        assert r.status == "FINISHED", (i, r, prompt_m.log()[-2000:])
        assert r.tokens == reference[i], i
    assert [load.kv_blocks_used for load in loads] == [0, 0]
    assert [load.role for load in loads] == [pb.TOKEN, pb.PROMPT]  # the home roles, as configured


def test_bad_input_to_every_rpc_is_refused_with_a_message(pair):
    prompt_m, token_m = pair

    async def run():
        async with Driver(prompt_m.address, token_m.address) as d:
            ok = pb.SamplingParams(max_tokens=4)

            def spec(rid="x", prompt=(5, 6, 7), sampling=ok):
                return pb.RequestSpec(request_id=rid, prompt_token_ids=list(prompt), sampling=sampling)

            cases = [
                (d.token.AddDecode(pb.AddDecodeRequest(request=spec(rid=""))), "INVALID_ARGUMENT", "request_id"),
                (d.token.AddDecode(pb.AddDecodeRequest(request=spec(prompt=()))), "INVALID_ARGUMENT", "prompt is empty"),
                (d.token.AddDecode(pb.AddDecodeRequest(request=spec(prompt=[5] * 4096))), "INVALID_ARGUMENT", "context"),
                (d.token.AddDecode(pb.AddDecodeRequest(request=spec(sampling=pb.SamplingParams()))), "INVALID_ARGUMENT", "max_tokens"),
                (d.token.AddDecode(pb.AddDecodeRequest(request=pb.RequestSpec(request_id="y", prompt_token_ids=[1]))), "INVALID_ARGUMENT", "sampling"),
                (d.token.AddDecode(pb.AddDecodeRequest(request=spec(sampling=pb.SamplingParams(max_tokens=2, temperature=float("nan"))))), "INVALID_ARGUMENT", "temperature"),
                (d.token.AddDecode(pb.AddDecodeRequest(request=spec(prompt=[60000]))), "INVALID_ARGUMENT", "vocabulary"),
                (d.token.AddDecode(pb.AddDecodeRequest(request=spec(sampling=pb.SamplingParams(max_tokens=1000), prompt=[5] * 2000))), "RESOURCE_EXHAUSTED", "KV blocks"),
                (d.prompt.Prefill(pb.PrefillRequest(request=spec())), "INVALID_ARGUMENT", "kv_address"),
                # Malformed addresses are refused at the RPC, before the prompt joins a batch.
                (d.prompt.Prefill(pb.PrefillRequest(request=spec(rid="a1"), kv_address=b"no-port")), "INVALID_ARGUMENT", "not host:port"),
                (d.prompt.Prefill(pb.PrefillRequest(request=spec(rid="a2"), kv_address=b"\xff\xfe:1")), "INVALID_ARGUMENT", "not text"),
                (d.prompt.Prefill(pb.PrefillRequest(request=spec(rid="a3"), kv_address=b"h:" + b"9" * 5000)), "INVALID_ARGUMENT", "at most 4096"),
                (d.token.Abort(pb.AbortRequest(request_id="never-seen")), "INVALID_ARGUMENT", "unknown request id"),
            ]
            got = []
            for call, code, words in cases:
                try:
                    await call
                    got.append(("OK", "", code, words))
                except grpc.aio.AioRpcError as e:
                    got.append((e.code().name, e.details(), code, words))
            # A duplicate id while the first is still queued.
            await d.token.AddDecode(pb.AddDecodeRequest(request=spec(rid="dup", prompt=[5] * 300,
                                                                     sampling=pb.SamplingParams(max_tokens=40))))
            try:
                await d.token.AddDecode(pb.AddDecodeRequest(request=spec(rid="dup")))
                got.append(("OK", "", "INVALID_ARGUMENT", "duplicate"))
            except grpc.aio.AioRpcError as e:
                got.append((e.code().name, e.details(), "INVALID_ARGUMENT", "duplicate"))
            await d.token.Abort(pb.AbortRequest(request_id="dup"))
            # A flood beyond the queue bound: memory for 7, queue of 24.
            flood = [d.token.AddDecode(pb.AddDecodeRequest(request=spec(
                rid=f"flood-{i}", prompt=[5] * 300, sampling=pb.SamplingParams(max_tokens=40))))
                for i in range(40)]
            outcomes = await asyncio.gather(*flood, return_exceptions=True)
            exhausted = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
            for i in range(40):
                try:
                    await d.token.Abort(pb.AbortRequest(request_id=f"flood-{i}"))
                except grpc.aio.AioRpcError:
                    pass
            # Still serving, nothing leaked.
            ok_result = await d.generate([5, 6, 7, 8], pb.SamplingParams(max_tokens=3))
            return got, exhausted, ok_result, await _loads(d)

    got, exhausted, ok_result, loads = asyncio.run(run())
    for code, details, want_code, words in got:
        assert code == want_code and words in details, (code, details, want_code, words)
    assert len(exhausted) == 40 - 7 - 24
    assert all(e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue is full" in e.details()
               for e in exhausted)
    assert ok_result.status == "FINISHED" and len(ok_result.tokens) == 3
    assert [load.kv_blocks_used for load in loads] == [0, 0]


def _peer(*args) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "tests.kv_peer", *map(str, args)],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True)
    return proc


def test_dead_or_hung_sender_fails_the_request_in_time_and_frees_blocks(pair):
    prompt_m, token_m = pair

    async def run():
        async with Driver(prompt_m.address, token_m.address) as d:
            outcomes = {}
            for case in ("hung", "killed"):
                rid = f"victim-{case}"
                q = d.watch(rid)
                await d.token.AddDecode(pb.AddDecodeRequest(
                    request=pb.RequestSpec(request_id=rid, prompt_token_ids=[5] * 100,
                                           sampling=pb.SamplingParams(max_tokens=4)),
                    transfer_timeout_s=1.5))
                peer = _peer("send", d.token_info.kv_address.hex(), rid, 100, 3)
                assert peer.stdout.readline().strip() == "sent"
                start = time.monotonic()
                if case == "killed":
                    peer.kill()
                event = await d.next_event(q, "FAILED", timeout_s=10)
                outcomes[case] = (time.monotonic() - start, event.message)
                peer.kill()
                peer.wait()
            ok = await d.generate([5, 6, 7], pb.SamplingParams(max_tokens=3))
            return outcomes, ok, await _loads(d)

    outcomes, ok, loads = asyncio.run(run())
    hung_s, hung_msg = outcomes["hung"]
    assert hung_s < 3.0 and "timed out" in hung_msg, outcomes
    killed_s, killed_msg = outcomes["killed"]
    assert killed_s < 2.0 and "KV transfer failed" in killed_msg, outcomes
    assert ok.status == "FINISHED" and [load.kv_blocks_used for load in loads] == [0, 0]


def test_dead_or_hung_receiver_does_not_stall_the_prompt_machine(pair):
    prompt_m, token_m = pair

    async def run():
        # The second driver's event stream is the prompt machine's (its roles are reversed).
        async with Driver(prompt_m.address, token_m.address) as d, \
                Driver(token_m.address, prompt_m.address) as prompt_events:
            watched = {f"orphan-{case}": prompt_events.watch(f"orphan-{case}")
                       for case in ("hung", "killed")}
            failed_before = _metric(_metrics(prompt_m), "mlsd_kv_failed_transfers_total")
            for case in ("hung", "killed"):
                rid = f"orphan-{case}"
                peer = _peer("receive", rid, 300)
                address = bytes.fromhex(peer.stdout.readline().strip())
                spec = pb.RequestSpec(request_id=rid, prompt_token_ids=[5] * 300,
                                      sampling=pb.SamplingParams(max_tokens=4))
                reply = await d.prompt.Prefill(pb.PrefillRequest(request=spec, kv_address=address,
                                                                 transfer_timeout_s=1.5))
                assert reply.kv_mode == "layerwise"
                if case == "killed":
                    peer.kill()
                # The prompt machine keeps serving while that transfer fails.
                ok = await d.generate([5, 6, 7], pb.SamplingParams(max_tokens=3))
                assert ok.status == "FINISHED"
                # ... and reports the failed send as the request's FAILED event, so its clsd
                # re-routes at once rather than after the token side's start window.
                failed = await prompt_events.next_event(watched[rid], "FAILED", 10)
                assert "KV send to the token machine failed" in failed.message, failed.message
                peer.kill()
                peer.wait()
            deadline = time.monotonic() + 10
            while _metric(_metrics(prompt_m), "mlsd_kv_failed_transfers_total") < failed_before + 2:
                assert time.monotonic() < deadline, "the prompt machine never gave up the sends"
                await asyncio.sleep(0.1)
            return await _loads(d)

    loads = asyncio.run(run())
    assert [load.kv_blocks_used for load in loads] == [0, 0]


def _metrics(m: MachineProc) -> str:
    url = f"http://127.0.0.1:{m.ready['metrics_port']}/metrics"
    return urllib.request.urlopen(url, timeout=5).read().decode()


def test_malformed_kv_headers_are_refused_by_name_and_the_token_machine_keeps_serving(pair):
    import torch

    from mls.kv.base import KVSpec, TransferState
    from mls.kv.factory import make_sender

    prompt_m, token_m = pair

    async def run():
        async with Driver(prompt_m.address, token_m.address) as d:
            sender = make_sender("tcp")
            errors = {}
            for field in ("dtype", "num_tokens", "head_dim", "request_id"):
                rid = f"victim-{field}"
                q = d.watch(rid)
                await d.token.AddDecode(pb.AddDecodeRequest(
                    request=pb.RequestSpec(request_id=rid, prompt_token_ids=[5] * 40,
                                           sampling=pb.SamplingParams(max_tokens=4)),
                    transfer_timeout_s=5))
                spec = {"dtype": KVSpec(rid, 30, 40, 3, 64, "bfloat16"),
                        "num_tokens": KVSpec(rid, 30, 41, 3, 64, "float32"),
                        "head_dim": KVSpec(rid, 30, 40, 3, 32, "float32"),
                        "request_id": KVSpec("nobody-expects-me", 30, 40, 3, 64, "float32")}[field]
                handle = sender.open(d.token_info.kv_address, spec, time.monotonic() + 5)
                handle.send_layer(0, torch.zeros(spec.layer_shape, dtype=getattr(torch, spec.dtype)))
                assert handle.wait(10) == TransferState.FAILED
                errors[field] = handle.error
                if field == "request_id":  # nothing of the expected request was touched
                    await d.token.Abort(pb.AbortRequest(request_id=rid))
                else:  # the request whose KV arrived malformed ends FAILED, saying why
                    event = await d.next_event(q, "FAILED", timeout_s=5)
                    assert field in event.message
            sender.close()
            ok = await d.generate([5, 6, 7], pb.SamplingParams(max_tokens=3))
            return errors, ok, await _loads(d)

    errors, ok, loads = asyncio.run(run())
    for field, error in errors.items():
        assert (field if field != "request_id" else "'nobody-expects-me' is not expected") in error
    assert ok.status == "FINISHED" and [load.kv_blocks_used for load in loads] == [0, 0]


def test_callers_that_go_away_mid_prefill_leave_a_working_machine(pair):
    """A Prefill whose caller's deadline passes is cancelled on the server side while the worker
    still runs it; the worker must shrug that off (it once died of it) and free everything."""
    prompt_m, token_m = pair
    rng = random.Random(9)
    prompts = [[rng.randrange(100, 40000) for _ in range(300)] for _ in range(8)]
    sampling = pb.SamplingParams(max_tokens=4, ignore_eos=True)

    async def run():
        async with Driver(prompt_m.address, token_m.address) as d:
            calls = [d.prompt.Prefill(pb.PrefillRequest(
                request=pb.RequestSpec(request_id=f"gone-{i}", prompt_token_ids=p, sampling=sampling),
                kv_address=d.token_info.kv_address), timeout=0.02) for i, p in enumerate(prompts)]
            outcomes = await asyncio.gather(*calls, return_exceptions=True)
            after = await d.generate(prompts[0], sampling)
            async with asyncio.timeout(30):
                while (loads := await _loads(d)) and (loads[0].kv_blocks_used or loads[0].prompt_queue_len):
                    await asyncio.sleep(0.05)
            return outcomes, after, loads

    outcomes, after, loads = asyncio.run(run())
    assert all(isinstance(o, grpc.aio.AioRpcError) and o.code() == grpc.StatusCode.DEADLINE_EXCEEDED
               for o in outcomes), outcomes
    assert after.status == "FINISHED" and len(after.tokens) == 4, (after, prompt_m.log()[-3000:])
    assert "Traceback" not in prompt_m.log()


def test_a_reservation_nobody_sends_to_fails_after_the_start_window(pair):
    prompt_m, token_m = pair

    async def run():
        async with Driver(prompt_m.address, token_m.address) as d:
            q = d.watch("orphan")
            start = time.monotonic()
            reply = await d.token.AddDecode(pb.AddDecodeRequest(request=pb.RequestSpec(
                request_id="orphan", prompt_token_ids=[5] * 40, sampling=pb.SamplingParams(max_tokens=4))))
            event = await d.next_event(q, "FAILED", timeout_s=40)
            return reply, time.monotonic() - start, event, await _loads(d)

    reply, waited_s, event, loads = asyncio.run(run())
    assert reply.reserved and 19.5 < waited_s < 30.0, (reply, waited_s)
    assert "waiting for the sender to connect" in event.message, event.message
    assert loads[1].kv_blocks_used == 0
