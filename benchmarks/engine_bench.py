"""Engine vs `transformers`: same weights, same dtype, same process, same run; prints ratios.

What it measures, per dtype (both sides warmed first; time.perf_counter; each figure is the median
of a few timed repeats after one untimed repeat at that size, except offline, which runs once):
1. prefill: tokens/s for one request of 128, 512 and 2048 random prompt tokens. Engine: one
   `engine.prefill([seq])`; transformers: one forward pass `model(ids, use_cache=False,
   logits_to_keep=1)`, i.e. last-position logits only, as the engine and `generate` compute them.
2. decode: decode-only tokens/s at batch 1, 8, 32 and 64 with 64-token prompts, N steps. Engine:
   an untimed prefill of the batch, then N timed `engine.decode(seqs)` steps (greedy, ignore_eos);
   B * N / time. Transformers: B * N / (t(generate N + 1 tokens) - t(generate 1 token)).
3. bandwidth: batch-1 decode as a share of the memory-bandwidth limit. Read bandwidth is a torch
   sum over a 512 MiB float32 buffer, measured in this run; each decode step reads the engine's
   weight bytes (the tied embedding counted once, as the LM head); limit = bandwidth / bytes.
4. offline: output tokens/s for 256 requests whose prompt and output lengths are sampled (seed 0,
   arrival order) from ../shared/traces/AzureLLMInferenceTrace_conv.csv and multiplied by
   --length-scale. Engine: `LLM.generate` (continuous batching, prompts first) on an engine with
   max_num_seqs = --offline-batch. Transformers: static left-padded batches of --offline-batch,
   each generating its longest output; only each request's own output tokens count as useful.

Ends with a markdown table (targets apply to bfloat16) for docs/BENCHMARKS.md. From the repo root:

    .venv/bin/python benchmarks/engine_bench.py [--quick] [--dtype bfloat16,float32]
        [--sections prefill,decode,bandwidth,offline] [--threads N] [--length-scale 0.125]
        [--offline-batch 32] [--json results.json] [--model models/SmolLM2-135M-Instruct]
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM

from engine.config import DTYPES, EngineConfig
from engine.engine import Engine
from engine.llm import LLM
from engine.sequence import SamplingParams, SeqStatus

REPO = Path(__file__).resolve().parents[1]
TRACE_PATH = REPO.parent / "shared" / "traces" / "AzureLLMInferenceTrace_conv.csv"
SECTIONS = ("prefill", "decode", "bandwidth", "offline")
KV_CACHE_BYTES = 4 * 2**30  # torch.empty: pages are only touched where blocks are used
BANDWIDTH_BUFFER_BYTES = 512 * 2**20
DECODE_PROMPT_LEN = 64
Request = tuple[list[int], int]  # (prompt token ids, output length)
TARGETS = {"prefill": 1.0, "decode b1": 1.3, "decode b32": 1.5, "offline": 3.0}  # bfloat16 only


@dataclass(frozen=True)
class Sizes:
    repeats: int
    prefill_lens: tuple[int, ...]
    decode_batches: tuple[int, ...]
    decode_steps: int
    offline_requests: int


FULL = Sizes(repeats=3, prefill_lens=(128, 512, 2048), decode_batches=(1, 8, 32, 64), decode_steps=32,
             offline_requests=256)
QUICK = Sizes(repeats=2, prefill_lens=(128, 512), decode_batches=(1, 32), decode_steps=8,
              offline_requests=32)


@dataclass
class Row:
    dtype: str
    metric: str
    unit: str
    engine: float
    transformers: float

    @property
    def ratio(self) -> float:
        return self.engine / self.transformers if self.transformers else float("nan")

    @property
    def target(self) -> float | None:
        if self.dtype != "bfloat16":
            return None
        return TARGETS.get("prefill" if self.metric.startswith("prefill") else self.metric)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def median_s(run: Callable[[], float], repeats: int) -> float:
    """`run` does its own untimed setup and returns the seconds of its timed part. One warm-up call
    at this size first (first touches of buffers and allocator growth), then the median."""
    run()
    return statistics.median(run() for _ in range(repeats))


def random_ids(gen: torch.Generator, vocab: int, n: int) -> list[int]:
    return torch.randint(vocab, (n,), generator=gen).tolist()


def new_engine(args: argparse.Namespace, dtype: str, max_num_seqs: int) -> Engine:
    return Engine(EngineConfig(model=args.model, dtype=dtype, kv_cache_bytes=KV_CACHE_BYTES,
                               max_num_seqs=max_num_seqs, skip_tokenizer_init=True))


# -- one timed repeat of each measurement ------------------------------------------------------

def engine_prefill_s(engine: Engine, ids: list[int]) -> float:
    seq = engine.add_request("prefill", ids, SamplingParams(max_tokens=1, ignore_eos=True))
    engine.reserve(seq)
    t = timed(lambda: engine.prefill([seq]))
    engine.free(seq)
    return t


def hf_prefill_s(model, ids: list[int]) -> float:
    x = torch.tensor([ids])  # [1, T]
    return timed(lambda: model(x, use_cache=False, logits_to_keep=1))


def engine_decode_s(engine: Engine, prompts: list[list[int]], steps: int) -> float:
    params = SamplingParams(max_tokens=steps + 2, ignore_eos=True)  # still running after `steps`
    seqs = [engine.add_request(f"decode-{i}", p, params) for i, p in enumerate(prompts)]
    for s in seqs:
        engine.reserve(s)
    engine.prefill(seqs)
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.decode(seqs)
    t = time.perf_counter() - t0
    for s in seqs:
        engine.free(s)
    return t


def hf_generate_s(model, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int) -> float:
    """ids, mask: [B, T], left-padded with id 0. Exactly `new_tokens` greedy tokens per row."""
    return timed(lambda: model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens,
                                        min_new_tokens=new_tokens, do_sample=False, pad_token_id=0))


def read_bandwidth_gbs(repeats: int) -> float:
    buf = torch.ones(BANDWIDTH_BUFFER_BYTES // 4)  # float32; ones() touches every page
    return BANDWIDTH_BUFFER_BYTES / 1e9 / median_s(lambda: timed(buf.sum), repeats)


# -- sections ------------------------------------------------------------------------------------

def bench_prefill(engine: Engine, hf, sizes: Sizes, gen: torch.Generator) -> list[tuple[str, float, float]]:
    out = []
    for n in sizes.prefill_lens:
        ids = random_ids(gen, engine.model_config.vocab_size, n)
        e = median_s(partial(engine_prefill_s, engine, ids), sizes.repeats)
        h = median_s(partial(hf_prefill_s, hf, ids), sizes.repeats)
        out.append((f"prefill {n}", n / e, n / h))
    return out


def bench_decode(engine: Engine, hf, sizes: Sizes, batches: tuple[int, ...],
                 gen: torch.Generator) -> dict[int, tuple[float, float]]:
    """Batch -> (engine, transformers) decode-only tokens/s."""
    steps, out = sizes.decode_steps, {}
    for b in batches:
        prompts = [random_ids(gen, engine.model_config.vocab_size, DECODE_PROMPT_LEN) for _ in range(b)]
        ids = torch.tensor(prompts)  # [B, 64]: equal lengths, no padding
        mask = torch.ones_like(ids)
        e = median_s(partial(engine_decode_s, engine, prompts, steps), sizes.repeats)
        t_long = median_s(partial(hf_generate_s, hf, ids, mask, steps + 1), sizes.repeats)
        t_one = median_s(partial(hf_generate_s, hf, ids, mask, 1), sizes.repeats)
        out[b] = (b * steps / e, b * steps / max(t_long - t_one, 1e-9))
    return out


def trace_requests(num: int, scale: float, max_model_len: int, vocab: int) -> list[Request]:
    """(prompt ids, output length) for `num` trace rows sampled with seed 0, in arrival order."""
    with open(TRACE_PATH, newline="") as f:
        rows = list(csv.DictReader(f))
    picked = sorted(random.Random(0).sample(range(len(rows)), num))  # rows are sorted by TIMESTAMP
    gen = torch.Generator().manual_seed(0)
    requests = []
    for i in picked:
        out_len = min(max(1, round(int(rows[i]["GeneratedTokens"]) * scale)), max_model_len - 4)
        prompt_len = min(max(4, round(int(rows[i]["ContextTokens"]) * scale)), max_model_len - out_len)
        requests.append((random_ids(gen, vocab, prompt_len), out_len))
    return requests


def bench_offline(engine: Engine, hf, requests: list[Request], batch: int) -> tuple[float, float]:
    """(engine, transformers) useful output tokens/s; one run each."""
    llm = LLM(engine)
    llm.generate([p for p, _ in requests[:2]], SamplingParams(max_tokens=2, ignore_eos=True))  # warm
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for _, n in requests]
    t0 = time.perf_counter()
    seqs = llm.generate([p for p, _ in requests], params)
    t_engine = time.perf_counter() - t0
    for s, (_, n) in zip(seqs, requests):
        if s.status != SeqStatus.FINISHED_LENGTH or len(s.output_token_ids) != n:
            raise RuntimeError(f"engine request {s.request_id} ended {s.status.name}: {s.error}")
    t_hf = 0.0
    for i in range(0, len(requests), batch):  # static batches in arrival order
        chunk = requests[i:i + batch]
        width = max(len(p) for p, _ in chunk)
        ids = torch.tensor([[0] * (width - len(p)) + p for p, _ in chunk])  # [B, width], left-padded
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in chunk])
        t_hf += hf_generate_s(hf, ids, mask, max(n for _, n in chunk))
    useful = sum(n for _, n in requests)
    return useful / t_engine, useful / t_hf


@torch.inference_mode()
def bench_dtype(args: argparse.Namespace, dtype: str, sizes: Sizes, sections: list[str],
                bandwidth_gbs: float | None) -> list[Row]:
    rows: list[Row] = []

    def add(metric: str, unit: str, e: float, h: float) -> None:
        rows.append(Row(dtype, metric, unit, e, h))
        log(f"[{dtype}] {metric}: engine {e:,.1f} {unit}, transformers {h:,.1f} {unit}, "
            f"ratio {rows[-1].ratio:.2f}x")

    log(f"[{dtype}] loading transformers")
    hf = AutoModelForCausalLM.from_pretrained(args.model, dtype=DTYPES[dtype]).eval()
    gen = torch.Generator().manual_seed(0)
    warm = [random_ids(gen, hf.config.vocab_size, 32)]
    hf_generate_s(hf, torch.tensor(warm), torch.ones(1, 32, dtype=torch.int64), 4)
    if set(sections) & {"prefill", "decode", "bandwidth"}:
        log(f"[{dtype}] loading engine (max_num_seqs 256)")
        engine = new_engine(args, dtype, max_num_seqs=256)
        engine_decode_s(engine, warm, 4)
        if "prefill" in sections:
            for metric, e, h in bench_prefill(engine, hf, sizes, gen):
                add(metric, "tok/s", e, h)
        decode: dict[int, tuple[float, float]] = {}
        if "decode" in sections:
            for b, (e, h) in bench_decode(engine, hf, sizes, sizes.decode_batches, gen).items():
                decode[b] = (e, h)
                add(f"decode b{b}", "tok/s", e, h)
        if "bandwidth" in sections:
            if 1 not in decode:
                decode.update(bench_decode(engine, hf, sizes, (1,), gen))
            limit_steps_s = bandwidth_gbs * 1e9 / engine.weight_bytes
            log(f"[{dtype}] weights {engine.weight_bytes / 1e6:.0f} MB, bandwidth {bandwidth_gbs:.1f} GB/s: "
                f"batch-1 limit {limit_steps_s:.1f} steps/s")
            e, h = decode[1]
            add("decode b1 share of bandwidth limit", "%", 100 * e / limit_steps_s, 100 * h / limit_steps_s)
        del engine  # one engine in memory at a time
    if "offline" in sections:
        log(f"[{dtype}] loading engine (max_num_seqs {args.offline_batch}, the offline batch)")
        engine = new_engine(args, dtype, max_num_seqs=args.offline_batch)
        requests = trace_requests(sizes.offline_requests, args.length_scale, engine.max_model_len,
                                  engine.model_config.vocab_size)
        log(f"[{dtype}] offline: {len(requests)} requests, {sum(len(p) for p, _ in requests)} prompt and "
            f"{sum(n for _, n in requests)} output tokens, batch {args.offline_batch}")
        add("offline", "out tok/s", *bench_offline(engine, hf, requests, args.offline_batch))
    return rows


# -- report -------------------------------------------------------------------------------------

def machine_info(bandwidth_gbs: float | None) -> dict:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "read_bandwidth_gbs": bandwidth_gbs}


def markdown(rows: list[Row], info: dict, args: argparse.Namespace) -> str:
    bw = f"{info['read_bandwidth_gbs']:.1f} GB/s" if info["read_bandwidth_gbs"] else "not measured"
    lines = [f"{info['cpu']}, {info['cores']} cores, {info['torch_threads']} torch threads; "
             f"torch {info['torch']}, transformers {info['transformers']}; {info['date']}; "
             f"read bandwidth {bw}; {Path(args.model).name}; length scale {args.length_scale}"
             f"{'; --quick' if args.quick else ''}", "",
             "| dtype | metric | engine | transformers | ratio | target |", "|---|---|---|---|---|---|"]
    for r in rows:
        target = "" if r.target is None else f">= {r.target:g}x {'met' if r.ratio >= r.target else 'MISSED'}"
        lines.append(f"| {r.dtype} | {r.metric} ({r.unit}) | {r.engine:,.1f} | {r.transformers:,.1f} | "
                     f"{r.ratio:.2f}x | {target} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(REPO / "models" / "SmolLM2-135M-Instruct"))
    p.add_argument("--dtype", action="append", help="repeatable or comma list (default bfloat16,float32)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    p.add_argument("--quick", action="store_true", help="smoke run: fewer repeats, smaller sizes")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    p.add_argument("--length-scale", type=float, default=0.125, help="multiplies trace lengths")
    p.add_argument("--offline-batch", type=int, default=32, help="max batch for both offline peers")
    p.add_argument("--json", type=Path, default=None, help="save all results here")
    args = p.parse_args(argv)
    args.dtype = [d for v in (args.dtype or ["bfloat16,float32"]) for d in v.split(",") if d]
    args.sections = [s for s in args.sections.split(",") if s]
    for d in args.dtype:
        if d not in DTYPES:
            p.error(f"--dtype {d!r}: choose from {', '.join(DTYPES)}")
    for s in args.sections:
        if s not in SECTIONS:
            p.error(f"--sections {s!r}: choose from {', '.join(SECTIONS)}")
    if args.length_scale <= 0 or args.offline_batch <= 0:
        p.error("--length-scale and --offline-batch must be positive")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    sizes = QUICK if args.quick else FULL
    if "offline" in args.sections and not TRACE_PATH.is_file():
        log(f"offline section skipped: trace not found at {TRACE_PATH}")
        args.sections.remove("offline")
    started = time.perf_counter()
    bandwidth_gbs = None
    if "bandwidth" in args.sections:
        bandwidth_gbs = read_bandwidth_gbs(5 * sizes.repeats)
        log(f"read bandwidth (sum over {BANDWIDTH_BUFFER_BYTES >> 20} MiB float32): {bandwidth_gbs:.1f} GB/s")
    rows = [r for dt in args.dtype for r in bench_dtype(args, dt, sizes, args.sections, bandwidth_gbs)]
    info = machine_info(bandwidth_gbs)
    info["elapsed_s"] = round(time.perf_counter() - started, 1)
    print(markdown(rows, info, args))
    if args.json:
        results = [asdict(r) | {"ratio": r.ratio, "target": r.target} for r in rows]
        args_json = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        args.json.write_text(json.dumps({"machine": info, "args": args_json, "results": results}, indent=2))
        log(f"results saved to {args.json}")


if __name__ == "__main__":
    main()
