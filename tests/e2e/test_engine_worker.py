"""The engine worker in one process: a prompt worker and a token worker on a tiny real model, KV
over real tcp sockets. A finished transfer wakes the idle token worker itself (the receiver's
on_ended), so the request does not wait for the worker's next look at transfers in flight."""

from __future__ import annotations

import threading

import pytest

from engine.sequence import SamplingParams
from mls import worker as worker_mod
from mls.config import MlsConfig, from_dict
from mls.events import EventKind, RequestEvent, TurnOutput
from mls.kv.factory import make_endpoints
from mls.metrics import MlsMetrics
from mls.mlsd import build_engine
from mls.request import PrefillResult
from mls.worker import EngineWorker
from tests.conftest import hf_greedy, make_tiny_checkpoint, write_word_tokenizer


class Collector:
    """The worker's emit: every token and event, and an Event per request that ended."""

    def __init__(self) -> None:
        self.tokens: dict[str, dict[int, int]] = {}
        self.events: list[RequestEvent] = []
        self.ended: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def ended_event(self, rid: str) -> threading.Event:
        with self._lock:
            return self.ended.setdefault(rid, threading.Event())

    def __call__(self, out: TurnOutput) -> None:
        for t in out.tokens:
            self.tokens.setdefault(t.request_id, {})[t.index] = t.token_id
        for e in out.events:
            self.events.append(e)
            if e.kind is not EventKind.RESERVED:
                self.ended_event(e.request_id).set()


def make_worker(ckpt, role: str, emit) -> EngineWorker:
    """mlsd's own assembly (build_engine, make_endpoints), without its gRPC service."""
    cfg = from_dict(MlsConfig, {"machine_id": f"w-{role}", "role": role, "metrics_port": None,
                                "engine": {"model": str(ckpt), "dtype": "float32", "block_size": 4,
                                           "kv_cache_bytes": 256 * 4 * 512}})
    receiver, sender = make_endpoints(cfg.kv_transfer.transport)
    return EngineWorker(build_engine(cfg), cfg, emit, MlsMetrics(cfg.machine_id, role), receiver,
                        sender)


@pytest.fixture
def ckpt(tmp_path):
    model = make_tiny_checkpoint(tmp_path / "tiny")
    write_word_tokenizer(tmp_path / "tiny")
    return tmp_path / "tiny", model


def test_finished_transfer_wakes_the_idle_token_worker_and_tokens_match_transformers(ckpt, monkeypatch):
    path, model = ckpt
    # An idle worker with a transfer in flight would look again only after POLL_S: make that an
    # hour, so the request can finish in time only if the receiver's on_ended wakes the worker.
    monkeypatch.setattr(worker_mod, "POLL_S", 3600.0)
    emitted = Collector()
    prompt_w, token_w = make_worker(path, "prompt", emitted), make_worker(path, "token", emitted)
    prompt_w.start()
    token_w.start()
    try:
        prompt = [5 + (i * 7) % 200 for i in range(40)]
        params = SamplingParams(max_tokens=6, ignore_eos=True)
        assert token_w.add_decode("r1", prompt, params, timeout_s=30).result(10) is True
        result = prompt_w.add_prefill("r1", prompt, params, token_w.receiver.address(),
                                      timeout_s=30).result(30)
        assert isinstance(result, PrefillResult)
        assert emitted.ended_event("r1").wait(60), "the token worker did not wake for the finished KV"
        reference = hf_greedy(model, prompt, 6)
        assert result.first_token_id == reference[0]
        got = emitted.tokens["r1"]
        assert [got[i] for i in sorted(got)] == reference[1:] and sorted(got) == list(range(1, 6))
        assert RequestEvent("r1", EventKind.FINISHED, "length", "", 6) in emitted.events
        assert token_w.engine.num_free_blocks == token_w.engine.num_blocks
        assert prompt_w.engine.num_free_blocks == prompt_w.engine.num_blocks
    finally:
        for w in (prompt_w, token_w):
            w.stop()
            w.receiver.close()
            w.runner.sender.close()


def test_early_connect_wait_is_configurable_and_checked():
    from mls.config import ConfigError

    base = {"machine_id": "m", "role": "token"}
    with pytest.raises(ConfigError, match="kv_transfer.early_connect_wait_s must be >= 0"):
        from_dict(MlsConfig, {**base, "kv_transfer": {"early_connect_wait_s": -1}})
    cfg = from_dict(MlsConfig, {**base, "kv_transfer": {"early_connect_wait_s": 0.5}})
    receiver, sender = make_endpoints("tcp", early_connect_wait_s=cfg.kv_transfer.early_connect_wait_s)
    try:
        assert receiver._early_connect_wait_s == 0.5
    finally:
        sender.close()
        receiver.close()
