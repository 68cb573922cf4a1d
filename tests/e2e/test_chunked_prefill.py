"""Chunked prefill in the engine: `Engine.step` runs decode rows and prompt chunks in one forward
pass. Greedy output must be token-identical to transformers and to unchunked prefill, for chunks
of every size (ending mid-block and on block edges, prompts split into many chunks), with other
requests decoding in the same steps; the per-step token budget holds; nothing leaks."""

from __future__ import annotations

import asyncio
import random

import pytest
import torch

from engine.config import EngineConfig
from engine.engine import Engine
from engine.kv_cache import KVCacheExhausted
from engine.llm import LLM
from engine.sequence import InvalidRequestError, SamplingParams, SeqStatus
from mls.policy import Job, MixedScheduler
from proto import mlsd_pb2 as pb
from tests.conftest import hf_greedy, make_tiny_checkpoint
from tests.e2e.test_mlsd_e2e import _machine_config, _metric, _metrics, _sampling, prompts
from tests.mls_driver import Driver, MachineProc

__all__ = ["prompts"]  # the fixture shared with the mlsd end-to-end tests

SHAPES = {
    "llama-gqa": ("llama", {}),
    "mistral-mqa": ("mistral", dict(num_attention_heads=8, num_key_value_heads=1)),
    "qwen2-bias-tied": ("qwen2", dict(tie_word_embeddings=True)),
}
NUM_NEW = 8


def _engine(path, block_size: int = 4, **kw) -> Engine:
    return Engine(EngineConfig(model=str(path), dtype="float32", skip_tokenizer_init=True,
                               kv_cache_bytes=8 * 2**20, block_size=block_size, **kw))


def _prompts(lengths: list[int], seed: int, vocab: int = 256) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


def _params(n: int = NUM_NEW) -> SamplingParams:
    return SamplingParams(max_tokens=n, ignore_eos=True)


@pytest.fixture(scope="module", params=sorted(SHAPES))
def tiny(request, tmp_path_factory):
    arch, overrides = SHAPES[request.param]
    path = tmp_path_factory.mktemp(request.param)
    return path, make_tiny_checkpoint(path, arch, **overrides)


@pytest.mark.parametrize("pattern", [(1,), (3,), (4,), (5, 2, 9), (13,)])
def test_prompts_split_into_chunks_while_others_decode_match_transformers(tiny, pattern):
    """Two requests decode in every step while two long prompts are computed in chunks of the
    pattern's sizes (cycled; block size 4, so most chunks end mid-block)."""
    path, hf = tiny
    eng = _engine(path)
    prompts = _prompts([6, 11, 37, 22], seed=len(pattern) * 7 + pattern[0])
    seqs = [eng.add_request(f"r{i}", p, _params()) for i, p in enumerate(prompts)]
    running, pending = seqs[:2], seqs[2:]
    eng.prefill(running)
    step = 0
    while pending or any(not s.finished for s in running):
        decode = [s for s in running if not s.finished]
        chunks = []
        for s in pending:
            size = pattern[step % len(pattern)]
            chunks.append((s, min(size, s.prompt_len - s.num_computed_tokens)))
        out = eng.step(decode, chunks)
        assert len(out) == len(decode) + len(chunks)
        assert all(t is not None for t in out[:len(decode)])
        for (s, _), t in zip(chunks, out[len(decode):]):
            # a token exactly when the prompt completed, and it is the request's first
            assert (t is not None) == (s.num_computed_tokens == s.prompt_len)
            assert t is None or s.output_token_ids == [t]
        running += [s for s in pending if s.status == SeqStatus.RUNNING]
        pending = [s for s in pending if s.status == SeqStatus.WAITING]
        step += 1
    assert step > 37 // max(pattern) - 1  # the long prompt really took many steps
    for s, p in zip(seqs, prompts):
        assert s.output_token_ids == hf_greedy(hf, p, NUM_NEW), s
    assert eng.num_free_blocks == eng.num_blocks


@pytest.mark.parametrize("budget", [3, 8, 40])
def test_the_chunked_policy_driving_the_engine_matches_unchunked_and_keeps_the_budget(tiny, budget):
    """The mlsd loop in miniature: requests arrive over time, the chunked MixedScheduler plans
    each step under `budget` tokens and the engine runs it (and itself refuses a step over the
    budget). Tokens equal an unchunked prompt-first run of the same requests, and transformers."""
    path, hf = tiny
    eng = _engine(path, block_size=8)
    rng = random.Random(budget)
    prompts = _prompts([rng.choice([1, 5, 8, 9, 23, 50]) for _ in range(7)], seed=budget)
    lens = [rng.randint(1, NUM_NEW) for _ in prompts]
    arrive_at = sorted(rng.randrange(0, 12) for _ in prompts)
    sched = MixedScheduler(eng.num_blocks, eng.kv.block_size, policy="chunked",
                           max_num_batched_tokens=budget)
    seqs = {}
    step = 0
    while step <= max(arrive_at) or sched.running or sched.prefilling or len(sched.queue):
        for i, at in enumerate(arrive_at):
            if at == step:
                seqs[f"r{i}"] = eng.add_request(f"r{i}", prompts[i], _params(lens[i]))
                sched.add(Job(f"r{i}", len(prompts[i]), lens[i]))
        plan = sched.schedule()
        assert plan.num_tokens <= budget
        for c in plan.chunks:
            if c.start == 0:
                eng.reserve(seqs[c.job.request_id])
        eng.step([seqs[r] for r in plan.decode],
                 [(seqs[c.job.request_id], c.num_tokens) for c in plan.chunks],
                 max_num_tokens=budget)
        for rid in [*plan.decode, *(c.job.request_id for c in plan.chunks if c.last)]:
            sched.token_generated(rid)
            if seqs[rid].finished:
                sched.release(rid)
        step += 1
    got = [seqs[f"r{i}"].output_token_ids for i in range(len(prompts))]
    ref = LLM(_engine(path, block_size=8)).generate(prompts, [_params(n) for n in lens])
    assert got == [s.output_token_ids for s in ref]
    assert got == [hf_greedy(hf, p, n) for p, n in zip(prompts, lens)]
    assert eng.num_free_blocks == eng.num_blocks and sched.budget.used == 0


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    return path, make_tiny_checkpoint(path, "llama")


def test_unwritten_cache_memory_never_reaches_a_mixed_step(llama):
    """The cache is torch.empty: decode rows padded to the longest context and chunks reading
    their cached context must both read only written slots (a NaN elsewhere would spread)."""
    path, hf = llama
    eng = _engine(path)
    eng.kv.tensor.fill_(float("nan"))
    prompts = _prompts([3, 9, 30], seed=4)
    seqs = [eng.add_request(f"r{i}", p, _params()) for i, p in enumerate(prompts)]
    eng.prefill(seqs[:2])
    long = seqs[2]
    while not all(s.finished for s in seqs):
        decode = [s for s in seqs if s.status == SeqStatus.RUNNING]
        left = long.prompt_len - long.num_computed_tokens
        eng.step(decode, [(long, min(7, left))] if long.status == SeqStatus.WAITING else [])
    assert [s.output_token_ids for s in seqs] == [hf_greedy(hf, p, NUM_NEW) for p in prompts]
    assert eng.num_free_blocks == eng.num_blocks


def test_bad_steps_are_refused_and_change_nothing(llama):
    path, _ = llama
    eng = _engine(path)
    a, b = (eng.add_request(r, p, _params()) for r, p in zip("ab", _prompts([10, 20], seed=5)))
    eng.prefill([a])
    eng.step([], [(b, 6)])
    state = (eng.num_free_blocks, b.num_computed_tokens, list(a.output_token_ids))
    cases = [
        (([a], [(b, 15)]), "a chunk of 15 prompt tokens, 14 left"),
        (([a], [(b, 0)]), "a chunk of 0"),
        (([], [(a, 1)]), "a chunk of 1 prompt tokens, 0 left"),  # its prompt is done
        (([b], []), "not ready to decode"),
        (([a], [(b, 3), (b, 3)]), "appears twice"),
        (([a], [(b, 14)], 14), "step of 15 tokens exceeds the budget of 14"),
    ]
    for args, words in cases:
        with pytest.raises(InvalidRequestError, match=words):
            eng.step(*args)
        assert (eng.num_free_blocks, b.num_computed_tokens, list(a.output_token_ids)) == state
    assert eng.step([], []) == []
    out = eng.step([a], [(b, 14)], max_num_tokens=15)  # exactly the budget is fine
    assert out[0] is not None and out[1] is not None and b.status == SeqStatus.RUNNING


def test_chunks_grow_blocks_all_or_nothing_and_aborts_mid_prompt_free_them(llama):
    path, _ = llama
    # 6 blocks of 4 tokens: a 20-token prompt fills 5 of them.
    eng = Engine(EngineConfig(model=str(path), dtype="float32", skip_tokenizer_init=True,
                              kv_cache_bytes=6 * 4 * 512, block_size=4))
    assert eng.num_blocks == 6
    a, b = (eng.add_request(r, p, _params()) for r, p in zip("ab", _prompts([20, 8], seed=6)))
    eng.step([], [(a, 5)])  # blocks on demand: 2, not the whole prompt's 5
    assert eng.num_free_blocks == 4 and a.num_computed_tokens == 5
    eng.step([], [(a, 11), (b, 4)])  # a to 16 tokens (4 blocks), b 4 (1 block)
    assert eng.num_free_blocks == 1
    with pytest.raises(KVCacheExhausted):  # a needs 1 more block, b 1 more: only 1 free
        eng.step([], [(a, 4), (b, 4)])
    assert eng.num_free_blocks == 1 and (a.num_computed_tokens, b.num_computed_tokens) == (16, 4)
    eng.abort(b)  # aborted mid-prompt
    assert eng.num_free_blocks == 2 and b.finished
    eng.step([], [(a, 4)])
    assert a.status == SeqStatus.RUNNING and len(a.output_token_ids) == 1
    eng.abort(a)
    assert eng.num_free_blocks == eng.num_blocks


BF16_TIE_LOGITS = 0.25  # as in tests/e2e/test_demo_model.py


def test_demo_model_bfloat16_chunked_equals_unchunked(demo_model_dir):
    """The real model in bfloat16: a 300-token prompt chunked at 64 (chunks end on block edges)
    and at 100 (mid-block) beside a decoding request, against whole-prompt prefill. bf16
    rounding depends on the batch shape, so a divergence is allowed only at a near-tie, judged
    by the float32 model as tests/e2e/test_demo_model.py does."""
    cfg = dict(model=str(demo_model_dir), dtype="bfloat16", kv_cache_bytes=2**27)
    rng = random.Random(8)
    long = [rng.randrange(100, 40000) for _ in range(300)]
    short = [rng.randrange(100, 40000) for _ in range(20)]
    n = 6
    eng = Engine(EngineConfig(**cfg))
    want = [s.output_token_ids for s in LLM(eng).generate([long], _params(n))][0]
    for size in (64, 100):
        s_short, s_long = eng.add_request("s", short, _params(40)), eng.add_request("l", long, _params(n))
        eng.prefill([s_short])
        while s_long.status == SeqStatus.WAITING:
            eng.step([s_short], [(s_long, min(size, s_long.prompt_len - s_long.num_computed_tokens))])
        while not s_long.finished:
            eng.step([s_short, s_long], [])
        eng.abort(s_short)
        got = s_long.output_token_ids
        i = next((k for k in range(n) if got[k] != want[k]), None)
        if i is not None:
            from transformers import AutoModelForCausalLM
            hf = AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype=torch.float32).eval()
            with torch.no_grad():
                logits = hf(torch.tensor([long + got[:i]])).logits[0, -1]
            assert (logits.max() - logits[got[i]]).item() <= BF16_TIE_LOGITS, (size, i, got, want)
    assert eng.num_free_blocks == eng.num_blocks


# -- mlsd: a real machine whose colocated work runs chunked --------------------------------------

NUM_MLSD_PROMPTS = 16  # of the e2e prompts: enough to mix, cheap enough for a 2-core host


@pytest.fixture(scope="module")
def reference(demo_model_dir, prompts):
    """One engine, unchunked (prompts first), float32: the e2e tests' reference, first prompts."""
    eng = Engine(EngineConfig(model=str(demo_model_dir), dtype="float32", kv_cache_bytes=2**28))
    few = prompts[:NUM_MLSD_PROMPTS]
    params = [SamplingParams(max_tokens=8 + i % 5, ignore_eos=True) for i in range(len(few))]
    return [s.output_token_ids for s in LLM(eng).generate(few, params)]


def test_mlsd_chunked_mixed_machine_matches_one_engine_and_keeps_its_budget(
        demo_model_dir, tmp_path, prompts, reference):
    """A real mlsd in the mixed role with `mixed_policy: chunked` and a 64-token budget serves 16
    concurrent Generate calls (prompts up to 511 tokens: many chunks each, beside the decodes of
    the others): the tokens equal one engine's, no step exceeded the budget (its histogram), a
    request aborted mid-prompt frees its blocks, and nothing is left held at the end."""
    cfg = _machine_config(demo_model_dir, "mixed", "tcp", max_num_seqs=32)
    cfg["machine_id"] = "mixed-0"
    cfg["scheduler"].update(mixed_policy="chunked", max_num_batched_tokens=64)
    machine = MachineProc(tmp_path, "mixed", cfg)
    long_prompt = [5 + i % 300 for i in range(2000)]
    try:
        machine.start()

        async def run():
            async with Driver(machine.address, machine.address) as d:
                results = await asyncio.gather(*[d.generate_colocated(p, _sampling(i)) for i, p
                                                 in enumerate(prompts[:NUM_MLSD_PROMPTS])])
                # Abort a long prompt once it is partly prefilled (its rest still pending).
                q = d.watch("long")
                await d.token.Generate(pb.GenerateRequest(request=pb.RequestSpec(
                    request_id="long", prompt_token_ids=long_prompt,
                    sampling=pb.SamplingParams(max_tokens=4))))
                async with asyncio.timeout(60):
                    while True:
                        load = await d.token.GetLoad(pb.LoadRequest())
                        if 0 < load.pending_prompt_tokens < len(long_prompt):
                            break
                        await asyncio.sleep(0.01)
                await d.token.Abort(pb.AbortRequest(request_id="long"))
                aborted = await d.next_event(q, "ABORTED", timeout_s=10)
                return results, load, aborted, await d.token.GetLoad(pb.LoadRequest())

        results, mid, aborted, after = asyncio.run(run())
        for i, r in enumerate(results):
            assert r.status == "FINISHED", (r, machine.log()[-2000:])
            assert r.tokens == reference[i], i
        assert mid.kv_blocks_used >= -(-len(long_prompt) // 16) and aborted.num_output_tokens == 0
        assert after.kv_blocks_used == 0 and after.num_running == 0 and after.pending_prompt_tokens == 0
        metrics = _metrics(machine)
        steps = _metric(metrics, 'mlsd_batch_size_count{phase="mixed"}')
        assert steps > 0 and _metric(metrics, 'mlsd_batch_size_bucket{le="64.0",phase="mixed"}') == steps
        # It really mixed: more steps carried prompt chunks than there are prompts.
        assert _metric(metrics, 'mlsd_batch_size_count{phase="prefill"}') > NUM_MLSD_PROMPTS
        assert machine.stop() == 0
    finally:
        machine.kill()


def test_mlsd_refuses_an_unknown_mixed_policy_naming_the_key(demo_model_dir, tmp_path):
    cfg = _machine_config(demo_model_dir, "mixed", "tcp")
    cfg["scheduler"]["mixed_policy"] = "splitfuse"
    machine = MachineProc(tmp_path, "bad", cfg)
    with pytest.raises(RuntimeError, match="did not become ready"):
        machine.start(timeout_s=60)
    assert machine.proc.wait(10) == 2
    assert "scheduler.mixed_policy must be one of" in machine.log()
