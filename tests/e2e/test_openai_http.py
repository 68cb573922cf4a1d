"""clsd's OpenAI-compatible HTTP door with real processes: the official `openai` client, raw
sockets for what a client library will not send, and the machines' own load reports to show
that no request leaves KV blocks behind."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import socket
import time
import urllib.error
import urllib.request

import grpc
import openai
import pytest

from cls.client import AsyncClsClient, ClsClient, ResourceExhausted
from cls.stop_strings import StopMatcher
from engine.tokenizer import Tokenizer
from proto import clsd_pb2 as pb
from proto import mlsd_pb2 as mpb
from proto import mlsd_pb2_grpc
from tests.cls_cluster import Cluster

API_KEY = "test-api-key"
MODEL = "SmolLM2-135M-Instruct"
MAX_INFLIGHT = 50
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def cluster(demo_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("http-cluster")
    (tmp / "api-key").write_text(API_KEY + "\n")
    c = Cluster(tmp, demo_model_dir, [("prompt-0", "prompt"), ("token-0", "token")],
                clsd={"http": {"port": 0, "api_key_file": str(tmp / "api-key"), "max_body_bytes": 2**20},
                      "limits": {"max_inflight_requests": MAX_INFLIGHT, "max_tokens_limit": 4096}})
    c.start()
    yield c
    c.stop()
    assert "Traceback" not in c.clsd.log(), c.clsd.log()[-4000:]


@pytest.fixture(scope="module")
def tokenizer(demo_model_dir):
    return Tokenizer(demo_model_dir)


def _base_url(c: Cluster) -> str:
    return f"http://127.0.0.1:{c.clsd.ready['http_port']}"


def _wait_for(predicate, timeout_s: float, what):
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise TimeoutError(what() if callable(what) else what)
        time.sleep(0.02)
    return value


def _loads(c: Cluster) -> list:
    out = []
    for proc in c.machines.values():
        with grpc.insecure_channel(proc.address) as ch:
            out.append(mlsd_pb2_grpc.MachineServiceStub(ch).GetLoad(mpb.LoadRequest(), timeout=10))
    return out


def _idle(c: Cluster) -> bool:
    """Every machine reports all KV blocks free and no work, and clsd holds no request for them."""
    for load in _loads(c):
        if load.kv_blocks_used or load.prompt_queue_len or load.decode_queue_len or load.num_running:
            return False
    return all(m.num_requests == 0 for m in c.admin("ListMachines", pb.ListMachinesRequest()).machines)


def _wait_idle(c: Cluster, timeout_s: float = 30.0) -> None:
    _wait_for(lambda: _idle(c), timeout_s, lambda: f"machines still hold work: {_loads(c)}\n{c.logs()}")


def _post(c: Cluster, path: str, body: bytes | dict, key: str | None = API_KEY) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    try:
        with urllib.request.urlopen(urllib.request.Request(_base_url(c) + path, data=data, headers=headers),
                                    timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


class RawStream:
    """A streaming request on a bare socket, so a test can walk away from it mid-stream."""

    def __init__(self, c: Cluster, path: str, body: dict):
        self.sock = socket.create_connection(("127.0.0.1", c.clsd.ready["http_port"]), timeout=60)
        payload = json.dumps(body).encode()
        self.sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {API_KEY}\r\n"
                          f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
                          .encode() + payload)
        self.buf = b""

    def read_events(self, count: int) -> bytes:
        """Reads until `count` SSE events (or the end of the response) have arrived."""
        while self.buf.count(b"data: ") < count and not self.buf.endswith(b"0\r\n\r\n"):
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            self.buf += chunk
        return self.buf

    def close(self) -> None:
        self.sock.close()


# --- stop strings (pure) ---------------------------------------------------------------------


def test_stop_matcher_cuts_at_the_earliest_stop_whatever_the_chunking():
    rng = random.Random(7)
    for _ in range(2000):
        text = "".join(rng.choice("ab c") for _ in range(rng.randrange(0, 40)))
        stops = tuple("".join(rng.choice("ab c") for _ in range(rng.randrange(1, 5)))
                      for _ in range(rng.randrange(0, 3)))
        # The reference: one character at a time, stopping at the first stop string completed.
        want, hits = text, []
        for end in range(1, len(text) + 1):
            if hits := [text[:end].find(s) for s in stops if s in text[:end]]:
                want = text[:min(hits)]
                break
        hold = max(map(len, stops), default=1) - 1
        m, out, i = StopMatcher(stops), [], 0
        while i < len(text):
            j = i + rng.randrange(1, 6)
            out.append(m.feed(text[i:j]))
            i = j
            if not m.stopped:  # held back: never more than the longest stop string - 1
                assert len("".join(out)) >= min(i, len(text)) - hold, (text, stops, out)
        out.append(m.flush())
        assert "".join(out) == want and m.stopped == bool(hits), (text, stops, out)


# --- the official client ---------------------------------------------------------------------


def test_sync_client_whole_equals_streamed_and_the_grpc_door(cluster, tokenizer):
    client = openai.OpenAI(base_url=_base_url(cluster) + "/v1", api_key=API_KEY, max_retries=0)
    assert [m.id for m in client.models.list()] == [MODEL]
    prompt = "The capital of France is"
    whole = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0)
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    streamed = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert streamed == whole.choices[0].text and whole.choices[0].text.strip(), (streamed, whole)
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage == whole.usage and not chunks[-1].choices
    with ClsClient(cluster.clsd.address) as grpc_client:  # the other door, same request
        ref = grpc_client.generate(prompt, max_tokens=16)
    assert whole.choices[0].text == ref.text and whole.choices[0].finish_reason == ref.finish_reason
    u = whole.usage
    assert (u.prompt_tokens, u.completion_tokens) == (len(tokenizer.encode(prompt)), len(ref.token_ids))
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens

    chat = client.chat.completions.create(model=MODEL, messages=QUESTION, max_completion_tokens=24,
                                          temperature=0)
    chat_chunks = list(client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=24,
                                                      temperature=0, stream=True,
                                                      stream_options={"include_usage": True}))
    assert chat_chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chat_chunks if ch.choices)
    assert text == chat.choices[0].message.content and "Paris" in text, (text, chat)
    assert chat.usage.prompt_tokens == len(tokenizer.encode_chat(QUESTION))
    assert chat_chunks[-1].usage == chat.usage and chat.usage.completion_tokens > 0
    with ClsClient(cluster.clsd.address) as grpc_client:
        ref = grpc_client.generate(QUESTION[0]["content"], chat=True, max_tokens=24)
    assert text == ref.text and chat.usage.completion_tokens == len(ref.token_ids)
    _wait_idle(cluster)


def test_async_client_50_concurrent_streams_all_finish(cluster, tokenizer):
    async def run():
        client = openai.AsyncOpenAI(base_url=_base_url(cluster) + "/v1", api_key=API_KEY, max_retries=0)
        ref = await client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=8,
                                                   temperature=0)
        completion = await client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8,
                                                     temperature=0)

        async def one():
            stream = await client.chat.completions.create(
                model=MODEL, messages=QUESTION, max_tokens=8, temperature=0, stream=True,
                stream_options={"include_usage": True})
            parts, usage, finish = [], None, None
            async for ch in stream:
                if ch.choices:
                    parts.append(ch.choices[0].delta.content or "")
                    finish = ch.choices[0].finish_reason or finish
                usage = ch.usage or usage
            return "".join(parts), finish, usage

        results = await asyncio.wait_for(asyncio.gather(*(one() for _ in range(50))), 240)
        await client.close()
        return ref, completion, results

    ref, completion, results = asyncio.run(run())
    assert completion.choices[0].text and completion.usage.completion_tokens <= 8
    assert len(results) == 50
    for text, finish, usage in results:  # greedy: every stream is the one whole answer
        assert (text, finish) == (ref.choices[0].message.content, ref.choices[0].finish_reason)
        assert usage == ref.usage
    assert ref.usage.prompt_tokens == len(tokenizer.encode_chat(QUESTION))
    _wait_idle(cluster)


def test_stop_strings_cut_the_text_before_them_streamed_or_whole(cluster):
    client = openai.OpenAI(base_url=_base_url(cluster) + "/v1", api_key=API_KEY, max_retries=0)
    prompt = "Here is a short story about a cat:"
    full = client.completions.create(model=MODEL, prompt=prompt, max_tokens=32, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = full[len(full) // 2:len(full) // 2 + 3]  # spans tokens somewhere in the middle
    assert stop.strip(), full
    want = full[:full.index(stop)]
    for kwargs in ({}, {"stream": True}):
        got = client.completions.create(model=MODEL, prompt=prompt, max_tokens=32, temperature=0,
                                        stop=[stop, "no such text"], extra_body={"ignore_eos": True},
                                        **kwargs)
        chunks = list(got) if kwargs else [got]
        text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
        assert text == want, (kwargs, stop, full, text)
        assert chunks[-1].choices[0].finish_reason == "stop"
    _wait_idle(cluster)  # the rest of each run was aborted on the machines


# --- bad input -------------------------------------------------------------------------------

_Q = {"model": MODEL, "messages": QUESTION}
_P = {"model": MODEL, "prompt": "hi"}
BAD_INPUT = [
    ("/v1/completions", b'{"model": "x", "prompt": ', 400, "body", "not valid JSON"),
    ("/v1/completions", b'{"model": "' + MODEL.encode() + b'", "prompt": "\xff\xfe"}', 400, "body", "UTF-8"),
    ("/v1/completions", b"[1, 2]", 400, "body", "JSON object"),
    ("/v1/completions", {**_P, "prompt": 42}, 400, "prompt", "prompt must be"),
    ("/v1/completions", {**_P, "prompt": "   "}, 400, "prompt", "prompt is empty"),
    ("/v1/completions", {**_P, "prompt": []}, 400, "prompt", "prompt is empty"),
    ("/v1/completions", {**_P, "prompt": ["a", "b"]}, 400, "prompt", "one prompt"),
    ("/v1/completions", {**_P, "prompt": [60000]}, 400, "prompt", "vocabulary"),
    ("/v1/completions", {**_P, "prompt": "\ud800"}, 400, "prompt", "surrogate"),
    ("/v1/completions", {"prompt": "hi"}, 400, "model", "model is required"),
    ("/v1/completions", {**_P, "model": "gpt-4"}, 404, "model", "does not exist"),
    ("/v1/completions", {**_P, "max_tokens": "ten"}, 400, "max_tokens", "must be an integer"),
    ("/v1/completions", {**_P, "max_tokens": 0}, 400, "max_tokens", "at least 1"),
    ("/v1/completions", {**_P, "max_tokens": -5}, 400, "max_tokens", "at least 1"),
    ("/v1/completions", {**_P, "max_tokens": 4000}, 400, "max_tokens", "exceeds the context"),
    ("/v1/completions", {**_P, "max_tokens": 5000}, 400, "max_tokens", "<= 4096"),
    ("/v1/completions", {**_P, "temperature": "hot"}, 400, "temperature", "must be a number"),
    ("/v1/completions", {**_P, "temperature": -1}, 400, "temperature", "temperature must be >= 0"),
    ("/v1/completions", {**_P, "top_p": 1.5}, 400, "top_p", "top_p"),
    ("/v1/completions", {**_P, "top_k": -7}, 400, "top_k", "top_k"),
    ("/v1/completions", {**_P, "seed": -1}, 400, "seed", "seed"),
    ("/v1/completions", {**_P, "n": 2}, 400, "n", "only n=1"),
    ("/v1/completions", {**_P, "stop": ""}, 400, "stop", "must not be empty"),
    ("/v1/completions", {**_P, "stop": [1]}, 400, "stop", "strings"),
    ("/v1/completions", {**_P, "stream": "yes"}, 400, "stream", "must be a boolean"),
    ("/v1/completions", {**_P, "stream_options": {"include_usage": True}}, 400, "stream_options", "stream"),
    ("/v1/completions", {**_P, "frobnicate": 1}, 400, "frobnicate", "unknown field"),
    ("/v1/completions", {**_P, "presence_penalty": 0.5}, 400, "presence_penalty", "not supported"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages", "empty"),
    ("/v1/chat/completions", {"model": MODEL}, 400, "messages", "required"),
    ("/v1/chat/completions", {**_Q, "messages": "hi"}, 400, "messages", "must be a list"),
    ("/v1/chat/completions", {**_Q, "messages": [{"role": "user"}]}, 400, "messages[0].content",
     "must be a string"),
    ("/v1/chat/completions", {**_Q, "messages": [{"role": "wizard", "content": "hi"}]}, 400,
     "messages[0].role", "must be one of"),
    ("/v1/chat/completions", {**_Q, "max_completion_tokens": 0}, 400, "max_completion_tokens", "at least 1"),
    ("/v1/chat/completions", {**_Q, "max_completion_tokens": 4000}, 400, "max_completion_tokens",
     "exceeds the context"),
    ("/v1/chat/completions", {**_Q, "model": "llama"}, 404, "model", "does not exist"),
]


def test_bad_input_gets_an_openai_error_naming_it_and_leaks_nothing(cluster):
    for path, body, status, param, fragment in BAD_INPUT:
        code, reply = _post(cluster, path, body)
        err = reply.get("error", {})
        assert (code, err.get("param")) == (status, param), (path, body, code, reply)
        assert fragment in err["message"] and err["type"], (path, body, reply)
    assert _post(cluster, "/v1/nowhere", _P)[0] == 404
    code, reply = _post(cluster, "/v1/completions", {**_P, "max_tokens": 4, "temperature": 0})
    assert code == 200 and reply["usage"]["completion_tokens"] <= 4, reply  # still serving
    _wait_idle(cluster)


def _send_big_body(port: int, chunked: bool) -> bytes:
    """Sends the headers of a 10 MB body and then body bytes until clsd answers; returns the answer.
    clsd must answer without reading it all."""
    size = 10 * 2**20
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {size}"
    sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {API_KEY}\r\n"
                 f"Content-Type: application/json\r\n{framing}\r\n\r\n".encode())
    piece = b'{"model": "x", "prompt": "' + b"a" * 65536
    sent, answer = 0, b""
    sock.setblocking(False)
    try:
        while sent < size:
            try:
                answer += sock.recv(65536)
                break  # clsd answered before the body was all sent
            except BlockingIOError:
                pass
            data = b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece
            try:
                sock.send(data)
                sent += len(piece)
            except BlockingIOError:
                time.sleep(0.01)  # clsd is not reading: the socket buffers are full
        sock.settimeout(30)
        while chunk := sock.recv(65536):
            answer += chunk
    except (BrokenPipeError, ConnectionResetError):
        pass
    finally:
        sock.close()
    assert sent < size, "clsd read the whole 10 MB body"
    return answer


@pytest.mark.parametrize("chunked", [False, True])
def test_a_10_mb_body_is_refused_without_being_read(cluster, chunked):
    answer = _send_big_body(cluster.clsd.ready["http_port"], chunked)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), answer[:500]
    err = json.loads(body[body.index(b"{"):body.rindex(b"}") + 1])["error"]
    assert err["param"] == "body" and "over the limit of 1048576 bytes" in err["message"], err
    code, reply = _post(cluster, "/v1/completions", {**_P, "max_tokens": 2})
    assert code == 200, reply


def test_api_key_is_required_when_configured(cluster):
    for key in (None, "wrong-key"):
        code, reply = _post(cluster, "/v1/completions", _P, key=key)
        assert code == 401 and reply["error"]["code"] == "invalid_api_key", reply
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=_base_url(cluster) + "/v1", api_key="wrong-key", max_retries=0).models.list()
    # Probes need no key: health is able-to-serve, metrics is clsd's registry.
    with urllib.request.urlopen(_base_url(cluster) + "/health", timeout=10) as r:
        assert r.status == 200
    with urllib.request.urlopen(_base_url(cluster) + "/metrics", timeout=10) as r:
        metrics = r.read().decode()
    assert "clsd_ttft_seconds_count" in metrics and 'clsd_requests_total{outcome="finished"}' in metrics


# --- disconnects and the admission bound ------------------------------------------------------


def _busy(c: Cluster) -> bool:
    return any(load.kv_blocks_used for load in _loads(c))


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_leaves_frees_kv_on_both_machines_within_a_second(cluster, stream):
    _wait_idle(cluster)
    raw = RawStream(cluster, "/v1/completions", {**_P, "prompt": "Tell me a long story.", "max_tokens": 1500,
                                                 "temperature": 0, "ignore_eos": True, "stream": stream})
    if stream:
        events = raw.read_events(4)
        assert events.startswith(b"HTTP/1.1 200") and events.count(b"data: ") >= 4, events[:500]
    _wait_for(lambda: _busy(cluster), 30, "the request never reached the machines")
    raw.close()
    closed = time.monotonic()
    _wait_idle(cluster, timeout_s=10)
    assert time.monotonic() - closed <= 1.0, f"KV freed {time.monotonic() - closed:.2f} s after the close"


def test_the_admission_bound_answers_429_and_grpc_resource_exhausted(cluster):
    _wait_idle(cluster)
    streams = []
    try:
        for _ in range(MAX_INFLIGHT):  # each holds a slot: its first event means it was admitted
            s = RawStream(cluster, "/v1/chat/completions", {**_Q, "max_tokens": 2000, "ignore_eos": True,
                                                             "stream": True})
            streams.append(s)
            assert s.read_events(1).startswith(b"HTTP/1.1 200"), s.buf[:300]
        code, reply = _post(cluster, "/v1/chat/completions", {**_Q, "max_tokens": 2})
        assert code == 429 and f"limit {MAX_INFLIGHT}" in reply["error"]["message"], reply

        async def grpc_door():
            async with AsyncClsClient(cluster.clsd.address) as c:
                with pytest.raises(ResourceExhausted):
                    await c.generate("hi", max_tokens=2)
        asyncio.run(grpc_door())
    finally:
        for s in streams:
            s.close()
    _wait_idle(cluster)
    code, reply = _post(cluster, "/v1/chat/completions", {**_Q, "max_tokens": 2})
    assert code == 200, reply


# --- drain -----------------------------------------------------------------------------------


def test_sigterm_drains_http_finishes_in_flight_and_exits(demo_model_dir, tmp_path):
    c = Cluster(tmp_path, demo_model_dir, [("token-0", "token")], clsd={"http": {"port": 0}})
    c.start()

    def health() -> int:
        try:
            with urllib.request.urlopen(_base_url(c) + "/health", timeout=10) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code
    try:
        assert health() == 200
        c.admin("DrainMachine", pb.DrainRequest(machine_id="token-0"))  # no machine takes work
        assert health() == 503
        c.admin("UndrainMachine", pb.DrainRequest(machine_id="token-0"))
        assert health() == 200
        raw = RawStream(c, "/v1/completions", {**_P, "max_tokens": 120, "temperature": 0, "ignore_eos": True,
                                               "stream": True})
        assert raw.read_events(2).startswith(b"HTTP/1.1 200")
        c.clsd.proc.send_signal(signal.SIGTERM)
        _wait_for(lambda: health() == 503, 10, "health stayed 200 while draining")
        code, reply = _post(c, "/v1/completions", {**_P, "max_tokens": 2}, key=None)
        assert code == 503 and "draining" in reply["error"]["message"], reply
        events = [json.loads(line[6:]) for line in raw.read_events(10**6).split(b"\n")
                  if line.startswith(b"data: {")]
        assert raw.buf.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n"), raw.buf[-300:]
        assert events[-1]["choices"][0]["finish_reason"] == "length", events[-1]
        raw.close()
        assert c.clsd.proc.wait(60) == 0, c.clsd.log()[-2000:]
        assert "Traceback" not in c.clsd.log() and "draining" in c.clsd.log(), c.clsd.log()[-2000:]
    finally:
        c.stop()
