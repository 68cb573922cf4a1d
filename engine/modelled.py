"""Modelled step latency: how long a prefill or decode step takes, without running a model.

The engine's `modelled` backend, the cluster simulator and (later) SLO-aware routing ask one
question: how long does this batch take on this machine? Two answers share one interface,
`LatencyModel` (`prefill_s`, `decode_s`, `mixed_s`); both are deterministic and import no torch
(`cls` imports this module, and the CLS host has no torch).

1. `ProfileLatencyModel`: measured batch latencies (Splitwise's profile CSV is one accepted format),
   linear interpolation over the batch's tokens, as Splitwise's simulator does.
2. `RooflineLatencyModel`: a roofline from the model shape and the hardware's published peaks.

Plus KV sizing (`kv_bytes_per_token`, `kv_capacity_tokens`) and KV transfer time (`kv_transfer_s`).
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
import json
import math
import numbers
import statistics
from abc import ABC, abstractmethod
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "models" / "SmolLM2-135M-Instruct" / "config.json"
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
        _check_count("batch_size", batch_size, 1)
        _check_count("batch_tokens", batch_tokens, batch_size)
        return self._prefill_s(batch_tokens, batch_size)

    def decode_s(self, batch_size: int, context_tokens: int | None = None) -> float:
        """One decode step: one token for each of `batch_size` requests, which attend to
        `context_tokens` cached tokens in all (default DEFAULT_CONTEXT_TOKENS_PER_REQUEST each)."""
        _check_count("batch_size", batch_size, 1)
        if context_tokens is None:
            context_tokens = batch_size * DEFAULT_CONTEXT_TOKENS_PER_REQUEST
        _check_count("context_tokens", context_tokens, 0)
        return self._decode_s(batch_size, context_tokens)

    def mixed_s(self, prefill_tokens: int, num_prefills: int, num_decodes: int,
                decode_context_tokens: int | None = None) -> float:
        """One step that prefills `num_prefills` prompts (`prefill_tokens` in all) and decodes
        `num_decodes` requests (colocated or chunked-prefill batching)."""
        _check_count("num_prefills", num_prefills, 0)
        _check_count("num_decodes", num_decodes, 0)
        _check_count("prefill_tokens", prefill_tokens, num_prefills)
        if num_decodes == 0:
            return self.prefill_s(prefill_tokens, num_prefills)
        if num_prefills == 0:
            return self.decode_s(num_decodes, decode_context_tokens)
        if decode_context_tokens is None:
            decode_context_tokens = num_decodes * DEFAULT_CONTEXT_TOKENS_PER_REQUEST
        _check_count("decode_context_tokens", decode_context_tokens, 0)
        return self._mixed_s(prefill_tokens, num_prefills, num_decodes, decode_context_tokens)

    @abstractmethod
    def _prefill_s(self, batch_tokens: int, batch_size: int) -> float: ...

    @abstractmethod
    def _decode_s(self, batch_size: int, context_tokens: int) -> float: ...

    @abstractmethod
    def _mixed_s(self, prefill_tokens: int, num_prefills: int, num_decodes: int,
                 decode_context_tokens: int) -> float: ...


def _check_count(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


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


# --- model shapes and hardware -------------------------------------------------------------------

@dataclass(frozen=True)
class ModelShape:
    """What the latency and memory of a dense decoder-only transformer depend on. Parameter
    counts cover the weight matrices; norms and biases (< 0.1%) are left out."""
    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool = False
    gated_mlp: bool = True  # gate, up and down projections (SwiGLU); False: up and down (GELU)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def layer_params(self) -> int:
        """Parameters of all decoder layers: q, k, v, o projections and the MLP."""
        h = self.hidden_size
        attention = 2 * h * self.q_size + 2 * h * self.kv_size
        mlp = (3 if self.gated_mlp else 2) * h * self.intermediate_size
        return self.num_layers * (attention + mlp)

    @property
    def lm_head_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def num_params(self) -> int:
        embeddings = self.lm_head_params * (1 if self.tie_word_embeddings else 2)
        return self.layer_params + embeddings

    def weight_bytes(self, dtype_bytes: int = 2) -> int:
        return self.num_params * dtype_bytes

    @classmethod
    def from_config_json(cls, path: str | Path, name: str | None = None) -> ModelShape:
        """Reads a Hugging Face config.json (or the folder holding one): Llama-style keys and
        BLOOM/GPT-2-style ones (n_layer, n_head, n_embed). Mixture-of-experts is not modelled."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            raw = json.loads(path.read_text())
        except OSError as e:
            raise ValueError(f"cannot read model config {path}: {e.strerror}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"model config {path} is not JSON: {e}") from None

        def get(*keys, default=None):
            for key in keys:
                if raw.get(key) is not None:
                    return raw[key]
            if default is None:
                raise ValueError(f"model config {path} lacks {' / '.join(keys)}")
            return default

        if (raw.get("num_local_experts") or raw.get("num_experts") or 1) > 1:
            raise ValueError(f"model config {path}: mixture-of-experts models are not modelled")
        model_type = str(raw.get("model_type", ""))
        hidden = int(get("hidden_size", "n_embed", "n_embd", "d_model"))
        heads = int(get("num_attention_heads", "n_head", "num_heads"))
        return cls(
            name=name or path.parent.name,
            num_layers=int(get("num_hidden_layers", "n_layer", "num_layers")),
            hidden_size=hidden,
            num_heads=heads,
            num_kv_heads=int(get("num_key_value_heads", "num_kv_heads", default=heads)),
            head_dim=int(get("head_dim", default=hidden // heads)),
            intermediate_size=int(get("intermediate_size", "n_inner", "ffn_dim", default=4 * hidden)),
            vocab_size=int(get("vocab_size")),
            # transformers' default is tied, except in these families' config classes
            tie_word_embeddings=bool(raw.get("tie_word_embeddings",
                                             model_type not in {"llama", "mistral", "qwen2"})),
            gated_mlp=model_type not in _PLAIN_MLP_MODEL_TYPES,
        )


_PLAIN_MLP_MODEL_TYPES = {"bloom", "gpt2", "gpt_neox", "gptj", "gpt_bigcode", "opt", "falcon",
                          "mpt", "phi"}

# The profile's models, from their Hugging Face config.json (meta-llama/Llama-2-70b-hf,
# bigscience/bloom), and the demo model (used when its folder is absent).
MODEL_SHAPES = {
    "llama2-70b": ModelShape("llama2-70b", num_layers=80, hidden_size=8192, num_heads=64,
                             num_kv_heads=8, head_dim=128, intermediate_size=28672,
                             vocab_size=32000),
    "bloom-176b": ModelShape("bloom-176b", num_layers=70, hidden_size=14336, num_heads=112,
                             num_kv_heads=112, head_dim=128, intermediate_size=4 * 14336,
                             vocab_size=250880, tie_word_embeddings=True, gated_mlp=False),
    "smollm2-135m": ModelShape("smollm2-135m", num_layers=30, hidden_size=576, num_heads=9,
                               num_kv_heads=3, head_dim=64, intermediate_size=1536,
                               vocab_size=49152, tie_word_embeddings=True),
}


def get_shape(name_or_path: str | Path) -> ModelShape:
    """A preset of MODEL_SHAPES by name (the demo model read from its config.json when present),
    or the shape in a config.json / model folder."""
    if name_or_path == "smollm2-135m" and DEMO_CONFIG.is_file():
        return ModelShape.from_config_json(DEMO_CONFIG, name="smollm2-135m")
    if name_or_path in MODEL_SHAPES:
        return MODEL_SHAPES[name_or_path]
    if Path(name_or_path).exists():
        return ModelShape.from_config_json(name_or_path)
    raise ValueError(f"unknown model {name_or_path!r}: not a preset ({', '.join(MODEL_SHAPES)}) "
                     "and not a config.json or model folder")


@dataclass(frozen=True)
class Hardware:
    """One GPU's published peaks."""
    peak_flops_bf16: float  # dense (no sparsity) bf16 tensor-core FLOP/s
    mem_bw_bytes_s: float   # HBM bandwidth
    mem_bytes: float        # HBM capacity


HARDWARE = {
    # NVIDIA A100 datasheet, SXM4 80GB: 312 TFLOP/s bf16 dense, 2,039 GB/s HBM2e, 80 GB.
    "a100-80gb": Hardware(peak_flops_bf16=312e12, mem_bw_bytes_s=2.039e12, mem_bytes=80e9),
    # NVIDIA H100 datasheet, SXM5: 1,979 TFLOP/s bf16 "with sparsity" = 989 dense, 3.35 TB/s
    # HBM3, 80 GB.
    "h100-80gb": Hardware(peak_flops_bf16=989e12, mem_bw_bytes_s=3.35e12, mem_bytes=80e9),
    # Splitwise's power-capped H100: its profile rows take prompt time x 1.3, token time as is;
    # here the compute peak / 1.3.
    "h100-80gb-pcap": Hardware(peak_flops_bf16=989e12 / 1.3, mem_bw_bytes_s=3.35e12, mem_bytes=80e9),
}

# KV links, bytes/s per GPU in one direction.
LINKS = {
    "infiniband-200g": 200e9 / 8,  # DGX-A100: one 200 Gb/s HDR NIC per GPU (Splitwise's A100s)
    "infiniband-400g": 400e9 / 8,  # DGX-H100: one 400 Gb/s NDR NIC per GPU (Splitwise's H100s)
    "nvlink3": 300e9,              # A100 NVLink: 600 GB/s per GPU, both directions together
    "nvlink4": 450e9,              # H100 NVLink: 900 GB/s per GPU, both directions together
    "tcp-loopback": 3.8e9,         # this project's tcp transport, two processes on one host:
                                   # 3.65-3.98 GB/s measured (docs/BENCHMARKS.md)
}


def _hardware(hardware: Hardware | str) -> Hardware:
    if isinstance(hardware, Hardware):
        return hardware
    if hardware not in HARDWARE:
        raise ValueError(f"unknown hardware {hardware!r}; known: {', '.join(HARDWARE)}")
    return HARDWARE[hardware]


# --- KV size and transfer ------------------------------------------------------------------------

def kv_bytes_per_token(shape: ModelShape, dtype_bytes: int = 2) -> int:
    """Bytes of K and V one token occupies across all layers (the whole model, all GPUs)."""
    return 2 * shape.num_layers * shape.kv_size * dtype_bytes


def _kv_bytes_per_token_per_gpu(shape: ModelShape, tensor_parallel: int, dtype_bytes: int) -> int:
    heads_per_gpu = -(-shape.num_kv_heads // tensor_parallel)  # replicated when tp > kv heads
    return 2 * shape.num_layers * heads_per_gpu * shape.head_dim * dtype_bytes


def kv_capacity_tokens(shape: ModelShape, hardware: Hardware | str, tensor_parallel: int = 1,
                       weight_dtype_bytes: int = 2, memory_fraction: float = 0.9,
                       kv_dtype_bytes: int = 2) -> int:
    """Tokens of KV that fit beside the weights in memory_fraction of the GPUs' memory
    (activation headroom not subtracted)."""
    _check_count("tensor_parallel", tensor_parallel, 1)
    if not 0 < memory_fraction <= 1:
        raise ValueError(f"memory_fraction must be in (0, 1], got {memory_fraction!r}")
    hw = _hardware(hardware)
    free_per_gpu = (hw.mem_bytes * memory_fraction
                    - shape.weight_bytes(weight_dtype_bytes) / tensor_parallel)
    if free_per_gpu <= 0:
        raise ValueError(f"{shape.name}'s weights ({shape.weight_bytes(weight_dtype_bytes) / 1e9:.1f}"
                         f" GB) do not fit in {tensor_parallel} x {hardware} at memory_fraction "
                         f"{memory_fraction}")
    return int(free_per_gpu // _kv_bytes_per_token_per_gpu(shape, tensor_parallel, kv_dtype_bytes))


def kv_transfer_s(num_tokens: int, shape: ModelShape, link_bytes_s: float, layerwise: bool,
                  prefill_s: float, tensor_parallel: int = 1, dtype_bytes: int = 2) -> float:
    """Seconds the KV of `num_tokens` prompt tokens keeps arriving after the prefill ends (the
    transfer time not hidden behind the prefill), over a link of `link_bytes_s` per GPU."""
    _check_count("num_tokens", num_tokens, 0)
    _check_count("tensor_parallel", tensor_parallel, 1)
    if not link_bytes_s > 0 or not prefill_s >= 0:
        raise ValueError(f"link_bytes_s must be > 0 and prefill_s >= 0, got {link_bytes_s!r}, "
                         f"{prefill_s!r}")
    all_s = num_tokens * _kv_bytes_per_token_per_gpu(shape, tensor_parallel, dtype_bytes) / link_bytes_s
    if not layerwise:
        return all_s
    n = shape.num_layers
    return max(all_s / n, all_s - prefill_s * (n - 1) / n)


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
        _check_count("tensor_parallel", tensor_parallel, 1)
        for name, eff in (("compute_efficiency", compute_efficiency),
                          ("memory_efficiency", memory_efficiency)):
            if not 0 < eff <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {eff!r}")
        if not step_overhead_s >= 0:
            raise ValueError(f"step_overhead_s must be >= 0, got {step_overhead_s!r}")
        self.shape = shape if isinstance(shape, ModelShape) else get_shape(shape)
        self.hardware = _hardware(hardware)
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
