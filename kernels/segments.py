"""Segment tables -> launch plans for the Triton kernels, plus the in-kernel segment lookup.

A segment table (``FlatSpace.segments``) is an int64 ``[S, 3]`` of ``(start, length, kind)``
rows, in θ order, covering ``[0, N)`` exactly once. Segment lengths span five orders of
magnitude (a 75-element LeNet filter, 400/512-wide rows, 4,608-element VGG filters, 2.4M
elements for a whole VGG layer in layer mode), so neither "one program per segment" nor
"one program per element" fits. Two host-side plans, built once per table and cached on
the device, tell each program which slice of θ it owns:

- ``ReducePlan`` (for the per-segment sums ``Σd²``, ``Σθ²``): consecutive small segments
  (≤ ``block`` elements) are *grouped* into one program of at most ``block`` elements;
  a segment longer than ``block`` is *split* into pieces of at most ``chunk`` elements,
  one program each, whose partial sums a second tiny pass adds up. Every program writes
  one partial-sum *entry* per segment it touches, so the entries of segment ``s`` are
  the contiguous range ``[seg_entry0[s], seg_entry0[s] + seg_nentries[s])``. Summation
  order is fixed, so results are deterministic (no atomics).
- ``TilePlan`` (for element-parallel kernels: applying scales, fused perturbation): the
  flat vector is cut into uniform tiles of ``block`` elements, and each tile records the
  segment of its first element (``seg0``) and how many segments it touches (``nseg``).
  A kernel recovers each element's segment with ``nseg - 1`` vector compares against
  segment starts (``segment_index``): one compare-free pass on tiles inside one big
  segment, a handful on tiles of small filters. This avoids a per-element segment-id
  array, which would cost as much memory traffic as the data itself.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
import triton
import triton.language as tl

from fastland.params import SEG_FILTER, SEG_SMALL

INT32_MAX = 2**31 - 1
_T = TypeVar("_T")
_CACHE_SIZE = 64


def check_table(segments: torch.Tensor, n: int) -> np.ndarray:
    """Validate a segment table against a flat length ``n``; return it as an int64 numpy array.

    Raises ``ValueError`` if the rows do not tile ``[0, n)`` in order, or a kind is unknown.
    """
    if segments.dim() != 2 or segments.shape[1] != 3 or segments.shape[0] == 0:
        raise ValueError(f"segment table must be a non-empty [S, 3] tensor, got shape {tuple(segments.shape)}")
    if segments.dtype.is_floating_point or segments.dtype.is_complex or segments.dtype == torch.bool:
        raise ValueError(f"segment table must hold integers, got {segments.dtype}")
    table = segments.detach().to("cpu", torch.int64).numpy()
    starts, lengths, kinds = table[:, 0], table[:, 1], table[:, 2]
    if n > INT32_MAX:
        raise ValueError(f"flat vectors of more than 2^31-1 elements are not supported by the kernels (N={n})")
    if (lengths < 0).any():
        raise ValueError("segment table has a negative length")
    if starts[0] != 0 or (starts[1:] != starts[:-1] + lengths[:-1]).any() or starts[-1] + lengths[-1] != n:
        raise ValueError(f"segment table does not cover [0, {n}) exactly once, in order")
    if not np.isin(kinds, (SEG_FILTER, SEG_SMALL)).all():
        raise ValueError(f"segment kinds must be SEG_FILTER={SEG_FILTER} or SEG_SMALL={SEG_SMALL}")
    return table


@dataclass(frozen=True)
class SegmentTable:
    """The per-segment arrays every kernel needs, on the device (int32: N < 2^31)."""

    starts: torch.Tensor  # [S] int32
    kinds: torch.Tensor  # [S] int32
    count: int  # S


@dataclass(frozen=True)
class TilePlan:
    """Uniform tiles of ``block`` elements: each tile's first segment and segment count."""

    block: int
    seg0: torch.Tensor  # [T] int32
    nseg: torch.Tensor  # [T] int32
    tiles: int  # T


@dataclass(frozen=True)
class ReducePlan:
    """Programs over θ for the per-segment partial sums (see the module docstring)."""

    block: int
    lo: torch.Tensor  # [G] int32: first element of each program
    hi: torch.Tensor  # [G] int32: one past its last element
    seg0: torch.Tensor  # [G] int32: its first segment
    nseg: torch.Tensor  # [G] int32: segments it touches (1 for a piece of a large segment)
    entry0: torch.Tensor  # [G] int32: where its partial-sum entries start
    seg_entry0: torch.Tensor  # [S] int32: first entry of each segment
    seg_nentries: torch.Tensor  # [S] int32: entries per segment
    programs: int  # G
    entries: int  # E
    max_nentries: int


_cache: OrderedDict[tuple, object] = OrderedDict()
# id(table tensor) -> (weakref, version, n, validated table, content key). The engine passes the
# same FlatSpace table for every chunk; this makes the per-launch host cost a dict lookup instead
# of a device->host copy, validation and hashing of S rows (~100 µs for VGG, longer than a small
# perturbation launch on the GPU).
_seen: OrderedDict[int, tuple] = OrderedDict()


def _validated(segments: torch.Tensor, n: int) -> tuple[np.ndarray, bytes]:
    """``check_table`` once per table object and in-place version; returns (table, content key)."""
    try:
        version = segments._version
    except RuntimeError:  # inference-mode tensors have no version counter: validate every time
        table = check_table(segments, n)
        return table, table.tobytes()
    hit = _seen.get(id(segments))
    if hit is not None and hit[0]() is segments and hit[1] == version and hit[2] == n:
        return hit[3], hit[4]
    table = check_table(segments, n)
    _seen[id(segments)] = (weakref.ref(segments), version, n, table, table.tobytes())
    if len(_seen) > _CACHE_SIZE:
        _seen.popitem(last=False)
    return table, _seen[id(segments)][4]


def _cached(key: tuple, build: Callable[[], _T]) -> _T:
    hit = _cache.get(key)
    if hit is not None:
        _cache.move_to_end(key)
        return hit
    value = build()
    _cache[key] = value
    if len(_cache) > _CACHE_SIZE:
        _cache.popitem(last=False)
    return value


def _i32(a: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int32)).to(device)


def segment_table(segments: torch.Tensor, n: int, device: torch.device) -> SegmentTable:
    """Segment starts and kinds on ``device`` (cached per table content)."""
    table, content = _validated(segments, n)
    key = ("table", content, n, str(device))
    return _cached(key, lambda: SegmentTable(_i32(table[:, 0], device), _i32(table[:, 2], device), table.shape[0]))


def tile_plan(segments: torch.Tensor, n: int, block: int, device: torch.device) -> TilePlan:
    """The ``TilePlan`` for tiles of ``block`` elements (cached per table content)."""
    table, content = _validated(segments, n)

    def build() -> TilePlan:
        starts = table[:, 0]
        first = np.arange(0, n, block, dtype=np.int64)
        last = np.minimum(first + block, n) - 1
        # side='right' - 1: the last segment starting at or before the element, which skips
        # zero-length segments exactly as repeat_interleave does in the reference.
        seg0 = np.searchsorted(starts, first, side="right") - 1
        nseg = np.searchsorted(starts, last, side="right") - seg0
        return TilePlan(block, _i32(seg0, device), _i32(nseg, device), len(first))

    return _cached(("tile", content, n, block, str(device)), build)


def reduce_plan(segments: torch.Tensor, n: int, block: int, chunk: int, max_group: int,
                device: torch.device) -> ReducePlan:
    """The ``ReducePlan``: group segments of ≤ ``block`` elements (at most ``max_group`` per
    program), split longer ones into pieces of ≤ ``chunk`` elements (cached per table content)."""
    if chunk < block or chunk % block:
        raise ValueError(f"chunk ({chunk}) must be a positive multiple of block ({block})")
    table, content = _validated(segments, n)

    def build() -> ReducePlan:
        starts, lengths = table[:, 0].tolist(), table[:, 1].tolist()
        s_count = len(starts)
        lo, hi, seg0, nseg = [], [], [], []
        seg_nentries = np.zeros(s_count, dtype=np.int64)
        i = 0
        while i < s_count:
            if lengths[i] > block:  # split: one program per piece of <= chunk elements
                pieces = range(starts[i], starts[i] + lengths[i], chunk)
                lo.extend(pieces)
                hi.extend(min(p + chunk, starts[i] + lengths[i]) for p in pieces)
                seg0.extend([i] * len(pieces))
                nseg.extend([1] * len(pieces))
                seg_nentries[i] = len(pieces)
                i += 1
                continue
            j, total = i, 0  # group: consecutive small segments while they fit in one block
            while j < s_count and j - i < max_group and total + lengths[j] <= block:
                total += lengths[j]
                j += 1
            lo.append(starts[i])
            hi.append(starts[i] + total)
            seg0.append(i)
            nseg.append(j - i)
            seg_nentries[i:j] = 1
            i = j
        nseg_a = np.asarray(nseg, dtype=np.int64)
        entry0 = np.concatenate(([0], np.cumsum(nseg_a)[:-1]))
        seg_entry0 = np.concatenate(([0], np.cumsum(seg_nentries)[:-1]))
        return ReducePlan(
            block, _i32(np.asarray(lo), device), _i32(np.asarray(hi), device), _i32(np.asarray(seg0), device),
            _i32(nseg_a, device), _i32(entry0, device), _i32(seg_entry0, device), _i32(seg_nentries, device),
            len(lo), int(nseg_a.sum()), int(seg_nentries.max()),
        )

    return _cached(("reduce", content, n, block, chunk, max_group, str(device)), build)


@triton.jit
def segment_index(idx, seg0, nseg, starts_ptr):
    """Segment id of every element offset in ``idx``, for a tile whose first element lies in
    segment ``seg0`` and which touches ``nseg`` segments: one compare per segment boundary
    inside the tile (the starts are a few scalar loads, served from cache)."""
    seg = tl.zeros_like(idx) + seg0
    for j in range(1, nseg):
        seg += (idx >= tl.load(starts_ptr + seg0 + j)).to(tl.int32)
    return seg
