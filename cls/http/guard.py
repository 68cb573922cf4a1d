"""The ASGI layer around the door's FastAPI app: what every HTTP request goes through.

1. `X-Request-Id`: a printable id of at most 128 characters is taken as the request's id, any
   other (or none) is replaced by a fresh one; either way the response echoes it (the door names
   its request `cmpl-<id>` / `chatcmpl-<id>`, as vLLM does).
2. The body must arrive within `body_timeout_s` of the headers: past it `receive` raises
   `BodyTimeout` (408, connection closed). A client that disconnects mid-body raises `BodyAborted`
   (499): one log line, no traceback.
3. A response that starts before the body was read (401, 404, 413...) closes the connection, so a
   client cannot keep trickling a body nobody reads.
4. Every response is counted by status (`clsd_http_responses_total`), and every 4xx / 5xx is one
   rate-limited log line naming the method, path, client, request id and the error message.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid

from cls.http.fields import ApiError
from cls.http.telemetry import DoorMetrics, RateLimitedLog

REQUEST_ID = "splitserve.request_id"  # the scope key the app reads the request id from
_MAX_ID_LEN = 128
_CLOSE = (b"connection", b"close")


class BodyTimeout(ApiError):
    def __init__(self, timeout_s: float, num_bytes: int):
        super().__init__(408, f"the request body did not arrive within {timeout_s:g} s "
                              f"({num_bytes} bytes came)", "body", code="timeout")


class BodyAborted(ApiError):
    def __init__(self, num_bytes: int):
        super().__init__(499, f"the client closed the connection after {num_bytes} bytes of the body",
                         "body", code="client_closed_request")


def request_id(raw: bytes | None) -> str:
    """The client's X-Request-Id if it is printable ASCII without spaces, 1-128 characters;
    otherwise a fresh one."""
    if raw and len(raw) <= _MAX_ID_LEN and all(0x21 <= b <= 0x7E for b in raw):
        return raw.decode("ascii")
    return uuid.uuid4().hex


class DoorGuard:
    def __init__(self, app, body_timeout_s: float, events: RateLimitedLog, metrics: DoorMetrics,
                 log: logging.Logger):
        self.app, self.body_timeout_s, self.events, self.metrics = app, body_timeout_s, events, metrics
        self.log = log

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])  # names are lower-case; a repeated one: the last wins
        rid = request_id(headers.get(b"x-request-id"))
        scope[REQUEST_ID] = rid
        length = headers.get(b"content-length", b"0")
        has_body = b"chunked" in headers.get(b"transfer-encoding", b"").lower() or \
            (length.isdigit() and int(length) > 0) or not length.isdigit()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout_s
        body_done, num_bytes = not has_body, 0
        status, error = 0, bytearray()

        async def timed_receive():
            nonlocal body_done, num_bytes
            if body_done:
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise BodyTimeout(self.body_timeout_s, num_bytes) from None
            if message["type"] == "http.disconnect":
                raise BodyAborted(num_bytes)
            num_bytes += len(message.get("body", b""))
            body_done = not message.get("more_body", False)
            return message

        async def counted_send(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                extra = [(b"x-request-id", rid.encode())]
                if not body_done and _CLOSE not in message.get("headers", ()):
                    extra.append(_CLOSE)
                message = {**message, "headers": [*message.get("headers", ()), *extra]}
                self.metrics.responses.labels(str(status)).inc()
            elif message["type"] == "http.response.body" and status >= 400 and len(error) < 2048:
                error.extend(message.get("body", b"")[:2048])
            await send(message)

        await self.app(scope, timed_receive, counted_send)
        if status >= 400:
            client = "{}:{}".format(*scope["client"]) if scope.get("client") else "?"
            self.events.log(logging.WARNING if status >= 500 else logging.INFO,
                            "http %d %s %s from %s (x-request-id %s): %s", status, scope["method"],
                            scope["path"][:100], client, rid, _message(bytes(error)))


def _message(body: bytes) -> str:
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = body.decode("utf-8", "replace")
    message = " ".join(str(message).split())
    return message if len(message) <= 300 else message[:300] + "..."
