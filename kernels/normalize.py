"""Filter / layer normalization of a flat direction in three short launches (Li et al. 2018, Sec. 4).

For every ``SEG_FILTER`` segment f: ``d_f · ‖θ_f‖ / (‖d_f‖ + 1e-10)``; ``SEG_SMALL``
segments (biases, BN γ/β) become 0 under ``ignore='biasbn'``, else θ itself. The contract
and the plain-torch reference are ``fastland.directions.normalize_reference`` and
``segment_scales``.

Launches (see ``segments.py`` for the plans):

1. ``_partials_kernel``: one program per group of small segments or per piece of a large
   one; reads d and θ once and writes one ``(Σd², Σθ²)`` entry per segment it touches.
2. ``_scales_kernel``: one program per ``SCALE_BLOCK`` segments adds up each segment's
   entries (1 for small segments, ``ceil(len / chunk)`` for large ones) in fp64 and writes
   the fp32 scale ``√Σθ² / (√Σd² + eps)``. ``segment_scales`` stops here: the fused perturbation
   kernel takes these ``[S]`` scales and never needs a normalized direction in memory.
3. ``_apply_kernel``: uniform tiles; reads d once (θ only on ``SEG_SMALL`` elements, where
   it is the fill value) and writes the normalized direction.

Memory: pass 1 reads d and θ (8 bytes/element in fp32), pass 3 reads d and writes the result
(8 more; the minimum would be 12 in all); pass 2 touches only ``[E, 2]`` floats. Normalization
runs once per direction per surface, so its loads stay masked (scalar) rather than duplicating
code for unmasked blocks as the per-chunk perturbation kernel does.

Accuracy: each lane adds at most ``CHUNK / BLOCK`` = 8 squares in fp32 before a tree sum, and
pass 2 adds the pieces in fp64 like the reference, so scales stay within ~2e-7 of the reference
(measured at VGG-16 size, filter and layer mode). Summation order is fixed: deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastland.directions import EPS  # Li et al.'s 1e-10, shared with the reference
from fastland.params import SEG_SMALL

from .segments import reduce_plan, segment_index, segment_table, tile_plan

# 1024 fp32 lanes = 8 per thread at 4 warps: enough loads in flight per SM without spilling
# (ptxas, sm_90: 56 registers for the partial sums, no spills). A group of small segments fits in one block;
# a large segment is cut into pieces of CHUNK = 8 blocks, so a 2.4M-element layer becomes ~290
# programs (plenty of parallelism) and its scale pass adds ~290 entries.
BLOCK = 1024
CHUNK = 8 * BLOCK
# Cost of a grouped program is one vector pass per segment in it; 32 bounds it even for
# pathological tables of 1-element segments (real models: ≤ 14 LeNet conv1 filters per block).
MAX_GROUP = 32
SCALE_BLOCK = 128


@triton.jit
def _partials_kernel(d_ptr, t_ptr, starts_ptr, lo_ptr, hi_ptr, seg0_ptr, nseg_ptr, entry0_ptr, part_ptr,
                     BLOCK: tl.constexpr):
    g = tl.program_id(0)
    lo = tl.load(lo_ptr + g)
    hi = tl.load(hi_ptr + g)
    seg0 = tl.load(seg0_ptr + g)
    nseg = tl.load(nseg_ptr + g)
    e0 = tl.load(entry0_ptr + g)
    offs = tl.arange(0, BLOCK)
    if nseg == 1:
        # A piece of one segment (up to CHUNK elements): blocked loop, per-lane fp32 accumulators
        # kept in registers, one tree sum at the end.
        acc_d = tl.zeros([BLOCK], dtype=tl.float32)
        acc_t = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(lo, hi, BLOCK):
            idx = start + offs
            m = idx < hi
            x = tl.load(d_ptr + idx, mask=m, other=0.0).to(tl.float32)
            y = tl.load(t_ptr + idx, mask=m, other=0.0).to(tl.float32)
            acc_d += x * x
            acc_t += y * y
        tl.store(part_ptr + 2 * e0, tl.sum(acc_d, axis=0))
        tl.store(part_ptr + 2 * e0 + 1, tl.sum(acc_t, axis=0))
    else:
        # Several whole segments within one block: load once, then one masked tree sum per segment.
        idx = lo + offs
        m = idx < hi
        x = tl.load(d_ptr + idx, mask=m, other=0.0).to(tl.float32)
        y = tl.load(t_ptr + idx, mask=m, other=0.0).to(tl.float32)
        x2 = x * x
        y2 = y * y
        local = segment_index(idx, seg0, nseg, starts_ptr) - seg0
        for j in range(0, nseg):
            sel = m & (local == j)
            tl.store(part_ptr + 2 * (e0 + j), tl.sum(tl.where(sel, x2, 0.0), axis=0))
            tl.store(part_ptr + 2 * (e0 + j) + 1, tl.sum(tl.where(sel, y2, 0.0), axis=0))


@triton.jit
def _scales_kernel(part_ptr, seg_entry0_ptr, seg_nentries_ptr, scale_ptr, S, eps, SCALE_BLOCK: tl.constexpr):
    offs = tl.program_id(0) * SCALE_BLOCK + tl.arange(0, SCALE_BLOCK)
    m = offs < S
    e0 = tl.load(seg_entry0_ptr + offs, mask=m, other=0)
    ne = tl.load(seg_nentries_ptr + offs, mask=m, other=0)
    # fp64 here, as in the reference: a 2.4M-element layer adds ~290 piece sums in sequence, and
    # fp32 would carry ~1e-6 of rounding into its scale. This pass touches only [E, 2] floats.
    acc_d = tl.zeros([SCALE_BLOCK], dtype=tl.float64)
    acc_t = tl.zeros([SCALE_BLOCK], dtype=tl.float64)
    for i in range(0, tl.max(ne, axis=0)):
        mi = m & (i < ne)
        acc_d += tl.load(part_ptr + 2 * (e0 + i), mask=mi, other=0.0).to(tl.float64)
        acc_t += tl.load(part_ptr + 2 * (e0 + i) + 1, mask=mi, other=0.0).to(tl.float64)
    # fp64 sqrt and division are correctly rounded on every backend; one rounding to fp32 at the end.
    scale = tl.sqrt(acc_t) / (tl.sqrt(acc_d) + eps)
    tl.store(scale_ptr + offs, scale.to(tl.float32), mask=m)


@triton.jit
def _apply_kernel(d_ptr, t_ptr, out_ptr, scale_ptr, kind_ptr, starts_ptr, seg0_ptr, nseg_ptr, N,
                  SMALL_IS_THETA: tl.constexpr, SMALL: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    idx = pid * BLOCK + tl.arange(0, BLOCK)
    m = idx < N
    seg = segment_index(idx, tl.load(seg0_ptr + pid), tl.load(nseg_ptr + pid), starts_ptr)
    # Per-segment values are gathers from S-sized arrays: a tile touches few segments, so these
    # hit the same few cache lines.
    scale = tl.load(scale_ptr + seg, mask=m, other=0.0)
    small = tl.load(kind_ptr + seg, mask=m, other=0) == SMALL
    x = tl.load(d_ptr + idx, mask=m, other=0.0).to(tl.float32)
    if SMALL_IS_THETA:
        # θ is read only where it is the answer (biases, BN γ/β), not on filter elements.
        fill = tl.load(t_ptr + idx, mask=m & small, other=0.0).to(tl.float32)
    else:
        fill = tl.zeros([BLOCK], dtype=tl.float32)
    tl.store(out_ptr + idx, tl.where(small, fill, x * scale), mask=m)


def segment_scales(d: torch.Tensor, theta: torch.Tensor, segments: torch.Tensor, norm: str = "filter",
                   block: int = BLOCK, chunk: int = CHUNK, max_group: int = MAX_GROUP) -> torch.Tensor:
    """Per-segment factors ``[S]`` fp32 with ``normalized = s · d`` on ``SEG_FILTER`` rows.

    Same contract as ``fastland.directions.segment_scales``. Takes contiguous 1-D ``d``, ``θ``
    on one device (CUDA, or CPU under ``TRITON_INTERPRET=1``); ``block``/``chunk``/``max_group``
    only change the work split (tests shrink them to exercise grouping and splitting).
    """
    n = d.numel()
    if norm == "none":
        segment_table(segments, n, d.device)  # validate, as the other modes do
        return torch.ones(segments.shape[0], dtype=torch.float32, device=d.device)
    plan = reduce_plan(segments, n, block, chunk, max_group, d.device)
    table = segment_table(segments, n, d.device)
    part = torch.empty(plan.entries, 2, dtype=torch.float32, device=d.device)
    _partials_kernel[(plan.programs,)](d, theta, table.starts, plan.lo, plan.hi, plan.seg0, plan.nseg,
                                       plan.entry0, part, BLOCK=block)
    scales = torch.empty(table.count, dtype=torch.float32, device=d.device)
    _scales_kernel[(triton.cdiv(table.count, SCALE_BLOCK),)](part, plan.seg_entry0, plan.seg_nentries, scales,
                                                             table.count, EPS, SCALE_BLOCK=SCALE_BLOCK)
    return scales


def apply_scales(d: torch.Tensor, theta: torch.Tensor, scales: torch.Tensor, segments: torch.Tensor,
                 ignore: str = "biasbn", out: torch.Tensor | None = None, block: int = BLOCK) -> torch.Tensor:
    """``where(SEG_SMALL, 0 or θ, d · scales[segment])`` as a new fp32 ``[N]`` (or into ``out``)."""
    n = d.numel()
    plan = tile_plan(segments, n, block, d.device)
    table = segment_table(segments, n, d.device)
    if out is None:
        out = torch.empty(n, dtype=torch.float32, device=d.device)
    _apply_kernel[(plan.tiles,)](d, theta, out, scales, table.kinds, table.starts, plan.seg0, plan.nseg, n,
                                 SMALL_IS_THETA=ignore != "biasbn", SMALL=SEG_SMALL, BLOCK=block)
    return out


def normalize(d: torch.Tensor, theta: torch.Tensor, segments: torch.Tensor, norm: str = "filter",
              ignore: str = "biasbn", out: torch.Tensor | None = None, block: int = BLOCK, chunk: int = CHUNK,
              max_group: int = MAX_GROUP) -> torch.Tensor:
    """Normalized direction ``[N]`` fp32; contract of ``fastland.directions.normalize_reference``.

    Inputs are checked by ``fastland.kernels.dispatch``; call it rather than this launcher.
    """
    scales = segment_scales(d, theta, segments, norm, block=block, chunk=chunk, max_group=max_group)
    return apply_scales(d, theta, scales, segments, ignore, out=out, block=block)
