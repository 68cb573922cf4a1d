"""The modelled engine backend: the torch engine's interface without a model."""

from __future__ import annotations

import time

import pytest

from engine.config import EngineConfig
from engine.engine import KVCacheExhausted
from engine.modelled import LatencyModel
from engine.modelled_engine import ModelledEngine
from engine.sequence import InvalidRequestError, SamplingParams, SeqStatus
from tests.conftest import make_tiny_checkpoint


class StepLatency(LatencyModel):
    """Prefill 20 ms + 0.1 ms a token; decode 10 ms; mixed 30 ms."""

    def _prefill_s(self, batch_tokens, batch_size):
        return 0.020 + 0.0001 * batch_tokens

    def _decode_s(self, batch_size, context_tokens):
        return 0.010

    def _mixed_s(self, prefill_tokens, num_prefills, num_decodes, decode_context_tokens):
        return 0.030


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    make_tiny_checkpoint(path, "llama")
    return path


def engine(ckpt, num_blocks=64, time_scale=1.0) -> ModelledEngine:
    # tiny llama: 2 layers, 2 kv heads x 16 dims, float32 -> 512 bytes per token
    return ModelledEngine(EngineConfig(model=str(ckpt), dtype="float32", block_size=4,
                                       kv_cache_bytes=num_blocks * 4 * 512), StepLatency(), time_scale)


def test_prefill_sleeps_the_modelled_time_and_exports_every_layer_as_it_goes(ckpt):
    eng = engine(ckpt)
    seq = eng.add_request("a", list(range(3, 103)), SamplingParams(max_tokens=4))
    eng.reserve(seq)
    seen = []
    t0 = time.monotonic()
    (first,) = eng.prefill([seq], kv_export=lambda layer, kv: seen.append((layer, time.monotonic() - t0, kv)))
    took = time.monotonic() - t0
    assert took >= 0.030  # 20 ms + 100 tokens x 0.1 ms
    assert [layer for layer, _, _ in seen] == [0, 1]
    assert seen[0][1] >= 0.015 - 0.002  # layer 0 is ready half way through the two-layer prefill
    for _, _, batch in seen:
        ((s, kv),) = batch
        assert s is seq and tuple(kv.shape) == (100, 2, 2, 16) and kv.dtype == eng.dtype
    assert first == seq.output_token_ids[0] and seq.status == SeqStatus.RUNNING


def test_tokens_are_a_function_of_the_context_so_a_reprefill_continues_them(ckpt):
    eng = engine(ckpt, time_scale=0.01)
    prompt = [7, 8, 9, 10, 11]
    a = eng.add_request("a", prompt, SamplingParams(max_tokens=6, ignore_eos=True))
    eng.prefill([a])
    while not a.finished:
        eng.decode([a])
    assert a.status == SeqStatus.FINISHED_LENGTH and len(a.output_token_ids) == 6
    assert not set(a.output_token_ids) & eng.eos_token_ids
    # Elsewhere, after a failure: the prompt plus the three tokens already delivered.
    b = eng.add_request("b", prompt + a.output_token_ids[:3], SamplingParams(max_tokens=3, ignore_eos=True))
    eng.prefill([b])
    while not b.finished:
        eng.decode([b])
    assert b.output_token_ids == a.output_token_ids[3:]
    assert all(0 <= t < eng.model_config.vocab_size for t in a.output_token_ids)
    assert eng.num_free_blocks == eng.num_blocks


def test_mixed_step_and_block_accounting_follow_the_torch_engine(ckpt):
    eng = engine(ckpt, num_blocks=12, time_scale=0.01)
    run = eng.add_request("run", [5] * 6, SamplingParams(max_tokens=8, ignore_eos=True))
    eng.prefill([run])
    long = eng.add_request("long", list(range(3, 23)), SamplingParams(max_tokens=2, ignore_eos=True))
    out = eng.step([run], [(long, 8)])
    assert out[0] is not None and out[1] is None and long.num_computed_tokens == 8
    out = eng.step([run], [(long, 12)])
    assert out[1] == long.output_token_ids[0] and long.status == SeqStatus.RUNNING
    with pytest.raises(InvalidRequestError, match="exceeds the budget"):
        eng.step([run, long], [], max_num_tokens=1)
    big = eng.add_request("big", list(range(3, 40)), SamplingParams(max_tokens=10))
    with pytest.raises(KVCacheExhausted):
        eng.reserve(big)
    eng.abort(run)
    eng.abort(long)
    assert eng.num_free_blocks == eng.num_blocks
    with pytest.raises(ValueError, match="time_scale"):
        engine(ckpt, time_scale=0)
