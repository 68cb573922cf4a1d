"""Modelled step latency: how long a prefill or decode step takes, without running a model.

The engine's `modelled` backend, the cluster simulator and (later) SLO-aware routing ask one
question: how long does this batch take on this machine? Two answers share one interface,
`LatencyModel` (`prefill_s`, `decode_s`, `mixed_s`); both are deterministic and import no torch
(`cls` imports this module, and the CLS host has no torch).

1. `ProfileLatencyModel`: measured batch latencies (Splitwise's profile CSV is one accepted format),
   linear interpolation over the batch's tokens, as Splitwise's simulator does.
2. `RooflineLatencyModel`: a roofline from the model shape and the hardware's published peaks.

Plus, from engine/machine_shapes.py (re-exported here), model shapes, hardware, links, KV sizing
(`kv_bytes_per_token`, `kv_capacity_tokens`) and KV transfer time (`kv_transfer_s`).
Units: seconds (`*_s`), bytes, FLOP, tokens, bytes/s. The profile CSV holds milliseconds.

Profile. One point per (prompt_size p, batch_size b) configuration of the CSV; its value is the
median of that configuration's rows (repeats; decode runs of different lengths). Its x is the
batch's tokens p * b: for prefill the tokens prefilled, for decode the context (KV) tokens the
batch attends to. A query (x, b) is answered in two steps: at each profiled x, the value for b is
linear in b between the batch sizes profiled at that x (the nearest one outside them); across x it
is linear between the neighbouring profiled x's, the smallest x's value below it (launch overheads
dominate there), and beyond the largest x the last segment's line, never below the last value (so
never negative). A profiled (p * b, b) thus returns its median exactly. Splitwise's simulator
queries its decode curve at the number of decode requests; here decode is queried at the batch's
context tokens, the axis the profile was measured on (`decode_axis="context"`, the default).
`decode_axis="requests"` queries it at the number of decode requests instead, as Splitwise's
simulator does: a decode step then costs about the same at any batch size up to the smallest
profiled x (128 requests on Splitwise's profile), which is what its published results assume.

Roofline. Step time = max(FLOP / (tp * peak_flops * compute_efficiency),
bytes / (tp * mem_bw * memory_efficiency)) + step_overhead_s, where for
  prefill of T tokens in b prompts (n = T / b tokens each):
    FLOP  = 2 * P * T + 2 * V * h * b + 2 * L * H * d * n^2 * b      (causal attention)
    bytes = W + T * kv_bytes_per_token                                 (weights read, KV written)
  decode of b requests attending to C cached tokens in all:
    FLOP  = 2 * (P + V * h) * b + 4 * L * H * d * C
    bytes = W + (C + b) * kv_bytes_per_token
P: decoder-layer weights (parameters); V * h: the LM head, applied to one token per sequence;
W: bytes of the weights read once per step (layers + LM head; the input embedding is gathered,
not streamed); L layers, H query heads of size d. Not modelled: activations, tensor-parallel
all-reduces, kernel launches, scheduling. So it is a lower bound; the efficiencies and
step_overhead_s calibrate it against a profile.

KV. kv_bytes_per_token = 2 (K and V) * L * kv_heads * d * dtype_bytes. With tensor parallelism
each GPU holds ceil(kv_heads / tp) heads (heads are replicated when tp > kv_heads) and sends its
own shard over its own link. Transfer of N tokens, s_all = N * per-GPU bytes per token / link:
  serialized: s_all, all of it after the prefill ends;
  layer-wise: layer i is ready at (i + 1) * prefill_s / L and layers cross the link in order, so
    what outlasts the prefill is max(s_all / L, s_all - prefill_s * (L - 1) / L): the last
    layer alone while the link keeps up, the backlog when it is slower than the prefill.
"""

from __future__ import annotations

import bisect
import csv
import math
import statistics
from abc import ABC, abstractmethod
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

# Model shapes, hardware, links and KV sizing live in engine/machine_shapes.py; they are part of
# this module's interface too (the simulator and configs name them from here).
from engine.machine_shapes import (  # noqa: F401
    HARDWARE,
    LINKS,
    MODEL_SHAPES,
    Hardware,
    ModelShape,
    check_count,
    get_hardware,
    get_shape,
    kv_bytes_per_token,
    kv_capacity_tokens,
    kv_transfer_s,
)

PROFILE_COLUMNS = ("model", "hardware", "tensor_parallel", "prompt_size", "batch_size",
                   "prompt_time", "token_time")
# decode_s's context when none is given: the prompt length of the profile's batch-size sweep, so
# decode_s(b) on Splitwise's profile returns its (512, b) rows.
DEFAULT_CONTEXT_TOKENS_PER_REQUEST = 512
# Splitwise's simulator times a batch mixing prompts and decodes as a prefill of all its tokens
# plus 10%.
MIXED_BATCH_FACTOR = 1.1
DECODE_AXES = ("context", "requests")


class ProfileError(ValueError):
    """A profile CSV that cannot be read or has no rows for the requested machine."""


# --- the interface -------------------------------------------------------------------------------

class LatencyModel(ABC):
    """Step latency of one machine (one model instance, all its GPUs). Deterministic; seconds."""

    def prefill_s(self, batch_tokens: int, batch_size: int = 1) -> float:
        """One prefill step over `batch_size` whole prompts of `batch_tokens` tokens in all."""
        check_count("batch_size", batch_size, 1)
        check_count("batch_tokens", batch_tokens, batch_size)
        return self._prefill_s(batch_tokens, batch_size)

    def decode_s(self, batch_size: int, context_tokens: int | None = None) -> float:
        """One decode step: one token for each of `batch_size` requests, which attend to
        `context_tokens` cached tokens in all (default DEFAULT_CONTEXT_TOKENS_PER_REQUEST each)."""
        check_count("batch_size", batch_size, 1)
        if context_tokens is None:
            context_tokens = batch_size * DEFAULT_CONTEXT_TOKENS_PER_REQUEST
        check_count("context_tokens", context_tokens, 0)
        return self._decode_s(batch_size, context_tokens)

    def mixed_s(self, prefill_tokens: int, num_prefills: int, num_decodes: int,
                decode_context_tokens: int | None = None) -> float:
        """One step that prefills `num_prefills` prompts (`prefill_tokens` in all) and decodes
        `num_decodes` requests (colocated or chunked-prefill batching)."""
        check_count("num_prefills", num_prefills, 0)
        check_count("num_decodes", num_decodes, 0)
        check_count("prefill_tokens", prefill_tokens, num_prefills)
        if num_decodes == 0:
            return self.prefill_s(prefill_tokens, num_prefills)
        if num_prefills == 0:
            return self.decode_s(num_decodes, decode_context_tokens)
        if decode_context_tokens is None:
            decode_context_tokens = num_decodes * DEFAULT_CONTEXT_TOKENS_PER_REQUEST
        check_count("decode_context_tokens", decode_context_tokens, 0)
        return self._mixed_s(prefill_tokens, num_prefills, num_decodes, decode_context_tokens)

    @abstractmethod
    def _prefill_s(self, batch_tokens: int, batch_size: int) -> float: ...

    @abstractmethod
    def _decode_s(self, batch_size: int, context_tokens: int) -> float: ...

    @abstractmethod
    def _mixed_s(self, prefill_tokens: int, num_prefills: int, num_decodes: int,
                 decode_context_tokens: int) -> float: ...


# --- the profile ---------------------------------------------------------------------------------

def _lerp(x0: float, y0: float, x1: float, y1: float, x: float) -> float:
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


class _Curve:
    """Seconds as a function of (x tokens, batch size) from points {(x, batch_size): seconds}."""

    def __init__(self, points: dict[tuple[int, int], float]):
        by_x: dict[int, dict[int, float]] = defaultdict(dict)
        for (x, b), y in points.items():
            by_x[x][b] = y
        self.xs = sorted(by_x)
        self.batch_sizes = [sorted(by_x[x]) for x in self.xs]
        self.values = [[by_x[x][b] for b in bs] for x, bs in zip(self.xs, self.batch_sizes)]

    def _at_knot(self, i: int, b: int) -> float:
        bs, ys = self.batch_sizes[i], self.values[i]
        if b <= bs[0]:
            return ys[0]
        if b >= bs[-1]:
            return ys[-1]
        j = bisect.bisect_left(bs, b)
        return ys[j] if bs[j] == b else _lerp(bs[j - 1], ys[j - 1], bs[j], ys[j], b)

    def __call__(self, x: int, b: int) -> float:
        xs = self.xs
        if x <= xs[0]:
            return self._at_knot(0, b)
        if x >= xs[-1]:
            y0, y1 = self._at_knot(len(xs) - 2, b), self._at_knot(len(xs) - 1, b)
            slope = max(0.0, (y1 - y0) / (xs[-1] - xs[-2]))
            return y1 + slope * (x - xs[-1])
        j = bisect.bisect_left(xs, x)
        if xs[j] == x:
            return self._at_knot(j, b)
        return _lerp(xs[j - 1], self._at_knot(j - 1, b), xs[j], self._at_knot(j, b), x)


class ProfileLatencyModel(LatencyModel):
    """Latency interpolated from profiled batches (see the module docstring for the rule)."""

    def __init__(self, prefill_points: dict[tuple[int, int], float],
                 decode_points: dict[tuple[int, int], float], source: str = "",
                 decode_axis: str = "context"):
        """Points map (batch tokens, batch size) to seconds; decode's batch tokens are the
        batch's context tokens. At least two distinct batch-token counts each. `decode_axis`:
        "context" or "requests" (see the module docstring)."""
        if decode_axis not in DECODE_AXES:
            raise ProfileError(f"decode_axis must be one of {', '.join(DECODE_AXES)}, got {decode_axis!r}")
        self.decode_axis = decode_axis
        for phase, points in (("prefill", prefill_points), ("decode", decode_points)):
            if len({x for x, _ in points}) < 2:
                raise ProfileError(f"{source or 'profile'}: {phase} needs points at two or more "
                                   f"batch-token counts to interpolate, got {sorted(points)}")
        self.source = source
        self._prefill = _Curve(prefill_points)
        self._decode = _Curve(decode_points)

    @classmethod
    def from_csv(cls, path: str | Path, *, model: str, hardware: str,
                 tensor_parallel: int, decode_axis: str = "context") -> ProfileLatencyModel:
        """Reads the rows of one (model, hardware, tensor_parallel) from a Splitwise-format CSV
        (PROFILE_COLUMNS; times in ms; other columns ignored)."""
        path = Path(path)
        try:
            f = open(path, newline="")
        except OSError as e:
            raise ProfileError(f"cannot read profile {path}: {e.strerror}") from None
        prompt_ms: dict[tuple[int, int], list[float]] = defaultdict(list)
        token_ms: dict[tuple[int, int], list[float]] = defaultdict(list)
        groups: set[tuple[str, str, str]] = set()
        with f:
            reader = csv.DictReader(f)
            missing = [c for c in PROFILE_COLUMNS if c not in (reader.fieldnames or ())]
            if missing:
                raise ProfileError(f"profile {path} lacks column(s) {', '.join(missing)}; "
                                   f"it has: {', '.join(reader.fieldnames or ()) or 'no header'}")
            for line, row in enumerate(reader, start=2):
                key = (row["model"], row["hardware"], row["tensor_parallel"])
                groups.add(key)
                try:
                    if (key[0], key[1]) != (model, hardware) or int(key[2]) != tensor_parallel:
                        continue
                    prompt_size, batch_size = int(row["prompt_size"]), int(row["batch_size"])
                    p_ms, t_ms = float(row["prompt_time"]), float(row["token_time"])
                except (TypeError, ValueError):
                    raise ProfileError(f"profile {path} line {line}: a number is missing or "
                                       f"malformed in {dict(row)}") from None
                if min(prompt_size, batch_size) < 1 or not (
                        math.isfinite(p_ms) and math.isfinite(t_ms) and p_ms >= 0 and t_ms >= 0):
                    raise ProfileError(f"profile {path} line {line}: sizes must be >= 1 and "
                                       f"times finite and >= 0, got {dict(row)}")
                config = (prompt_size * batch_size, batch_size)
                prompt_ms[config].append(p_ms)
                token_ms[config].append(t_ms)
        if not prompt_ms:
            have = ", ".join(f"{m}/{h}/tp{t}" for m, h, t in sorted(groups)) or "no rows"
            raise ProfileError(f"profile {path} has no rows for model={model!r}, "
                               f"hardware={hardware!r}, tensor_parallel={tensor_parallel}; "
                               f"it has: {have}")
        source = f"{path} [{model}, {hardware}, tp{tensor_parallel}]"
        return cls({k: statistics.median(v) / 1000 for k, v in prompt_ms.items()},
                   {k: statistics.median(v) / 1000 for k, v in token_ms.items()}, source, decode_axis)

    def _prefill_s(self, batch_tokens: int, batch_size: int) -> float:
        return self._prefill(batch_tokens, batch_size)

    def _decode_s(self, batch_size: int, context_tokens: int) -> float:
        if self.decode_axis == "requests":
            return self._decode(batch_size, batch_size)
        return self._decode(context_tokens, batch_size)

    def _mixed_s(self, prefill_tokens, num_prefills, num_decodes, decode_context_tokens) -> float:
        return MIXED_BATCH_FACTOR * self._prefill(prefill_tokens + num_decodes, num_prefills)

    def __repr__(self) -> str:
        return f"ProfileLatencyModel({self.source}, decode_axis={self.decode_axis})"


# --- the roofline --------------------------------------------------------------------------------

@dataclass(frozen=True)
class StepCost:
    flops: float
    bytes_moved: float
    compute_s: float  # flops at the (derated) peak of all the machine's GPUs
    memory_s: float   # bytes at the (derated) bandwidth of all the machine's GPUs

    @property
    def bound(self) -> str:
        return "compute" if self.compute_s >= self.memory_s else "memory"


class RooflineLatencyModel(LatencyModel):
    """Step time from FLOP and bytes (see the module docstring for the formulas)."""

    def __init__(self, shape: ModelShape | str, hardware: Hardware | str, tensor_parallel: int = 1,
                 *, compute_efficiency: float = 1.0, memory_efficiency: float = 1.0,
                 step_overhead_s: float = 0.0, weight_dtype_bytes: int = 2, kv_dtype_bytes: int = 2):
        check_count("tensor_parallel", tensor_parallel, 1)
        for name, eff in (("compute_efficiency", compute_efficiency),
                          ("memory_efficiency", memory_efficiency)):
            if not 0 < eff <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {eff!r}")
        if not step_overhead_s >= 0:
            raise ValueError(f"step_overhead_s must be >= 0, got {step_overhead_s!r}")
        self.shape = shape if isinstance(shape, ModelShape) else get_shape(shape)
        self.hardware = get_hardware(hardware)
        self.tensor_parallel = tensor_parallel
        self.step_overhead_s = step_overhead_s
        self.weight_dtype_bytes = weight_dtype_bytes
        self.kv_dtype_bytes = kv_dtype_bytes
        self._flops_s = tensor_parallel * self.hardware.peak_flops_bf16 * compute_efficiency
        self._bytes_s = tensor_parallel * self.hardware.mem_bw_bytes_s * memory_efficiency

    def step_cost(self, prefill_tokens: int = 0, num_prefills: int = 0, num_decodes: int = 0,
                  context_tokens: int = 0) -> StepCost:
        """FLOP and bytes of one step that prefills `num_prefills` prompts of `prefill_tokens` in
        all and decodes `num_decodes` requests attending to `context_tokens` cached tokens."""
        s = self.shape
        flops = 2.0 * s.layer_params * (prefill_tokens + num_decodes)
        flops += 2.0 * s.lm_head_params * (num_prefills + num_decodes)
        if num_prefills:
            n = prefill_tokens / num_prefills
            flops += 2.0 * s.num_layers * s.q_size * n * n * num_prefills
        flops += 4.0 * s.num_layers * s.q_size * context_tokens
        weights = (s.layer_params + s.lm_head_params) * self.weight_dtype_bytes
        kv = kv_bytes_per_token(s, self.kv_dtype_bytes) * (prefill_tokens + context_tokens + num_decodes)
        return StepCost(flops, weights + kv, flops / self._flops_s, (weights + kv) / self._bytes_s)

    def _time(self, cost: StepCost) -> float:
        return max(cost.compute_s, cost.memory_s) + self.step_overhead_s

    def _prefill_s(self, batch_tokens: int, batch_size: int) -> float:
        return self._time(self.step_cost(batch_tokens, batch_size))

    def _decode_s(self, batch_size: int, context_tokens: int) -> float:
        return self._time(self.step_cost(num_decodes=batch_size, context_tokens=context_tokens))

    def _mixed_s(self, prefill_tokens, num_prefills, num_decodes, decode_context_tokens) -> float:
        return self._time(self.step_cost(prefill_tokens, num_prefills, num_decodes,
                                         decode_context_tokens))

    def __repr__(self) -> str:
        return f"RooflineLatencyModel({self.shape.name}, {self.hardware}, tp{self.tensor_parallel})"


def latency_model(profile: str | Path | None, model: str, hardware: str, tensor_parallel: int,
                  decode_axis: str = "context") -> LatencyModel:
    """The configured model of a machine's step time, as mlsd's modelled backend and the
    simulator's designs both configure it: the rows of (model, hardware, tensor_parallel) in a
    Splitwise-format profile CSV, or with no profile the roofline of the model's shape."""
    if profile is None:
        return RooflineLatencyModel(model, hardware, tensor_parallel)
    return ProfileLatencyModel.from_csv(profile, model=model, hardware=hardware,
                                        tensor_parallel=tensor_parallel, decode_axis=decode_axis)
