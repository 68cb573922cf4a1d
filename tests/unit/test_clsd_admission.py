"""clsd's admission pieces without daemons: the in-flight bound from the machines, the character
pre-check's bound per token, the tokenizer threads, the kept pool sizes, the parsing gRPC handlers
(on an in-process server on 127.0.0.1) and the leases' tolerance of a stalled event loop."""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
from types import SimpleNamespace

import grpc
import pytest

from cls.admission import (
    SHORT_TEXT_CHARS,
    Encoder,
    TokenizerBusy,
    TokenizerPool,
    inflight_bound,
    max_chars_per_token,
    prompt_char_limit,
)
from cls.checked_rpc import add_checked
from cls.config import ClsConfig, ConfigError, LimitsSection
from cls.pool_targets import PoolTargets
from cls.pools import Pools
from cls.registry import Registry
from proto import clsd_pb2 as pb
from proto import clsd_pb2_grpc
from proto.roles import Role
from tests.conftest import DEMO_MODEL


def _pools(*blocks: int, max_model_len: int = 8192) -> Pools:
    pools = Pools()
    for i, n in enumerate(blocks):
        pools.add(f"m{i}", Role.TOKEN, n, 16, max_model_len)
    return pools


# --- the in-flight bound -------------------------------------------------------------------------


def test_inflight_bound_follows_the_machines_and_never_passes_the_ceiling():
    limits = LimitsSection(max_inflight_requests=4096, requests_per_machine=256, inflight_factor=2.0)
    assert inflight_bound(_pools(1000, 1000), limits)[0] == 2 * (256 + 256)
    # A machine with fewer KV blocks than request slots counts its blocks.
    bound, why = inflight_bound(_pools(1000, 40), limits)
    assert bound == 2 * (256 + 40) and "2 machines" in why
    assert inflight_bound(_pools(*[1000] * 20), limits) == (4096, "limits.max_inflight_requests 4096")
    # Draining machines take no work, so they hold none of the bound.
    pools = _pools(1000, 1000)
    pools.set_draining("m0", True)
    assert inflight_bound(pools, limits)[0] == 512
    small = LimitsSection(requests_per_machine=3, inflight_factor=1.0)
    assert inflight_bound(_pools(100, 100), small)[0] == 6
    assert inflight_bound(Pools(), small)[0] == 1  # no machines: UNAVAILABLE answers first anyway


def test_limits_config_names_the_key():
    for key, value in (("max_prompt_chars", 0), ("inflight_factor", 0.0), ("inflight_factor", float("nan")),
                       ("requests_per_machine", -1), ("tokenizer_threads", 0), ("tokenizer_queue", 0)):
        with pytest.raises(ConfigError, match=f"limits.{key}"):
            ClsConfig(limits=LimitsSection(**{key: value}))


# --- characters per token --------------------------------------------------------------------------


def test_demo_tokenizer_bound_holds_for_hostile_text():
    if not (DEMO_MODEL / "tokenizer.json").is_file():
        pytest.skip("demo model absent")
    from engine.tokenizer import Tokenizer

    k = max_chars_per_token(DEMO_MODEL)
    assert k is not None and 8 <= k <= 256
    tok = Tokenizer(DEMO_MODEL)
    rng = random.Random(0)
    pieces = [" " * 200, "\n" + " " * 300, "#" * 500, "-" * 400, "=" * 300, "a" * 1000, "的" * 300,
              "\U0001F600" * 100, "<|im_start|>" * 50, "hello world " * 30, "\t" * 200, "0" * 400]
    for _ in range(50):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 6)))
        assert len(text) <= len(tok.encode(text)) * k, text[:80]
    pools = _pools(10, max_model_len=8192)
    assert prompt_char_limit(pools, LimitsSection(), k) == 8192 * k
    assert prompt_char_limit(pools, LimitsSection(max_prompt_chars=1000), k) == 1000
    assert prompt_char_limit(pools, LimitsSection(), None) is None
    assert prompt_char_limit(Pools(), LimitsSection(), k) is None


def test_encoder_gives_the_engine_tokenizers_ids_without_holding_the_gil():
    if not (DEMO_MODEL / "tokenizer.json").is_file():
        pytest.skip("demo model absent")
    from engine.tokenizer import Tokenizer

    tok, encoder = Tokenizer(DEMO_MODEL), Encoder(DEMO_MODEL)
    for text in ("What is the capital of France?", "  leading\n\ttabs  ", "<|im_start|>user\nhi<|im_end|>",
                 "的 \U0001F600 é" * 20, "x" * 5000):
        assert encoder.encode(text) == tok.encode(text)
        assert encoder.encode(text, add_special_tokens=True) == tok.encode(text, add_special_tokens=True)
    messages = [{"role": "user", "content": "Name three rivers."}]
    assert encoder.encode(tok.apply_chat_template(messages)) == tok.encode_chat(messages)

    # While a long text is encoded on a thread, the event loop keeps turning.
    text = "the capital of France is Paris and " * 60000  # about 1 s to encode

    async def run():
        gaps, last = [], time.monotonic()
        work = asyncio.create_task(asyncio.to_thread(encoder.encode, text))
        while not work.done():
            await asyncio.sleep(0.005)
            now = time.monotonic()
            gaps.append(now - last)
            last = now
        return max(gaps), len(await work)
    max_gap, num_ids = asyncio.run(run())
    assert num_ids > 300_000 and max_gap < 0.25, max_gap


def _tokenizer_json(tmp_path, model: dict, normalizer=None, pre_tokenizer=None, added=()):
    (tmp_path / "tokenizer.json").write_text(json.dumps({
        "model": model, "normalizer": normalizer, "pre_tokenizer": pre_tokenizer,
        "added_tokens": [{"content": c} for c in added]}))
    return tmp_path


@pytest.mark.parametrize("model, normalizer, pre_tokenizer, expected", [
    # The longest entry, added tokens included, times 4 where characters compose.
    ({"type": "BPE", "vocab": {"ab": 0, "abcdef": 1}}, None, {"type": "ByteLevel"}, 11),
    ({"type": "BPE", "vocab": {"abc": 0}, "byte_fallback": True}, {"type": "NFC"}, {"type": "Metaspace"}, 44),
    ({"type": "BPE", "vocab": {"abc": 0}, "byte_fallback": True},
     {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "_"},
                                          {"type": "Replace", "pattern": {"String": " "}, "content": "_"}]},
     {"type": "Metaspace"}, 11),
    # Unbounded: an unknown word is one token, characters are dropped, unknowns fused.
    ({"type": "WordLevel", "vocab": {"a": 0}, "unk_token": "a"}, None, {"type": "Whitespace"}, None),
    ({"type": "BPE", "vocab": {"ab": 0}}, None,
     {"type": "Sequence", "pretokenizers": [{"type": "Split", "behavior": "Removed"}, {"type": "ByteLevel"}]}, None),
    ({"type": "BPE", "vocab": {"ab": 0}, "unk_token": "ab", "fuse_unk": True}, None, None, None),
    ({"type": "BPE", "vocab": {"ab": 0}}, {"type": "Replace", "pattern": {"String": "  "}, "content": ""},
     {"type": "ByteLevel"}, None),
    ({"type": "BPE", "vocab": {"ab": 0}}, {"type": "StripAccents"}, {"type": "ByteLevel"}, None),
])
def test_chars_per_token_only_where_it_is_a_bound(tmp_path, model, normalizer, pre_tokenizer, expected):
    directory = _tokenizer_json(tmp_path, model, normalizer, pre_tokenizer, added=("<|special|>",))
    assert max_chars_per_token(directory) == expected
    assert max_chars_per_token(tmp_path / "absent") is None


# --- tokenizer threads -----------------------------------------------------------------------------


def test_tokenizer_pool_bounds_long_texts_and_keeps_short_ones_moving():
    async def run():
        pool = TokenizerPool(threads=1, queue=2)
        gate = threading.Event()
        long = SHORT_TEXT_CHARS + 1
        first = asyncio.create_task(pool.run(long, gate.wait, 10))
        second = asyncio.create_task(pool.run(long, lambda: "second"))
        await asyncio.sleep(0)
        assert pool.num_long == 2
        with pytest.raises(TokenizerBusy, match="limits.tokenizer_queue 2"):
            await pool.run(long, lambda: "third")
        # Short texts have their own thread: the blocked long lane does not hold them.
        assert await asyncio.wait_for(pool.run(10, lambda: "short"), 5) == "short"
        # A cancelled caller stops waiting, but its place is held until the thread is done.
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        assert pool.num_long == 2
        gate.set()
        assert await asyncio.wait_for(second, 5) == "second"
        deadline = time.monotonic() + 5
        while pool.num_long and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert pool.num_long == 0
        pool.close()
    asyncio.run(run())


# --- kept pool sizes -----------------------------------------------------------------------------


def test_pool_targets_survive_a_reload(tmp_path):
    state = tmp_path / "state"
    assert PoolTargets.load(None).home_of("m0", Role.TOKEN) == Role.TOKEN
    targets = PoolTargets.load(state)
    assert targets.home_of("m0", Role.TOKEN) == Role.TOKEN  # nothing kept yet
    targets.save(2, 1, {"m0": Role.PROMPT, "m1": Role.PROMPT, "m2": Role.TOKEN})
    again = PoolTargets.load(state)
    assert (again.num_prompt, again.num_token) == (2, 1)
    assert again.home_of("m0", Role.TOKEN) == Role.PROMPT
    assert again.home_of("m2", Role.PROMPT) == Role.TOKEN
    assert again.home_of("new", Role.TOKEN) == Role.TOKEN  # a machine the resize never saw
    assert not list(state.glob("*.tmp"))
    (state / "pools.json").write_text("{not json")
    assert PoolTargets.load(state).homes == {}  # unreadable: logged, clsd starts anyway


# --- parsing in the handler ------------------------------------------------------------------------


class _Client(clsd_pb2_grpc.ClientServiceServicer):
    def __init__(self):
        self.closed = asyncio.Event()

    async def Generate(self, request, context):
        try:
            for i in range(1000):
                yield pb.GenerateResponse(request_id=request.request_id, index=i)
                await asyncio.sleep(0.01)
        finally:
            self.closed.set()


class _Registry(clsd_pb2_grpc.RegistryServiceServicer):
    async def Heartbeat(self, request, context):
        return pb.HeartbeatReply(known=request.lease_id == "L")


def test_corrupt_requests_are_invalid_argument_and_valid_ones_still_work():
    async def run():
        server = grpc.aio.server()
        client = _Client()
        add_checked(clsd_pb2_grpc.add_ClientServiceServicer_to_server, client, server)
        add_checked(clsd_pb2_grpc.add_RegistryServiceServicer_to_server, _Registry(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                raw_stream = ch.unary_stream("/splitserve.cls.v1.ClientService/Generate",
                                             request_serializer=None, response_deserializer=None)
                raw_unary = ch.unary_unary("/splitserve.cls.v1.RegistryService/Heartbeat",
                                           request_serializer=None, response_deserializer=None)
                # A bad varint, a string past the end, a string field of invalid UTF-8
                # (GenerateRequest.request_id is field 11, HeartbeatRequest.lease_id field 1).
                for generate, heartbeat in ((b"\xff\xff\xff\xff\x0f",) * 2, (b"\x0a\x05ab",) * 2,
                                            (b"\x5a\x02\xff\xfe", b"\x0a\x02\xff\xfe")):
                    with pytest.raises(grpc.aio.AioRpcError) as e:
                        async for _ in raw_stream(generate, timeout=5):
                            pass
                    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value
                    assert "Generate: the request of" in e.value.details()
                    with pytest.raises(grpc.aio.AioRpcError) as e:
                        await raw_unary(heartbeat, timeout=5)
                    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                stub = clsd_pb2_grpc.ClientServiceStub(ch)
                call = stub.Generate(pb.GenerateRequest(request_id="ok"))
                assert (await call.read()).request_id == "ok"
                call.cancel()  # the servicer's stream is closed at once
                await asyncio.wait_for(client.closed.wait(), 5)
                reply = await clsd_pb2_grpc.RegistryServiceStub(ch).Heartbeat(pb.HeartbeatRequest(lease_id="L"))
                assert reply.known
        finally:
            await server.stop(0)
    asyncio.run(run())


# --- leases across a stalled loop ----------------------------------------------------------------


def test_a_stalled_loop_does_not_expire_leases_but_silence_still_does():
    async def run():
        lost = []
        registry = Registry(Pools(), 1.0, lambda *a: None, lambda mid, why: lost.append(mid))
        registry.pools.add("m0", Role.TOKEN, 10, 16, 128)

        async def close(grace=None):
            pass
        link = SimpleNamespace(machine_id="m0", lease_id="L", expires_at=time.monotonic() + 1.0,
                               stream_task=None, work=SimpleNamespace(close=lambda: None),
                               channel=SimpleNamespace(close=close), requests=set())
        registry.links["m0"], registry._by_lease["L"] = link, "m0"
        registry.start()
        await asyncio.sleep(0.3)
        time.sleep(2.0)  # the loop is held past the lease: the stall is not the machine's fault
        await asyncio.sleep(0.5)
        assert not lost and "m0" in registry.links
        deadline = time.monotonic() + 5  # no heartbeat comes: the lease runs out all the same
        while not lost and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert lost == ["m0"]
        await registry.close()
    asyncio.run(run())
