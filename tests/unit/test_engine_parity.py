"""Greedy output is token-identical to transformers' generate() in float32, for tiny random
Llama, Mistral and Qwen2 models of several shapes, mixed prompt lengths in one packed prefill,
and requests joining a running decode batch."""

from __future__ import annotations

import random

import pytest

from engine.config import EngineConfig
from engine.engine import Engine
from engine.sequence import SamplingParams
from tests.conftest import hf_greedy, make_tiny_checkpoint

SHAPES = {
    "llama-gqa-untied": ("llama", {}),
    "llama-mha-tied": ("llama", dict(num_key_value_heads=4, tie_word_embeddings=True)),
    "llama-headdim32-3layers": ("llama", dict(head_dim=32, num_hidden_layers=3,
                                              num_attention_heads=2, num_key_value_heads=1)),
    "llama3-rope": ("llama", dict(rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                "original_max_position_embeddings": 64})),
    "llama-linear-rope": ("llama", dict(rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "mistral-mqa": ("mistral", dict(num_attention_heads=8, num_key_value_heads=1, hidden_size=64)),
    "qwen2-bias-tied": ("qwen2", dict(num_attention_heads=4, num_key_value_heads=2,
                                      tie_word_embeddings=True)),
    "qwen2-yarn": ("qwen2", dict(rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                               "original_max_position_embeddings": 64})),
}

NUM_NEW = 10


def _prompts(vocab: int, lengths: list[int], seed: int = 1) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


def _engine(path, **kw) -> Engine:
    return Engine(EngineConfig(model=str(path), dtype="float32", skip_tokenizer_init=True,
                               kv_cache_bytes=8 * 2**20, block_size=4, **kw))


def _params() -> SamplingParams:
    return SamplingParams(max_tokens=NUM_NEW, ignore_eos=True)


@pytest.fixture(scope="module", params=sorted(SHAPES))
def tiny(request, tmp_path_factory):
    arch, overrides = SHAPES[request.param]
    path = tmp_path_factory.mktemp(request.param)
    hf = make_tiny_checkpoint(path, arch, **overrides)
    return path, hf


def test_mixed_lengths_in_one_prefill_match_transformers(tiny):
    path, hf = tiny
    eng = _engine(path)
    prompts = _prompts(hf.config.vocab_size, [3, 17, 1, 9, 30])
    seqs = [eng.add_request(str(i), p, _params()) for i, p in enumerate(prompts)]
    for s in seqs:
        eng.reserve(s)
    eng.prefill(seqs)
    while not all(s.finished for s in seqs):
        eng.decode([s for s in seqs if not s.finished])
    for s, p in zip(seqs, prompts):
        assert s.output_token_ids == hf_greedy(hf, p, NUM_NEW), s
    assert eng.num_free_blocks == eng.num_blocks


def test_requests_join_and_leave_a_running_decode_batch(tiny):
    path, hf = tiny
    eng = _engine(path)
    prompts = _prompts(hf.config.vocab_size, [5, 12, 7, 21], seed=2)
    short = SamplingParams(max_tokens=4, ignore_eos=True)
    first = [eng.add_request("a", prompts[0], _params()), eng.add_request("b", prompts[1], short)]
    for s in first:
        eng.reserve(s)
    eng.prefill(first)
    for _ in range(3):
        eng.decode([s for s in first if not s.finished])
    assert first[1].finished  # "b" left the batch after 4 tokens
    late = [eng.add_request("c", prompts[2], _params()), eng.add_request("d", prompts[3], _params())]
    eng.prefill(late)  # no reserve(): blocks grow on demand
    seqs = first + late
    while not all(s.finished for s in seqs):
        eng.decode([s for s in seqs if not s.finished])
    for s, p in zip(seqs, prompts):
        want = hf_greedy(hf, p, s.params.max_tokens)
        assert s.output_token_ids == want, s
    assert eng.num_free_blocks == eng.num_blocks
