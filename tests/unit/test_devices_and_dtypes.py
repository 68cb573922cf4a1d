"""Dtypes, devices and KV memory sizing."""

from __future__ import annotations

import pytest
import torch

from engine import memory
from engine.config import EngineConfig
from engine.engine import Engine
from engine.llm import LLM
from engine.sequence import SamplingParams
from tests.conftest import hf_greedy, make_tiny_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    hf = make_tiny_checkpoint(path, "llama", initializer_range=0.2)
    return path, hf


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_reduced_precision_runs_and_stays_close(ckpt, dtype):
    path, hf = ckpt
    eng = Engine(EngineConfig(model=str(path), dtype=dtype, skip_tokenizer_init=True,
                              kv_cache_bytes=2**20))
    assert eng.kv.tensor.dtype == getattr(torch, dtype)
    prompt = [5, 9, 33, 70, 101, 4]
    (seq,) = LLM(eng).generate([prompt], SamplingParams(max_tokens=3, ignore_eos=True))
    # A random model with large weights has clear margins: the first tokens agree with float32.
    assert seq.output_token_ids == hf_greedy(hf, prompt, 3)


def test_kv_budget_from_free_memory(ckpt, monkeypatch):
    path, _ = ckpt
    monkeypatch.setattr(memory, "free_device_bytes", lambda device: 64 * 2**20)
    eng = Engine(EngineConfig(model=str(path), dtype="float32", skip_tokenizer_init=True,
                              kv_cache_memory_fraction=0.5, kv_cache_headroom_bytes=16 * 2**20,
                              block_size=16))
    # (64 MiB * 0.5 - 16 MiB) / (16 tokens * 512 bytes) = 2048 blocks, capped by what
    # max_num_seqs (256) full-length (256 tokens = 16 blocks) requests could ever use: 4096.
    assert eng.num_blocks == 2048
    monkeypatch.setattr(memory, "free_device_bytes", lambda device: 8 * 2**20)
    with pytest.raises(MemoryError, match="below one block"):
        Engine(EngineConfig(model=str(path), dtype="float32", skip_tokenizer_init=True,
                            kv_cache_headroom_bytes=16 * 2**20))


def test_kv_budget_is_capped_by_useful_size(ckpt):
    path, _ = ckpt
    eng = Engine(EngineConfig(model=str(path), dtype="float32", skip_tokenizer_init=True,
                              max_num_seqs=2, block_size=16))
    assert eng.num_blocks == 2 * 256 // 16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_transformers(ckpt):
    path, hf = ckpt
    eng = Engine(EngineConfig(model=str(path), dtype="float32", device="cuda",
                              skip_tokenizer_init=True, kv_cache_bytes=2**24))
    prompts = [[5, 9, 33, 70, 101, 4], [7, 8], [200] * 20]
    seqs = LLM(eng).generate(prompts, SamplingParams(max_tokens=8, ignore_eos=True))
    for s, p in zip(seqs, prompts):
        assert s.output_token_ids == hf_greedy(hf, p, 8)
    assert eng.num_free_blocks == eng.num_blocks
