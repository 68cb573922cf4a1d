"""The engine's `modelled` backend: the torch engine's interface and KV cache, no model.

A machine on this backend behaves like one on the torch engine in everything the schedulers and
the KV transfer see: the same requests, block accounting, KV cache, export hook and import path,
statuses and errors. What differs is the step itself:
1. A step (`prefill`, `decode` or the mixed `step`) takes as long as `engine.modelled` says this
   batch takes on the modelled machine (a profile or roofline; `time_scale` shrinks or stretches
   it), and the engine thread sleeps that long (the GIL is free meanwhile).
2. A prefill with an export hook hands layer i's K/V (zeros, in the real layout and dtype of the
   checkpoint's shape) to the hook at (i + 1) / L of the step, as the real forward pass would: the
   real transport streams it layer by layer while the "prefill" still runs.
3. The next token is a fixed function of the request's whole token sequence (a CRC of its last
   tokens), never an EOS id: every machine produces the same token for the same context, so a
   request re-prefilled elsewhere after a failure continues with the same tokens.
So a cluster of large modelled machines (e.g. Llama2-70B on 8 H100s) runs on one CPU host
through the real daemons and the real gRPC and KV paths. The checkpoint folder gives the KV shape,
the vocabulary and the context length; its weights are not loaded.
"""

from __future__ import annotations

import time
import zlib
from array import array

import torch

from engine.backend import KVExportHook
from engine.config import EngineConfig
from engine.engine import Engine
from engine.modelled import LatencyModel
from engine.sequence import SeqStatus, Sequence

_CONTEXT_TOKENS_HASHED = 16
_FIRST_TOKEN_ID = 100  # below: special tokens in most vocabularies


class ModelledEngine(Engine):
    def __init__(self, config: EngineConfig, latency: LatencyModel, time_scale: float = 1.0):
        if not time_scale > 0:
            raise ValueError(f"time_scale must be > 0, got {time_scale}")
        super().__init__(config, load_model=False)
        self.latency, self.time_scale = latency, time_scale
        self.step_seconds = 0.0
        """Modelled seconds slept so far (after time_scale)."""

    def step_s(self, decode_seqs: list[Sequence], chunks: list[tuple[Sequence, int]]) -> float:
        """The modelled duration of one step, before time_scale."""
        num_prompt = sum(n for _, n in chunks)
        context = sum(s.num_tokens for s in decode_seqs)
        if not chunks:
            return self.latency.decode_s(len(decode_seqs), context)
        if not decode_seqs:
            return self.latency.prefill_s(num_prompt, len(chunks))
        return self.latency.mixed_s(num_prompt, len(chunks), len(decode_seqs), context)

    def _forward_step(self, decode_seqs: list[Sequence], chunks: list[tuple[Sequence, int]],
                      kv_export: KVExportHook | None) -> list[int | None]:
        chunk_seqs = [s for s, _ in chunks]
        ends = [s.num_computed_tokens + n for s, n in chunks]
        self._ensure_blocks([*decode_seqs, *chunk_seqs], [s.num_tokens for s in decode_seqs] + ends)
        duration = self.step_s(decode_seqs, chunks) * self.time_scale
        start = time.monotonic()
        if kv_export is not None and chunks:
            mc = self.model_config
            kv = [(s, torch.zeros(n, 2, mc.num_kv_heads, mc.head_dim, dtype=self.dtype))
                  for s, n in chunks]  # the export layout; the content is not modelled
            for layer in range(mc.num_layers):
                _sleep_until(start + duration * (layer + 1) / mc.num_layers)
                kv_export(layer, kv)
        _sleep_until(start + duration)
        self.step_seconds += duration
        for s in decode_seqs:
            s.num_computed_tokens = s.num_tokens
        out: list[int | None] = []
        for s in decode_seqs:
            out.append(self._emit(s))
        for s, end in zip(chunk_seqs, ends):
            s.num_computed_tokens = end
            if end == s.prompt_len:
                s.status = SeqStatus.RUNNING
                out.append(self._emit(s))
            else:
                out.append(None)
        return out

    def _emit(self, seq: Sequence) -> int:
        token = self.next_token(seq.prompt_token_ids + seq.output_token_ids)
        self._append(seq, token)
        return token

    def next_token(self, token_ids: list[int]) -> int:
        """The modelled model's greedy choice after `token_ids` (never an EOS id)."""
        tail = array("q", token_ids[-_CONTEXT_TOKENS_HASHED:]).tobytes()
        span = max(1, self.model_config.vocab_size - _FIRST_TOKEN_ID)
        token = _FIRST_TOKEN_ID + zlib.crc32(tail) % span
        while token in self.eos_token_ids:
            token = _FIRST_TOKEN_ID + (token + 1 - _FIRST_TOKEN_ID) % span
        return token


def _sleep_until(deadline: float) -> None:
    left = deadline - time.monotonic()
    if left > 0:
        time.sleep(left)
