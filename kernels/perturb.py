"""Perturbed weights for a chunk of grid points in one launch: ``out[p] = θ + Σ_k c[p, k] · d_k``.

This is the engine's per-chunk hot path (``design.md``: weights ``[P, N] = θ* + α d1 + β d2``).
Contract and plain-torch reference: ``fastland.directions.perturb_reference``. D is 1 (a 1-D
plot, or the probe line ``θ − η_k g`` with ``dirs = g[None]``, ``coords = -η[:, None]``) or 2.

Memory reasoning. The output ``[P, N]`` dominates traffic (P · N · 4 bytes in fp32, half in
bf16); the inputs are ``(1 + D) · N · 4`` bytes. A program owns ``BLOCK_N`` columns and up to
``BLOCK_P`` rows: it loads its slice of θ, d1 (and d2) *once* into registers and reuses them for
all of its rows, so inputs are read ``ceil(P / BLOCK_P)`` times instead of P times, and the
loop over p issues only coalesced row stores. 1024 fp32 columns at 4 warps is 8 values per
thread per array (≤ 24 live registers for θ, d1, d2): 16-byte vector accesses, no spills.
BLOCK_P = 16 keeps input re-reads at ≤ 1/16 of the output traffic for D = 2 in fp32 (~1/8 in
bf16) while still giving LeNet-sized vectors (61 column blocks) enough programs at large P.

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
BLOCK_P = 16
OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _normalized(raw, theta, scale_ptr, small, seg, m, SMALL_IS_THETA: tl.constexpr):
    """One direction's slice, normalized in registers (the fused path)."""
    s = tl.load(scale_ptr + seg, mask=m, other=0.0)
    if SMALL_IS_THETA:
        return tl.where(small, theta, raw * s)
    else:
        return tl.where(small, 0.0, raw * s)


@triton.jit
def _perturb_kernel(theta_ptr, d1_ptr, d2_ptr, coords_ptr, out_ptr, N, P, stride_cp, stride_cd, stride_op,
                    s1_ptr, s2_ptr, kind_ptr, starts_ptr, seg0_ptr, nseg_ptr,
                    D: tl.constexpr, FUSED: tl.constexpr, SMALL_IS_THETA: tl.constexpr, SMALL: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_p = tl.program_id(1)
    idx = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m = idx < N
    # Loaded once per program, kept in registers for all BLOCK_P rows.
    theta = tl.load(theta_ptr + idx, mask=m, other=0.0).to(tl.float32)
    d1 = tl.load(d1_ptr + idx, mask=m, other=0.0).to(tl.float32)
    if D == 2:
        d2 = tl.load(d2_ptr + idx, mask=m, other=0.0).to(tl.float32)
    if FUSED:
        seg = segment_index(idx, tl.load(seg0_ptr + pid_n), tl.load(nseg_ptr + pid_n), starts_ptr)
        small = tl.load(kind_ptr + seg, mask=m, other=0) == SMALL
        d1 = _normalized(d1, theta, s1_ptr, small, seg, m, SMALL_IS_THETA)
        if D == 2:
            d2 = _normalized(d2, theta, s2_ptr, small, seg, m, SMALL_IS_THETA)

    p0 = pid_p * BLOCK_P
    p_end = tl.minimum(p0 + BLOCK_P, P)
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
        tl.store(out_row + idx, y.to(out_ptr.dtype.element_ty), mask=m)
        out_row += stride_op
        c_row += stride_cp


def _launch(theta: torch.Tensor, dirs: torch.Tensor, coords: torch.Tensor, out: torch.Tensor,
            fused: tuple | None, block_n: int, block_p: int) -> torch.Tensor:
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
    grid = (triton.cdiv(n, block_n), triton.cdiv(p, block_p))
    _perturb_kernel[grid](theta, d1, d2, coords, out, n, p, coords.stride(0), coords.stride(1), out.stride(0),
                          scales1, scales2, kinds, starts, seg0, nseg,
                          D=d, FUSED=fused is not None, SMALL_IS_THETA=small_is_theta, SMALL=SEG_SMALL,
                          BLOCK_N=block_n, BLOCK_P=block_p)
    return out


def _alloc(out: torch.Tensor | None, p: int, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.empty(p, n, dtype=dtype, device=device) if out is None else out


def perturb(theta: torch.Tensor, dirs: torch.Tensor, coords: torch.Tensor, dtype: torch.dtype = torch.float32,
            out: torch.Tensor | None = None, block_n: int = BLOCK_N, block_p: int = BLOCK_P) -> torch.Tensor:
    """``[P, N]`` weights ``θ + coords @ dirs`` in ``dtype`` (fp32, bf16 or fp16), one launch.

    ``theta [N]`` and the rows of ``dirs [D, N]`` must have unit stride (checked by
    ``fastland.kernels.dispatch``, the entry point to use).
    """
    out = _alloc(out, coords.shape[0], theta.numel(), dtype, theta.device)
    return _launch(theta, dirs, coords, out, None, block_n, block_p)


def perturb_scaled(theta: torch.Tensor, raw: torch.Tensor, scales: torch.Tensor, segments: torch.Tensor,
                   coords: torch.Tensor, ignore: str = "biasbn", dtype: torch.dtype = torch.float32,
                   out: torch.Tensor | None = None, block_n: int = BLOCK_N, block_p: int = BLOCK_P) -> torch.Tensor:
    """Fused normalization + perturbation: like ``perturb`` with ``dirs`` = the normalized ``raw``
    directions, where ``scales [D, S]`` are their per-segment factors (``segment_scales``)
    and ``SEG_SMALL`` segments follow ``ignore`` (0 for ``'biasbn'``, else θ)."""
    out = _alloc(out, coords.shape[0], theta.numel(), dtype, theta.device)
    return _launch(theta, raw, coords, out, (scales, segments, ignore), block_n, block_p)
