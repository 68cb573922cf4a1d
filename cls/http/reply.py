"""One admitted request's answer in OpenAI's shapes: a whole JSON body or server-sent events.

1. `Reply.texts` runs the request (`ClusterState.generate`) and cuts its text at the first stop
   string (cls/stop_strings.py; with `include_stop_str_in_output` the stop string is kept). The
   first token always yields, even when its text is held back, so the first event goes out with
   the first token: the chat role delta rides on it, never before the prefill.
2. `Reply.events`: one event per text delta (usage on each with
   `stream_options.continuous_usage_stats`), then the finish reason, the usage if asked for, and
   `data: [DONE]`; an error after the stream began goes out as an error object.
3. `EventStream` / `unless_disconnected`: a client that leaves cancels the run, which aborts the
   request on its machines.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import grpc
from fastapi.responses import Response

from cls.cluster_request import ClusterRequest, RequestError
from cls.http.fields import ApiError
from cls.http.schema import ParsedRequest
from cls.service import ClusterState
from cls.stop_strings import StopMatcher

# gRPC status of a RequestError -> (HTTP status, OpenAI error type, code)
_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error", None),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error", None),
    grpc.StatusCode.UNAUTHENTICATED: (401, "invalid_request_error", "invalid_api_key"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "invalid_request_error", None),
    grpc.StatusCode.NOT_FOUND: (404, "invalid_request_error", None),
    grpc.StatusCode.ALREADY_EXISTS: (409, "invalid_request_error", "conflict"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error", "rate_limit_exceeded"),
    grpc.StatusCode.UNAVAILABLE: (503, "server_error", "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "server_error", "timeout"),
}


def api_error(e: RequestError, parsed: ParsedRequest) -> ApiError:
    status, type_, code = _STATUS.get(e.code, (500, "server_error", None))
    param = {"prompt": parsed.prompt_param, "prompt_token_ids": parsed.prompt_param,
             "max_tokens": parsed.max_tokens_param}.get(e.param, e.param)
    message = e.message.replace("max_tokens", parsed.max_tokens_param) \
        if param == parsed.max_tokens_param else e.message
    return ApiError(status, message, param, type_, code)


class StopCutter:
    """StopMatcher, optionally keeping the stop string found (include_stop_str_in_output)."""

    def __init__(self, stops: tuple[str, ...], include: bool):
        self.matcher, self.include = StopMatcher(stops), include and bool(stops)
        self._seen: list[str] = []  # all text fed, only when the stop string is kept
        self._num_sent = 0

    @property
    def stopped(self) -> bool:
        return self.matcher.stopped

    def feed(self, delta: str) -> str:
        if self.matcher.stopped:
            return ""
        out = self.matcher.feed(delta)
        if self.include:
            self._seen.append(delta)
            if self.matcher.stopped:
                # The cut is where the stop string begins; the matcher picked, of those beginning
                # there, the one that ends first: the shortest.
                text, at = "".join(self._seen), self._num_sent + len(out)
                out += min((s for s in self.matcher.stops if text.startswith(s, at)), key=len, default="")
            self._num_sent += len(out)
        return out

    def flush(self) -> str:
        return self.matcher.flush()


class Reply:
    def __init__(self, state: ClusterState, req: ClusterRequest, parsed: ParsedRequest, model: str):
        self.state, self.req, self.p = state, req, parsed
        self.head = {"id": req.request_id, "created": int(time.time()), "model": model}

    async def texts(self):
        """Text deltas up to the first stop string ('' once for a first token whose text is held
        back); sets req.finish_reason."""
        stops, first = StopCutter(self.p.stop, self.p.include_stop), True
        async with contextlib.aclosing(self.state.generate(self.req)) as run:
            async for _, text in run:
                if (out := stops.feed(text)) or first:
                    first = False
                    yield out
                if stops.stopped:
                    self.state.release(self.req, "finished")
                    break  # leaving aclosing aborts the rest of the run on its machines
        if stops.stopped:
            self.req.finish_reason = "stop"
        elif tail := stops.flush():
            yield tail

    def usage(self) -> dict:
        num_prompt, num_out = len(self.req.prompt_ids), len(self.req.tokens)
        return {"prompt_tokens": num_prompt, "completion_tokens": num_out,
                "total_tokens": num_prompt + num_out}

    def choice(self, text: str | None, finish_reason: str | None, whole: bool, role: bool = False) -> dict:
        if not self.p.chat:
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        if whole:
            return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                    "finish_reason": finish_reason}
        delta = {"role": "assistant"} if role else {}
        if text is not None:
            delta["content"] = text
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}

    async def whole(self) -> dict:
        text = "".join([t async for t in self.texts()])
        return {**self.head, "object": "chat.completion" if self.p.chat else "text_completion",
                "choices": [self.choice(text, self.req.finish_reason, whole=True)], "usage": self.usage()}

    async def events(self):
        """SSE frames: the deltas, the finish reason, the usage if asked for, then [DONE]; an error
        after the stream began goes out as an error object (the HTTP status is already sent)."""
        obj = "chat.completion.chunk" if self.p.chat else "text_completion"

        def frame(choices: list, usage: dict | None = None) -> bytes:
            more = {}
            if self.p.include_usage:  # null on the deltas, unless continuous_usage_stats
                more["usage"] = usage or (self.usage() if self.p.continuous_usage else None)
            return sse({**self.head, "object": obj, "choices": choices, **more})

        try:
            first = True
            async for text in self.texts():
                yield frame([self.choice(text, None, whole=False, role=first)])
                first = False
            if first:  # no token at all (cannot happen for max_tokens >= 1, but the role goes out)
                yield frame([self.choice("", None, whole=False, role=True)])
            yield frame([self.choice(None, self.req.finish_reason, whole=False)])
            if self.p.include_usage:
                yield frame([], usage=self.usage())
        except RequestError as e:
            yield sse(api_error(e, self.p).body())
        yield b"data: [DONE]\n\n"


def sse(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


class ClientGone(Exception):
    pass


async def unless_disconnected(receive, coro):
    """Runs `coro` until it returns, or until the client disconnects: then `coro` is cancelled
    (which aborts its request) and ClientGone is raised. Needs the request body read already,
    so the next ASGI message can only be the disconnect."""
    work = asyncio.ensure_future(coro)

    async def gone():
        while (await receive())["type"] != "http.disconnect":
            pass

    watch = asyncio.ensure_future(gone())
    try:
        await asyncio.wait((work, watch), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (work, watch):
            if not task.done():
                task.cancel()
        await asyncio.gather(work, watch, return_exceptions=True)
    if work.cancelled():
        raise ClientGone
    return work.result()


class EventStream(Response):
    """A text/event-stream response that stops (and aborts its request) when the client leaves."""

    def __init__(self, reply: Reply):
        # Not Response.__init__: it would declare a Content-Length for an empty body.
        self.status_code, self.background, self.reply = 200, None, reply
        self.raw_headers = [(b"content-type", b"text/event-stream; charset=utf-8"),
                            (b"cache-control", b"no-cache")]

    async def __call__(self, scope, receive, send) -> None:
        async def pump():
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async with contextlib.aclosing(self.reply.events()) as frames:
                async for chunk in frames:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        try:
            await unless_disconnected(receive, pump())
        except (ClientGone, OSError):
            pass  # the client left: the run is cancelled
        finally:
            self.reply.state.release(self.reply.req, "cancelled")  # a no-op unless it never ran
