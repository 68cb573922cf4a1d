"""clsd's OpenAI-compatible HTTP door with real processes: the official `openai` client, raw
sockets for what a client library will not send, and the machines' own load reports to show
that no request leaves KV blocks behind."""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import logging
import random
import re
import signal
import socket
import threading
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

    def read_head(self) -> bytes:
        """Reads until the response's headers have arrived (a stream sends them once admitted)."""
        while b"\r\n\r\n" not in self.buf and (chunk := self.sock.recv(65536)):
            self.buf += chunk
        return self.buf

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
        for include in (False, True):  # include_stop_str_in_output keeps the stop string
            got = client.completions.create(model=MODEL, prompt=prompt, max_tokens=32, temperature=0,
                                            stop=[stop, "no such text"],
                                            extra_body={"ignore_eos": True, "include_stop_str_in_output": include},
                                            **kwargs)
            chunks = list(got) if kwargs else [got]
            text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
            assert text == want + (stop if include else ""), (kwargs, include, stop, full, text)
            assert chunks[-1].choices[0].finish_reason == "stop"
    _wait_idle(cluster)  # the rest of each run was aborted on the machines


# --- what vLLM's clients send ----------------------------------------------------------------

NEUTRAL = {"min_tokens": 0, "repetition_penalty": 1.0, "presence_penalty": 0, "frequency_penalty": 0.0,
           "min_p": 0.0, "top_logprobs": 0, "chat_template_kwargs": {"enable_thinking": False},
           "include_stop_str_in_output": False, "skip_special_tokens": True}


def test_unknown_fields_are_ignored_logged_once_and_counted_neutral_values_accepted(cluster):
    client = openai.OpenAI(base_url=_base_url(cluster) + "/v1", api_key=API_KEY, max_retries=0)
    ref = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=12, temperature=0)
    before = _metric(cluster, 'clsd_http_unknown_fields_total{field="frobnicate_e2e"}')
    for _ in range(3):
        got = client.chat.completions.create(
            model=MODEL, messages=QUESTION, max_tokens=12, temperature=0, n=1, logprobs=False,
            presence_penalty=0, frequency_penalty=0,
            extra_body={**NEUTRAL, "frobnicate_e2e": {"deep": [1, 2]}, "another_novelty_e2e": None})
        assert got.choices[0].message.content == ref.choices[0].message.content
    got = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4,
                                    temperature=0, extra_body={**NEUTRAL, "frobnicate_e2e": 1})
    assert got.usage.completion_tokens <= 4
    assert _metric(cluster, 'clsd_http_unknown_fields_total{field="frobnicate_e2e"}') == before + 4
    log = cluster.clsd.log()
    assert log.count("ignoring the unknown request field 'frobnicate_e2e'") == 1, log[-3000:]
    assert log.count("ignoring the unknown request field 'another_novelty_e2e'") == 1


def test_max_completion_tokens_on_completions(cluster):
    client = openai.OpenAI(base_url=_base_url(cluster) + "/v1", api_key=API_KEY, max_retries=0)
    got = client.completions.create(model=MODEL, prompt="Once upon a time", temperature=0,
                                    extra_body={"max_completion_tokens": 5, "ignore_eos": True})
    assert got.usage.completion_tokens == 5 and got.choices[0].finish_reason == "length"


def test_role_goes_with_the_first_token_and_usage_on_every_chunk(cluster):
    client = openai.OpenAI(base_url=_base_url(cluster) + "/v1", api_key=API_KEY, max_retries=0)
    for chat in (True, False):
        kwargs = dict(model=MODEL, max_tokens=10, temperature=0, stream=True,
                      stream_options={"include_usage": True, "continuous_usage_stats": True},
                      extra_body={"ignore_eos": True})
        chunks = list(client.chat.completions.create(messages=QUESTION, **kwargs) if chat else
                      client.completions.create(prompt="Once upon a time", **kwargs))
        with_choices = [ch for ch in chunks if ch.choices]
        if chat:  # no role-only chunk ahead of the prefill: the role rides on the first token
            first = with_choices[0].choices[0].delta
            assert first.role == "assistant" and first.content, chunks[:2]
            assert all(ch.choices[0].delta.role is None for ch in with_choices[1:])
        # usage on every chunk, growing with the tokens, the last one the request's total
        done = [ch.usage.completion_tokens for ch in chunks]
        assert all(ch.usage is not None for ch in chunks) and done == sorted(done), done
        assert done[0] >= 1 and done[-1] == 10 and not chunks[-1].choices
        assert len({ch.usage.prompt_tokens for ch in chunks}) == 1
    _wait_idle(cluster)


def test_default_max_tokens_is_the_rest_of_the_context(cluster, tokenizer):
    machines = cluster.admin("ListMachines", pb.ListMachinesRequest()).machines
    room = min(8192, max(m.kv_blocks_total for m in machines) * 16)  # context, KV (16-token blocks)
    prompt = [tokenizer.encode("hello")[0]] * (room - 6)  # fits only with max_tokens <= 6
    code, reply = _post(cluster, "/v1/completions", {**_P, "prompt": prompt, "ignore_eos": True,
                                                     "temperature": 0})
    assert code == 200 and reply["usage"]["completion_tokens"] == 6, reply
    assert reply["choices"][0]["finish_reason"] == "length"
    _wait_idle(cluster)


def test_x_request_id_is_taken_and_echoed(cluster):
    def post(headers: dict, body: dict) -> tuple[int, dict, dict]:
        req = urllib.request.Request(_base_url(cluster) + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json",
                                              "Authorization": f"Bearer {API_KEY}", **headers})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, dict(r.headers), json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), json.loads(e.read())

    code, headers, reply = post({"X-Request-Id": "trace-42.a_b"}, {**_P, "max_tokens": 2})
    assert code == 200 and headers["x-request-id"] == "trace-42.a_b" and reply["id"] == "cmpl-trace-42.a_b"
    for bad_id in ("x" * 129, "has space", ""):
        code, headers, reply = post({"X-Request-Id": bad_id}, {**_P, "max_tokens": 2})
        rid = headers["x-request-id"]
        assert code == 200 and rid != bad_id and re.fullmatch(r"[0-9a-f]{32}", rid) and reply["id"] == f"cmpl-{rid}"
    code, headers, reply = post({"X-Request-Id": "bad-one"}, {**_P, "top_p": 0})
    assert code == 400 and headers["x-request-id"] == "bad-one"
    client = openai.OpenAI(base_url=_base_url(cluster) + "/v1", api_key=API_KEY, max_retries=0)
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=QUESTION, max_tokens=2,
                                                           stream=True, extra_headers={"X-Request-Id": "s-1"})
    assert raw.headers["x-request-id"] == "s-1"
    assert all(ch.id == "chatcmpl-s-1" for ch in raw.parse())
    # The same id twice at once: the second request still runs, under a suffixed id.
    first = client.completions.with_raw_response.create(model=MODEL, prompt="hi", max_tokens=500, stream=True,
                                                        extra_headers={"X-Request-Id": "dup"},
                                                        extra_body={"ignore_eos": True})
    second = client.completions.with_raw_response.create(model=MODEL, prompt="hi", max_tokens=2,
                                                         extra_headers={"X-Request-Id": "dup"})
    assert second.headers["x-request-id"] == "dup"
    assert re.fullmatch(r"cmpl-dup-[0-9a-f]{8}", second.parse().id), second.parse().id
    first.http_response.close()
    _wait_idle(cluster)


def test_ping_version_models_tokenize_detokenize(cluster, tokenizer):
    base = _base_url(cluster)
    for method in ("GET", "POST"):
        with urllib.request.urlopen(urllib.request.Request(base + "/ping", method=method), timeout=10) as r:
            assert r.status == 200
    with urllib.request.urlopen(base + "/version", timeout=10) as r:
        assert json.loads(r.read()) == {"version": importlib.metadata.version("splitserve")}
    client = openai.OpenAI(base_url=base + "/v1", api_key=API_KEY, max_retries=0)
    card = client.models.list().data[0]
    assert card.id == MODEL and card.model_extra["max_model_len"] == 8192
    assert client.models.retrieve(MODEL).model_extra["max_model_len"] == 8192

    text = "The capital of France is Paris."
    code, reply = _post(cluster, "/tokenize", {"model": MODEL, "prompt": text})
    assert code == 200 and reply == {"count": len(tokenizer.encode(text, True)), "max_model_len": 8192,
                                     "tokens": tokenizer.encode(text, True), "token_strs": None}, reply
    code, chat = _post(cluster, "/tokenize", {"model": MODEL, "messages": QUESTION})
    assert code == 200 and chat["tokens"] == tokenizer.encode_chat(QUESTION) and chat["count"] == len(chat["tokens"])
    code, back = _post(cluster, "/detokenize", {"model": MODEL, "tokens": reply["tokens"]})
    assert code == 200 and back == {"prompt": text}
    assert _post(cluster, "/detokenize", {"tokens": [10**6]})[1]["error"]["param"] == "tokens"
    assert _post(cluster, "/tokenize", {"model": "other", "prompt": "x"})[0] == 404
    assert _post(cluster, "/tokenize", {"prompt": "x"}, key=None)[0] == 401


def _log_since(c: Cluster, start: int) -> str:
    return c.clsd.log()[start:]


def test_4xx_lines_are_rate_limited_and_a_client_leaving_mid_body_is_one_line(cluster):
    start = len(cluster.clsd.log())
    t0 = time.monotonic()
    for _ in range(40):
        assert _post(cluster, "/v1/completions", {**_P, "top_p": 0})[0] == 400
    elapsed = time.monotonic() - t0
    lines = [ln for ln in _log_since(cluster, start).splitlines() if " http 400 POST /v1/completions" in ln]
    assert 1 <= len(lines) <= 5 * (elapsed + 2), (len(lines), elapsed)
    assert "top_p must be in (0, 1]" in lines[0] and "x-request-id" in lines[0]

    def suppressed_reported() -> bool:  # the next line let through says how many were held back
        _post(cluster, "/v1/completions", {**_P, "top_p": 0})
        return "similar lines suppressed" in _log_since(cluster, start)
    _wait_for(suppressed_reported, 15, lambda: _log_since(cluster, start)[-2000:])

    def leave_mid_body() -> bool:
        with socket.create_connection(("127.0.0.1", cluster.clsd.ready["http_port"]), timeout=10) as sock:
            sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
                         "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n".encode() + b'{"model": ')
            time.sleep(0.2)  # pacing only: the server has read the headers and waits for the body
        return "closed the connection after 10 bytes of the body" in _log_since(cluster, start)
    _wait_for(leave_mid_body, 15, lambda: _log_since(cluster, start)[-2000:])
    assert "Traceback" not in cluster.clsd.log()


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
    # Hostile but legal bytes: never a 500.
    ("/v1/completions", b'{"model": "' + MODEL.encode() + b'", "prompt": [1099511627776]}', 400, "prompt",
     "beyond the vocabulary"),
    ("/v1/completions", b'{"model": "' + MODEL.encode() + b'", "prompt": "hi", "max_tokens": ' + b"7" * 5000 + b"}",
     400, "body", "not valid JSON"),
    ("/v1/completions", b"[" * 100_000, 400, "body", "nested too deeply"),
    ("/v1/chat/completions", b'{"messages": ' + b"[" * 100_000, 400, "body", "nested too deeply"),
    ("/v1/completions", b'{"model": "' + MODEL.encode() + b'", "prompt": "hi", "top_p": NaN}', 400, "body", "NaN"),
    ("/v1/completions", b'"just a string"', 400, "body", "JSON object"),
    ("/v1/completions", b"null", 400, "body", "JSON object"),
    ("/v1/completions", b"", 400, "body", "not valid JSON"),
    ("/v1/completions", {**_P, "prompt": [1] * 9000}, 400, "prompt", "leaves no room for output"),
    ("/v1/completions", {**_P, "prompt": "hello " * 9000}, 400, "prompt", "leaves no room for output"),
    # Ranges as vLLM's (OpenAI's) and engine features the door cannot honour yet.
    ("/v1/completions", {**_P, "temperature": 2.5}, 400, "temperature", "<= 2"),
    ("/v1/completions", {**_P, "top_p": 0}, 400, "top_p", "top_p must be in (0, 1], got 0"),
    ("/v1/chat/completions", {**_Q, "top_p": -0.5}, 400, "top_p", "(0, 1]"),
    ("/v1/completions", {**_P, "repetition_penalty": 1.3}, 400, "repetition_penalty", "not supported yet"),
    ("/v1/completions", {**_P, "repetition_penalty": -1}, 400, "repetition_penalty", "must be"),
    ("/v1/completions", {**_P, "min_tokens": 4}, 400, "min_tokens", "not supported yet"),
    ("/v1/chat/completions", {**_Q, "min_p": 0.2}, 400, "min_p", "not supported yet"),
    ("/v1/completions", {**_P, "logprobs": 1}, 400, "logprobs", "not supported yet"),
    ("/v1/chat/completions", {**_Q, "logprobs": True}, 400, "logprobs", "not supported yet"),
    ("/v1/chat/completions", {**_Q, "top_logprobs": 3}, 400, "top_logprobs", "not supported yet"),
    ("/v1/chat/completions", {**_Q, "n": 3}, 400, "n", "only n=1"),
    ("/v1/chat/completions", {**_Q, "frequency_penalty": 0.1}, 400, "frequency_penalty", "not supported yet"),
    ("/v1/chat/completions", {**_Q, "chat_template_kwargs": "x"}, 400, "chat_template_kwargs", "an object"),
    ("/v1/completions", {**_P, "max_completion_tokens": 0}, 400, "max_completion_tokens", "at least 1"),
    ("/v1/completions", {**_P, "stream": True, "stream_options": {"continuous_usage_stats": 1}}, 400,
     "stream_options.continuous_usage_stats", "a boolean"),
]


def _metric(c: Cluster, name: str) -> float:
    with urllib.request.urlopen(_base_url(c) + "/metrics", timeout=10) as r:
        text = r.read().decode()
    found = re.search(r"^" + re.escape(name) + r" (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def test_bad_input_gets_an_openai_error_naming_it_and_leaks_nothing(cluster):
    num_400 = _metric(cluster, 'clsd_http_responses_total{status="400"}')
    for path, body, status, param, fragment in BAD_INPUT:
        code, reply = _post(cluster, path, body)
        err = reply.get("error", {})
        assert (code, err.get("param")) == (status, param), (path, str(body)[:200], code, reply)
        assert fragment in err["message"] and err["type"], (path, str(body)[:200], reply)
        assert len(err["message"]) < 400, err["message"]
    # Every 400 is counted by its status.
    want = sum(status == 400 for *_, status, _, _ in BAD_INPUT)
    assert _metric(cluster, 'clsd_http_responses_total{status="400"}') >= num_400 + want
    # A prompt too long for the context says so, with or without max_tokens.
    for extra in ({}, {"max_tokens": 5}):
        code, reply = _post(cluster, "/v1/completions", {**_P, "prompt": [1] * 9000, **extra})
        message = reply["error"]["message"]
        assert code == 400 and "9000 tokens" in message and "max_tokens" in message \
            and "context (8192 tokens)" in message, reply
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
        for _ in range(MAX_INFLIGHT):  # each holds a slot: its response head means it was admitted
            s = RawStream(cluster, "/v1/chat/completions", {**_Q, "max_tokens": 2000, "ignore_eos": True,
                                                             "stream": True})
            streams.append(s)
            assert s.read_head().startswith(b"HTTP/1.1 200"), s.buf[:300]
        code, reply = _post(cluster, "/v1/chat/completions", {**_Q, "max_tokens": 2})
        assert code == 429 and str(MAX_INFLIGHT) in reply["error"]["message"], reply

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


# --- the HTTP server's own limits (an in-process door with short limits, no machines) ----------


class InProcessDoor:
    """clsd's HTTP door on its own event loop thread, with `limits`: slow clients and the
    connection cap need no machines, and short limits keep the tests short."""

    def __init__(self, model_dir, limits):
        from cls.config import ClsConfig, HttpSection
        from cls.http.server import HttpFrontDoor
        from cls.metrics import ClsMetrics
        from cls.service import ClusterState

        cfg = ClsConfig(model=str(model_dir), http=HttpSection(port=0))
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

        self.state = ClusterState(cfg, Tokenizer(model_dir), ClsMetrics())

        async def make():
            return HttpFrontDoor(self.state, limits)
        self.door = self._run(make())
        self._run(self.door.start())
        self.port = self.door.port

    def _run(self, coro, timeout_s: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    @property
    def num_connections(self) -> int:
        return len(self.door.server.server_state.connections)

    def get(self, path: str) -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=10) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    def close(self) -> None:
        self._run(self.door.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.state.tokenizers.close()


@pytest.fixture
def door(demo_model_dir, caplog):
    from cls.http.limits import HttpLimits

    caplog.set_level(logging.INFO, logger="clsd.http")
    d = InProcessDoor(demo_model_dir, HttpLimits(header_timeout_s=1.0, body_timeout_s=1.0, keep_alive_s=5,
                                                 max_connections=300))
    yield d
    d.close()
    assert "Traceback" not in caplog.text


def _closed_by_server(sock: socket.socket, timeout_s: float) -> bytes:
    """Reads until the server closes the connection; returns what came."""
    sock.settimeout(timeout_s)
    got = b""
    try:
        while chunk := sock.recv(65536):
            got += chunk
    except ConnectionResetError:
        pass
    return got


def test_a_body_sent_byte_by_byte_past_the_timeout_gets_408_and_is_dropped(door, caplog):
    sock = socket.create_connection(("127.0.0.1", door.port), timeout=10)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 200\r\n\r\n")
    t0, sent = time.monotonic(), 0
    sock.setblocking(False)
    answer = b""
    while sent < 200 and time.monotonic() - t0 < 10:
        try:
            answer += sock.recv(65536)
            break  # answered (or closed)
        except BlockingIOError:
            pass
        try:
            sock.send(b" ")
            sent += 1
        except (BrokenPipeError, ConnectionResetError):
            break
        time.sleep(0.05)  # pacing: one byte every 50 ms, 10 s for the whole body
    sock.setblocking(True)
    answer += _closed_by_server(sock, 10)
    sock.close()
    assert sent < 200 and time.monotonic() - t0 < 5, (sent, time.monotonic() - t0)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:300]
    assert b"did not arrive within 1 s" in answer and b"connection: close" in answer.lower()
    assert door.get("/version") == 200  # still serving


def test_headers_trickled_past_the_timeout_are_dropped_and_idle_connections_too(door, caplog):
    trickle = socket.create_connection(("127.0.0.1", door.port), timeout=10)
    idle = socket.create_connection(("127.0.0.1", door.port), timeout=10)
    t0 = time.monotonic()
    trickle.setblocking(False)
    closed = False
    for b in b"GET /version HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 400:
        try:
            trickle.send(bytes([b]))
        except (BrokenPipeError, ConnectionResetError):
            closed = True
            break
        try:
            if trickle.recv(1) == b"":
                closed = True
                break
        except BlockingIOError:
            pass
        time.sleep(0.02)  # pacing: 50 bytes a second, never a complete header block
    trickle.setblocking(True)
    assert closed or _closed_by_server(trickle, 5) == b""
    assert time.monotonic() - t0 < 5
    assert _closed_by_server(idle, 5) == b""  # sent nothing: closed without a word
    trickle.close()
    idle.close()
    _wait_for(lambda: "no complete request headers within 1 s" in caplog.text, 5, caplog.text)
    assert door.get("/version") == 200


def test_the_connection_cap_answers_503_at_once_and_frees_with_the_timeout(demo_model_dir, caplog):
    from cls.http.limits import HttpLimits

    caplog.set_level(logging.INFO, logger="clsd.http")
    d = InProcessDoor(demo_model_dir, HttpLimits(header_timeout_s=2.0, max_connections=8))
    try:
        held = [socket.create_connection(("127.0.0.1", d.port), timeout=10) for _ in range(8)]
        _wait_for(lambda: d.num_connections == 8, 5, lambda: f"{d.num_connections} connections")
        extra = socket.create_connection(("127.0.0.1", d.port), timeout=10)
        t0 = time.monotonic()
        answer = _closed_by_server(extra, 5)
        assert answer.startswith(b"HTTP/1.1 503") and b"too many connections (limit 8)" in answer, answer
        assert time.monotonic() - t0 < 1.0
        extra.close()
        # The held connections never send a request: the header timeout frees their places.
        for s in held:
            assert _closed_by_server(s, 10) == b""
            s.close()
        _wait_for(lambda: d.num_connections == 0, 5, lambda: f"{d.num_connections} connections")
        assert d.get("/version") == 200
        assert "refused a connection: 8 open (limit 8)" in caplog.text
    finally:
        d.close()
    assert "Traceback" not in caplog.text


def test_200_slow_clients_are_dropped_while_others_are_served(door):
    slow = []
    for _ in range(200):
        s = socket.create_connection(("127.0.0.1", door.port), timeout=10)
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # and never the rest
        slow.append(s)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 1.5:  # the others are served while the slow ones wait
        assert door.get("/version") == 200
    for s in slow:  # and the slow ones are gone by the header timeout (1 s)
        assert _closed_by_server(s, 5) == b""
        s.close()
    assert time.monotonic() - t0 < 5
    _wait_for(lambda: door.num_connections == 0, 5, lambda: f"{door.num_connections} connections")
