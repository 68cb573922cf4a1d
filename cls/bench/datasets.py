"""Benchmark requests: lengths from a dataset, prompts of real text to exactly those lengths.

Datasets (lengths only; the Azure traces carry no text):
- `azure-conv` / `azure-code`: (ContextTokens, GeneratedTokens) pairs of an Azure LLM inference
  trace (read where it lies, ../shared/traces/ by default), sampled with replacement (seeded),
  each length multiplied by `length_scale` and rounded (at least 1 token).
- `random`: uniform lengths in [len * (1 - range_ratio), len * (1 + range_ratio)], as vLLM's
  random dataset draws them.

`PromptMaker` writes a prompt of exactly N tokens of the given tokenizer (without special tokens)
from the English passage below: it keeps the passage's words that are one token each after a
space, and its punctuation, so concatenating them cannot merge across words (the byte-level
pre-tokenizer splits before every space-led word and every punctuation run). The count is
checked by encoding the result; a mismatch raises.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

from cls.sim.traces import TraceError, load_azure_trace

TRACE_ROOT = Path(__file__).resolve().parents[2].parent / "shared" / "traces"
AZURE_TRACES = {"azure-conv": "AzureLLMInferenceTrace_conv.csv",
                "azure-code": "AzureLLMInferenceTrace_code.csv"}
DATASETS = (*AZURE_TRACES, "random")

# Written for this project; any English prose would do. The words are what the prompts are made of.
PASSAGE = """
The harbour town woke slowly on the morning of the fair. Fishermen pulled their boats up onto the
grey sand, and the smell of bread drifted down from the bakery on the hill. Children ran between
the stalls, asking the price of every toy, while their parents talked about the weather, the
catch, and the new road that would one day reach the valley. An old keeper climbed the steps of
the lighthouse, as he had done for forty years, and wound the great lamp by hand. From the top he
could see the whole coast: the river where it met the sea, the dark line of the forest, the church
with its broken clock, and the small white houses that seemed to lean against the wind. He wrote a
few lines in his book, as he did every day, about the tide, the clouds, and the ships that passed.
In the afternoon a storm came in from the west. The sky turned the colour of iron, and the first
heavy drops of rain fell on the canvas roofs. People laughed and ran for cover, carrying baskets
of apples and jars of honey under their coats. The music stopped for a moment, then started again
inside the hall, where the floor shook with dancing until long after dark. When the rain had
passed, the air was clean and cold, and the stars came out over the water. The keeper lit the
lamp, watched its beam sweep across the waves, and thought that it had been a good day after all.
Some of the visitors stayed the night at the inn by the bridge, sharing stories of other towns and
other fairs, of roads that flooded and markets that burned, of friends who had gone away to the
city and never written home. The innkeeper listened, filled their cups, and said very little.
"""


class DatasetError(ValueError):
    """A dataset that cannot be built; the message names the file or the setting."""


@dataclass(frozen=True)
class BenchRequest:
    prompt: str
    prompt_len: int   # tokens of `prompt` under the benchmark's tokenizer
    output_len: int   # max_tokens sent with it


class PromptMaker:
    """Prompts of exactly `num_tokens` tokens of real text; `offset` picks where in the passage
    they start, so prompts differ."""

    def __init__(self, tokenizer, passage: str = PASSAGE):
        self._tok = tokenizer
        units: list[str] = []
        for piece in re.findall(r"[A-Za-z]+|[.,:;]", passage):
            unit = piece if not piece.isalpha() else " " + piece
            if not piece.isalpha() and (not units or not units[-1][-1].isalpha()):
                continue  # two punctuation marks in a row would merge into one token
            if len(tokenizer.encode(unit)) == 1:
                units.append(unit)
        if units and not units[-1][-1].isalpha():
            units.pop()  # the cycle wraps from the last unit to the first: keep a word between
        words = [u for u in units if u[-1].isalpha()]
        if len(words) < 10:
            raise DatasetError("the tokenizer keeps too few of the passage's words as single tokens")
        self._units = units

    @property
    def num_units(self) -> int:
        return len(self._units)

    def make(self, num_tokens: int, offset: int = 0) -> str:
        if num_tokens < 1:
            raise DatasetError(f"a prompt needs at least 1 token, got {num_tokens}")
        n = len(self._units)
        start = offset % n
        while not self._units[start][-1].isalpha():  # begin with a word, not a comma
            start = (start + 1) % n
        text = "".join(self._units[(start + i) % n] for i in range(num_tokens))
        got = len(self._tok.encode(text))
        if got != num_tokens:
            raise DatasetError(f"prompt of {num_tokens} tokens came out as {got} tokens")
        return text


def azure_lengths(name: str, num_prompts: int, seed: int, length_scale: float = 1.0,
                  path: str | Path | None = None) -> list[tuple[int, int]]:
    """`num_prompts` (prompt_len, output_len) pairs sampled with replacement from an Azure trace,
    each scaled by `length_scale` (rounded, at least 1)."""
    if name not in AZURE_TRACES:
        raise DatasetError(f"unknown Azure dataset {name!r}; choose from {', '.join(AZURE_TRACES)}")
    path = Path(path) if path is not None else TRACE_ROOT / AZURE_TRACES[name]
    try:
        rows = load_azure_trace(path)
    except TraceError as e:
        raise DatasetError(str(e)) from None
    rng = random.Random(seed)
    picked = rng.choices(rows, k=num_prompts)
    return [(scale_len(a.prompt_len, length_scale), scale_len(a.output_len, length_scale))
            for a in picked]


def random_lengths(num_prompts: int, input_len: int, output_len: int, range_ratio: float,
                   seed: int) -> list[tuple[int, int]]:
    """Uniform integer lengths around `input_len` / `output_len` (+- range_ratio of them)."""
    if input_len < 1 or output_len < 1:
        raise DatasetError(f"random lengths must be >= 1, got input {input_len}, output {output_len}")
    if not 0 <= range_ratio < 1:
        raise DatasetError(f"random range ratio must be in [0, 1), got {range_ratio}")
    rng = random.Random(seed)

    def draw(length: int) -> int:
        low = max(1, int(length * (1 - range_ratio)))
        return rng.randint(low, max(low, int(length * (1 + range_ratio))))

    return [(draw(input_len), draw(output_len)) for _ in range(num_prompts)]


def scale_len(length: int, scale: float) -> int:
    return max(1, round(length * scale))


def build_requests(lengths: list[tuple[int, int]], maker: PromptMaker, seed: int) -> list[BenchRequest]:
    """One request per (prompt_len, output_len), each prompt starting at a seeded place."""
    rng = random.Random(seed)
    return [BenchRequest(maker.make(p, rng.randrange(maker.num_units)), p, o) for p, o in lengths]
