"""Placements of the `shm` KV transport: where in the token machine's shared-memory segment one
request's layers go (receiver side), their validation and the copy plan (sender side).

A placement is JSON the receiver sends once per transfer, after ACCEPT:
  {"mode": "inline", "reason": str}             the bytes travel over the socket (as tcp)
  {"mode": "shm", "segment": name, "segment_bytes": int, "window_s": float,
   "spans": [[offset, nbytes], ...],            one layer's spans, in wire (prompt) order,
   "layer_offsets": [int] * num_layers}         added to every span for that layer
  or, when the layers are not shifted copies of one pattern, "layers": [[[offset, nbytes], ...]]
  (one list per layer) instead of spans/layer_offsets. Offsets count from the segment's start.
The sender refuses (PlacementError, naming the problem) a placement whose segment name is not a
plain segment name, whose size differs from the file's, whose spans leave the segment, do not add
up to one layer, or overlap: it writes only into the ranges the receiver reserved.
"""

from __future__ import annotations

import ctypes

import numpy as np
import torch

from engine.shared_memory import NAME_RE, find_segment
from mls.kv.base import KVSink, KVSpec
from mls.kv.wire import ProtocolError, buffer_spans

MIN_ROW_RUN = 4  # equal spans copied by one numpy row scatter (one C loop, not a Python loop)


class PlacementError(ProtocolError):
    """A placement the sender must not act on; the message names the field or span."""


def sink_spans(sink: KVSink, spec: KVSpec, layer: int) -> list[tuple[int, int]]:
    """(address, nbytes) of one layer in the sink; `layer_spans` is an optional fast path of the
    sink (no per-block tensor views), else the spans of `layer_buffers`."""
    fast = getattr(sink, "layer_spans", None)
    spans = fast(layer) if fast is not None else buffer_spans(sink.layer_buffers(layer), spec.layer_nbytes)
    if sum(size for _, size in spans) != spec.layer_nbytes:
        raise ValueError(f"sink spans of layer {layer} do not hold {spec.layer_nbytes} bytes")
    return spans


def sink_layout(sink: KVSink, spec: KVSpec) -> tuple[list[tuple[int, int]], list[int]] | list:
    """(layer 0's spans, each layer's address shift from them) when every layer is a shifted copy
    of layer 0, else every layer's spans. A sink's optional `span_pattern()` (EngineSink: one
    block table, a fixed layer stride) answers the first form without listing 30 layers."""
    pattern = getattr(sink, "span_pattern", None)
    if pattern is not None:
        spans0, shifts = pattern()
        if sum(size for _, size in spans0) != spec.layer_nbytes or len(shifts) != spec.num_layers:
            raise ValueError(f"sink span pattern does not describe {spec.num_layers} layers of "
                             f"{spec.layer_nbytes} bytes")
        return spans0, shifts
    layers = [sink_spans(sink, spec, i) for i in range(spec.num_layers)]
    base0, shifts = layers[0][0][0], []
    rel = [(a - base0, s) for a, s in layers[0]]
    for spans in layers:
        base = spans[0][0]
        if [(a - base, s) for a, s in spans] != rel:
            return layers
        shifts.append(base - base0)
    return layers[0], shifts


def make_placement(spec: KVSpec, sink: KVSink, window_s: float) -> dict:
    """The receiver's placement for one transfer (inline when the sink is not in a segment)."""
    layout = sink_layout(sink, spec)
    if isinstance(layout, tuple):
        spans0, shifts = layout
        first = spans0[0]
        lowest = min(a for a, _ in spans0) + min(shifts)
        highest = max(a + s for a, s in spans0) + max(shifts)
    else:
        first = layout[0][0]
        lowest = min(a for sp in layout for a, _ in sp)
        highest = max(a + s for sp in layout for a, s in sp)
    found = find_segment(first[0], first[1])
    if found is None:
        return {"mode": "inline", "reason": "the receiver's KV memory is not in a shared-memory "
                "segment (engine.kv_cache_shared_memory is off, or a device engine)"}
    seg = found[0]
    lo = seg.address
    if lowest < lo or highest > lo + seg.nbytes:
        return {"mode": "inline", "reason": "the sink's spans are not all in one segment"}
    head = {"mode": "shm", "segment": seg.name, "segment_bytes": seg.nbytes, "window_s": window_s}
    if isinstance(layout, tuple):
        return {**head, "spans": [[a - lo, s] for a, s in spans0], "layer_offsets": shifts}
    return {**head, "layers": [[[a - lo, s] for a, s in sp] for sp in layout]}


MAX_OFFSET = 1 << 62


def _int_pairs(value, what: str) -> list[tuple[int, int]]:
    if not isinstance(value, list) or not value:
        raise PlacementError(f"placement {what} must be a non-empty list of [offset, nbytes]")
    out = []
    for item in value:
        if (not isinstance(item, list) or len(item) != 2
                or not all(type(x) is int and -MAX_OFFSET < x < MAX_OFFSET for x in item)):
            raise PlacementError(f"placement {what}: {item!r} is not [offset, nbytes]")
        if item[1] <= 0:
            raise PlacementError(f"placement {what}: span {item!r} has no bytes")
        out.append((item[0], item[1]))
    return out


def check_placement(spec: KVSpec, p: dict, file_bytes: int) -> Layout:
    """Validates an "shm" placement against the mapped file's size (PlacementError otherwise)."""
    name = p.get("segment")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise PlacementError(f"placement segment {name!r} is not a shared-memory segment name")
    if p.get("segment_bytes") != file_bytes:
        raise PlacementError(f"placement says the segment has {p.get('segment_bytes')!r} bytes, "
                             f"the file has {file_bytes}")
    n = spec.num_layers
    if "layers" in p:
        if not isinstance(p["layers"], list) or len(p["layers"]) != n:
            raise PlacementError(f"placement layers must list {n} layers")
        layout = Layout(per_layer=[_int_pairs(sp, f"layer {i}") for i, sp in enumerate(p["layers"])])
    else:
        offs = p.get("layer_offsets")
        if (not isinstance(offs, list) or len(offs) != n
                or not all(type(o) is int and -MAX_OFFSET < o < MAX_OFFSET for o in offs)):
            raise PlacementError(f"placement layer_offsets must be {n} integers")
        layout = Layout(rel=_int_pairs(p.get("spans"), "spans"), offsets=offs)
    for i, spans in enumerate(layout.per_layer or [layout.rel]):
        if (total := sum(s for _, s in spans)) != spec.layer_nbytes:
            raise PlacementError(f"placement spans of layer {i} hold {total} bytes, a layer has "
                                 f"{spec.layer_nbytes}")
    starts, sizes = layout.arrays()
    ends = starts + sizes
    bad = np.flatnonzero((starts < 0) | (ends > file_bytes))
    if bad.size:
        a, e = int(starts[bad[0]]), int(ends[bad[0]])
        raise PlacementError(f"placement span [{a}, {e}) lies outside the segment of {file_bytes} bytes")
    order = np.argsort(starts, kind="stable")
    overlap = np.flatnonzero(starts[order][1:] < ends[order][:-1])
    if overlap.size:
        at = int(starts[order][overlap[0] + 1])
        raise PlacementError(f"placement spans overlap at segment offset {at}")
    return layout


class Layout:
    """Checked spans: shifted copies of one pattern (`rel` + `offsets`) or one list per layer."""

    def __init__(self, rel=None, offsets=None, per_layer=None):
        self.rel, self.offsets, self.per_layer = rel, offsets, per_layer

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """Every span's absolute start and size, as int64 arrays."""
        if self.per_layer is not None:
            flat = [span for spans in self.per_layer for span in spans]
            return (np.array([a for a, _ in flat], dtype=np.int64),
                    np.array([s for _, s in flat], dtype=np.int64))
        rel = np.array(self.rel, dtype=np.int64)
        offs = np.array(self.offsets, dtype=np.int64)
        return ((offs[:, None] + rel[None, :, 0]).ravel(),
                np.broadcast_to(rel[None, :, 1], (len(offs), len(rel))).ravel())


class CopyPlan:
    """Copies layers into checked spans of a mapped segment: runs of equal, aligned spans (an
    engine's blocks) by one numpy row scatter, the rest by memmove (one thread, GIL released:
    steadier than torch's parallel copy beside a busy engine). Built once per transfer;
    `copy(layer, kv)` is one layer."""

    def __init__(self, seg_bytes: torch.Tensor, layout: Layout):
        self._seg = seg_bytes
        self._np = seg_bytes.numpy()
        self._base = seg_bytes.data_ptr()
        if layout.per_layer is not None:
            self._layers = [self._ops(spans) for spans in layout.per_layer]
            return
        # One pattern, shifted per layer: plan it once (a Python loop over 256 blocks costs
        # about as much as copying them), then shift only the row indices.
        pattern = self._ops(layout.rel)
        self._layers = []
        for off in layout.offsets:
            ops = []
            for op in pattern:
                if op[0] == "rows" and off % op[1] == 0:
                    ops.append(("rows", op[1], op[2] + off // op[1], op[3], op[4]))
                elif op[0] == "rows":  # this layer's base is not row-aligned: plain moves
                    ops += [("move", off + int(r) * op[1], op[3] + k * op[1], op[1])
                            for k, r in enumerate(op[2])]
                else:
                    ops.append((op[0], off + op[1], op[2], op[3]))
            self._layers.append(ops)

    def _rows(self, size: int) -> np.ndarray:
        return self._np[: (self._np.size // size) * size].reshape(-1, size)

    def _ops(self, spans: list[tuple[int, int]]) -> list[tuple]:
        ops, src, i = [], 0, 0
        while i < len(spans):
            off, size = spans[i]
            j = i
            while j + 1 < len(spans) and spans[j + 1][1] == size:
                j += 1
            run = spans[i:j + 1]
            if (len(run) >= MIN_ROW_RUN and src % size == 0
                    and all(o % size == 0 for o, _ in run)):
                rows = np.fromiter((o // size for o, _ in run), dtype=np.int64, count=len(run))
                ops.append(("rows", size, rows, src, len(run)))
                src += size * len(run)
                i = j + 1
                continue
            ops.append(("move", off, src, size))
            src += size
            i += 1
        return ops

    def copy(self, layer: int, kv: torch.Tensor) -> None:
        src = kv.view(torch.uint8).reshape(-1)
        src_np, src_ptr = src.numpy(), src.data_ptr()
        for op in self._layers[layer]:
            if op[0] == "rows":
                _, size, rows, start, count = op
                self._rows(size)[rows] = src_np[start:start + size * count].reshape(count, size)
            else:
                _, off, start, size = op
                ctypes.memmove(self._base + off, src_ptr + start, size)
