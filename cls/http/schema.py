"""OpenAI request bodies -> clsd's GenerateRequest (pure: no I/O, no network, no tokenizer).

`parse_body` checks the bytes (UTF-8, JSON without NaN, huge integers or deep nesting, an
object); `parse_completion` / `parse_chat` check the fields' types and the values only HTTP has
(n, stop strings, max_tokens <= 0, temperature in [0, 2], top_p in (0, 1], the model name, chat
messages) and build a `pb.GenerateRequest`. Everything the gRPC door checks too (max_tokens
against the context, the vocabulary, draining, the in-flight bound) is left to
`ClusterState.admit`, the one validation both doors share. Each failure is an `ApiError` naming
the field, in OpenAI's error object.

Fields, as vLLM's server treats them (the tables and typed reads are in cls/http/fields.py):
the ones read here; the sampling features that need the engine (penalties, min_p, min_tokens,
logprobs, n > 1), accepted at their neutral value and otherwise refused as "not supported yet";
other known features at their "off" value only (tools, guided decoding...); and unknown fields,
ignored and listed in `ParsedRequest.unknown` for the door to log and count.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from cls.http.fields import ApiError, bad, check_fields, clip, get_field, is_int, kind_of, utf8
from proto import clsd_pb2 as pb

_MISSING = object()
_ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_TOKEN_ID = 2**31 - 1  # far beyond any vocabulary; admit() checks the real one

# Read by parse_completion / parse_chat.
_COMMON = ("model", "stream", "stream_options", "max_tokens", "max_completion_tokens", "temperature",
           "top_p", "top_k", "stop", "seed", "ignore_eos", "stop_token_ids",
           "include_stop_str_in_output")
@dataclass
class ParsedRequest:
    spec: pb.GenerateRequest
    chat: bool
    stream: bool
    include_usage: bool
    stop: tuple[str, ...]
    prompt_param: str  # where a prompt problem found later is reported: "prompt" or "messages"
    max_tokens_param: str
    continuous_usage: bool = False  # usage on every chunk (stream_options.continuous_usage_stats)
    include_stop: bool = False  # include_stop_str_in_output
    max_tokens_given: bool = True  # False: the door fills in the rest of the context
    messages: list[dict] | None = None  # chat turns, for the door to tokenize
    unknown: tuple[str, ...] = field(default=())  # unknown field names, ignored


@dataclass
class TokenizeRequest:
    text: str | None
    messages: list[dict] | None
    add_special_tokens: bool
    return_token_strs: bool
    unknown: tuple[str, ...] = ()


def parse_body(raw: bytes) -> dict:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad("body", f"the request body is not valid UTF-8 (byte {e.start})") from None
    try:
        body = json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        raise bad("body", f"the request body is not valid JSON: {e.msg} at line {e.lineno} "
                          f"column {e.colno}") from None
    except RecursionError:
        raise bad("body", "the request body is not valid JSON: nested too deeply") from None
    except ValueError as e:  # an integer of more than 4300 digits, NaN, Infinity
        raise bad("body", f"the request body is not valid JSON: {clip(str(e), 120)}") from None
    if not isinstance(body, dict):
        raise bad("body", f"the request body must be a JSON object, got {kind_of(body)}")
    return body


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def parse_completion(body: dict, model_name: str, max_stop: int) -> ParsedRequest:
    unknown = check_fields(body, _COMMON + ("prompt",), "completion")
    prompt = body.get("prompt", _MISSING)
    spec = pb.GenerateRequest()
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if prompt is _MISSING:
        raise bad("prompt", "prompt is required")
    if isinstance(prompt, str):
        spec.prompt = utf8("prompt", prompt)
    elif isinstance(prompt, list) and prompt and all(is_int(t) for t in prompt):
        if not 0 <= min(prompt) <= max(prompt) <= MAX_TOKEN_ID:
            worst = min(prompt) if min(prompt) < 0 else max(prompt)
            raise bad("prompt", f"prompt holds the token id {clip(str(worst))}, beyond the vocabulary")
        spec.prompt_token_ids.extend(prompt)
    elif isinstance(prompt, list) and not prompt:
        raise bad("prompt", "prompt is empty")
    elif isinstance(prompt, list) and all(isinstance(p, (str, list)) for p in prompt):
        raise bad("prompt", f"one prompt per request is supported, got {len(prompt)}")
    else:
        raise bad("prompt", "prompt must be a string, a list of token ids, or a list holding one of "
                            "those")
    return _common(body, spec, model_name, max_stop, chat=False, unknown=unknown)


def parse_chat(body: dict, model_name: str, max_stop: int) -> ParsedRequest:
    """The chat request with its turns in `messages`; the door renders and tokenizes them
    (off the event loop) into `spec.prompt_token_ids`."""
    unknown = check_fields(body, _COMMON + ("messages", "chat_template_kwargs"), "chat")
    messages = body.get("messages", _MISSING)
    if messages is _MISSING:
        raise bad("messages", "messages is required")
    if not isinstance(messages, list):
        raise bad("messages", f"messages must be a list of message objects, got {kind_of(messages)}")
    if not messages:
        raise bad("messages", "messages is empty: give at least one message")
    turns = [_message(i, m) for i, m in enumerate(messages)]
    get_field(body, "chat_template_kwargs", dict, {})  # accepted and ignored, as vLLM's unknown ones
    parsed = _common(body, pb.GenerateRequest(), model_name, max_stop, chat=True, unknown=unknown)
    parsed.messages = turns
    return parsed


def parse_tokenize(body: dict, model_name: str) -> TokenizeRequest:
    """vLLM's /tokenize: {"prompt": text} or {"messages": [...]}; `model` may be left out."""
    unknown = check_fields(body, ("model", "prompt", "messages", "add_special_tokens",
                                   "return_token_strs", "chat_template_kwargs"), "tokenize")
    _model(body, model_name, required=False)
    text, messages = body.get("prompt"), body.get("messages")
    if (text is None) == (messages is None):
        raise bad("prompt", "give prompt (a string) or messages (a list of message objects)")
    if text is not None:
        if not isinstance(text, str):
            raise bad("prompt", f"prompt must be a string, got {kind_of(text)}")
        utf8("prompt", text)
    else:
        if not isinstance(messages, list) or not messages:
            raise bad("messages", "messages must be a non-empty list of message objects")
        messages = [_message(i, m) for i, m in enumerate(messages)]
    add_special = get_field(body, "add_special_tokens", bool, text is not None)  # vLLM's defaults
    return TokenizeRequest(text, messages, add_special, get_field(body, "return_token_strs", bool, False),
                           unknown)


def parse_detokenize(body: dict, model_name: str) -> tuple[list[int], tuple[str, ...]]:
    """vLLM's /detokenize: {"tokens": [ids]} -> the ids (bounded, not yet against the vocabulary)
    and the unknown fields."""
    unknown = check_fields(body, ("model", "tokens"), "detokenize")
    _model(body, model_name, required=False)
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not all(is_int(t) for t in tokens):
        raise bad("tokens", f"tokens must be a list of token ids, got {kind_of(tokens)}")
    if tokens and not 0 <= min(tokens) <= max(tokens) <= MAX_TOKEN_ID:
        worst = min(tokens) if min(tokens) < 0 else max(tokens)
        raise bad("tokens", f"tokens holds the token id {clip(str(worst))}, beyond the vocabulary")
    return tokens, unknown


def _message(i: int, m) -> dict:
    where = f"messages[{i}]"
    if not isinstance(m, dict):
        raise bad(where, f"{where} must be an object with role and content, got {kind_of(m)}")
    role = m.get("role")
    if role not in _ROLES:
        raise bad(f"{where}.role", f"{where}.role must be one of {', '.join(_ROLES)}, "
                                   f"got {clip(repr(role))}")
    content = m.get("content")
    if isinstance(content, list):  # content parts: only text ones
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text"
                    and isinstance(part.get("text"), str)):
                raise bad(f"{where}.content[{j}]", f"{where}.content[{j}] must be a text part "
                                                   '({"type": "text", "text": ...})')
        content = "".join(part["text"] for part in content)
    if not isinstance(content, str):
        raise bad(f"{where}.content", f"{where}.content must be a string, got {kind_of(content)}")
    utf8(f"{where}.content", content)
    return {"role": role, "content": content}


def _model(body: dict, model_name: str, required: bool) -> None:
    model = body.get("model", _MISSING)
    if model is _MISSING or model is None:
        if required:
            raise bad("model", "model is required")
        return
    if not isinstance(model, str):
        raise bad("model", f"model must be a string, got {kind_of(model)}")
    if model != model_name:
        raise ApiError(404, f"the model {clip(repr(model))} does not exist; this server serves "
                            f"{model_name!r}", "model", code="model_not_found")


def _common(body: dict, spec: pb.GenerateRequest, model_name: str, max_stop: int, *, chat: bool,
            unknown: tuple[str, ...]) -> ParsedRequest:
    model = body.get("model", _MISSING)
    if model is _MISSING or model is None:
        raise bad("model", "model is required")
    if not isinstance(model, str):
        raise bad("model", f"model must be a string, got {kind_of(model)}")
    # max_completion_tokens is OpenAI's newer name; vLLM reads it first on both endpoints.
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = get_field(body, key, int, None)
    if max_tokens is not None:
        if max_tokens <= 0:
            raise bad(key, f"{key} must be at least 1, got {clip(str(max_tokens))}")
        spec.max_tokens = min(max_tokens, 2**32 - 1)  # admit() names the configured limit
    temperature = get_field(body, "temperature", float, 1.0)
    if not 0 <= temperature <= 2:
        raise bad("temperature", f"temperature must be >= 0 and <= 2, got {temperature}")
    spec.temperature = temperature
    top_p = get_field(body, "top_p", float, 1.0)
    if not 0 < top_p <= 1:
        raise bad("top_p", f"top_p must be in (0, 1], got {top_p}")
    spec.top_p = top_p
    top_k = get_field(body, "top_k", int, 0)
    if not -2**31 <= top_k < 2**31:
        raise bad("top_k", f"top_k out of range: {clip(str(top_k))}")
    spec.top_k = top_k
    seed = get_field(body, "seed", int, None)
    if seed is not None:
        if not 0 <= seed < 2**64:
            raise bad("seed", f"seed must be in 0..2**64-1, got {clip(str(seed))}")
        spec.seed = seed
    spec.ignore_eos = get_field(body, "ignore_eos", bool, False)
    stop_ids = get_field(body, "stop_token_ids", list, [])
    if not all(is_int(t) and 0 <= t <= MAX_TOKEN_ID for t in stop_ids):
        raise bad("stop_token_ids", "stop_token_ids must be a list of token ids")
    spec.stop_token_ids.extend(stop_ids)
    stream = get_field(body, "stream", bool, False)
    options = get_field(body, "stream_options", dict, {})
    if options and not stream:
        raise bad("stream_options", "stream_options needs stream: true")
    include_usage = get_field(options, "include_usage", bool, False, "stream_options.include_usage")
    # As vLLM: usage on every chunk only together with include_usage.
    continuous = get_field(options, "continuous_usage_stats", bool, False,
                      "stream_options.continuous_usage_stats") and include_usage
    unknown += tuple(f"stream_options.{k}" for k in options
                     if k not in ("include_usage", "continuous_usage_stats"))
    parsed = ParsedRequest(spec, chat, stream, include_usage, _stop(body, max_stop),
                           "messages" if chat else "prompt", key, continuous,
                           get_field(body, "include_stop_str_in_output", bool, False),
                           max_tokens is not None, unknown=unknown)
    if model != model_name:  # after the types: a malformed body is a 400 whatever its model
        raise ApiError(404, f"the model {clip(repr(model))} does not exist; this server serves "
                            f"{model_name!r}", "model", code="model_not_found")
    return parsed


def _stop(body: dict, max_stop: int) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad("stop", f"stop must be a string or a list of strings, got {kind_of(stop)}")
    if len(stops) > max_stop:
        raise bad("stop", f"at most {max_stop} stop strings are supported, got {len(stops)}")
    if any(not s for s in stops):
        raise bad("stop", "stop strings must not be empty")
    for s in stops:
        utf8("stop", s)
    return tuple(stops)
