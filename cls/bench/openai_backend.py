"""The `openai` and `openai-chat` backends: streamed `/v1/completions` and `/v1/chat/completions`.

Requests follow the OpenAI API: `stream: true` with `stream_options: {include_usage: true}`, so
the last event before `data: [DONE]` carries `usage.completion_tokens` (the output length; the
token count of the generated text is the fallback when a server sends no usage). TTFT and ITL are
taken from the arrival times of the server-sent events that carry text. `ignore_eos` is sent
only when asked for (it is an extension of vLLM and others, not part of OpenAI's API).

The HTTP client is httpx (async), which the openai package brings; some builds of openai ship
it as `httpx2`, which has the same API.
"""

from __future__ import annotations

import json
import time

from cls.bench.datasets import BenchRequest
from cls.bench.outputs import RequestOutput

try:
    import httpx
except ImportError:  # the openai package of this environment bundles its fork under this name
    import httpx2 as httpx

DONE = object()


def parse_sse_line(line: str):
    """One line of an SSE stream -> the event's JSON object, DONE for `data: [DONE]`, or None
    for blank lines, comments and other fields. Raises ValueError on a data line that is not JSON."""
    line = line.strip()
    if not line.startswith("data:"):
        return None
    data = line[len("data:"):].strip()
    if data == "[DONE]":
        return DONE
    try:
        return json.loads(data)
    except json.JSONDecodeError:
        raise ValueError(f"server-sent event is not JSON: {data[:200]!r}") from None


def chunk_text(event: dict, chat: bool) -> str:
    """The output text an event carries ('' for role-only, usage-only or finish-only events)."""
    choices = event.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    if chat:
        return (choice.get("delta") or {}).get("content") or ""
    return choice.get("text") or ""


def error_message(status: int, body: bytes) -> str:
    """`HTTP <status>: <message>` from an OpenAI error object, or the start of the body."""
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = body[:300].decode("utf-8", "replace")
    return f"HTTP {status}: {message}"


class OpenAIBackend:
    def __init__(self, base_url: str, *, chat: bool, model: str | None, ignore_eos: bool,
                 temperature: float, timeout_s: float | None, endpoint: str | None = None):
        self.name = "openai-chat" if chat else "openai"
        self.base_url = base_url.rstrip("/")
        self.chat = chat
        self.model = model
        self.endpoint = endpoint or ("/v1/chat/completions" if chat else "/v1/completions")
        self._ignore_eos = ignore_eos
        self._temperature = temperature
        self._timeout_s = timeout_s
        self._http: httpx.AsyncClient | None = None
        self._tokenizer = None

    async def __aenter__(self) -> OpenAIBackend:
        self._http = httpx.AsyncClient(base_url=self.base_url, timeout=httpx.Timeout(self._timeout_s),
                                       limits=httpx.Limits(max_connections=None,
                                                           max_keepalive_connections=None))
        return self

    async def __aexit__(self, *exc) -> None:
        if self._http is not None:
            await self._http.aclose()

    def count_tokens_with(self, tokenizer) -> None:
        """Counts output tokens by tokenizing the text when the server sends no usage."""
        self._tokenizer = tokenizer

    async def served_model(self) -> str:
        """The first model of GET /v1/models (used when --model is not given)."""
        try:
            reply = await self._http.get("/v1/models")
        except httpx.HTTPError as e:
            raise RuntimeError(f"GET {self.base_url}/v1/models: {type(e).__name__}: {e}") from None
        if reply.status_code != 200:
            raise RuntimeError(f"GET /v1/models: {error_message(reply.status_code, reply.content)}")
        models = reply.json().get("data") or []
        if not models:
            raise RuntimeError("GET /v1/models lists no model")
        return models[0]["id"]

    def payload(self, request: BenchRequest) -> dict:
        body: dict = {"model": self.model, "temperature": self._temperature, "stream": True,
                      "stream_options": {"include_usage": True}}
        if self.chat:
            body["messages"] = [{"role": "user", "content": request.prompt}]
            body["max_completion_tokens"] = request.output_len
        else:
            body["prompt"] = request.prompt
            body["max_tokens"] = request.output_len
        if self._ignore_eos:
            body["ignore_eos"] = True
        return body

    async def send(self, request: BenchRequest) -> RequestOutput:
        out = RequestOutput(prompt_len=request.prompt_len)
        text: list[str] = []
        usage_tokens = None
        num_chunks = 0
        last = start = out.start_s = time.perf_counter()
        try:
            async with self._http.stream("POST", self.endpoint, json=self.payload(request)) as reply:
                if reply.status_code != 200:
                    out.error = error_message(reply.status_code, await reply.aread())
                    return out
                async for line in reply.aiter_lines():
                    event = parse_sse_line(line)
                    if event is None:
                        continue
                    if event is DONE:
                        break
                    if "error" in event:
                        out.error = f"stream error: {event['error'].get('message', event['error'])}"
                        return out
                    now = time.perf_counter()
                    piece = chunk_text(event, self.chat)
                    if piece:
                        if num_chunks == 0:
                            out.ttft_s = now - start
                        else:
                            out.itl_s.append(now - last)
                        last = now
                        num_chunks += 1
                        text.append(piece)
                    if event.get("usage"):
                        usage_tokens = event["usage"].get("completion_tokens")
        except Exception as e:  # refused connection, timeout, a malformed event: counted, not fatal
            out.error = f"{type(e).__name__}: {e}"
            return out
        out.generated_text = "".join(text)
        if num_chunks == 0:
            out.error = "the stream carried no text"
            return out
        if usage_tokens is not None:
            out.output_len = int(usage_tokens)
        elif self._tokenizer is not None:
            out.output_len = len(self._tokenizer.encode(out.generated_text))
        else:
            out.output_len = num_chunks
        out.latency_s = last - start
        out.success = True
        return out
