"""Directions in the flat parameter space: random (seeded), normalized, interpolation.

The hot parts, normalization and perturbed-weight construction, are written here as
plain-torch *references* over a segment table (see ``FlatSpace.segments``); the
Triton kernels in ``fastland.kernels`` implement the same contracts and are checked
against these functions.
"""

from __future__ import annotations

import torch

from fastland.params import SEG_SMALL, FlatSpace

NORMS = ("filter", "layer", "none")
IGNORES = ("biasbn", "none")
EPS = 1e-10  # Li et al.'s epsilon in d_f * |θ_f| / (|d_f| + eps)


def random(space: FlatSpace, seed: int, count: int = 1, device: torch.device | str = "cpu") -> torch.Tensor:
    """``count`` Gaussian directions ``[count, N]``, identical on every device.

    They are drawn on the CPU from one seeded generator, in θ order, then moved, so
    the same seed gives the same bits on CPU and CUDA.
    """
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    d = torch.randn(count, space.numel, generator=gen, dtype=torch.float32)
    return d.to(device)


def segment_scales(d: torch.Tensor, theta: torch.Tensor, segments: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-segment factor ``s`` such that the normalized direction is ``s * d`` on
    ``SEG_FILTER`` segments. ``[S]`` fp32. (``SEG_SMALL`` rows are handled by ``ignore``.)"""
    if norm == "none":
        return torch.ones(segments.shape[0], dtype=torch.float32, device=d.device)
    seg = segments.to(d.device)
    ids = torch.repeat_interleave(torch.arange(seg.shape[0], device=d.device), seg[:, 1])
    # Sums of squares in fp64: this is the reference, so it should not carry fp32 rounding over 2M-element layers.
    d2 = torch.zeros(seg.shape[0], dtype=torch.float64, device=d.device).index_add_(0, ids, d.double() ** 2)
    t2 = torch.zeros(seg.shape[0], dtype=torch.float64, device=d.device).index_add_(0, ids, theta.double() ** 2)
    return (t2.sqrt() / (d2.sqrt() + EPS)).float()


def normalize_reference(
    d: torch.Tensor, theta: torch.Tensor, segments: torch.Tensor, norm: str, ignore: str
) -> torch.Tensor:
    """Plain-torch normalization of one flat direction (Li et al. 2018, Sec. 4).

    - ``SEG_FILTER`` rows: ``d_f * |θ_f| / (|d_f| + 1e-10)`` (filter or layer), or
      unchanged for ``norm='none'``.
    - ``SEG_SMALL`` rows (tensors with <= 1 dim): 0 with ``ignore='biasbn'``;
      otherwise θ itself, as the official ``loss-landscape`` code does.
    """
    if norm not in NORMS:
        raise ValueError(f"unknown normalization {norm!r}; use one of {', '.join(NORMS)}")
    if ignore not in IGNORES:
        raise ValueError(f"unknown ignore rule {ignore!r}; use one of {', '.join(IGNORES)}")
    seg = segments.to(d.device)
    scale = segment_scales(d, theta, seg, norm)
    out = d.float() * torch.repeat_interleave(scale, seg[:, 1])
    small = torch.repeat_interleave(seg[:, 2] == SEG_SMALL, seg[:, 1])
    fill = torch.zeros_like(out) if ignore == "biasbn" else theta.float()
    return torch.where(small, fill, out)


def perturb_reference(
    theta: torch.Tensor, dirs: torch.Tensor, coords: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``out[p] = θ + Σ_k coords[p, k] · dirs[k]`` as a ``[P, N]`` tensor of ``dtype``.

    One direction gives the 1-D case; the line case ``θ − η_k g`` is
    ``dirs = g[None]``, ``coords = -η[:, None]``.
    """
    if dirs.dim() != 2 or coords.dim() != 2 or coords.shape[1] != dirs.shape[0]:
        raise ValueError(f"coords [P, D] and dirs [D, N] do not match: {tuple(coords.shape)} vs {tuple(dirs.shape)}")
    # One fused multiply-add pass per direction: a [P, D] @ [D, N] matmul with D <= 2 is far slower
    # on the CPU (measured ~28 ms per VGG point), and this is the order θ + α·d1 + β·d2 the kernel uses.
    c = coords.float()
    out = theta.float().unsqueeze(0).repeat(c.shape[0], 1)
    for k in range(dirs.shape[0]):
        out.addcmul_(c[:, k : k + 1], dirs[k].float().unsqueeze(0))
    return out.to(dtype)


def normalize(d: torch.Tensor, theta: torch.Tensor, space: FlatSpace, norm: str = "filter",
              ignore: str = "biasbn") -> torch.Tensor:
    """Normalize a flat direction ``[N]`` against θ; see ``normalize_reference``."""
    from fastland.kernels import dispatch  # Triton on CUDA, this module's reference on CPU

    return dispatch.normalize(d, theta, space.segments(norm), norm, ignore)


def perturb(theta: torch.Tensor, dirs: torch.Tensor, coords: torch.Tensor,
            dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Perturbed weights ``[P, N]`` for grid points ``coords [P, D]``."""
    from fastland.kernels import dispatch  # Triton on CUDA, this module's reference on CPU

    return dispatch.perturb(theta, dirs, coords, dtype)


def make(space: FlatSpace, theta: torch.Tensor, dim: int = 2, seed: int = 0, norm: str = "filter",
         ignore: str = "biasbn") -> torch.Tensor:
    """``dim`` independent normalized random directions ``[dim, N]`` on θ's device.

    As in Li et al., the two directions of a 2-D plot are not orthogonalized.
    """
    if dim not in (1, 2):
        raise ValueError(f"dim must be 1 or 2, got {dim}")
    raw = random(space, seed, dim, device=theta.device)
    return torch.stack([normalize(raw[k], theta, space, norm, ignore) for k in range(dim)])


def interpolation(theta1: torch.Tensor, theta2: torch.Tensor) -> torch.Tensor:
    """The direction from θ₁ to θ₂ (Goodfellow et al. 2015): ``θ₂ − θ₁``."""
    if theta1.shape != theta2.shape:
        raise ValueError(f"checkpoints differ in size: {theta1.numel()} vs {theta2.numel()} parameters")
    return theta2.float() - theta1.float()


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two flat directions (reported for 2-D plots)."""
    return float(torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=0))
