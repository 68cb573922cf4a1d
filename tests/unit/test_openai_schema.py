"""The HTTP door's pure parts: request bodies (cls/http/schema.py), the stop-string cut that keeps
the stop string (cls/http/reply.py), the rate-limited log (cls/http/telemetry.py) and
X-Request-Id (cls/http/guard.py)."""

from __future__ import annotations

import logging
import random

import pytest

from cls.http.guard import request_id
from cls.http.reply import StopCutter
from cls.http.schema import (
    ApiError,
    parse_body,
    parse_chat,
    parse_completion,
    parse_detokenize,
    parse_tokenize,
)
from cls.http.telemetry import RateLimitedLog

M = "m"
P = {"model": M, "prompt": "hi"}
C = {"model": M, "messages": [{"role": "user", "content": "hi"}]}


def _error(fn, *args) -> ApiError:
    with pytest.raises(ApiError) as e:
        fn(*args)
    return e.value


@pytest.mark.parametrize("raw, fragment", [
    (b"[" * 100_000, "nested too deeply"),
    (b'{"model": "m", "prompt": "hi", "max_tokens": ' + b"9" * 5000 + b"}", "not valid JSON"),
    (b'{"model": "m", "temperature": NaN}', "NaN"),
    (b'{"model": "m", "temperature": Infinity}', "Infinity"),
    (b'{"prompt": "\xff"}', "UTF-8"),
    (b'"a string"', "must be a JSON object, got a string"),
    (b"42", "must be a JSON object, got an integer"),
    (b"null", "must be a JSON object, got null"),
    (b"", "not valid JSON"),
    (b'{"a": 1', "not valid JSON"),
])
def test_bad_bodies_are_400_naming_the_body(raw, fragment):
    e = _error(parse_body, raw)
    assert (e.status, e.param) == (400, "body") and fragment in e.message, e.message
    assert len(e.message) < 300


def test_unknown_fields_are_listed_and_ignored_known_ones_still_checked():
    parsed = parse_completion({**P, "frobnicate": {"x": [1]}, "guidellm": None,
                               "stream": True, "stream_options": {"include_usage": True, "novel": 1}}, M, 4)
    assert parsed.unknown == ("frobnicate", "guidellm", "stream_options.novel")
    parsed = parse_chat({**C, "chat_template_kwargs": {"enable_thinking": False}, "foo": 1}, M, 4)
    assert parsed.unknown == ("foo",) and parsed.messages == C["messages"]
    assert parsed.spec.request_id == "" and not parsed.spec.prompt_token_ids  # the door fills them
    for body, param in (({**P, "temperature": "hot", "frob": 1}, "temperature"),
                        ({**C, "chat_template_kwargs": "x"}, "chat_template_kwargs"),
                        ({**P, "include_stop_str_in_output": 1}, "include_stop_str_in_output"),
                        ({**P, "stream": True, "stream_options": {"continuous_usage_stats": "y"}},
                         "stream_options.continuous_usage_stats")):
        e = _error(parse_completion if "prompt" in body else parse_chat, body, M, 4)
        assert (e.status, e.param) == (400, param), e.message


NEUTRAL = {"n": 1, "min_tokens": 0, "repetition_penalty": 1.0, "presence_penalty": 0, "frequency_penalty": 0.0,
           "min_p": 0, "top_logprobs": 0, "length_penalty": 1, "best_of": 1, "echo": False,
           "logit_bias": {}, "tools": [], "tool_choice": "none", "use_beam_search": False,
           "skip_special_tokens": True, "prompt_logprobs": None, "guided_json": None}


def test_engine_features_at_their_neutral_values_are_accepted():
    assert parse_completion({**P, **NEUTRAL, "logprobs": None}, M, 4).unknown == ()
    assert parse_chat({**C, **NEUTRAL, "logprobs": False}, M, 4).unknown == ()


@pytest.mark.parametrize("key, value, fragment", [
    ("n", 2, "n=2 is not supported yet: only n=1"),
    ("n", 0, "n must be at least 1"),
    ("min_tokens", 3, "min_tokens=3 is not supported yet"),
    ("min_tokens", -1, "min_tokens must be >= 0"),
    ("repetition_penalty", 1.2, "repetition_penalty=1.2 is not supported yet"),
    ("repetition_penalty", 0, "repetition_penalty must be finite and > 0"),
    ("presence_penalty", 0.5, "not supported yet"),
    ("frequency_penalty", 3, "frequency_penalty must be in [-2, 2]"),
    ("min_p", 0.1, "min_p=0.1 is not supported yet"),
    ("min_p", 1.5, "min_p must be in [0, 1]"),
    ("top_logprobs", 2, "top_logprobs=2 is not supported yet"),
    ("logprobs", 0, "logprobs=0 is not supported yet"),  # completions: 0 = the sampled token's
    ("temperature", 2.5, "temperature must be >= 0 and <= 2"),
    ("temperature", -0.1, "temperature must be >= 0 and <= 2"),
    ("top_p", 0, "top_p must be in (0, 1]"),
    ("top_p", 1.01, "top_p must be in (0, 1]"),
    ("tools", [{"type": "function"}], "tools=[...] is not supported"),
    ("min_tokens", 10**4000, "not supported yet"),
    ("repetition_penalty", "x", "repetition_penalty must be a number"),
])
def test_out_of_range_or_unsupported_values_are_400_naming_the_param(key, value, fragment):
    e = _error(parse_completion, {**P, key: value}, M, 4)
    assert (e.status, e.param) == (400, key) and fragment in e.message, e.message
    assert len(e.message) < 300, e.message


def test_chat_logprobs_true_is_refused_false_accepted():
    e = _error(parse_chat, {**C, "logprobs": True}, M, 4)
    assert (e.status, e.param) == (400, "logprobs") and "not supported yet" in e.message


def test_max_completion_tokens_on_both_endpoints_and_the_default():
    for parse, body in ((parse_completion, P), (parse_chat, C)):
        p = parse({**body, "max_completion_tokens": 7, "max_tokens": 3}, M, 4)
        assert (p.spec.max_tokens, p.max_tokens_param, p.max_tokens_given) == (7, "max_completion_tokens", True)
        p = parse({**body, "max_tokens": 3}, M, 4)
        assert (p.spec.max_tokens, p.max_tokens_param) == (3, "max_tokens")
        p = parse(body, M, 4)
        assert (p.spec.max_tokens, p.max_tokens_given) == (0, False)
        e = _error(parse, {**body, "max_completion_tokens": 0}, M, 4)
        assert e.param == "max_completion_tokens"


def test_stream_options_usage_flags():
    p = parse_completion({**P, "stream": True, "stream_options": {"include_usage": True,
                                                                  "continuous_usage_stats": True}}, M, 4)
    assert (p.include_usage, p.continuous_usage) == (True, True)
    # As vLLM: continuous usage only together with include_usage.
    p = parse_completion({**P, "stream": True, "stream_options": {"continuous_usage_stats": True}}, M, 4)
    assert (p.include_usage, p.continuous_usage) == (False, False)


@pytest.mark.parametrize("ids", [[2**40], [-1], [1, 2**31]])
def test_token_ids_beyond_any_vocabulary_are_400(ids):
    e = _error(parse_completion, {**P, "prompt": ids}, M, 4)
    assert (e.status, e.param) == (400, "prompt") and "beyond the vocabulary" in e.message
    e = _error(parse_detokenize, {"tokens": ids}, M)
    assert (e.status, e.param) == (400, "tokens")


def test_tokenize_bodies():
    t = parse_tokenize({"prompt": "hi"}, M)
    assert (t.text, t.messages, t.add_special_tokens) == ("hi", None, True)
    t = parse_tokenize({"model": M, "messages": C["messages"]}, M)
    assert (t.text, t.add_special_tokens) == (None, False) and t.messages == C["messages"]
    assert _error(parse_tokenize, {"model": "other", "prompt": "hi"}, M).status == 404
    assert _error(parse_tokenize, {}, M).param == "prompt"
    assert parse_detokenize({"tokens": [], "x": 1}, M) == ([], ("x",))


def test_stop_cutter_keeps_the_stop_string_when_asked_whatever_the_chunking():
    rng = random.Random(3)
    for _ in range(2000):
        text = "".join(rng.choice("ab c") for _ in range(rng.randrange(0, 30)))
        stops = tuple("".join(rng.choice("ab c") for _ in range(rng.randrange(1, 4)))
                      for _ in range(rng.randrange(1, 3)))
        plain, keep = StopCutter(stops, False), StopCutter(stops, True)
        out_plain, out_keep, i = [], [], 0
        while i < len(text):
            j = i + rng.randrange(1, 5)
            out_plain.append(plain.feed(text[i:j]))
            out_keep.append(keep.feed(text[i:j]))
            i = j
        out_plain.append(plain.flush())
        out_keep.append(keep.flush())
        cut, kept = "".join(out_plain), "".join(out_keep)
        if plain.stopped:  # the kept text is the cut text + the stop string that ended it
            # ... the one completed first: the text up to the earliest end of a stop string.
            first_end = min(text.find(s) + len(s) for s in stops if s in text)
            assert kept == text[:first_end] and kept[len(cut):] in stops, (text, stops, cut, kept)
        else:
            assert kept == cut == text


def test_rate_limited_log_says_how_many_lines_it_held_back(caplog):
    now = [0.0]
    limited = RateLimitedLog(logging.getLogger("test.limited"), lines_per_s=3, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="test.limited"):
        for i in range(100):
            limited.log(logging.INFO, "bad request %d", i)
        assert len(caplog.records) == 3
        now[0] = 1.5
        limited.log(logging.INFO, "bad request %d", 100)
    assert len(caplog.records) == 4
    assert caplog.records[-1].getMessage() == "bad request 100 (97 similar lines suppressed before this one)"


@pytest.mark.parametrize("raw, kept", [(b"abc-123_X.y", True), (b"x" * 128, True), (b"x" * 129, False),
                                       (b"a b", False), (b"a\x00b", False), ("é".encode(), False),
                                       (b"", False), (None, False)])
def test_x_request_id_is_taken_when_printable_and_short(raw, kept):
    rid = request_id(raw)
    assert (rid == (raw or b"").decode("latin-1")) == kept
    assert 0 < len(rid) <= 128 and rid.isprintable()
