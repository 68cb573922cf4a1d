"""What a request must pass before it takes a place in flight, and the work done off the loop.

clsd's one event loop serves leases, heartbeats, the dispatcher and every stream, so nothing a
client sends may hold it for long. Life cycle of a request here (`Admission`, called by
ClusterState.admit for both front doors):
1. `check`, at once, before any tokenizing: the in-flight bound, which follows what the
   registered machines can run (`inflight_bound`: `inflight_factor` x the sum over machines of
   min(`requests_per_machine`, KV blocks), never above `max_inflight_requests`), then the input:
   one of text / token ids, token ids within the context and the vocabulary, UTF-8, a text's
   characters against the longest context x the tokenizer's most characters per token
   (`max_chars_per_token`: a longer text cannot fit, so it is not tokenized), max_tokens and
   sampling values, at most MAX_STOP_TOKEN_IDS stop ids, a request id of at most
   MAX_REQUEST_ID_CHARS characters, machines present, a request id not already in flight. Each
   failure is a RequestError: RESOURCE_EXHAUSTED, INVALID_ARGUMENT (naming the field and the
   limit), UNAVAILABLE or ALREADY_EXISTS (a retryable answer: the id is live in this clsd).
2. `tokenize`: the text (chat template on request) on a tokenizer thread (`TokenizerPool`):
   short texts on one of their own, long ones on `tokenizer_threads`, at most `tokenizer_queue`
   of them waiting or running (past that: RESOURCE_EXHAUSTED). `Encoder` encodes through the
   tokenizers library's batch call, which releases the GIL, so the loop turns meanwhile.
3. `request`: the checks that need the tokens (context and KV memory of the machines, which may
   have changed meanwhile), and the ClusterRequest for the Dispatcher.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from tokenizers import Tokenizer as HFTokenizer

from cls.cluster_request import ClusterRequest, RequestError
from cls.config import ClsConfig, LimitsSection
from cls.pools import Pools
from cls.router import Router
from engine.sequence import InvalidRequestError
from engine.sequence import SamplingParams as EngineSampling
from engine.tokenizer import Tokenizer, TokenizerError
from proto import clsd_pb2 as pb
from proto import mlsd_pb2 as mpb

log = logging.getLogger("clsd.admission")

MAX_REQUEST_ID_CHARS = 256
"""A request id travels in every attempt id, event and log line about the request."""
MAX_STOP_TOKEN_IDS = 1024
"""Stop token ids go to the machines with every attempt."""
SHORT_TEXT_CHARS = 16384
"""Texts up to this long (a few ms to tokenize) take the short lane of the TokenizerPool."""
NORMALIZE_FACTOR = 4
"""How many characters Unicode composition (NFC, NFKC) can fold into one (Hangul jamo: 3 -> 1)."""


class Admission:
    """Turns a GenerateRequest into a ClusterRequest, or a RequestError (see the life cycle)."""

    _ids = itertools.count()

    def __init__(self, cfg: ClsConfig, tokenizer: Tokenizer, pools: Pools, router: Router):
        self.cfg, self.tokenizer, self.pools, self.router = cfg, tokenizer, pools, router
        self.tokenizers = TokenizerPool(cfg.limits.tokenizer_threads, cfg.limits.tokenizer_queue)
        self.encoder = Encoder(cfg.model)
        self.chars_per_token = max_chars_per_token(cfg.model)

    def check(self, r: pb.GenerateRequest, num_inflight: int,
              live: Callable[[str], bool]) -> tuple[str, str | None]:
        """What needs no tokens, at once (`num_inflight`: requests in flight now; `live(id)`:
        whether a request id is). Returns the request id and the text to tokenize (None when the
        request brings token ids)."""
        lim = self.cfg.limits
        bad = grpc.StatusCode.INVALID_ARGUMENT
        bound, why = inflight_bound(self.pools, lim)
        if self.pools.machines and num_inflight >= bound:
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"{num_inflight} requests in flight: the cluster is full (the limit is "
                               f"{bound}: {why}); retry later")
        if r.prompt and r.prompt_token_ids:
            raise RequestError(bad, "give prompt or prompt_token_ids, not both", "prompt")
        longest = max((m.max_model_len for m in self.pools.machines.values()), default=None)
        max_tokens = r.max_tokens or lim.default_max_tokens
        text = None
        if r.prompt_token_ids:
            if r.apply_chat_template:
                raise RequestError(bad, "apply_chat_template needs a text prompt", "apply_chat_template")
            num = len(r.prompt_token_ids)
            if longest is not None and num + max_tokens > longest:  # before reading the ids
                raise RequestError(bad, f"prompt of {num} tokens + max_tokens {max_tokens} exceeds the "
                                        f"context ({longest} tokens) of every machine", "max_tokens")
            vocab, top = self.tokenizer.vocab_size, max(r.prompt_token_ids)
            if top >= vocab:
                raise RequestError(bad, f"prompt_token_ids holds {top}, beyond the vocabulary of "
                                        f"{vocab} tokens", "prompt_token_ids")
        else:
            try:
                text = r.prompt.decode("utf-8")
            except UnicodeDecodeError as e:
                raise RequestError(bad, f"prompt is not valid UTF-8 (byte {e.start})", "prompt") from None
            if not text or text.isspace():  # no copy of a long text
                raise RequestError(bad, "prompt is empty", "prompt")
            limit = prompt_char_limit(self.pools, lim, self.chars_per_token)
            if limit is not None and len(text) > limit:
                how = "limits.max_prompt_chars" if lim.max_prompt_chars is not None else \
                    f"the context of {longest} tokens x at most {self.chars_per_token} characters per token"
                raise RequestError(bad, f"prompt of {len(text)} characters cannot fit: the limit is "
                                        f"{limit} characters ({how})", "prompt")
        if max_tokens > lim.max_tokens_limit:
            raise RequestError(bad, f"max_tokens must be <= {lim.max_tokens_limit}, got {max_tokens}",
                               "max_tokens")
        for name in ("temperature", "top_p"):
            if not math.isfinite(getattr(r, name)):
                raise RequestError(bad, f"{name} must be finite", name)
        try:
            EngineSampling(max_tokens=max_tokens, temperature=r.temperature, top_k=r.top_k,
                           top_p=r.top_p or 1.0).validate()
        except InvalidRequestError as e:
            raise RequestError(bad, str(e), _first_word(str(e))) from None
        if len(r.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise RequestError(bad, f"stop_token_ids holds {len(r.stop_token_ids)} ids; at most "
                                    f"{MAX_STOP_TOKEN_IDS}", "stop_token_ids")
        if len(r.request_id) > MAX_REQUEST_ID_CHARS:
            raise RequestError(bad, f"request_id of {len(r.request_id)} characters; at most "
                                    f"{MAX_REQUEST_ID_CHARS}", "request_id")
        if not self.pools.machines:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, "no machines are registered")
        rid = r.request_id or f"cmpl-{next(self._ids)}-{time.monotonic_ns() % 10**6}"
        if live(rid):
            raise RequestError(grpc.StatusCode.ALREADY_EXISTS,
                               f"request_id {rid!r} is already in flight; retry once it has ended, "
                               f"or with another id", "request_id")
        return rid, text

    async def tokenize(self, text: str, chat: bool) -> list[int]:
        tok, encoder = self.tokenizer, self.encoder

        def encode() -> list[int]:  # as Tokenizer.encode / encode_chat, with the GIL released
            messages = [{"role": "user", "content": text}]
            return encoder.encode(tok.apply_chat_template(messages) if chat else text)
        try:
            return await self.tokenizers.run(len(text), encode)
        except TokenizerBusy as e:
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)) from None
        except TokenizerError as e:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"the model's chat template refused "
                               f"the prompt: {e}", "apply_chat_template") from None

    def request(self, r: pb.GenerateRequest, rid: str, prompt_ids: list[int]) -> ClusterRequest:
        """The checks that need the tokens (the machines may have changed while tokenizing)."""
        if not self.pools.machines:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, "no machines are registered")
        max_tokens = r.max_tokens or self.cfg.limits.default_max_tokens
        total = len(prompt_ids) + max_tokens
        if not self.router.fits_anywhere(total):
            longest = max(m.max_model_len for m in self.pools.machines.values())
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"prompt of {len(prompt_ids)} tokens + max_tokens {max_tokens} exceeds the "
                               f"context ({longest} tokens) or KV memory of every machine", "max_tokens")
        sampling = mpb.SamplingParams(max_tokens=max_tokens, temperature=r.temperature, top_k=r.top_k,
                                      top_p=r.top_p, stop_token_ids=r.stop_token_ids,
                                      ignore_eos=r.ignore_eos)
        if r.HasField("seed"):
            sampling.seed = r.seed
        stop = set(r.stop_token_ids)
        if not r.ignore_eos and self.tokenizer.eos_token_id is not None:
            stop.add(self.tokenizer.eos_token_id)
        return ClusterRequest(rid, prompt_ids, sampling, frozenset(stop))


def _first_word(message: str) -> str | None:
    """The field an engine validation message opens with ("temperature must be ...")."""
    word = message.split(" ", 1)[0]
    return word if word.isidentifier() else None


class Encoder:
    """Text to token ids, as engine.tokenizer.Tokenizer.encode, but without holding the GIL:
    the tokenizers library's `encode` holds it for the whole encode (0.4 s for 660,000
    characters, during which clsd's event loop stands still however many threads it has), its
    batch calls release it. Loads the same tokenizer.json."""

    def __init__(self, model_dir: str | Path):
        tok = HFTokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
        self._encode_batch = getattr(tok, "encode_batch_fast", tok.encode_batch)  # fast: no offsets

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self._encode_batch([text], add_special_tokens=add_special_tokens)[0].ids


class TokenizerBusy(Exception):
    """`queue` long prompts are waiting for or being tokenized already."""


class TokenizerPool:
    """Threads for tokenizing: one for short texts, `threads` for long ones, of which at most
    `queue` wait or run (a burst of long prompts never delays a short one by more than its own
    lane's work)."""

    def __init__(self, threads: int, queue: int):
        self.threads, self.queue = threads, queue
        self.num_long = 0
        """Long texts waiting for or being tokenized."""
        self._short = ThreadPoolExecutor(1, thread_name_prefix="clsd-tokenize-short")
        self._long = ThreadPoolExecutor(threads, thread_name_prefix="clsd-tokenize")

    async def run(self, num_chars: int, fn, *args):
        """fn(*args) on a tokenizer thread, for a text of `num_chars` characters. Raises
        TokenizerBusy when it is long and `queue` long ones are already there. A caller cancelled
        meanwhile stops waiting, but a long text keeps its place until its thread is done with
        it (a running encode cannot stop)."""
        if num_chars <= SHORT_TEXT_CHARS:
            return await asyncio.wrap_future(self._short.submit(fn, *args))
        if self.num_long >= self.queue:
            raise TokenizerBusy(f"{self.num_long} long prompts are waiting to be tokenized "
                                f"(limits.tokenizer_queue {self.queue}); retry later")
        loop = asyncio.get_running_loop()
        self.num_long += 1
        future = self._long.submit(fn, *args)

        def finished(_) -> None:
            try:
                loop.call_soon_threadsafe(self._finished)
            except RuntimeError:  # the loop has closed: nobody counts any more
                pass
        future.add_done_callback(finished)
        return await asyncio.wrap_future(future)

    def _finished(self) -> None:
        self.num_long -= 1

    def close(self) -> None:
        for pool in (self._short, self._long):
            pool.shutdown(wait=False, cancel_futures=True)


def inflight_bound(pools: Pools, limits: LimitsSection) -> tuple[int, str]:
    """The bound on requests in flight now, and how it came about (for the refusal message)."""
    machines = [m for m in pools.machines.values() if not m.draining]
    slots = sum(min(limits.requests_per_machine, m.kv_blocks_total) for m in machines)
    derived = math.floor(limits.inflight_factor * slots)
    if derived >= limits.max_inflight_requests:
        return limits.max_inflight_requests, f"limits.max_inflight_requests {limits.max_inflight_requests}"
    return max(1, derived), (f"{limits.inflight_factor:g} x {slots} request slots of the "
                             f"{len(machines)} machines taking work")


def prompt_char_limit(pools: Pools, limits: LimitsSection, chars_per_token: int | None) -> int | None:
    """The most characters a text prompt may have, or None when nothing bounds it: the
    configured `max_prompt_chars`, else the longest context x `chars_per_token`."""
    if limits.max_prompt_chars is not None:
        return limits.max_prompt_chars
    if chars_per_token is None or not pools.machines:
        return None
    return max(m.max_model_len for m in pools.machines.values()) * chars_per_token


def max_chars_per_token(model_dir: str | Path) -> int | None:
    """The most characters of text one token can stand for, read from the model's tokenizer.json:
    the longest vocabulary entry (for byte-level BPE its length in bytes, which is at least its
    length in characters), times NORMALIZE_FACTOR when the normalizer composes characters.
    None when the tokenizer can fold an unbounded run of characters into one token (a word-level
    model's unknown word, a pre-tokenizer or normalizer that drops characters): then only
    `limits.max_prompt_chars` bounds a prompt."""
    try:
        data = json.loads((Path(model_dir) / "tokenizer.json").read_text())
    except (OSError, ValueError):
        return None
    model = data.get("model") or {}
    factor = _normalizer_factor(data.get("normalizer"))
    byte_level = _keeps_every_char(data.get("pre_tokenizer"))
    if model.get("type") != "BPE" or factor is None or byte_level is None:
        return None
    # Every character must become tokens: through the byte alphabet, byte fallback, or one
    # unknown token per character.
    one_unknown_per_char = model.get("unk_token") and not model.get("fuse_unk")
    if not (byte_level or model.get("byte_fallback") or one_unknown_per_char):
        return None
    vocab = model.get("vocab") or {}
    pieces = [*vocab, *(t.get("content", "") for t in data.get("added_tokens") or [])]
    return max(map(len, pieces), default=1) * factor


def _normalizer_factor(node) -> int | None:
    """1 when the normalizer never makes text shorter, NORMALIZE_FACTOR when it composes
    characters, None when it may drop characters (or is unknown)."""
    if node is None:
        return 1
    kind = node.get("type")
    if kind == "Sequence":
        factors = [_normalizer_factor(n) for n in node.get("normalizers") or []]
        return None if None in factors else max(factors, default=1)
    if kind in ("NFC", "NFKC"):
        return NORMALIZE_FACTOR
    if kind in ("Prepend", "NFD", "NFKD", "Lowercase"):
        return 1
    if kind == "Replace":  # SentencePiece's " " -> "\u2581"
        pattern = (node.get("pattern") or {}).get("String")
        content = node.get("content") or ""
        return 1 if pattern is not None and len(content) >= len(pattern) else None
    return None


def _keeps_every_char(node) -> bool | None:
    """Whether the pre-tokenizer keeps every character: True when it maps them to the byte
    alphabet (ByteLevel), False when it keeps them as they are, None when it may drop some."""
    if node is None:
        return False
    kind = node.get("type")
    if kind == "Sequence":
        parts = [_keeps_every_char(n) for n in node.get("pretokenizers") or []]
        return None if None in parts else any(parts)
    if kind == "ByteLevel":
        return True
    if kind in ("Metaspace", "Digits"):
        return False
    if kind in ("Split", "Punctuation"):
        return None if node.get("behavior") == "Removed" else False
    return None
