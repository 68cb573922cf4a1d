"""One chat turn on the engine alone: chat template in, answer streamed token by token out."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from engine.config import EngineConfig
from engine.engine import Engine
from engine.llm import LLM
from engine.sequence import SamplingParams, Sequence
from engine.tokenizer import IncrementalDetokenizer


def stream_chat(engine: Engine, question: str, params: SamplingParams,
                out: TextIO = sys.stdout) -> Sequence:
    """Answers `question` with the model's chat template, writing text as each token arrives."""
    if engine.tokenizer is None:
        raise ValueError("chat needs the model's tokenizer")
    prompt = engine.tokenizer.encode_chat([{"role": "user", "content": question}])
    detok = IncrementalDetokenizer(engine.tokenizer, prompt)

    def on_token(_seq: Sequence, token: int) -> None:
        out.write(detok.add([token]))
        out.flush()

    (seq,) = LLM(engine).generate([prompt], params, on_token=on_token)
    out.write("\n")
    return seq


def run(model: str, question: str, *, dtype: str = "auto", max_tokens: int = 256,
        temperature: float = 0.0, seed: int | None = None) -> int:
    t0 = time.perf_counter()
    engine = Engine(EngineConfig(model=model, dtype=dtype, kv_cache_bytes=256 * 2**20,
                                 max_num_seqs=1))
    print(f"loaded {model} ({engine.dtype}, {engine.weight_bytes / 2**20:.0f} MiB) in "
          f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
    print(f"> {question}", file=sys.stderr)
    t1 = time.perf_counter()
    seq = stream_chat(engine, question, SamplingParams(max_tokens=max_tokens,
                                                       temperature=temperature, seed=seed))
    dt = time.perf_counter() - t1
    n = len(seq.output_token_ids)
    print(f"[{n} tokens in {dt:.2f} s, {n / dt:.1f} tokens/s, finished: "
          f"{seq.status.name.lower()}]", file=sys.stderr)
    return 0
