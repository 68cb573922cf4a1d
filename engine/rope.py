"""Rotary position embeddings: inverse frequencies for the scaling types Llama-family models use,
and the cos/sin tables the model indexes by position.

The model keeps Hugging Face's "rotate half" layout (the two halves of each head are the real and
imaginary parts). Rotation is applied as `x * cos + roll(x, d/2) * sin_signed`, where `sin_signed`
carries the minus sign of the first half, so one roll replaces slice + negate + cat.
"""

from __future__ import annotations

import math

import torch

from engine.model_config import ModelConfig


def inv_frequencies(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Returns (inv_freq [head_dim/2] float32, attention scaling applied to cos/sin)."""
    dim, base, p = cfg.head_dim, cfg.rope_theta, cfg.rope_scaling
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    rope_type = cfg.rope_type
    if rope_type == "default":
        return inv_freq, 1.0
    if rope_type == "linear":
        return inv_freq / p["factor"], 1.0
    if rope_type == "llama3":
        return _llama3(inv_freq, p), 1.0
    if rope_type == "yarn":
        return _yarn(cfg, p)
    raise ValueError(f"unsupported rope type {rope_type!r}")


def _llama3(inv_freq: torch.Tensor, p: dict) -> torch.Tensor:
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old_len = p["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn(cfg: ModelConfig, p: dict) -> tuple[torch.Tensor, float]:
    dim, base = cfg.head_dim, cfg.rope_theta
    orig_len = p["original_max_position_embeddings"]
    factor = p.get("factor") or cfg.max_position_embeddings / orig_len

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn_factor = p.get("attention_factor")
    if attn_factor is None:
        if p.get("mscale") and p.get("mscale_all_dim"):
            attn_factor = mscale(factor, p["mscale"]) / mscale(factor, p["mscale_all_dim"])
        else:
            attn_factor = mscale(factor)
    beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return dim * math.log(orig_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attn_factor)


def cos_sin_tables(cfg: ModelConfig, max_positions: int, dtype: torch.dtype,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin tables, each [max_positions, head_dim], in the model dtype."""
    inv_freq, scale = inv_frequencies(cfg)
    positions = torch.arange(max_positions, dtype=torch.float32)
    freqs = positions[:, None] * inv_freq[None, :]  # [P, d/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [P, d]
    cos, sin = emb.cos() * scale, emb.sin() * scale
    half = cfg.head_dim // 2
    sin[:, :half] = -sin[:, :half]
    return cos.to(dtype=dtype, device=device), sin.to(dtype=dtype, device=device)


def apply_rope_(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> None:
    """Rotates x in place. x: [T, heads, d]; cos, sin_signed: [T, 1, d]."""
    rolled = x.roll(x.shape[-1] // 2, dims=-1)
    x.mul_(cos).addcmul_(rolled, sin_signed)
