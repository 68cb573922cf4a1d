"""The fields of an OpenAI request body, as vLLM's server treats them (pure).

Which fields are known and harmless to ignore, which sampling features need the engine (accepted
at their neutral value, otherwise refused as "not supported yet"), which other features are
accepted at their "off" value only; typed reads of one field; and the `ApiError` every failure
becomes (OpenAI's error object). cls/http/schema.py builds requests with them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

# Known and harmless to ignore.
_IGNORED = ("user", "metadata", "store", "service_tier", "priority", "request_id")


@dataclass(frozen=True)
class _NeedsEngine:
    """A sampling feature the engine does not implement yet: its type, its valid range (a
    value outside it is invalid, whatever the engine), and its neutral values (accepted)."""
    kind: type
    valid: object  # value -> bool
    range_text: str
    neutral: tuple


_ANY = lambda v: True  # noqa: E731
_NEEDS_ENGINE = {
    "n": _NeedsEngine(int, lambda v: v >= 1, "at least 1", (1,)),
    "min_tokens": _NeedsEngine(int, lambda v: v >= 0, ">= 0", (0,)),
    "repetition_penalty": _NeedsEngine(float, lambda v: 0 < v < math.inf, "finite and > 0", (1.0,)),
    "presence_penalty": _NeedsEngine(float, lambda v: -2 <= v <= 2, "in [-2, 2]", (0.0,)),
    "frequency_penalty": _NeedsEngine(float, lambda v: -2 <= v <= 2, "in [-2, 2]", (0.0,)),
    "min_p": _NeedsEngine(float, lambda v: 0 <= v <= 1, "in [0, 1]", (0.0,)),
    "top_logprobs": _NeedsEngine(int, lambda v: 0 <= v <= 20, "in 0..20", (0,)),
    "length_penalty": _NeedsEngine(float, math.isfinite, "finite", (1.0,)),
}
_LOGPROBS = {"chat": _NeedsEngine(bool, _ANY, "", (False,)),
             # On completions `logprobs: 0` asks for the sampled token's logprob: not neutral.
             "completion": _NeedsEngine(int, lambda v: 0 <= v <= 20, "in 0..20", ())}
# Known features of other kinds, accepted only at their "off" values.
_OFF = {"logit_bias": ({},), "echo": (False,), "best_of": (1,), "suffix": ("",), "tools": ([],),
        "tool_choice": ("none", "auto"), "response_format": ({"type": "text"},),
        "parallel_tool_calls": (True, False), "use_beam_search": (False,), "prompt_logprobs": (),
        "skip_special_tokens": (True,), "allowed_token_ids": (), "bad_words": ([],),
        "guided_json": (), "guided_regex": (), "guided_choice": (), "guided_grammar": (),
        "structured_outputs": (), "add_generation_prompt": (True,), "continue_final_message": (False,),
        "truncate_prompt_tokens": ()}


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


def check_fields(body: dict, known: tuple[str, ...], endpoint: str) -> tuple[str, ...]:
    """Checks the known fields the door does not act on; returns the unknown field names."""
    unknown = []
    for key, value in body.items():
        if key in known or key in _IGNORED:
            continue
        if value is None and (key in _NEEDS_ENGINE or key in _OFF or key == "logprobs"):
            continue  # null: the default, i.e. off
        rule = _LOGPROBS["chat" if endpoint == "chat" else "completion"] if key == "logprobs" \
            else _NEEDS_ENGINE.get(key)
        if rule is not None:
            _needs_engine(key, value, rule)
        elif key in _OFF:
            if value not in _OFF[key]:
                raise bad(key, f"{key}={show(value)} is not supported by this server yet")
        else:
            unknown.append(key)
    return tuple(unknown)


def _needs_engine(key: str, value, rule: _NeedsEngine) -> None:
    v = get_field({key: value}, key, rule.kind, None)
    if not rule.valid(v):
        raise bad(key, f"{key} must be {rule.range_text}, got {show(value)}")
    if v not in rule.neutral:
        if key == "n":
            raise bad(key, f"n={show(value)} is not supported yet: only n=1")
        neutral = f"; leave it out or send {json.dumps(rule.neutral[0])}" if rule.neutral else \
            "; leave it out or send null"
        raise bad(key, f"{key}={show(value)} is not supported yet (the engine does not implement "
                       f"it){neutral}")


def get_field(body: dict, key: str, kind: type, default, name: str | None = None):
    name = name or key
    value = body.get(key)
    if value is None:
        return default
    if kind is float and (is_int(value) or isinstance(value, float)):
        try:
            return float(value)
        except OverflowError:
            raise bad(name, f"{name} is out of range") from None
    if kind is int and is_int(value):
        return value
    if kind in (bool, list, dict) and isinstance(value, kind):
        return value
    names = {float: "a number", int: "an integer", bool: "a boolean", list: "a list", dict: "an object"}
    raise bad(name, f"{name} must be {names[kind]}, got {kind_of(value)}")


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def kind_of(v) -> str:
    if v is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "an object"}.get(type(v), type(v).__name__)


def show(v) -> str:
    """A value for an error message: scalars as JSON, clipped; containers by their kind (a
    deeply nested one must not be walked)."""
    if isinstance(v, (list, dict)):
        return ("[...]" if isinstance(v, list) else "{...}") if v else json.dumps(v)
    return clip(json.dumps(v))


def clip(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[:limit] + f"...({len(text)} characters)"


def utf8(param: str, text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate written as a JSON \\u escape
        raise bad(param, f"{param} is not valid Unicode (a lone surrogate at character {e.start})") \
            from None
