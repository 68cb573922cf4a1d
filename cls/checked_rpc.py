"""Registers gRPC services so that a request that does not parse is INVALID_ARGUMENT, not UNKNOWN.

grpc.aio runs a method handler's `request_deserializer` before the servicer and answers a failure
there with UNKNOWN and a logged traceback. `add_checked(add_fn, servicer, server)`:
1. runs the generated `add_*Servicer_to_server(servicer, ...)` against a stand-in server, which
   keeps the method handlers it is given;
2. gives each handler no deserializer (it receives the raw bytes) and a behavior that parses them
   first: a message that does not parse aborts the call with INVALID_ARGUMENT naming the method
   and the message type, and nothing is logged;
3. registers the handlers on the real server, as the generated function would have.
"""

from __future__ import annotations

import contextlib
import inspect

import grpc


class _Capture:
    """Stands in for the server while a generated function registers its handlers."""

    def __init__(self):
        self.registered: list[tuple[str, dict]] = []

    def add_generic_rpc_handlers(self, handlers) -> None:
        pass  # rebuilt from the registered handlers

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        self.registered.append((service, handlers))


def add_checked(add_fn, servicer, server: grpc.aio.Server) -> None:
    capture = _Capture()
    add_fn(servicer, capture)
    if not capture.registered:
        raise RuntimeError(f"{add_fn.__name__} registered no method handlers")
    for service, handlers in capture.registered:
        checked = {name: _checked(f"/{service}/{name}", h) for name, h in handlers.items()}
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, checked),))
        server.add_registered_method_handlers(service, checked)


async def _parse(parse, raw: bytes, context, method: str):
    try:
        return parse(raw)
    except Exception as e:  # noqa: BLE001 - DecodeError, or whatever else a deserializer raises
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                            f"{method}: the request of {len(raw)} bytes does not parse: {str(e)[:200]}")


def _checked(method: str, handler):
    parse = handler.request_deserializer
    if parse is None or handler.request_streaming:
        return handler  # clsd's services take one request message per call
    if handler.response_streaming:
        inner = handler.unary_stream

        async def unary_stream(raw, context):
            result = inner(await _parse(parse, raw, context, method), context)
            if not inspect.isasyncgen(result):
                await result  # a servicer that writes with context.write
                return
            async with contextlib.aclosing(result):  # a cancelled call closes the servicer's stream now
                async for message in result:
                    yield message
        return handler._replace(request_deserializer=None, unary_stream=unary_stream)
    inner = handler.unary_unary

    async def unary_unary(raw, context):
        return await inner(await _parse(parse, raw, context, method), context)
    return handler._replace(request_deserializer=None, unary_unary=unary_unary)
