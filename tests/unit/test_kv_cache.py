"""Block accounting: exhaustion is a typed error that changes nothing; every path frees."""

from __future__ import annotations

import pytest

from engine.config import EngineConfig
from engine.engine import Engine
from engine.kv_cache import BlockPool, KVCacheExhausted
from engine.llm import LLM
from engine.sequence import InvalidRequestError, SamplingParams, SeqStatus
from tests.conftest import make_tiny_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    make_tiny_checkpoint(path, "llama")
    return path


def _engine(path, num_blocks: int, block_size: int = 4, **kw) -> Engine:
    # K and V, 2 layers, 2 kv heads x 16 dims, float32: 512 bytes per token.
    return Engine(EngineConfig(model=str(path), dtype="float32", skip_tokenizer_init=True,
                               kv_cache_bytes=num_blocks * block_size * 512, block_size=block_size,
                               **kw))


def test_pool_allocation_is_all_or_nothing_and_catches_double_free():
    pool = BlockPool(4)
    got = pool.allocate(3)
    with pytest.raises(KVCacheExhausted) as err:
        pool.allocate(2)
    assert err.value.needed_blocks == 2 and err.value.free_blocks == 1
    assert pool.num_free_blocks == 1
    pool.free(got)
    with pytest.raises(RuntimeError, match="freed twice"):
        pool.free(got[:1])
    assert pool.num_free_blocks == 4


def test_budget_sets_block_count(ckpt):
    assert _engine(ckpt, num_blocks=10).num_blocks == 10


def test_request_too_big_gets_typed_error_and_others_keep_running(ckpt):
    eng = _engine(ckpt, num_blocks=12)
    small = eng.add_request("small", [5, 6, 7, 8, 9], SamplingParams(max_tokens=8, ignore_eos=True))
    eng.reserve(small)  # 13 tokens -> 4 blocks
    eng.prefill([small])
    big = eng.add_request("big", list(range(3, 40)), SamplingParams(max_tokens=10))
    before = eng.num_free_blocks
    with pytest.raises(KVCacheExhausted):
        eng.reserve(big)
    with pytest.raises(KVCacheExhausted):
        eng.prefill([big])  # growth on demand fails the same way, before any compute
    assert eng.num_free_blocks == before and big.block_table == [] and big.output_token_ids == []
    while not small.finished:
        eng.decode([small])
    assert small.status == SeqStatus.FINISHED_LENGTH and len(small.output_token_ids) == 8
    assert eng.num_free_blocks == eng.num_blocks


def test_finished_stopped_and_aborted_requests_free_everything(ckpt):
    eng = _engine(ckpt, num_blocks=64)

    def batch(stop_token_ids=()):
        return [
            eng.add_request(f"len{len(stop_token_ids)}", [9, 8, 7, 6],
                            SamplingParams(max_tokens=5, ignore_eos=True)),
            eng.add_request(f"stop{len(stop_token_ids)}", [9, 8, 7],
                            SamplingParams(max_tokens=50, ignore_eos=True, stop_token_ids=stop_token_ids)),
            eng.add_request(f"abort{len(stop_token_ids)}", [4, 4, 4, 4, 4, 4, 4], SamplingParams(max_tokens=50)),
        ]

    # Learn which token greedy decoding produces second for "stop" in this very batch (a random
    # tiny model has near-tied logits, so a different batch shape may round to another token).
    probe = batch()
    eng.prefill(probe)
    eng.decode([s for s in probe if not s.finished])
    stop_at = probe[1].output_token_ids[1]
    stop_len = probe[1].output_token_ids.index(stop_at) + 1
    for s in probe:
        eng.abort(s)
    assert eng.num_free_blocks == eng.num_blocks

    seqs = batch((stop_at,)) + [eng.add_request("never-started", [4, 5], SamplingParams(max_tokens=50))]
    for s in seqs:
        eng.reserve(s)
    eng.prefill(seqs[:3])
    eng.decode([s for s in seqs[:3] if not s.finished])
    eng.abort(seqs[2])
    eng.abort(seqs[3])
    while not all(s.finished for s in seqs):
        eng.decode([s for s in seqs if not s.finished])
    assert [s.status for s in seqs] == [SeqStatus.FINISHED_LENGTH, SeqStatus.FINISHED_STOPPED,
                                        SeqStatus.FINISHED_ABORTED, SeqStatus.FINISHED_ABORTED]
    assert seqs[1].output_token_ids[-1] == stop_at and len(seqs[1].output_token_ids) == stop_len
    eng.abort(seqs[0])  # aborting a finished request is harmless
    assert eng.num_free_blocks == eng.num_blocks


def test_llm_loop_queues_when_memory_is_short_and_fails_only_the_impossible(ckpt):
    eng = _engine(ckpt, num_blocks=8, max_num_seqs=8)
    prompts = [[5 + i] * 6 for i in range(6)] + [list(range(3, 60))]  # the last one never fits
    out = LLM(eng).generate(prompts, SamplingParams(max_tokens=6, ignore_eos=True))
    assert [s.status for s in out[:6]] == [SeqStatus.FINISHED_LENGTH] * 6
    assert out[6].status == SeqStatus.FINISHED_ERROR and "exceeds" in out[6].error
    assert eng.num_free_blocks == eng.num_blocks


@pytest.mark.parametrize("prompt,params,match", [
    ([], SamplingParams(), "prompt is empty"),
    ([1] * 300, SamplingParams(), "context holds 256"),
    ([1, 999], SamplingParams(), "outside the vocabulary"),
    ([1], SamplingParams(max_tokens=0), "max_tokens"),
    ([1], SamplingParams(temperature=-1.0), "temperature"),
    ([1], SamplingParams(temperature=float("nan")), "temperature"),
    ([1], SamplingParams(top_p=0.0), "top_p"),
    ([1], SamplingParams(top_k=-5), "top_k"),
])
def test_bad_requests_are_refused_with_a_message(ckpt, prompt, params, match):
    eng = _engine(ckpt, num_blocks=4)
    with pytest.raises(InvalidRequestError, match=match):
        eng.add_request("bad", prompt, params)
    assert eng.num_free_blocks == eng.num_blocks


def test_unwritten_cache_memory_never_reaches_a_decode(ckpt):
    """The cache is allocated with torch.empty; a batch of unequal lengths pads its reads, and the
    padding must not read slots that hold garbage (a NaN there survives the attention mask)."""
    import transformers

    from tests.conftest import hf_greedy

    ref_model = transformers.AutoModelForCausalLM.from_pretrained(ckpt).eval()
    prompts = [[9, 8, 7, 6], [9, 8, 7], [4] * 7]
    eng = _engine(ckpt, num_blocks=64)
    eng.kv.tensor.fill_(float("nan"))  # what uninitialised memory may hold
    seqs = [eng.add_request(f"r{i}", p, SamplingParams(max_tokens=6, ignore_eos=True))
            for i, p in enumerate(prompts)]
    eng.prefill(seqs)
    while not all(s.finished for s in seqs):
        eng.decode([s for s in seqs if not s.finished])
    assert [s.output_token_ids for s in seqs] == [hf_greedy(ref_model, p, 6) for p in prompts]
    assert eng.num_free_blocks == eng.num_blocks
