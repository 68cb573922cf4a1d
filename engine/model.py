"""The Llama-family decoder as one explicit forward function.

Inputs are flat over the batch: `input_ids` and `positions` are [T] for T tokens of all requests
together (no padding), and `AttentionMetadata` says where each request's queries sit, which cache
slots its new K/V go to (`slot_mapping`) and which slots its attention reads. No global context.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.model_config import ModelConfig
from engine.rope import apply_rope_, cos_sin_tables
from engine.weights import ModelWeights

# Called after layer i with that layer's new K/V of the whole batch: [T, 2, kv_heads, head_dim].
LayerKVHook = Callable[[int, torch.Tensor], None]


@dataclass
class PrefillSlice:
    query_start: int  # offset of this request's new tokens in the flat batch
    query_len: int
    context_len: int  # tokens already in the cache before this step
    context_slots: torch.Tensor | None  # [context_len + query_len] slots, only if context_len > 0
    context_mask: torch.Tensor | None = None  # [query_len, context_len + query_len] bool, causal;
    # only if context_len > 0 (built once per step, not per layer)


@dataclass
class AttentionMetadata:
    """A step may hold decode rows, prefill slices or both (a mixed step, chunked prefill): the
    B decode rows come first in the flat batch, at [0, B), the prefill slices after them."""
    slot_mapping: torch.Tensor  # [T] cache slot of each new token
    prefill: list[PrefillSlice] | None = None  # prompt (chunk) slices; None in decode-only steps
    decode_slots: torch.Tensor | None = None  # [B, L] slots each decode query reads (padded)
    decode_mask: torch.Tensor | None = None  # [B, 1, 1, L] bool, True = attend; None if no padding


class LlamaModel:
    def __init__(self, cfg: ModelConfig, weights: ModelWeights, max_positions: int):
        self.cfg = cfg
        self.w = weights
        dtype, device = weights.embed.dtype, weights.embed.device
        self.cos, self.sin = cos_sin_tables(cfg, max_positions, dtype, device)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_cache: torch.Tensor, kv_hook: LayerKVHook | None = None) -> torch.Tensor:
        """Returns the final hidden states [T, H]; writes every layer's new K/V into kv_cache."""
        cfg, w = self.cfg, self.w
        n_tok = input_ids.shape[0]
        nh, nkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q_size, inter, eps, hidden_shape = cfg.q_size, cfg.intermediate_size, cfg.rms_norm_eps, (
            cfg.hidden_size,)
        cos = self.cos[positions].unsqueeze(1)  # [T, 1, d]
        sin = self.sin[positions].unsqueeze(1)
        residual = F.embedding(input_ids, w.embed)  # [T, H]
        for i, lw in enumerate(w.layers):
            x = F.rms_norm(residual, hidden_shape, lw.input_norm, eps)
            qkv = lw.qkv(x)  # [T, q + 2kv]
            apply_rope_(qkv[:, : q_size + cfg.kv_size].view(n_tok, nh + nkv, d), cos, sin)
            kv = qkv[:, q_size:].view(n_tok, 2, nkv, d)
            layer_cache = kv_cache[i]  # [slots, 2, nkv, d]
            layer_cache.index_copy_(0, meta.slot_mapping, kv)
            if kv_hook is not None:
                kv_hook(i, kv)
            q = qkv[:, :q_size].view(n_tok, nh, d)
            attn = _attention(q, kv, layer_cache, meta)
            residual = residual + lw.o(attn)
            x = F.rms_norm(residual, hidden_shape, lw.post_norm, eps)
            gate_up = lw.gate_up(x)  # [T, 2I]
            act = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]  # [T, I]
            residual = residual + lw.down(act)
        return F.rms_norm(residual, hidden_shape, w.norm, eps)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, H] -> [N, V] float32 (computed in the model dtype)."""
        return self.w.lm_head(hidden).float()

    def refine_greedy(self, hidden: torch.Tensor, logits: torch.Tensor,
                      num_candidates: int = 8) -> torch.Tensor:
        """Greedy argmax with float32 precision for the leading candidates.

        In bfloat16 the logits are rounded to 8 bits of mantissa, so near-ties (common in a
        quantized model) are decided by rounding. Re-scoring the top few candidates in float32
        costs a [N, k, H] product instead of a float32 copy of the whole LM head.
        """
        if logits.dtype == hidden.dtype:
            return logits.argmax(dim=-1)
        cand = logits.topk(num_candidates, dim=-1).indices  # [N, k]
        w = self.w.lm_head_weight[cand].float()  # [N, k, H]
        exact = torch.einsum("nh,nkh->nk", hidden.float(), w)
        return cand.gather(1, exact.argmax(dim=-1, keepdim=True)).squeeze(1)


def _attention(q: torch.Tensor, kv: torch.Tensor, layer_cache: torch.Tensor,
               meta: AttentionMetadata) -> torch.Tensor:
    """q: [T, nh, d] -> [T, nh * d]: decode rows [0, B) batched, then each prefill slice."""
    if meta.prefill is None:
        return _decode_attention(q, layer_cache, meta)
    n_tok, nh, d = q.shape
    out = torch.empty(n_tok, nh * d, dtype=q.dtype, device=q.device)
    if meta.decode_slots is not None:
        b = meta.decode_slots.shape[0]
        out[:b] = _decode_attention(q[:b], layer_cache, meta)
    _prefill_attention(q, kv, layer_cache, meta.prefill, out)
    return out


def _prefill_attention(q: torch.Tensor, kv: torch.Tensor, layer_cache: torch.Tensor,
                       slices: list[PrefillSlice], out: torch.Tensor) -> None:
    """Causal attention per request over its cached context and its own new tokens, written into
    out's rows of each slice. q: [T, nh, d]; kv: [T, 2, nkv, d]; out: [T, nh * d]."""
    nh, d = q.shape[1], q.shape[2]
    for s in slices:
        lo, hi = s.query_start, s.query_start + s.query_len
        qi = q[lo:hi].transpose(0, 1).unsqueeze(0)  # [1, nh, n, d]
        if s.context_len == 0:
            kvi = kv[lo:hi]  # [n, 2, nkv, d]
            mask, causal = None, True
        else:
            kvi = layer_cache[s.context_slots]  # [ctx + n, 2, nkv, d]
            mask, causal = s.context_mask, False
            if mask is None:
                mask = causal_mask(s.context_len, s.query_len, q.device)
        ki = kvi[:, 0].transpose(0, 1).unsqueeze(0)  # [1, nkv, S, d]
        vi = kvi[:, 1].transpose(0, 1).unsqueeze(0)
        oi = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, is_causal=causal,
                                            enable_gqa=True)  # [1, nh, n, d]
        out[lo:hi] = oi[0].transpose(0, 1).reshape(hi - lo, nh * d)


def causal_mask(context_len: int, query_len: int, device: torch.device) -> torch.Tensor:
    """[query_len, context_len + query_len] bool: query i (at position context_len + i) sees
    positions <= its own."""
    total = context_len + query_len
    rows = torch.arange(context_len, total, device=device)[:, None]
    return torch.arange(total, device=device)[None, :] <= rows


def _decode_attention(q: torch.Tensor, layer_cache: torch.Tensor,
                      meta: AttentionMetadata) -> torch.Tensor:
    """One query per request against its cached context. q: [B, nh, d] -> [B, nh * d].

    Grouped-query trick: the `nh / nkv` query heads sharing a KV head become that head's query
    rows, so K and V are read once per KV head and never repeated.
    """
    b, nh, d = q.shape
    kv = layer_cache[meta.decode_slots]  # [B, L, 2, nkv, d]
    nkv = kv.shape[3]
    k = kv[:, :, 0].transpose(1, 2)  # [B, nkv, L, d]
    v = kv[:, :, 1].transpose(1, 2)
    qg = q.view(b, nkv, nh // nkv, d)  # [B, nkv, group, d]
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=meta.decode_mask)
    return out.reshape(b, nh * d)
