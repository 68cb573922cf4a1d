"""Prefill on engine A with per-layer export, import into engine B, decode on B: the tokens are
those A would have produced. The export hook runs inside the forward pass, layer by layer."""

from __future__ import annotations

import random

import pytest
import torch

from engine.config import EngineConfig
from engine.engine import Engine
from engine.sequence import InvalidRequestError, SamplingParams
from tests.conftest import make_tiny_checkpoint

NUM_NEW = 12


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    make_tiny_checkpoint(path, "llama", num_hidden_layers=4)
    return path


def _engine(path, block_size=4) -> Engine:
    return Engine(EngineConfig(model=str(path), dtype="float32", skip_tokenizer_init=True,
                               kv_cache_bytes=8 * 2**20, block_size=block_size))


def _prompts():
    rng = random.Random(7)
    return [[rng.randrange(3, 256) for _ in range(n)] for n in (6, 23, 14)]


def test_layerwise_export_import_then_decode_matches_local_decode(ckpt):
    a, b = _engine(ckpt), _engine(ckpt, block_size=8)  # different block sizes: layout is neutral
    params = SamplingParams(max_tokens=NUM_NEW, ignore_eos=True)
    prompts = _prompts()

    # Reference: A decodes alone.
    ref = [a.add_request(f"r{i}", p, params) for i, p in enumerate(prompts)]
    a.prefill(ref)
    while not all(s.finished for s in ref):
        a.decode([s for s in ref if not s.finished])

    # Phase split: A prefills and exports, B imports and decodes.
    src = [a.add_request(f"s{i}", p, params) for i, p in enumerate(prompts)]
    dst = [b.add_request(f"s{i}", p, params) for i, p in enumerate(prompts)]
    for s in dst:
        b.reserve(s)  # the receiver reserves before the first layer arrives
    by_id = {s.request_id: s for s in dst}
    layers_seen = []

    def export(layer, items):
        layers_seen.append(layer)
        for i, (seq, kv) in enumerate(items):
            assert kv.is_contiguous()
            assert kv.shape == (seq.prompt_len, 2, 2, 16) and kv.dtype == torch.float32
            dst_seq = by_id[seq.request_id]
            if i % 2:  # staged import ...
                b.import_kv_layer(dst_seq, layer, kv)
            else:  # ... or straight into the receiver's block memory, as a socket would write
                offset = 0
                for view in b.import_views(dst_seq, layer):
                    view.copy_(kv[offset:offset + view.shape[0]])
                    offset += view.shape[0]
                assert offset == seq.prompt_len

    a.prefill(src, kv_export=export)
    assert layers_seen == [0, 1, 2, 3]
    for s_src, s_dst in zip(src, dst):
        b.finish_import(s_dst, s_src.output_token_ids[0])
        a.free(s_src)  # the prompt machine's copy is no longer needed
    while not all(s.finished for s in dst):
        b.decode([s for s in dst if not s.finished])
    assert [s.output_token_ids for s in dst] == [s.output_token_ids for s in ref]
    assert a.num_free_blocks == a.num_blocks and b.num_free_blocks == b.num_blocks


def test_export_happens_before_later_layers_compute(ckpt):
    eng = _engine(ckpt)
    eng.kv.tensor.zero_()
    seq = eng.add_request("x", _prompts()[1], SamplingParams(max_tokens=2))
    eng.reserve(seq)
    slots = eng.kv.slots(seq.block_table, 0, seq.prompt_len)
    written_at_hook = []

    def export(layer, items):
        written = [bool(eng.kv.tensor[i, slots].abs().sum() > 0) for i in range(4)]
        written_at_hook.append(written)

    eng.prefill([seq], kv_export=export)
    # At the hook of layer i, layers <= i are in the cache and layers > i are not yet computed.
    assert written_at_hook == [[j <= i for j in range(4)] for i in range(4)]


def test_import_rejects_wrong_shape_dtype_layer_and_unreserved(ckpt):
    eng = _engine(ckpt)
    seq = eng.add_request("x", [5, 6, 7], SamplingParams())
    good = torch.zeros(3, 2, 2, 16)
    with pytest.raises(InvalidRequestError, match="no blocks reserved"):
        eng.import_kv_layer(seq, 0, good)
    with pytest.raises(InvalidRequestError, match="no blocks reserved"):
        eng.import_views(seq, 0)
    eng.reserve(seq)
    with pytest.raises(InvalidRequestError, match="shape"):
        eng.import_kv_layer(seq, 0, torch.zeros(4, 2, 2, 16))
    with pytest.raises(InvalidRequestError, match="dtype"):
        eng.import_kv_layer(seq, 0, good.to(torch.bfloat16))
    with pytest.raises(InvalidRequestError, match="layer 9"):
        eng.import_kv_layer(seq, 9, good)
    eng.abort(seq)
    assert eng.num_free_blocks == eng.num_blocks
