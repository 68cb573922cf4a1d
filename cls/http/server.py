"""clsd's OpenAI-compatible HTTP front door: FastAPI on uvicorn, inside clsd's own event loop.

Life cycle of a request (`POST /v1/completions`, `POST /v1/chat/completions`):
1. The connection is accepted under the connection cap and its headers arrive within the header
   timeout (cls/http/limits.py); the guard (cls/http/guard.py) takes or makes its X-Request-Id,
   bounds the body's arrival in time, counts and logs the answer.
2. The bearer key is checked when `http.api_key_file` is configured (401 otherwise).
3. The body is read in chunks up to `http.max_body_bytes` (413 past it, without reading the rest)
   and parsed (cls/http/schema.py: 400 naming the field, 404 for another model's name; unknown
   fields are ignored, logged once and counted). Chat messages are rendered and tokenized off the
   event loop.
4. `ClusterState.admit` validates it as the gRPC door does (the same context and vocabulary
   checks; 429 at the in-flight bound, 503 while draining) and tokenizes it. Without max_tokens
   the request gets the rest of the context (cls/http/model_info.py), as in vLLM.
5. `ClusterState.generate` runs it through the Dispatcher (cls/http/reply.py): text goes through
   the stop strings and back whole or as server-sent events (`data: [DONE]` last).
6. A client that disconnects, while waiting or mid-stream, cancels the run: the Dispatcher
   aborts the request on its machines, which free its KV blocks. A stop string found ends the
   run the same way (finish_reason "stop").
No body needed: `GET /v1/models`, `GET /health` and `/ping` (200 only when able to serve),
`GET /version`, `GET /metrics` (clsd's Prometheus registry). `POST /tokenize` and `/detokenize`
take vLLM's bodies. Drain: clsd's draining flag makes new requests 503 while in-flight ones
finish; `HttpFrontDoor.stop` then closes the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import importlib.metadata
import logging
import socket
import time
import uuid

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

from cls.admission import TokenizerBusy, prompt_char_limit
from cls.cluster_request import RequestError
from cls.http.guard import REQUEST_ID, DoorGuard
from cls.http.limits import HttpLimits, connection_cap, guarded_protocol
from cls.http.model_info import context_room, max_model_len, model_card
from cls.http.reply import ClientGone, EventStream, Reply, api_error, unless_disconnected
from cls.http.schema import (
    ApiError,
    ParsedRequest,
    bad,
    parse_body,
    parse_chat,
    parse_completion,
    parse_detokenize,
    parse_tokenize,
)
from cls.http.telemetry import DoorMetrics, RateLimitedLog
from cls.service import ClusterState
from daemon.settings import ConfigError
from engine.tokenizer import TokenizerError

log = logging.getLogger("clsd.http")


def _version() -> str:
    try:
        return importlib.metadata.version("splitserve")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def admit_error(e: RequestError, parsed: ParsedRequest) -> ApiError:
    """A refusal of admit(); without the client's max_tokens the door asked for one token, so a
    context refusal means the prompt alone fills the context."""
    err = api_error(e, parsed)
    if e.param == "max_tokens" and not parsed.max_tokens_given:
        return ApiError(err.status, f"the prompt alone leaves no room for output: {e.message}",
                        parsed.prompt_param, err.type, err.code)
    return err


def build_app(state: ClusterState, metrics: DoorMetrics) -> FastAPI:
    cfg, tokenizer = state.cfg, state.tokenizer
    model_name, api_key, created = cfg.served_model_name, cfg.http_api_key(), int(time.time())
    app = FastAPI(title="splitserve clsd", docs_url=None, redoc_url=None, openapi_url=None)

    async def offload(num_chars: int, fn, *args):
        """Chat templates and tokenizing on clsd's tokenizer threads (cls/admission.py), never on
        the event loop; 429 when too many long texts wait already."""
        try:
            return await state.tokenizers.run(num_chars, fn, *args)
        except TokenizerBusy as e:
            raise ApiError(429, str(e), None, "rate_limit_error", "rate_limit_exceeded") from None

    async def chat_ids(messages: list[dict], add_special_tokens: bool = False, to_run: bool = True):
        num_chars = sum(len(m["content"]) for m in messages)
        limit = prompt_char_limit(state.pools, cfg.limits, state.chars_per_token) if to_run else None
        if limit is not None and num_chars > limit:  # cannot fit whatever the template adds
            raise bad("messages", f"messages of {num_chars} characters cannot fit: the limit is {limit} "
                                  "characters (the longest context x the most characters per token)")

        def render_and_encode() -> list[int]:
            return tokenizer.encode(tokenizer.apply_chat_template(messages), add_special_tokens)
        try:
            return await offload(num_chars, render_and_encode)
        except TokenizerError as e:
            raise bad("messages", f"the model's chat template refused the messages: {e}") from None

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status)  # the guard closes a half-read request

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, e: HTTPException):  # unknown path, wrong method
        return JSONResponse(ApiError(e.status_code, f"{request.method} {request.url.path[:100]}: "
                                                    f"{e.detail}").body(), status_code=e.status_code)

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        got = request.headers.get("authorization", "")
        if not got.startswith("Bearer ") or not hmac.compare_digest(got[7:].encode(), api_key.encode()):
            raise ApiError(401, "missing or wrong API key (header Authorization: Bearer <key>)",
                           code="invalid_api_key")

    async def body_of(request: Request) -> dict:
        return parse_body(await _read_body(request, cfg.http.max_body_bytes))

    @app.api_route("/health", methods=["GET"])
    @app.api_route("/ping", methods=["GET", "POST"])
    async def health():
        if state.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if not any(not m.draining for m in state.pools.machines.values()):
            return JSONResponse({"status": "no machine can take work"}, status_code=503)
        return {"status": "ok"}

    @app.get("/version")
    async def version():
        return {"version": _version()}

    @app.get("/metrics")
    async def metrics_page():
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [model_card(model_name, created, state)]}

    @app.get("/v1/models/{name:path}")
    async def model(request: Request, name: str):
        authorize(request)
        if name != model_name:
            raise ApiError(404, f"the model {name[:100]!r} does not exist; this server serves "
                                f"{model_name!r}", "model", code="model_not_found")
        return model_card(model_name, created, state)

    @app.post("/tokenize")
    async def tokenize(request: Request):
        authorize(request)
        t = parse_tokenize(await body_of(request), model_name)
        metrics.unknown(t.unknown, log, "/tokenize")
        if t.return_token_strs:
            raise bad("return_token_strs", "return_token_strs=true is not supported yet")
        if t.messages is not None:
            ids = await chat_ids(t.messages, t.add_special_tokens, to_run=False)
        else:
            ids = await offload(len(t.text), tokenizer.encode, t.text, t.add_special_tokens)
        return {"count": len(ids), "max_model_len": max_model_len(state), "tokens": ids,
                "token_strs": None}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        authorize(request)
        ids, unknown = parse_detokenize(await body_of(request), model_name)
        metrics.unknown(unknown, log, "/detokenize")
        if ids and max(ids) >= tokenizer.vocab_size:
            raise bad("tokens", f"tokens holds {max(ids)}, beyond the vocabulary of "
                                f"{tokenizer.vocab_size} tokens")
        return {"prompt": await offload(len(ids), tokenizer.decode, ids, False)}

    async def serve(request: Request, chat: bool) -> Response:
        authorize(request)
        body = await body_of(request)
        parse = parse_chat if chat else parse_completion
        parsed = parse(body, model_name, cfg.http.max_stop_strings)
        metrics.unknown(parsed.unknown, log, request.url.path)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{request.scope[REQUEST_ID]}"
        # The same X-Request-Id twice at once: the second gets a suffix rather than a refusal.
        parsed.spec.request_id = f"{rid}-{uuid.uuid4().hex[:8]}" if state.is_live(rid) else rid
        if parsed.messages is not None:
            parsed.spec.prompt_token_ids.extend(await chat_ids(parsed.messages))
        if not parsed.max_tokens_given:
            parsed.spec.max_tokens = 1  # admission: the prompt must leave room for one token
        try:
            req = await state.admit(parsed.spec)
        except RequestError as e:
            raise admit_error(e, parsed) from None
        if not parsed.max_tokens_given:  # the rest of the context, as vLLM
            room = context_room(state)
            req.sampling.max_tokens = cfg.limits.default_max_tokens if room is None else \
                max(1, min(cfg.limits.max_tokens_limit, room - len(req.prompt_ids)))
        reply = Reply(state, req, parsed, model_name)
        if parsed.stream:
            return EventStream(reply)
        try:
            return JSONResponse(await unless_disconnected(request.receive, reply.whole()))
        except RequestError as e:
            raise api_error(e, parsed) from None
        except ClientGone:
            return Response(status_code=499)  # nobody reads it; the run was cancelled
        finally:
            state.release(req, "cancelled")  # a no-op unless the run never started

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await serve(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await serve(request, chat=True)

    return app


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


class _Server(uvicorn.Server):
    def capture_signals(self):
        return contextlib.nullcontext()  # clsd owns SIGTERM/SIGINT and drains before stop()


class HttpFrontDoor:
    """The uvicorn server as a task in clsd's loop, on a socket bound before READY. `limits`
    default to HttpLimits.from_section(cfg.http)."""

    def __init__(self, state: ClusterState, limits: HttpLimits | None = None):
        cfg = state.cfg
        self.limits = limits or HttpLimits.from_section(cfg.http)
        self.host = cfg.http.host or cfg.host
        try:
            self.sock = socket.create_server((self.host, cfg.http.port))
        except OSError as e:
            raise ConfigError(f"http.port: cannot bind {self.host}:{cfg.http.port}: {e.strerror}") from None
        self.port = self.sock.getsockname()[1]
        events = RateLimitedLog(log)
        events.filter_logger(logging.getLogger("uvicorn.error"))
        metrics = DoorMetrics.of(state.metrics.registry)
        self.max_connections = connection_cap(self.limits, log)
        app = DoorGuard(build_app(state, metrics), self.limits.body_timeout_s, events, metrics, log)
        config = uvicorn.Config(
            app, http=guarded_protocol(self.limits, self.max_connections, events, metrics),
            lifespan="off", log_config=None, log_level="warning", access_log=False,
            timeout_graceful_shutdown=5, server_header=False, timeout_keep_alive=self.limits.keep_alive_s,
            # The protocol refuses connections past the cap; this bounds the tasks too.
            limit_concurrency=self.max_connections + 1,
            h11_max_incomplete_event_size=self.limits.max_header_bytes)
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
