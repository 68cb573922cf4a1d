"""clsd under hostile-but-legal input and across its own restart, with real processes on 127.0.0.1:
clsd and modelled-engine mlsd machines (the real daemons, gRPC and KV paths; step times from the
roofline model instead of a model's compute), so every test here is cheap.

1. A stream keeps its token pace while one 10 MB gRPC prompt, six prompts at the character limit
   (tokenized, then refused for their tokens) and six maximal HTTP bodies arrive; no lease
   expires; each of them gets a clear error.
2. Corrupt and random protobuf bytes get INVALID_ARGUMENT, and clsd logs no traceback.
3. The in-flight bound follows the registered machines: the excess of a burst gets
   RESOURCE_EXHAUSTED within 1 s, the rest completes.
4. After a clsd crash and restart: the operator's pool sizes come back as the machines register
   again, a client retrying with the same request id is served, and a request id already in
   flight is answered ALREADY_EXISTS.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import shutil
import socket
import statistics
import time
import urllib.error
import urllib.request

import grpc
import pytest
from google.protobuf.message import DecodeError

from cls.client import AsyncClsClient, ClsError, InvalidArgument, ResourceExhausted
from proto import clsd_pb2 as pb
from proto import mlsd_pb2 as mpb
from tests.cls_cluster import Cluster
from tests.conftest import DEMO_MODEL

MODELLED = {"backend": "modelled", "dtype": "bfloat16", "kv_cache_bytes": 48 * 2**20,  # 2,176 tokens
            "modelled": {"profile": None, "model": "llama2-70b", "hardware": "h100-80gb",
                         "tensor_parallel": 8, "time_scale": 4.0}}  # about 20 ms per decode step
SPLIT = [("prompt-0", "prompt"), ("token-0", "token")]
CHARS_PER_TOKEN = 81  # SmolLM2's tokenizer: its longest vocabulary entry


def _wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)
    return value


def _cluster(tmp_path, machines, clsd: dict) -> Cluster:
    if not (DEMO_MODEL / "config.json").is_file():
        pytest.skip(f"demo model absent at {DEMO_MODEL} (make demo-model)")
    return Cluster(tmp_path, DEMO_MODEL, machines, clsd, MODELLED)


def _metric(cluster: Cluster, name: str) -> float | None:
    url = f"http://127.0.0.1:{cluster.clsd.ready['metrics_port']}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    m = re.search(rf"^{name} (\S+)$", text, re.M)
    return float(m.group(1)) if m else None


@pytest.fixture(scope="module")
def door(tmp_path_factory):
    c = _cluster(tmp_path_factory.mktemp("door"), SPLIT, {"http": {"port": 0}}).start()
    yield c
    c.stop()


# --- 1. the event loop is never held by a request --------------------------------------------------


def _post(url: str, body: bytes) -> tuple[int, str]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_a_stream_keeps_its_pace_and_leases_hold_while_huge_prompts_arrive(door):
    http = f"http://127.0.0.1:{door.clsd.ready['http_port']}/v1/completions"
    limit = 8192 * CHARS_PER_TOKEN  # the demo model's context x its most characters per token
    words = "the capital of France is Paris and "
    near_limit = (words * (limit // len(words)))[:limit - 1000]
    huge_body = json.dumps({"model": door.clsd.ready["model"], "max_tokens": 4,
                            "prompt": "z" * (4 * 2**20 - 200)}).encode()
    assert len(huge_body) <= 4 * 2**20  # just under http.max_body_bytes: the door reads it all

    async def run():
        times: list[float] = []
        attack_done = asyncio.Event()
        async with AsyncClsClient(door.clsd.address) as client:
            async def stream():
                async with client.generate_stream(list(range(200, 260)), max_tokens=2000, ignore_eos=True,
                                                  timeout_s=120) as s:
                    async for _ in s:
                        times.append(time.monotonic())
                        if attack_done.is_set() and times[-1] - attack_end[0] > 1.0:
                            return  # a second past the attack: the pace is measured

            async def refusal(prompt: str):
                try:
                    return await client.generate(prompt, max_tokens=4, timeout_s=60)
                except ClsError as e:
                    return e

            streaming = asyncio.create_task(stream())
            await asyncio.wait_for(_until(lambda: len(times) >= 20 or streaming.done()), 30)
            assert not streaming.done(), streaming.result()
            t0 = time.monotonic()
            attack_end = [0.0]
            answers = await asyncio.gather(refusal("x " * (5 * 2**20)),
                                           *(refusal(near_limit) for _ in range(6)),
                                           *(asyncio.to_thread(_post, http, huge_body) for _ in range(6)))
            attack_end[0] = time.monotonic()
            attack_done.set()
            await asyncio.wait_for(streaming, 60)
            return times, t0, attack_end[0], answers

    times, t0, t1, answers = asyncio.run(run())
    gaps = [b - a for a, b in zip(times, times[1:])]
    step = statistics.median(gaps)
    during = [b - a for a, b in zip(times, times[1:]) if b >= t0 and a <= t1]
    assert during, "the stream delivered nothing while the prompts arrived"
    assert max(gaps) <= step + 1.0, (f"largest gap {max(gaps):.2f} s, normal step {step:.3f} s, "
                                     f"attack {t1 - t0:.1f} s\n{door.logs()}")
    log = door.clsd.log()
    assert "lease expired" not in log and "Traceback" not in log, log[-4000:]
    machines = door.admin("ListMachines", pb.ListMachinesRequest()).machines
    assert sorted(m.machine_id for m in machines) == ["prompt-0", "token-0"]
    assert all(m.lease_expires_in_s > 0 for m in machines)
    for proc in door.machines.values():  # no machine had to register again
        assert "no longer knows lease" not in proc.log(), proc.log()[-3000:]
    # Each got a clear answer: refused before tokenizing (10 MB, the HTTP bodies), or tokenized
    # on a thread and refused for its tokens.
    huge, *near = answers[:7]
    assert isinstance(huge, InvalidArgument) and f"cannot fit: the limit is {limit} characters" in huge.message
    assert all(isinstance(e, InvalidArgument) and "exceeds the context" in e.message for e in near), near
    for status, text in answers[7:]:
        assert status == 400 and "cannot fit" in text, (status, text[:500])


async def _until(predicate) -> None:
    while not predicate():
        await asyncio.sleep(0.01)


# --- 2. corrupt protobufs ---------------------------------------------------------------------------


def _parses(message_type, body: bytes) -> bool:
    try:
        message_type.FromString(body)
        return True
    except DecodeError:
        return False


def test_corrupt_and_random_protobufs_get_invalid_argument(door):
    rng = random.Random(15)
    valid = pb.GenerateRequest(prompt=b"What is the capital of France?", max_tokens=4,
                               request_id="r").SerializeToString()
    bodies = [valid[:n] for n in range(1, len(valid))]  # cut short anywhere
    bodies += [bytes(rng.randrange(256) for _ in range(rng.randint(1, 300))) for _ in range(150)]
    methods = {"/splitserve.cls.v1.ClientService/Generate": pb.GenerateRequest,
               "/splitserve.cls.v1.RegistryService/Register": pb.RegisterRequest,
               "/splitserve.cls.v1.RegistryService/Heartbeat": pb.HeartbeatRequest,
               "/splitserve.cls.v1.AdminService/ResizePools": pb.ResizePoolsRequest}
    codes: dict[str, set] = {m: set() for m in methods}
    num_corrupt = 0
    with grpc.insecure_channel(door.clsd.address) as ch:
        for method, message_type in methods.items():
            streaming = method.endswith("/Generate")
            call = (ch.unary_stream if streaming else ch.unary_unary)(method)  # bytes in, bytes out
            for body in bodies:
                parses = _parses(message_type, body)
                if not parses and not streaming and rng.random() < 0.7:
                    continue  # enough of them; each unary case is the same path
                if parses and not streaming:
                    continue  # a parsed Register would dial its random address
                num_corrupt += not parses
                try:
                    list(call(body, timeout=20)) if streaming else call(body, timeout=20)
                    code = grpc.StatusCode.OK
                except grpc.RpcError as e:
                    code = e.code()
                    if not parses:
                        assert "does not parse" in e.details(), e.details()
                codes[method].add(code)
                # What does not parse is INVALID_ARGUMENT; what parses is a request like any other.
                assert code == grpc.StatusCode.INVALID_ARGUMENT or parses, (method, body, code)
    assert num_corrupt > 100 and all(codes.values()), codes
    log = door.clsd.log()
    assert "Traceback" not in log and "Unexpected" not in log, log[-4000:]
    assert door.clsd.proc.poll() is None


# --- 3. the in-flight bound follows the machines -----------------------------------------------------


def test_a_burst_past_the_capacity_bound_is_refused_at_once(tmp_path):
    # 1 x (3 + 3) request slots of the two machines: 6 in flight at most.
    c = _cluster(tmp_path, SPLIT, {"limits": {"requests_per_machine": 3, "inflight_factor": 1.0}}).start()
    try:
        _wait_for(lambda: _metric(c, "clsd_inflight_bound") == 6, 10, "no bound of 6")

        async def burst():
            async with AsyncClsClient(c.clsd.address) as client:
                async def one(i):
                    t = time.monotonic()
                    try:
                        r = await client.generate([300 + i] * 20, max_tokens=60, ignore_eos=True, timeout_s=60)
                        return r, time.monotonic() - t
                    except ClsError as e:
                        return e, time.monotonic() - t
                return await asyncio.gather(*(one(i) for i in range(16)))
        results = asyncio.run(burst())
        done = [r for r, _ in results if not isinstance(r, Exception)]
        refused = [(e, s) for e, s in results if isinstance(e, Exception)]
        assert len(done) == 6 and all(len(r.token_ids) == 60 for r in done), results
        assert len(refused) == 10 and all(isinstance(e, ResourceExhausted) for e, _ in refused), refused
        assert all(s < 1.0 for _, s in refused), [s for _, s in refused]
        assert "the cluster is full (the limit is 6: 1 x 6 request slots of the 2 machines" in refused[0][0].message
        # A machine that drains takes its slots with it.
        c.admin("DrainMachine", pb.DrainRequest(machine_id="prompt-0"))
        _wait_for(lambda: _metric(c, "clsd_inflight_bound") == 3, 10, "the bound did not follow the drain")
    finally:
        c.stop()


# --- 4. a clsd restart -------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pools(c: Cluster) -> dict[int, list[str]]:
    return {p.role: sorted(p.machine_ids) for p in c.admin("ListPools", pb.ListPoolsRequest()).pools}


def test_pool_sizes_and_request_ids_across_a_clsd_restart(tmp_path):
    machines = [("prompt-0", "prompt"), ("token-0", "token"), ("token-1", "token")]
    state_dir = tmp_path / "state"
    c = _cluster(tmp_path, machines, {"grpc_port": _free_port(), "state_dir": str(state_dir)})
    c.start()
    try:
        moves = c.admin("ResizePools", pb.ResizePoolsRequest(num_prompt=2)).moves
        assert len(moves) == 1 and moves[0].to_pool == mpb.PROMPT
        resized = _pools(c)
        assert len(resized[mpb.PROMPT]) == 2 and len(resized[mpb.TOKEN]) == 1
        assert json.loads((state_dir / "pools.json").read_text())["num_prompt"] == 2

        async def long_request_then_crash():
            async with AsyncClsClient(c.clsd.address) as client:
                async with client.generate_stream([500] * 30, max_tokens=2000, ignore_eos=True,
                                                  request_id="retry-me", timeout_s=60) as s:
                    n = 0
                    async for d in s:
                        n += len(d.token_ids)
                        if n >= 10:
                            break
                    # A second client with the same id while the first is in flight.
                    with pytest.raises(ClsError) as dup:
                        await client.generate([500] * 30, max_tokens=4, request_id="retry-me", timeout_s=30)
                    assert dup.value.code == grpc.StatusCode.ALREADY_EXISTS, dup.value
                    assert "already in flight" in dup.value.message
                    c.clsd.proc.kill()  # a crash, with the request running on its machines
                    c.clsd.proc.wait(10)
        asyncio.run(long_request_then_crash())
        shutil.copy(c.clsd.log_path, tmp_path / "clsd-first.log")

        c.clsd.start()  # the same port and state directory
        c.wait_registered(60)
        assert _pools(c) == resized, (resized, c.logs())

        async def retry():
            async with AsyncClsClient(c.clsd.address) as client:
                return await client.generate([500] * 30, max_tokens=20, ignore_eos=True,
                                             request_id="retry-me", timeout_s=60)
        r = asyncio.run(retry())
        assert r.request_id == "retry-me" and len(r.token_ids) == 20 and r.finish_reason == "length"
    finally:
        c.stop()
