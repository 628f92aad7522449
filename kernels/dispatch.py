"""Route normalization and perturbation to the Triton kernels or to the torch references.

``backend``:

- ``"auto"`` (what ``fastland.directions`` uses): Triton for CUDA tensors when Triton is
  installed and the case is one the kernels cover (D ∈ {1, 2}; output fp32/bf16/fp16);
  otherwise the plain-torch reference in ``fastland.directions``. CPU tensors always get
  the reference: the Triton interpreter is a testing tool, ~1 ms per program.
- ``"torch"``: the reference, on any device.
- ``"triton"``: the kernels, or a ``ValueError`` saying why not. CPU tensors are accepted
  only when the kernels were compiled for the interpreter (``TRITON_INTERPRET=1`` set before
  ``fastland.kernels`` was first imported), which is how the tests exercise them.

Both backends implement the same contracts; results agree to fp32 rounding (the kernels sum
segment norms in a different, more accurate order than the reference's ``index_add_``).
Inputs with a non-unit inner stride are copied to contiguous memory first (one extra pass);
the ``out`` buffer, if given, is written in place: its rows must be contiguous, and a ``[P, N]``
output may have padded rows (``fastland.kernels.perturb.row_aligned_empty``: vector stores).
"""

from __future__ import annotations

import importlib.util
from typing import Literal

import torch

from fastland.directions import IGNORES, NORMS, normalize_reference, perturb_reference
from fastland.directions import segment_scales as segment_scales_reference
from fastland.params import SEG_SMALL

Backend = Literal["auto", "torch", "triton"]
BACKENDS = ("auto", "torch", "triton")
_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_TRITON_OUT = (torch.float32, torch.bfloat16, torch.float16)


def triton_available() -> bool:
    """Whether the ``triton`` package can be imported here."""
    return importlib.util.find_spec("triton") is not None


def interpreted() -> bool:
    """Whether the kernels were built for Triton's CPU interpreter (``TRITON_INTERPRET=1``
    was set when ``fastland.kernels`` was first imported)."""
    if not triton_available():
        return False
    import fastland.kernels.perturb as kp

    return type(kp._perturb_kernel).__name__ == "InterpretedFunction"


def _device(*tensors: torch.Tensor) -> torch.device:
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"inputs are on different devices: {sorted(str(d) for d in devices)}")
    return devices.pop()


def resolve_backend(backend: str, device: torch.device, supported: bool = True) -> str:
    """``"torch"`` or ``"triton"`` for tensors on ``device``; see the module docstring."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "triton" if device.type == "cuda" and supported and triton_available() else "torch"
    if not triton_available():
        raise ValueError("backend='triton' needs the triton package; install it or use backend='torch'")
    if device.type == "cpu" and not interpreted():
        raise ValueError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before fastland.kernels "
                         "is imported; otherwise use CUDA tensors or backend='torch'")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"backend='triton' supports CUDA (or interpreted CPU) tensors, not {device.type}")
    return "triton"


def _flat(name: str, t: torch.Tensor, n: int | None = None) -> torch.Tensor:
    """A contiguous 1-D float vector (copied only if strided)."""
    if t.dim() != 1:
        raise ValueError(f"{name} must be a flat [N] vector, got shape {tuple(t.shape)}")
    if n is not None and t.numel() != n:
        raise ValueError(f"{name} has {t.numel()} elements, expected N={n}")
    if t.dtype not in _FLOATS:
        raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    return t.contiguous()


def _rows(name: str, t: torch.Tensor, n: int) -> torch.Tensor:
    """A ``[D, N]`` float tensor whose rows have unit stride (copied only if not)."""
    if t.dim() != 2 or t.shape[1] != n:
        raise ValueError(f"{name} must be [D, N] with N={n}, got shape {tuple(t.shape)}")
    if t.dtype not in _FLOATS:
        raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    return t if t.stride(1) == 1 else t.contiguous()


def _check_names(norm: str | None, ignore: str | None) -> None:
    if norm is not None and norm not in NORMS:
        raise ValueError(f"unknown normalization {norm!r}; use one of {', '.join(NORMS)}")
    if ignore is not None and ignore not in IGNORES:
        raise ValueError(f"unknown ignore rule {ignore!r}; use one of {', '.join(IGNORES)}")


def _check_out(out: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
    """``out`` must match exactly and have unit-stride rows; a ``[P, N]`` output may have padded
    rows (row stride >= N, e.g. ``perturb.row_aligned_empty``), never overlapping ones."""
    if out is None:
        return
    rows_ok = out.dim() >= 1 and out.stride(-1) == 1 and (out.dim() == 1 or out.stride(0) >= out.shape[-1])
    if tuple(out.shape) != shape or out.dtype != dtype or out.device != device or not rows_ok:
        raise ValueError(f"out must be a {dtype} tensor of shape {shape} on {device} with contiguous rows, got "
                         f"{out.dtype} {tuple(out.shape)} on {out.device} with strides {out.stride()}")


def _coords(coords: torch.Tensor, dims: int) -> torch.Tensor:
    if coords.dim() != 2 or coords.shape[1] != dims:
        raise ValueError(f"coords must be [P, D] with D={dims} directions, got shape {tuple(coords.shape)}")
    if coords.dtype not in _FLOATS:
        raise ValueError(f"coords must be a floating-point tensor, got {coords.dtype}")
    return coords


def segment_scales(d: torch.Tensor, theta: torch.Tensor, segments: torch.Tensor, norm: str = "filter",
                   *, backend: Backend = "auto") -> torch.Tensor:
    """Per-segment scale factors ``[S]`` fp32 (contract: ``fastland.directions.segment_scales``)."""
    _check_names(norm, None)
    theta = _flat("theta", theta)
    d = _flat("d", d, theta.numel())
    if resolve_backend(backend, _device(d, theta)) == "torch":
        return segment_scales_reference(d, theta, segments, norm)
    import fastland.kernels.normalize as kn

    return kn.segment_scales(d, theta, segments, norm)


def normalize(d: torch.Tensor, theta: torch.Tensor, segments: torch.Tensor, norm: str = "filter",
              ignore: str = "biasbn", *, backend: Backend = "auto", out: torch.Tensor | None = None) -> torch.Tensor:
    """Normalized direction ``[N]`` fp32 (contract: ``fastland.directions.normalize_reference``)."""
    _check_names(norm, ignore)
    theta = _flat("theta", theta)
    d = _flat("d", d, theta.numel())
    device = _device(d, theta)
    _check_out(out, (theta.numel(),), torch.float32, device)
    if resolve_backend(backend, device) == "torch":
        result = normalize_reference(d, theta, segments, norm, ignore)
        return result if out is None else out.copy_(result)
    import fastland.kernels.normalize as kn

    return kn.normalize(d, theta, segments, norm, ignore, out=out)


def perturb(theta: torch.Tensor, dirs: torch.Tensor, coords: torch.Tensor, dtype: torch.dtype = torch.float32,
            *, backend: Backend = "auto", out: torch.Tensor | None = None) -> torch.Tensor:
    """``[P, N]`` weights ``θ + coords @ dirs`` (contract: ``fastland.directions.perturb_reference``).

    The Triton path covers D ∈ {1, 2} and fp32/bf16/fp16 output; ``auto`` uses the
    reference for anything else.
    """
    theta = _flat("theta", theta)
    dirs = _rows("dirs", dirs, theta.numel())
    coords = _coords(coords, dirs.shape[0])
    device = _device(theta, dirs, coords)
    shape = (coords.shape[0], theta.numel())
    _check_out(out, shape, dtype, device)
    supported = dirs.shape[0] in (1, 2) and dtype in _TRITON_OUT
    if resolve_backend(backend, device, supported) == "torch":
        result = perturb_reference(theta, dirs, coords, dtype)
        return result if out is None else out.copy_(result)
    _check_triton_case(dirs.shape[0], dtype)
    import fastland.kernels.perturb as kp

    return kp.perturb(theta, dirs, coords, dtype, out=out)


def scaled_directions_reference(theta: torch.Tensor, raw: torch.Tensor, scales: torch.Tensor,
                                segments: torch.Tensor, ignore: str = "biasbn") -> torch.Tensor:
    """Plain-torch ``[D, N]`` normalized directions from raw ones and given scales ``[D, S]``.

    The same rule as ``normalize_reference``, with the scales supplied instead of computed:
    ``SEG_SMALL`` rows are 0 (``ignore='biasbn'``) or θ, the rest ``raw · scale``.
    """
    seg = segments.to(raw.device)
    scaled = raw.float() * torch.repeat_interleave(scales.float(), seg[:, 1], dim=1)
    small = torch.repeat_interleave(seg[:, 2] == SEG_SMALL, seg[:, 1])
    fill = torch.zeros_like(scaled[0]) if ignore == "biasbn" else theta.float()
    return torch.where(small, fill, scaled)


def perturb_scaled(theta: torch.Tensor, raw: torch.Tensor, scales: torch.Tensor, segments: torch.Tensor,
                   coords: torch.Tensor, ignore: str = "biasbn", dtype: torch.dtype = torch.float32,
                   *, backend: Backend = "auto", out: torch.Tensor | None = None) -> torch.Tensor:
    """Fused normalization + perturbation: ``perturb`` of the *raw* directions ``[D, N]``
    normalized on the fly by ``scales [D, S]`` (from ``segment_scales``) and the ``ignore``
    rule, so the normalized directions are never written to memory."""
    _check_names(None, ignore)
    theta = _flat("theta", theta)
    raw = _rows("raw", raw, theta.numel())
    coords = _coords(coords, raw.shape[0])
    if scales.dim() != 2 or tuple(scales.shape) != (raw.shape[0], segments.shape[0]):
        raise ValueError(f"scales must be [D, S] = [{raw.shape[0]}, {segments.shape[0]}], got {tuple(scales.shape)}")
    device = _device(theta, raw, coords, scales)
    shape = (coords.shape[0], theta.numel())
    _check_out(out, shape, dtype, device)
    supported = raw.shape[0] in (1, 2) and dtype in _TRITON_OUT
    if resolve_backend(backend, device, supported) == "torch":
        dirs = scaled_directions_reference(theta, raw, scales, segments, ignore)
        result = perturb_reference(theta, dirs, coords, dtype)
        return result if out is None else out.copy_(result)
    _check_triton_case(raw.shape[0], dtype)
    import fastland.kernels.perturb as kp

    scales = scales.to(torch.float32).contiguous()
    return kp.perturb_scaled(theta, raw, scales, segments, coords, ignore, dtype, out=out)


def _check_triton_case(dims: int, dtype: torch.dtype) -> None:
    if dims not in (1, 2):
        raise ValueError(f"the Triton perturbation kernel takes 1 or 2 directions, got {dims}; use backend='torch'")
    if dtype not in _TRITON_OUT:
        raise ValueError(f"the Triton perturbation kernel writes fp32, bf16 or fp16, not {dtype}; "
                         "use backend='torch'")
