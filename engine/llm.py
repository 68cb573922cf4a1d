"""`LLM`: the engine on its own, with a minimal continuous-batching loop (prompts first).

This is what `clsctl chat` and the engine benchmark run. The machine-level schedulers in `mls/`
make the same calls with their own policies.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable

from engine.config import EngineConfig
from engine.engine import Engine
from engine.sequence import SamplingParams, SeqStatus, Sequence

# Called after every step with each request that got a token in it.
StepCallback = Callable[[Sequence, int], None]


class LLM:
    def __init__(self, engine: Engine | EngineConfig):
        self.engine = engine if isinstance(engine, Engine) else Engine(engine)

    def generate(self, prompts: Iterable[list[int]], params: SamplingParams | list[SamplingParams],
                 on_token: StepCallback | None = None) -> list[Sequence]:
        """Runs every prompt to completion; returns the sequences in prompt order.

        Admission reserves each request's prompt + max_tokens blocks up front, so a running
        request never runs out of memory; a request larger than the whole cache fails alone.
        """
        eng = self.engine
        prompts = list(prompts)
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        seqs = [eng.add_request(str(i), p, sp) for i, (p, sp) in enumerate(zip(prompts, params))]
        waiting: deque[Sequence] = deque(seqs)
        running: list[Sequence] = []
        cfg = eng.config
        while waiting or running:
            batch, num_tokens = [], 0
            while waiting and len(running) + len(batch) < cfg.max_num_seqs:
                seq = waiting[0]
                if batch and num_tokens + seq.prompt_len > cfg.prompt_token_cap:
                    break
                if eng.blocks_for(seq) > eng.num_blocks:
                    waiting.popleft()
                    seq.status, seq.error = SeqStatus.FINISHED_ERROR, "request exceeds KV cache"
                    continue
                if eng.blocks_for(seq) > eng.num_free_blocks:
                    break
                eng.reserve(seq)
                batch.append(waiting.popleft())
                num_tokens += seq.prompt_len
            if batch:
                tokens = eng.prefill(batch)
                step = batch
                running += batch
            else:
                tokens = eng.decode(running)
                step = running
            if on_token is not None:
                for seq, tok in zip(step, tokens):
                    on_token(seq, tok)
            running = [s for s in running if not s.finished]
        return seqs
