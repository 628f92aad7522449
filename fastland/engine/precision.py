"""Compute precision of the engine: fp32, tf32 (CUDA) or bf16; losses always accumulate in fp32/fp64."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from fastland.errors import UserError

PRECISIONS = ("auto", "fp32", "tf32", "bf16")
DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16}


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> fp32 on CPU, tf32 on CUDA. tf32 is a CUDA format: asking for it elsewhere is an error."""
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "tf32" if device.type == "cuda" else "fp32"
    if precision == "tf32" and device.type != "cuda":
        raise UserError("--precision tf32 needs a CUDA GPU; use fp32 or bf16 on the CPU")
    return precision


@contextlib.contextmanager
def precision_context(precision: str, device: torch.device) -> Iterator[None]:
    """On CUDA, fp32 matmuls and convolutions run as TF32 for ``tf32`` and as true fp32 (IEEE)
    otherwise; PyTorch's own default lets cuDNN convolutions use TF32, which would make an
    "fp32" run silently TF32. The global settings are restored afterwards. No-op on the CPU."""
    if device.type != "cuda":
        yield
        return
    tf32 = precision == "tf32"
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):  # torch >= 2.9
        mm, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
        saved = (mm.fp32_precision, conv.fp32_precision)
        mm.fp32_precision = conv.fp32_precision = "tf32" if tf32 else "ieee"
        try:
            yield
        finally:
            mm.fp32_precision, conv.fp32_precision = saved
    else:
        saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
