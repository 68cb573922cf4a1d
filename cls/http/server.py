"""clsd's OpenAI-compatible HTTP front door: FastAPI on uvicorn, inside clsd's own event loop.

Life cycle of a request (`POST /v1/completions`, `POST /v1/chat/completions`):
1. The bearer key is checked when `http.api_key_file` is configured (401 otherwise).
2. The body is read in chunks up to `http.max_body_bytes` (413 past it, without reading the rest)
   and parsed (cls/http/schema.py: 400 naming the field, 404 for another model's name).
3. `ClusterState.admit` validates it as the gRPC door does (the same sampling, context and
   vocabulary checks; 429 at the in-flight bound, 503 while draining) and tokenizes it.
4. `ClusterState.generate` runs it through the Dispatcher; text goes through the stop strings
   (cls/stop_strings.py) and back whole or as server-sent events (`data: [DONE]` last).
5. A client that disconnects, while waiting or mid-stream, cancels the run: the Dispatcher
   aborts the request on its machines, which free its KV blocks. A stop string found ends the
   run the same way (finish_reason "stop").
`GET /v1/models`, `GET /health` (200 only when able to serve) and `GET /metrics` (clsd's
Prometheus registry) need no request body. Drain: clsd's draining flag makes new requests 503
while in-flight ones finish; `HttpFrontDoor.stop` then closes the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import json
import logging
import socket
import time

import grpc
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

from cls.dispatcher import ClusterRequest, RequestError
from cls.http.schema import ApiError, ParsedRequest, parse_body, parse_chat, parse_completion
from cls.service import ClusterState
from cls.stop_strings import StopMatcher
from daemon.settings import ConfigError

log = logging.getLogger("clsd.http")

# gRPC status of a RequestError -> (HTTP status, OpenAI error type, code)
_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error", None),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error", None),
    grpc.StatusCode.UNAUTHENTICATED: (401, "invalid_request_error", "invalid_api_key"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "invalid_request_error", None),
    grpc.StatusCode.NOT_FOUND: (404, "invalid_request_error", None),
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


def build_app(state: ClusterState) -> FastAPI:
    cfg = state.cfg
    model_name, api_key, created = cfg.served_model_name, cfg.http_api_key(), int(time.time())
    app = FastAPI(title="splitserve clsd", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        # A body left unread cannot be followed by another request on this connection.
        headers = {"connection": "close"} if e.status == 413 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, e: HTTPException):  # unknown path, wrong method
        return JSONResponse(ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}")
                            .body(), status_code=e.status_code)

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        got = request.headers.get("authorization", "")
        if not got.startswith("Bearer ") or not hmac.compare_digest(got[7:].encode(), api_key.encode()):
            raise ApiError(401, "missing or wrong API key (header Authorization: Bearer <key>)",
                           code="invalid_api_key")

    @app.get("/health")
    async def health():
        if state.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if not any(not m.draining for m in state.pools.machines.values()):
            return JSONResponse({"status": "no machine can take work"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [_model_card(model_name, created)]}

    @app.get("/v1/models/{name:path}")
    async def model(request: Request, name: str):
        authorize(request)
        if name != model_name:
            raise ApiError(404, f"the model {name!r} does not exist; this server serves {model_name!r}",
                           "model", code="model_not_found")
        return _model_card(model_name, created)

    async def serve(request: Request, parse) -> Response:
        authorize(request)
        body = parse_body(await _read_body(request, cfg.http.max_body_bytes))
        parsed = parse(body, model_name, cfg.http.max_stop_strings)
        try:
            req = state.admit(parsed.spec)
        except RequestError as e:
            raise api_error(e, parsed) from None
        reply = _Reply(state, req, parsed, model_name)
        if parsed.stream:
            return _EventStream(reply)
        try:
            return JSONResponse(await _unless_disconnected(request.receive, reply.whole()))
        except RequestError as e:
            raise api_error(e, parsed) from None
        except _ClientGone:
            return Response(status_code=499)  # nobody reads it; the run was cancelled
        finally:
            state.release(req, "cancelled")  # a no-op unless the run never started

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await serve(request, parse_completion)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await serve(request, functools.partial(parse_chat, tokenizer=state.tokenizer))

    return app


def _model_card(name: str, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "splitserve"}


async def _read_body(request: Request, limit: int) -> bytes:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise ApiError(413, f"the request body of {int(length)} bytes is over the limit of {limit} bytes",
                       "body", code="request_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"the request body is over the limit of {limit} bytes", "body",
                           code="request_too_large")
    return bytes(body)


class _ClientGone(Exception):
    pass


async def _unless_disconnected(receive, coro):
    """Runs `coro` until it returns, or until the client disconnects: then `coro` is cancelled
    (which aborts its request) and _ClientGone is raised. Needs the request body read already,
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
        raise _ClientGone
    return work.result()


class _Reply:
    """One admitted request's answer, whole or as server-sent events, in OpenAI's shapes."""

    def __init__(self, state: ClusterState, req: ClusterRequest, parsed: ParsedRequest, model: str):
        self.state, self.req, self.p = state, req, parsed
        self.head = {"id": req.request_id, "created": int(time.time()), "model": model}

    async def texts(self):
        """Text deltas up to the first stop string; sets req.finish_reason."""
        stops = StopMatcher(self.p.stop)
        async with contextlib.aclosing(self.state.generate(self.req)) as run:
            async for _, text in run:
                if out := stops.feed(text):
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

    def choice(self, text: str | None, finish_reason: str | None, whole: bool) -> dict:
        if not self.p.chat:
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        if whole:
            return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                    "finish_reason": finish_reason}
        delta = {} if text is None else {"content": text}
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}

    async def whole(self) -> dict:
        text = "".join([t async for t in self.texts()])
        return {**self.head, "object": "chat.completion" if self.p.chat else "text_completion",
                "choices": [self.choice(text, self.req.finish_reason, whole=True)], "usage": self.usage()}

    async def events(self):
        """SSE frames: the deltas, the finish reason, the usage if asked for, then [DONE]; an error
        after the stream began goes out as an error object (the HTTP status is already sent)."""
        obj = "chat.completion.chunk" if self.p.chat else "text_completion"
        extra = {"usage": None} if self.p.include_usage else {}

        def frame(choices: list, **more) -> bytes:
            return _sse({**self.head, "object": obj, "choices": choices, **extra, **more})

        try:
            if self.p.chat:
                yield frame([{"index": 0, "delta": {"role": "assistant", "content": ""},
                              "logprobs": None, "finish_reason": None}])
            async for text in self.texts():
                yield frame([self.choice(text, None, whole=False)])
            yield frame([self.choice(None, self.req.finish_reason, whole=False)])
            if self.p.include_usage:
                yield frame([], usage=self.usage())
        except RequestError as e:
            yield _sse(api_error(e, self.p).body())
        yield b"data: [DONE]\n\n"


def _sse(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


class _EventStream(Response):
    """A text/event-stream response that stops (and aborts its request) when the client leaves."""

    def __init__(self, reply: _Reply):
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
            await _unless_disconnected(receive, pump())
        except (_ClientGone, OSError):
            pass  # the client left: the run is cancelled
        finally:
            self.reply.state.release(self.reply.req, "cancelled")  # a no-op unless it never ran


class _Server(uvicorn.Server):
    def capture_signals(self):
        return contextlib.nullcontext()  # clsd owns SIGTERM/SIGINT and drains before stop()


class HttpFrontDoor:
    """The uvicorn server as a task in clsd's loop, on a socket bound before READY."""

    def __init__(self, state: ClusterState):
        cfg = state.cfg
        self.host = cfg.http.host or cfg.host
        try:
            self.sock = socket.create_server((self.host, cfg.http.port))
        except OSError as e:
            raise ConfigError(f"http.port: cannot bind {self.host}:{cfg.http.port}: {e.strerror}") from None
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(build_app(state), lifespan="off", log_config=None, log_level="warning",
                                access_log=False, timeout_graceful_shutdown=5, server_header=False)
        self.server = _Server(config)
        self.task: asyncio.Task | None = None

    async def start(self, timeout_s: float = 30.0) -> None:
        self.task = asyncio.create_task(self.server.serve(sockets=[self.sock]))
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if self.task.done():
                self.task.result()  # raises what stopped it
                raise RuntimeError("the HTTP server stopped while starting")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the HTTP server did not start in {timeout_s} s")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        self.server.should_exit = True
        if self.task is not None:
            await self.task
