"""What chunked prefill buys on this host: the decodes of N running requests while a long prompt
arrives, prompt-first against chunked at several per-step token budgets.

The loop is mlsd's colocated loop in miniature: the `MixedScheduler` (the daemon's own policy, in
`prompt_first` or `chunked` mode) plans each step and the engine runs it (`prefill` + `decode`,
or one `Engine.step`). Per mode, after a warm-up (N requests of --short-prompt tokens prefilled
and decoding), a prompt of --long-prompt tokens arrives (max_tokens 1: its work is its prefill)
and the run goes on until the long prompt has its first token and every running request has made
--decode-tokens more tokens: the same work in every mode, so the window's wall time compares
their throughput. Figures per mode (median over --repeats runs, the modes interleaved;
time.perf_counter):
- TBT p50 / p99 / max: gaps between consecutive tokens of the running requests in the window.
- TTFT: the long prompt's arrival to its first token.
- window: wall time for the window's work; cost = window / prompt-first's window.
- prefill alone: the long prompt's prefill with nothing else running (the floor for TTFT).

    .venv/bin/python benchmarks/chunked_bench.py [--num-running 16] [--long-prompt 1536]
        [--budgets 256,512,1024] [--dtype auto] [--threads 2] [--repeats 3] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from engine.config import EngineConfig
from engine.engine import Engine
from engine.sequence import SamplingParams
from mls.policy import Job, MixedScheduler

REPO = Path(__file__).resolve().parents[1]


def _pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


def _run_step(eng: Engine, sched: MixedScheduler, seqs: dict) -> list[str]:
    """One planned step; returns the ids that got a token in it."""
    plan = sched.schedule()
    got: list[str] = []
    if plan.prefill:
        for j in plan.prefill:
            eng.reserve(seqs[j.request_id])
        eng.prefill([seqs[j.request_id] for j in plan.prefill])
        got = [j.request_id for j in plan.prefill]
    elif plan.chunks or (plan.decode and sched.chunked):
        for c in plan.chunks:
            if c.start == 0:
                eng.reserve(seqs[c.job.request_id])
        out = eng.step([seqs[r] for r in plan.decode],
                       [(seqs[c.job.request_id], c.num_tokens) for c in plan.chunks],
                       max_num_tokens=sched.max_num_batched_tokens)
        got = list(plan.decode) + [c.job.request_id for c, t in zip(plan.chunks, out[len(plan.decode):])
                                   if t is not None]
    elif plan.decode:
        eng.decode([seqs[r] for r in plan.decode])
        got = list(plan.decode)
    for rid in got:
        sched.token_generated(rid)
        if seqs[rid].finished:
            sched.release(rid)
    return got


def run_mode(eng: Engine, args, policy: str, budget: int, rng: random.Random) -> dict:
    sched = MixedScheduler(eng.num_blocks, eng.kv.block_size, prompt_token_cap=2048,
                           policy=policy, max_num_batched_tokens=budget)
    vocab = eng.model_config.vocab_size
    seqs = {}
    num_out = args.decode_tokens + 16  # the warm-up's tokens and the window's, with room
    short = SamplingParams(max_tokens=num_out, ignore_eos=True)
    for i in range(args.num_running):
        rid = f"s{i}"
        seqs[rid] = eng.add_request(rid, [rng.randrange(100, vocab) for _ in range(args.short_prompt)],
                                    short)
        sched.add(Job(rid, args.short_prompt, num_out))
    if sum(sched.blocks_needed(j) for j in sched.queue) > sched.num_blocks:
        raise SystemExit("the running requests do not fit the KV cache")
    while len(sched.running) < args.num_running or sched.prefilling:
        _run_step(eng, sched, seqs)
    for _ in range(4):  # a few plain decode steps: the batch is warm
        _run_step(eng, sched, seqs)
    long_prompt = [rng.randrange(100, vocab) for _ in range(args.long_prompt)]
    seqs["long"] = eng.add_request("long", long_prompt, SamplingParams(max_tokens=1, ignore_eos=True))
    arrive = time.perf_counter()
    sched.add(Job("long", args.long_prompt, 1))
    last = {f"s{i}": arrive for i in range(args.num_running)}
    made = dict.fromkeys(last, 0)
    gaps: list[float] = []
    ttft = None
    while ttft is None or min(made.values()) < args.decode_tokens:
        got = _run_step(eng, sched, seqs)
        now = time.perf_counter()
        for rid in got:
            if rid == "long":
                ttft = now - arrive
            elif made[rid] < args.decode_tokens:
                gaps.append(now - last[rid])
                last[rid] = now
                made[rid] += 1
    window = time.perf_counter() - arrive
    for s in seqs.values():
        eng.abort(s)
    assert eng.num_free_blocks == eng.num_blocks
    return dict(tbt_p50_ms=_pct(gaps, 50) * 1e3, tbt_p99_ms=_pct(gaps, 99) * 1e3,
                tbt_max_ms=max(gaps) * 1e3, ttft_ms=ttft * 1e3, window_s=window)


def prefill_alone_ms(eng: Engine, n: int, rng: random.Random) -> float:
    vocab = eng.model_config.vocab_size
    seq = eng.add_request("alone", [rng.randrange(100, vocab) for _ in range(n)],
                          SamplingParams(max_tokens=1))
    start = time.perf_counter()
    eng.prefill([seq])
    ms = (time.perf_counter() - start) * 1e3
    eng.abort(seq)
    return ms


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(REPO / "models" / "SmolLM2-135M-Instruct"))
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--num-running", type=int, default=16)
    ap.add_argument("--short-prompt", type=int, default=64)
    ap.add_argument("--long-prompt", type=int, default=1536)
    ap.add_argument("--decode-tokens", type=int, default=24)
    ap.add_argument("--budgets", default="256,512,1024")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    eng = Engine(EngineConfig(model=args.model, dtype=args.dtype, kv_cache_bytes=2**30,
                              num_threads=args.threads, max_model_len=4096))
    rng = random.Random(0)
    modes = [("prompt_first", 2048)] + [("chunked", int(b)) for b in args.budgets.split(",")]
    prefill_alone_ms(eng, args.long_prompt, rng)  # warm-up
    alone = statistics.median(prefill_alone_ms(eng, args.long_prompt, rng) for _ in range(args.repeats))
    run_mode(eng, args, "chunked", 256, rng)  # warm-up of every code path
    runs: dict[tuple, list[dict]] = {m: [] for m in modes}
    for _ in range(args.repeats):  # modes interleaved: a noisy neighbour hits them all alike
        for policy, budget in modes:
            runs[(policy, budget)].append(r := run_mode(eng, args, policy, budget, rng))
            print(f"{policy} {budget}: {r}", file=sys.stderr, flush=True)
    rows = []
    for (policy, budget), rs in runs.items():
        row = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        row.update(mode=policy if policy == "prompt_first" else f"chunked {budget}")
        rows.append(row)
    base = rows[0]["window_s"]
    print(f"dtype {eng.dtype}, {torch.get_num_threads()} threads; {args.num_running} running "
          f"requests ({args.short_prompt}-token prompts), a {args.long_prompt}-token prompt "
          f"arrives; window = its prefill + {args.decode_tokens} tokens of each running request")
    print(f"load average {os.getloadavg()[0]:.1f}; prefill alone: {alone:,.0f} ms "
          f"({args.long_prompt / alone * 1e3:,.0f} tok/s)\n")
    print("| mode | TBT p50 (ms) | TBT p99 (ms) | TBT max (ms) | TTFT long (ms) | window (s) | cost |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['tbt_p50_ms']:,.1f} | {r['tbt_p99_ms']:,.1f} | "
              f"{r['tbt_max_ms']:,.1f} | {r['ttft_ms']:,.0f} | {r['window_s']:.2f} | "
              f"{r['window_s'] / base:.2f}x |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(dict(args=vars(args), prefill_alone_ms=alone,
                                                   rows=rows), indent=2))


if __name__ == "__main__":
    main()
