"""Sampling: seeded draws are reproducible whatever the batch; top-k/top-p/temperature behave."""

from __future__ import annotations

import pytest
import torch

from engine.config import EngineConfig
from engine.engine import Engine
from engine.sampler import sample
from engine.sequence import SamplingParams
from tests.conftest import make_tiny_checkpoint


@pytest.fixture(scope="module")
def eng(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    make_tiny_checkpoint(path, "llama", initializer_range=0.02)  # flat logits: sampling varies
    return Engine(EngineConfig(model=str(path), dtype="float32", skip_tokenizer_init=True,
                               kv_cache_bytes=8 * 2**20, block_size=4))


def _run(eng, prompts_params):
    seqs = [eng.add_request(str(i), p, sp) for i, (p, sp) in enumerate(prompts_params)]
    eng.prefill(seqs)
    while not all(s.finished for s in seqs):
        eng.decode([s for s in seqs if not s.finished])
    return [s.output_token_ids for s in seqs]


def test_seeded_request_is_reproducible_alone_or_in_any_batch(eng):
    p = SamplingParams(max_tokens=12, temperature=1.0, seed=1234, ignore_eos=True)
    other = SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, ignore_eos=True)
    alone = _run(eng, [([10, 11, 12], p)])[0]
    in_batch = _run(eng, [([40, 41], other), ([10, 11, 12], p), ([7] * 9, other)])[1]
    assert alone == in_batch
    different_seed = _run(eng, [([10, 11, 12], SamplingParams(max_tokens=12, temperature=1.0,
                                                              seed=99, ignore_eos=True))])[0]
    assert different_seed != alone


def test_top_k_1_and_tiny_top_p_equal_greedy(eng):
    greedy = _run(eng, [([3, 4, 5], SamplingParams(max_tokens=8, ignore_eos=True))])[0]
    k1 = _run(eng, [([3, 4, 5], SamplingParams(max_tokens=8, temperature=1.0, top_k=1,
                                               ignore_eos=True))])[0]
    p0 = _run(eng, [([3, 4, 5], SamplingParams(max_tokens=8, temperature=1.0, top_p=1e-6,
                                               ignore_eos=True))])[0]
    assert greedy == k1 == p0


def _draws(params: SamplingParams, logits: torch.Tensor, n: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    greedy = logits.argmax(-1)
    return torch.tensor([sample(logits, greedy, [params], [0], gen)[0] for _ in range(n)])


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    k2 = _draws(SamplingParams(temperature=1.0, top_k=2), logits, 300)
    assert set(k2.tolist()) == {0, 1}
    # softmax: 0.636, 0.234, 0.086, ... -> top_p 0.8 keeps tokens 0 and 1 only
    p8 = _draws(SamplingParams(temperature=1.0, top_p=0.8), logits, 300)
    assert set(p8.tolist()) == {0, 1}
    full = _draws(SamplingParams(temperature=1.0), logits, 2000)
    freq0 = (full == 0).float().mean().item()
    assert abs(freq0 - 0.636) < 0.05
    hot = _draws(SamplingParams(temperature=5.0), logits, 2000)
    assert (hot == 0).float().mean().item() < freq0 - 0.2  # higher temperature flattens
