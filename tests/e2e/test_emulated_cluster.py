"""Real daemons on the modelled engine: clsd and four mlsd processes that replay Splitwise's
profiled Llama2-70B/H100 step times (slowed down so a burst is routed before any step ends),
through the real gRPC and KV paths; their routing decisions must be the simulator's for the same
arrivals, and their tokens the modelled engine's."""

from __future__ import annotations

import asyncio
import random
import re
import time
import urllib.request

import pytest

from cls.client import AsyncClsClient
from cls.sim.simulator import ClusterDesign, Simulator
from cls.sim.traces import Arrival
from engine.config import EngineConfig
from engine.modelled import ProfileLatencyModel
from engine.modelled_engine import ModelledEngine
from mls.config import ConfigError, EngineSection, MlsConfig, ModelledSection
from proto import clsd_pb2 as pb
from tests.cls_cluster import Cluster
from tests.conftest import DEMO_MODEL, SHARED

PROFILE = SHARED / "profiles" / "splitwise_perf_model.csv"
MACHINES = [("prompt-0", "prompt"), ("prompt-1", "prompt"), ("token-0", "token"), ("token-1", "token")]
QUEUE_LIMIT = 1500


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if not PROFILE.is_file():
        pytest.skip(f"Splitwise profile absent at {PROFILE} (../shared/profiles is not checked out)")
    if not (DEMO_MODEL / "config.json").is_file():
        pytest.skip(f"demo model absent at {DEMO_MODEL} (make demo-model)")
    engine = {"backend": "modelled", "dtype": "bfloat16", "kv_cache_bytes": 48 * 2**20,
              "modelled": {"profile": str(PROFILE), "model": "llama2-70b", "hardware": "h100-80gb",
                           "tensor_parallel": 8, "time_scale": 20.0}}
    # No heartbeat during the test: every decision sees only clsd's own charges and credits, as
    # the simulator's router does.
    clsd = {"heartbeat_interval_s": 30.0, "lease_ttl_s": 90.0,
            "router": {"prompt_queue_limit_tokens": QUEUE_LIMIT}}
    c = Cluster(tmp_path_factory.mktemp("emulated"), DEMO_MODEL, MACHINES, clsd, engine).start()
    yield c
    c.stop()


def routed_count(metrics_port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return int(sum(float(v) for v in re.findall(r'^clsd_routed_requests_total\{[^}]*\} (\S+)$', text, re.M)))


async def send_burst(address: str, metrics_port: int, arrivals: list[Arrival], prompts: list[list[int]]):
    """Sends the requests one after another, each once clsd has routed the one before; returns
    the completions and the seconds it took to route them all."""
    async with AsyncClsClient(address) as client:
        tasks, t0 = [], time.monotonic()
        for i, (a, prompt) in enumerate(zip(arrivals, prompts)):
            tasks.append(asyncio.create_task(client.generate(prompt, max_tokens=a.output_len,
                                                             ignore_eos=True, timeout_s=120)))
            deadline = time.monotonic() + 10
            while routed_count(metrics_port) < i + 1:
                assert time.monotonic() < deadline, f"clsd did not route request {i}"
                await asyncio.sleep(0.005)
        routed_s = time.monotonic() - t0
        return await asyncio.gather(*tasks), routed_s


def test_modelled_daemons_route_like_the_simulator_and_produce_the_modelled_tokens(cluster):
    blocks = {m.machine_id: m.kv_blocks_total
              for m in cluster.admin("ListMachines", pb.ListMachinesRequest()).machines}
    assert len(set(blocks.values())) == 1 and set(blocks) == {mid for mid, _ in MACHINES}
    rng = random.Random(3)
    arrivals = [Arrival(0.0, rng.choice([64, 200, 450, 700, 1000]), rng.randint(2, 5)) for _ in range(12)]
    prompts = [[rng.randrange(200, 40000) for _ in range(a.prompt_len)] for a in arrivals]

    results, routed_s = asyncio.run(send_burst(cluster.clsd.address, cluster.clsd.ready["metrics_port"],
                                               arrivals, prompts))

    design = ClusterDesign(num_prompt=2, num_token=2, kv_blocks_per_machine=next(iter(blocks.values())),
                           block_size=16, prompt_queue_limit_tokens=QUEUE_LIMIT, max_model_len=8192)
    latency = ProfileLatencyModel.from_csv(PROFILE, model="llama2-70b", hardware="h100-80gb", tensor_parallel=8)
    sim = Simulator(design, latency).run(arrivals)
    want = [(r.prompt_machine, r.token_machine) for r in sorted(sim.requests, key=lambda r: int(r.request_id[1:]))]
    got = [(r.prompt_machine, r.token_machine) for r in results]
    assert got == want, f"daemons {got}\nsimulator {want}\n{cluster.logs()}"
    # The burst exercises the whole policy: prompts past the queue limit borrow token machines,
    # token memory runs short and borrows prompt machines, and some requests run colocated.
    assert {m.from_pool for _, m in sim.borrow_events} == {"prompt", "token"}
    assert any(p == t for p, t in got) and any(p != t for p, t in got)
    # The premise: every decision came before any token existed (no credit in between), as in the
    # simulator's burst at t = 0. Each request arrived after the first was sent, so its TTFT
    # is a lower bound on when its first token came, counted from the first send.
    assert min(r.timing.ttft_s for r in results) > routed_s

    reference = ModelledEngine(EngineConfig(model=str(DEMO_MODEL), kv_cache_bytes=2**20), latency)
    for a, prompt, r in zip(arrivals, prompts, results):
        expected, context = [], list(prompt)
        for _ in range(a.output_len):
            expected.append(reference.next_token(context))
            context.append(expected[-1])
        assert list(r.token_ids) == expected and r.finish_reason == "length" and r.num_reroutes == 0


def test_modelled_backend_config_errors_name_the_key(tmp_path):
    base = {"machine_id": "m", "role": "token"}
    with pytest.raises(ConfigError, match="engine.backend must be one of"):
        MlsConfig(**base, engine=EngineSection(backend="jax"))

    for modelled, message in ((ModelledSection(profile=str(tmp_path / "none.csv")), "engine.modelled.profile"),
                              (ModelledSection(profile=None, hardware="tpu"), "engine.modelled.hardware"),
                              (ModelledSection(profile=None, time_scale=0), "engine.modelled.time_scale"),
                              (ModelledSection(profile=None, decode_axis="x"), "engine.modelled.decode_axis")):
        with pytest.raises(ConfigError, match=message):
            MlsConfig(**base, engine=EngineSection(backend="modelled", modelled=modelled))
    MlsConfig(**base, engine=EngineSection(backend="modelled", modelled=ModelledSection(profile=None)))
