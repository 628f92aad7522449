"""Perturbed weights for a chunk of grid points in one launch: ``out[p] = θ + Σ_k c[p, k] · d_k``.

This is the engine's per-chunk hot path (``design.md``: weights ``[P, N] = θ* + α d1 + β d2``).
Contract and plain-torch reference: ``fastland.directions.perturb_reference``. D is 1 (a 1-D
plot, or the probe line ``θ − η_k g`` with ``dirs = g[None]``, ``coords = -η[:, None]``) or 2.

Memory reasoning. The output ``[P, N]`` dominates traffic (P · N · 4 bytes in fp32, half in
bf16); the inputs are ``(1 + D) · N · 4`` bytes. A program owns ``BLOCK_N`` columns and ``rows``
consecutive grid points: it loads its slice of θ, d1 (and d2) *once* into registers and reuses
it for all of its rows, and the loop over p issues only coalesced row stores. 1024 fp32 columns
at 4 warps is 8 values per thread per array (ptxas, sm_90: 40 registers, 58 fused, no spills).
Every column block but the last runs unmasked, so its loads compile to 16-byte vector loads, and
its stores too when the output's row stride is a multiple of 16 elements: N is not (62,458 for
LeNet-BN, 14,728,266 for VGG-16-BN), so ``row_aligned_empty`` offers a row-padded ``out``; the
benchmark measures both layouts. ``rows`` is the largest count that still gives the grid
``PROGRAMS_PER_SM`` programs per SM: at VGG size the 14.4k column blocks alone fill the GPU, so
each program loops over all P and θ, d1, d2 are read from DRAM exactly once; at LeNet size (61
column blocks) the points are split across programs, and the re-reads of the 750 KB inputs hit L2.

Fusion (``FUSED=True``). The directions may be passed *raw*, together with per-segment
scales ``[D, S]`` from ``normalize.segment_scales`` and the small-segment rule; each program
then normalizes its slice in registers (``d = SEG_SMALL ? (0 or θ) : raw · s[segment]``), so
normalized directions never exist in memory. Per chunk the traffic is the same as the plain
kernel (raw instead of normalized directions, plus a few cached scale loads); what fusion
removes is the normalization's write-then-reread of D · N floats, i.e. it pays off when the
normalized directions are not otherwise needed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastland.params import SEG_SMALL

from .segments import segment_index, segment_table, tile_plan

BLOCK_N = 1024
PROGRAMS_PER_SM = 8  # 8 programs x 4 warps = half the warp slots of an H100 SM: enough stores in flight


@triton.jit
def _normalized(raw, theta, scale_ptr, small, seg, m, SMALL_IS_THETA: tl.constexpr):
    """One direction's slice, normalized in registers (the fused path)."""
    s = tl.load(scale_ptr + seg, mask=m, other=0.0)
    if SMALL_IS_THETA:
        return tl.where(small, theta, raw * s)
    else:
        return tl.where(small, 0.0, raw * s)


@triton.jit
def _load(ptr, idx, m, MASKED: tl.constexpr):
    if MASKED:
        return tl.load(ptr + idx, mask=m, other=0.0).to(tl.float32)
    else:
        return tl.load(ptr + idx).to(tl.float32)


@triton.jit
def _columns(theta_ptr, d1_ptr, d2_ptr, coords_ptr, out_ptr, idx, m, p0, p_end, stride_cp, stride_cd, stride_op,
             s1_ptr, s2_ptr, kind_ptr, starts_ptr, seg0, nseg, D: tl.constexpr, FUSED: tl.constexpr,
             SMALL_IS_THETA: tl.constexpr, SMALL: tl.constexpr, MASKED: tl.constexpr):
    """Rows ``p0 .. p_end-1`` of one block of columns. ``MASKED=False`` (every block but the last)
    drops the bounds mask so that loads, and stores into rows whose stride is a multiple of 16
    elements, compile to 16-byte vector accesses."""
    # Loaded once per program, kept in registers for all of its rows.
    theta = _load(theta_ptr, idx, m, MASKED)
    d1 = _load(d1_ptr, idx, m, MASKED)
    if D == 2:
        d2 = _load(d2_ptr, idx, m, MASKED)
    if FUSED:
        seg = segment_index(idx, seg0, nseg, starts_ptr)
        small = tl.load(kind_ptr + seg, mask=m, other=0) == SMALL
        d1 = _normalized(d1, theta, s1_ptr, small, seg, m, SMALL_IS_THETA)
        if D == 2:
            d2 = _normalized(d2, theta, s2_ptr, small, seg, m, SMALL_IS_THETA)
    # Row pointers advance in 64-bit pointer arithmetic: p · N overflows int32 for VGG-sized P · N.
    out_row = out_ptr + p0.to(tl.int64) * stride_op
    c_row = coords_ptr + p0.to(tl.int64) * stride_cp
    for _p in range(p0, p_end):
        a = tl.load(c_row).to(tl.float32)
        if D == 2:
            b = tl.load(c_row + stride_cd).to(tl.float32)
            y = theta + (a * d1 + b * d2)  # same association as θ + coords @ dirs in the reference
        else:
            y = theta + a * d1
        if MASKED:
            tl.store(out_row + idx, y.to(out_ptr.dtype.element_ty), mask=m)
        else:
            tl.store(out_row + idx, y.to(out_ptr.dtype.element_ty))
        out_row += stride_op
        c_row += stride_cp


@triton.jit
def _perturb_kernel(theta_ptr, d1_ptr, d2_ptr, coords_ptr, out_ptr, N, P, stride_cp, stride_cd, stride_op,
                    s1_ptr, s2_ptr, kind_ptr, starts_ptr, seg0_ptr, nseg_ptr,
                    rows, D: tl.constexpr, FUSED: tl.constexpr, SMALL_IS_THETA: tl.constexpr,
                    SMALL: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_p = tl.program_id(1)
    idx = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m = idx < N
    p0 = pid_p * rows
    p_end = tl.minimum(p0 + rows, P)
    seg0 = 0
    nseg = 0
    if FUSED:
        seg0 = tl.load(seg0_ptr + pid_n)
        nseg = tl.load(nseg_ptr + pid_n)
    if (pid_n + 1) * BLOCK_N <= N:
        _columns(theta_ptr, d1_ptr, d2_ptr, coords_ptr, out_ptr, idx, m, p0, p_end, stride_cp, stride_cd, stride_op,
                 s1_ptr, s2_ptr, kind_ptr, starts_ptr, seg0, nseg, D, FUSED, SMALL_IS_THETA, SMALL, MASKED=False)
    else:
        _columns(theta_ptr, d1_ptr, d2_ptr, coords_ptr, out_ptr, idx, m, p0, p_end, stride_cp, stride_cd, stride_op,
                 s1_ptr, s2_ptr, kind_ptr, starts_ptr, seg0, nseg, D, FUSED, SMALL_IS_THETA, SMALL, MASKED=True)


def _launch(theta: torch.Tensor, dirs: torch.Tensor, coords: torch.Tensor, out: torch.Tensor,
            fused: tuple | None, block_n: int, rows: int | None) -> torch.Tensor:
    n = theta.numel()
    p, d = coords.shape
    if p == 0:
        return out
    d1 = dirs[0]
    d2 = dirs[1] if d == 2 else dirs[0]  # unused when D == 1 (constexpr-pruned)
    if fused is None:
        scales1 = scales2 = kinds = starts = seg0 = nseg = theta  # unused placeholders
        small_is_theta = False
    else:
        scales, segments, ignore = fused
        table = segment_table(segments, n, theta.device)
        plan = tile_plan(segments, n, block_n, theta.device)
        scales1, scales2 = scales[0], scales[1] if d == 2 else scales[0]
        kinds, starts, seg0, nseg = table.kinds, table.starts, plan.seg0, plan.nseg
        small_is_theta = ignore != "biasbn"
    rows = rows_per_program(p, triton.cdiv(n, block_n), theta.device) if rows is None else rows
    grid = (triton.cdiv(n, block_n), triton.cdiv(p, rows))
    _perturb_kernel[grid](theta, d1, d2, coords, out, n, p, coords.stride(0), coords.stride(1), out.stride(0),
                          scales1, scales2, kinds, starts, seg0, nseg, rows,
                          D=d, FUSED=fused is not None, SMALL_IS_THETA=small_is_theta, SMALL=SEG_SMALL,
                          BLOCK_N=block_n)
    return out


def rows_per_program(points: int, column_blocks: int, device: torch.device) -> int:
    """Grid points per program: as many as possible (inputs loaded once, reused for every row)
    while the grid keeps ``PROGRAMS_PER_SM`` programs per SM. The interpreter runs programs one
    after another, so there one program per column block is best."""
    if device.type != "cuda":
        return max(points, 1)
    target = PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    return min(max(points * column_blocks // target, 1), max(points, 1))


def row_aligned_empty(points: int, n: int, dtype: torch.dtype = torch.float32,
                      device: torch.device | str = "cuda") -> torch.Tensor:
    """An uninitialized ``[P, N]`` output whose row stride is rounded up to 16 elements.

    Rows of a contiguous ``[P, N]`` start 16-byte aligned only when N is a multiple of 4 (it is
    not for LeNet or VGG-16), so the kernel's stores stay scalar; with this buffer they compile to
    16-byte vector stores. It is a view (``stride(1) == 1``), which ``FlatSpace.batch_views``
    accepts; pass it as ``out=``.
    """
    padded = -(-n // 16) * 16
    return torch.empty(points, padded, dtype=dtype, device=device)[:, :n]


def _alloc(out: torch.Tensor | None, p: int, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.empty(p, n, dtype=dtype, device=device) if out is None else out


def perturb(theta: torch.Tensor, dirs: torch.Tensor, coords: torch.Tensor, dtype: torch.dtype = torch.float32,
            out: torch.Tensor | None = None, block_n: int = BLOCK_N, rows: int | None = None) -> torch.Tensor:
    """``[P, N]`` weights ``θ + coords @ dirs`` in ``dtype`` (fp32, bf16 or fp16), one launch.

    ``theta [N]`` and the rows of ``dirs [D, N]`` must have unit stride (checked by
    ``fastland.kernels.dispatch``, the entry point to use).
    """
    out = _alloc(out, coords.shape[0], theta.numel(), dtype, theta.device)
    return _launch(theta, dirs, coords, out, None, block_n, rows)


def perturb_scaled(theta: torch.Tensor, raw: torch.Tensor, scales: torch.Tensor, segments: torch.Tensor,
                   coords: torch.Tensor, ignore: str = "biasbn", dtype: torch.dtype = torch.float32,
                   out: torch.Tensor | None = None, block_n: int = BLOCK_N, rows: int | None = None) -> torch.Tensor:
    """Fused normalization + perturbation: like ``perturb`` with ``dirs`` = the normalized ``raw``
    directions, where ``scales [D, S]`` are their per-segment factors (``segment_scales``)
    and ``SEG_SMALL`` segments follow ``ignore`` (0 for ``'biasbn'``, else θ)."""
    out = _alloc(out, coords.shape[0], theta.numel(), dtype, theta.device)
    return _launch(theta, raw, coords, out, (scales, segments, ignore), block_n, rows)
