"""Shared fixtures: tiny random checkpoints written by transformers, and the demo model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DEMO_MODEL = Path(os.environ.get("SPLITSERVE_DEMO_MODEL", ROOT / "models" / "SmolLM2-135M-Instruct"))
SHARED = ROOT.parent / "shared"


@pytest.fixture(scope="session")
def demo_model_dir() -> Path:
    if not (DEMO_MODEL / "config.json").is_file():
        pytest.skip(f"demo model absent at {DEMO_MODEL}: run `clsctl models fetch-demo` (make test does)")
    return DEMO_MODEL


def make_tiny_checkpoint(path: Path, arch: str = "llama", seed: int = 0, **overrides):
    """Writes a random model of the given family with transformers' save_pretrained and returns
    the transformers model (float32, eval mode) as the reference."""
    import transformers

    cls_cfg, cls_model = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[arch]
    kwargs = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  tie_word_embeddings=False, initializer_range=0.08, bos_token_id=1,
                  eos_token_id=2, pad_token_id=0)
    kwargs.update(overrides)
    cfg = cls_cfg(**kwargs)
    torch.manual_seed(seed)
    model = cls_model(cfg).eval()
    if arch == "qwen2":  # biases are zero-initialised; make them matter
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.1)
    model.save_pretrained(path)
    return model


def write_word_tokenizer(path: Path, vocab_size: int = 256) -> None:
    """A tokenizer.json for a tiny checkpoint (token i is the word `t<i>`), so a daemon can load
    the folder as a model."""
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0")).save(
        str(path / "tokenizer.json"))


def hf_greedy(model, prompt: list[int], num_tokens: int) -> list[int]:
    """transformers' greedy continuation of one prompt, exactly num_tokens long (no EOS stop)."""
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=num_tokens,
                         do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()
