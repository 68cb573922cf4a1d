"""OpenAI request bodies -> clsd's GenerateRequest (pure: no I/O, no network).

`parse_body` checks the bytes (UTF-8, JSON, an object); `parse_completion` / `parse_chat` check
the fields' types and the values only HTTP has (n, stop strings, max_tokens <= 0, the model
name, chat messages) and build a `pb.GenerateRequest`. Everything the gRPC door checks too
(sampling ranges, max_tokens against the context, the vocabulary, draining, the in-flight bound)
is left to `ClusterState.admit`, the one validation both doors share. Each failure is an
`ApiError` naming the field, in OpenAI's error object.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from engine.tokenizer import Tokenizer, TokenizerError
from proto import clsd_pb2 as pb

_MISSING = object()
_ROLES = ("system", "developer", "user", "assistant", "tool")
# Known OpenAI fields this server does not implement: accepted only at their "off" values.
_OFF = {"presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "logit_bias": ({},),
        "logprobs": (False, 0), "top_logprobs": (0,), "echo": (False,), "best_of": (1,),
        "suffix": ("",), "tools": ([],), "tool_choice": ("none",),
        "response_format": ({"type": "text"},), "parallel_tool_calls": (True, False)}
_IGNORED = ("user", "metadata", "store", "service_tier")
_COMMON = ("model", "stream", "stream_options", "max_tokens", "temperature", "top_p", "top_k", "stop",
           "seed", "n", "ignore_eos", "stop_token_ids")


class ApiError(Exception):
    """An HTTP error with OpenAI's error object as its body."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type_: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type_, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def bad(param: str, message: str) -> ApiError:
    return ApiError(400, message, param)


@dataclass
class ParsedRequest:
    spec: pb.GenerateRequest
    chat: bool
    stream: bool
    include_usage: bool
    stop: tuple[str, ...]
    prompt_param: str  # where a prompt problem found later is reported: "prompt" or "messages"
    max_tokens_param: str


def parse_body(raw: bytes) -> dict:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad("body", f"the request body is not valid UTF-8 (byte {e.start})") from None
    try:
        body = json.loads(text)
    except json.JSONDecodeError as e:
        raise bad("body", f"the request body is not valid JSON: {e.msg} at line {e.lineno} "
                          f"column {e.colno}") from None
    if not isinstance(body, dict):
        raise bad("body", f"the request body must be a JSON object, got {_kind(body)}")
    return body


def parse_completion(body: dict, model_name: str, max_stop: int) -> ParsedRequest:
    _check_fields(body, _COMMON + ("prompt",))
    prompt = body.get("prompt", _MISSING)
    spec = pb.GenerateRequest(request_id=f"cmpl-{uuid.uuid4().hex}")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if prompt is _MISSING:
        raise bad("prompt", "prompt is required")
    if isinstance(prompt, str):
        spec.prompt = _utf8("prompt", prompt)
    elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        if min(prompt) < 0:
            raise bad("prompt", f"prompt token ids must be >= 0, got {min(prompt)}")
        spec.prompt_token_ids.extend(prompt)
    elif isinstance(prompt, list) and not prompt:
        raise bad("prompt", "prompt is empty")
    elif isinstance(prompt, list) and all(isinstance(p, (str, list)) for p in prompt):
        raise bad("prompt", f"one prompt per request is supported, got {len(prompt)}")
    else:
        raise bad("prompt", "prompt must be a string, a list of token ids, or a list holding one of "
                            "those")
    return _common(body, spec, model_name, max_stop, chat=False, max_tokens_param="max_tokens")


def parse_chat(body: dict, model_name: str, max_stop: int, tokenizer: Tokenizer) -> ParsedRequest:
    _check_fields(body, _COMMON + ("messages", "max_completion_tokens"))
    messages = body.get("messages", _MISSING)
    if messages is _MISSING:
        raise bad("messages", "messages is required")
    if not isinstance(messages, list):
        raise bad("messages", f"messages must be a list of message objects, got {_kind(messages)}")
    if not messages:
        raise bad("messages", "messages is empty: give at least one message")
    turns = [_message(i, m) for i, m in enumerate(messages)]
    try:
        prompt_ids = tokenizer.encode_chat(turns)
    except TokenizerError as e:
        raise bad("messages", f"the model's chat template refused the messages: {e}") from None
    spec = pb.GenerateRequest(request_id=f"chatcmpl-{uuid.uuid4().hex}", prompt_token_ids=prompt_ids)
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    return _common(body, spec, model_name, max_stop, chat=True, max_tokens_param=key)


def _message(i: int, m) -> dict:
    where = f"messages[{i}]"
    if not isinstance(m, dict):
        raise bad(where, f"{where} must be an object with role and content, got {_kind(m)}")
    role = m.get("role")
    if role not in _ROLES:
        raise bad(f"{where}.role", f"{where}.role must be one of {', '.join(_ROLES)}, got {role!r}")
    content = m.get("content")
    if isinstance(content, list):  # content parts: only text ones
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text"
                    and isinstance(part.get("text"), str)):
                raise bad(f"{where}.content[{j}]", f"{where}.content[{j}] must be a text part "
                                                   '({"type": "text", "text": ...})')
        content = "".join(part["text"] for part in content)
    if not isinstance(content, str):
        raise bad(f"{where}.content", f"{where}.content must be a string, got {_kind(content)}")
    _utf8(f"{where}.content", content)
    return {"role": role, "content": content}


def _common(body: dict, spec: pb.GenerateRequest, model_name: str, max_stop: int, *, chat: bool,
            max_tokens_param: str) -> ParsedRequest:
    model = body.get("model", _MISSING)
    if model is _MISSING or model is None:
        raise bad("model", "model is required")
    if not isinstance(model, str):
        raise bad("model", f"model must be a string, got {_kind(model)}")
    n = _get(body, "n", int, 1)
    if n != 1:
        raise bad("n", f"only n=1 is supported, got n={n}")
    max_tokens = _get(body, max_tokens_param, int, None)
    if max_tokens is not None:
        if max_tokens <= 0:
            raise bad(max_tokens_param, f"{max_tokens_param} must be at least 1, got {max_tokens}")
        spec.max_tokens = min(max_tokens, 2**32 - 1)  # admit() names the configured limit
    spec.temperature = _get(body, "temperature", float, 1.0)
    spec.top_p = _get(body, "top_p", float, 1.0)
    top_k = _get(body, "top_k", int, 0)
    if not -2**31 <= top_k < 2**31:
        raise bad("top_k", f"top_k out of range: {top_k}")
    spec.top_k = top_k
    seed = _get(body, "seed", int, None)
    if seed is not None:
        if not 0 <= seed < 2**64:
            raise bad("seed", f"seed must be in 0..2**64-1, got {seed}")
        spec.seed = seed
    spec.ignore_eos = _get(body, "ignore_eos", bool, False)
    stop_ids = _get(body, "stop_token_ids", list, [])
    if not all(_is_int(t) and 0 <= t < 2**32 for t in stop_ids):
        raise bad("stop_token_ids", "stop_token_ids must be a list of token ids")
    spec.stop_token_ids.extend(stop_ids)
    stream = _get(body, "stream", bool, False)
    options = _get(body, "stream_options", dict, {})
    if options and not stream:
        raise bad("stream_options", "stream_options needs stream: true")
    unknown = sorted(set(options) - {"include_usage"})
    if unknown:
        raise bad("stream_options", f"unknown field stream_options.{unknown[0]}")
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise bad("stream_options", "stream_options.include_usage must be a boolean")
    chat_name = "prompt" if not chat else "messages"
    parsed = ParsedRequest(spec, chat, stream, include_usage, _stop(body, max_stop), chat_name,
                           max_tokens_param)
    if model != model_name:  # after the types: a malformed body is a 400 whatever its model
        raise ApiError(404, f"the model {model!r} does not exist; this server serves {model_name!r}",
                       "model", code="model_not_found")
    return parsed


def _stop(body: dict, max_stop: int) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad("stop", f"stop must be a string or a list of strings, got {_kind(stop)}")
    if len(stops) > max_stop:
        raise bad("stop", f"at most {max_stop} stop strings are supported, got {len(stops)}")
    if any(not s for s in stops):
        raise bad("stop", "stop strings must not be empty")
    for s in stops:
        _utf8("stop", s)
    return tuple(stops)


def _check_fields(body: dict, known: tuple[str, ...]) -> None:
    for key, value in body.items():
        if key in known or key in _IGNORED:
            continue
        if key in _OFF:
            if value is not None and value not in _OFF[key]:
                raise bad(key, f"{key}={json.dumps(value)} is not supported by this server")
            continue
        raise bad(key, f"unknown field {key!r}")


def _get(body: dict, key: str, kind: type, default):
    value = body.get(key)
    if value is None:
        return default
    if kind is float and (_is_int(value) or isinstance(value, float)):
        try:
            return float(value)
        except OverflowError:
            raise bad(key, f"{key} is out of range") from None
    if kind is int and _is_int(value):
        return value
    if kind in (bool, list, dict) and isinstance(value, kind):
        return value
    names = {float: "a number", int: "an integer", bool: "a boolean", list: "a list", dict: "an object"}
    raise bad(key, f"{key} must be {names[kind]}, got {_kind(value)}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _kind(v) -> str:
    if v is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "an object"}.get(type(v), type(v).__name__)


def _utf8(param: str, text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate written as a JSON \\u escape
        raise bad(param, f"{param} is not valid Unicode (a lone surrogate at character {e.start})") \
            from None
