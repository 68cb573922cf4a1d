"""A missing file, a missing tensor or an unsupported architecture is an error naming it."""

from __future__ import annotations

import json

import pytest

from engine.config import EngineConfig
from engine.engine import Engine
from engine.model_config import ModelConfigError
from engine.weights import CheckpointError
from tests.conftest import make_tiny_checkpoint


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def _load(path, **kw):
    return Engine(EngineConfig(model=str(path), dtype="float32", kv_cache_bytes=2**20, **kw))


def test_missing_folder_and_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        EngineConfig(model=str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        _load(tmp_path, skip_tokenizer_init=True)
    make_tiny_checkpoint(tmp_path, "llama")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        _load(tmp_path)
    for f in tmp_path.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        _load(tmp_path, skip_tokenizer_init=True)


def test_unsupported_architecture_and_rope_are_named(tmp_path):
    make_tiny_checkpoint(tmp_path, "llama")
    _edit_config(tmp_path, architectures=["GPTNeoXForCausalLM"])
    with pytest.raises(ModelConfigError, match="GPTNeoXForCausalLM"):
        _load(tmp_path, skip_tokenizer_init=True)
    _edit_config(tmp_path, architectures=["LlamaForCausalLM"],
                 rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0})
    with pytest.raises(ModelConfigError, match="longrope"):
        _load(tmp_path, skip_tokenizer_init=True)


def test_missing_tensor_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    make_tiny_checkpoint(tmp_path, "llama")
    (f,) = tmp_path.glob("*.safetensors")
    tensors = load_file(f)
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, f)
    with pytest.raises(CheckpointError, match="model.layers.1.mlp.down_proj.weight"):
        _load(tmp_path, skip_tokenizer_init=True)
