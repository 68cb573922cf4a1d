"""Token sampling: greedy, temperature, top-k, top-p, with per-request seeds."""

from __future__ import annotations

import torch

from engine.sequence import SamplingParams

_SEED_STRIDE = 1_000_003  # a prime: (seed, index) pairs map to distinct generator seeds


def sample(logits: torch.Tensor, greedy_tokens: torch.Tensor, params: list[SamplingParams],
           output_lens: list[int], default_generator: torch.Generator) -> list[int]:
    """Picks one token per row. logits: [B, V] float32; greedy_tokens: [B] argmax of each row;
    output_lens[i] = tokens row i already has.

    A seeded request draws output index i from a generator seeded by (seed, i): the draw does not
    depend on batch composition or on which machine computes it.
    """
    tokens = greedy_tokens.tolist()
    for row, p in enumerate(params):
        if p.greedy:
            continue
        if p.seed is not None:
            gen = torch.Generator(device=logits.device)
            gen.manual_seed((p.seed * _SEED_STRIDE + output_lens[row]) % 2**63)
        else:
            gen = default_generator
        probs = _probabilities(logits[row], p)
        tokens[row] = int(torch.multinomial(probs, 1, generator=gen))
    return tokens


def _probabilities(row: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    row = row / p.temperature
    if p.top_k > 0 and p.top_k < row.shape[-1]:
        kth = torch.topk(row, p.top_k).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(row, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the mass before it already reaches top_p (the first always stays).
        drop = (cum - sorted_logits.softmax(-1)) >= p.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        row = torch.empty_like(row).scatter_(0, order, sorted_logits)
    return row.softmax(-1)
