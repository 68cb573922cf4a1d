"""The daemon and its simulation make the same choices: the same arrivals run through mlsd's engine
worker (the modelled engine, turns driven by hand) and through the cluster simulator give the same
MachineScheduler plan, turn by turn.

The simulator decides when each turn starts (virtual time) and which arrivals it has seen by then;
the worker is handed the same arrivals before the same turn. Everything else (what each turn
runs, which tokens come back, when requests finish and free their blocks) is worked out on each
side on its own: the worker from its engine's sequences, the simulator from its records."""

from __future__ import annotations

import random

import pytest

from cls.sim.simulator import ClusterDesign, Simulator
from cls.sim.traces import Arrival
from engine.config import EngineConfig
from engine.modelled import LatencyModel
from engine.modelled_engine import ModelledEngine
from engine.sequence import SamplingParams
from mls.config import MlsConfig, from_dict
from mls.metrics import MlsMetrics
from mls.worker import EngineWorker
from tests.conftest import make_tiny_checkpoint

BLOCK_SIZE, NUM_BLOCKS, TOKEN_CAP, STEP_BUDGET, MAX_NUM_SEQS = 4, 48, 64, 24, 16


class StepLatency(LatencyModel):
    """Made-up step times: only their order matters to the simulator's turn boundaries."""

    def _prefill_s(self, batch_tokens, batch_size):
        return 0.020 + 0.0001 * batch_tokens

    def _decode_s(self, batch_size, context_tokens):
        return 0.010 + 0.001 * batch_size

    def _mixed_s(self, prefill_tokens, num_prefills, num_decodes, decode_context_tokens):
        return 0.030 + 0.0001 * prefill_tokens


def arrivals(seed: int, n: int = 40) -> list[Arrival]:
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        t += rng.choice([0.0, 0.0, 0.005, 0.03, 0.2])  # bursts (ties) and gaps
        out.append(Arrival(t, rng.randint(3, 70), rng.randint(1, 12)))
    return out


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    make_tiny_checkpoint(path, "llama")
    return path


def worker_for(ckpt, mixed_policy: str) -> EngineWorker:
    cfg = from_dict(MlsConfig, {
        "machine_id": "parity", "role": "mixed", "metrics_port": None,
        "engine": {"model": str(ckpt), "dtype": "float32", "block_size": BLOCK_SIZE,
                   "max_num_seqs": MAX_NUM_SEQS},
        "scheduler": {"prompt_token_cap": TOKEN_CAP, "mixed_policy": mixed_policy,
                      "max_num_batched_tokens": STEP_BUDGET}})
    # tiny llama: 2 layers, 2 kv heads x 16 dims, float32 -> 512 bytes per token
    engine = ModelledEngine(EngineConfig(model=str(ckpt), dtype="float32", block_size=BLOCK_SIZE,
                                         max_num_seqs=MAX_NUM_SEQS,
                                         kv_cache_bytes=NUM_BLOCKS * BLOCK_SIZE * 512),
                            StepLatency(), time_scale=1e-4)
    assert engine.num_blocks == NUM_BLOCKS
    return EngineWorker(engine, cfg, lambda out: None, MlsMetrics("parity", "mixed"), None, None)


@pytest.mark.parametrize("mixed_policy", ["prompt_first", "chunked"])
@pytest.mark.parametrize("seed", [0, 1])
def test_worker_and_simulator_plan_every_turn_alike(ckpt, mixed_policy, seed):
    worker = worker_for(ckpt, mixed_policy)
    trace = arrivals(seed)
    sim_turns: list[tuple[int, tuple]] = []  # (arrivals routed before the plan, the plan)

    def on_plan(machine_id, now_s, plan):
        sim_turns.append((len(sim.records), plan.summary()))

    design = ClusterDesign(num_prompt=0, num_token=1, kv_blocks_per_machine=NUM_BLOCKS,
                           block_size=BLOCK_SIZE, prompt_token_cap=TOKEN_CAP,
                           max_num_seqs=worker.engine.max_num_seqs, colocated=True,
                           mixed_policy=mixed_policy, max_num_batched_tokens=STEP_BUDGET)
    sim = Simulator(design, StepLatency(), on_plan=on_plan)
    result = sim.run(trace)
    assert len(result.finished) == len(trace) and not result.rejected

    added = 0
    for turn, (num_arrived, sim_plan) in enumerate(sim_turns):
        while added < num_arrived:
            a = trace[added]
            worker.add_generate(f"r{added}", list(range(5, 5 + a.prompt_len)),
                                SamplingParams(max_tokens=a.output_len, ignore_eos=True))
            added += 1
        plan = worker.turn()
        assert plan is not None and plan.summary() == sim_plan, f"turn {turn} differs"
    # Both ran every request to its end and gave every block back.
    assert added == len(trace) and worker.idle
    assert worker.engine.num_free_blocks == NUM_BLOCKS and worker.scheduler.budget.used == 0
    assert sum(1 for p in sim_turns if p[1][3] or p[1][2]) > 5  # prompts ran in many turns
    assert any(len(p[1][4]) > 1 for p in sim_turns)  # and decodes were batched
