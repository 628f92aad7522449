"""Importing torchvision next to a CPU-only torch.

The registry's torchvision wheel is a CUDA build. With the CPU torch its ``_C`` extension
fails to load (it needs ``libtorch_cuda.so``) and ``import torchvision`` then crashes on
``operator torchvision::nms does not exist``. Its pure-Python parts (the datasets) are all
fastland needs, and they work once the two missing operator schemas exist. We define them
only when the import really failed that way, so a normal install is never touched.
"""

from __future__ import annotations

import sys
from types import ModuleType

import torch

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_LIB: torch.library.Library | None = None  # kept alive: dropping it would unregister the schemas


def _define_missing_schemas() -> None:
    global _LIB
    _LIB = torch.library.Library("torchvision", "FRAGMENT")
    for op, schema in _SCHEMAS.items():
        if not _has_schema(op):
            _LIB.define(schema)


def _has_schema(op: str) -> bool:
    try:
        return getattr(torch.ops.torchvision, op).default is not None
    except (AttributeError, RuntimeError):
        return False


def import_torchvision() -> ModuleType:
    """``import torchvision``, working around a CUDA-only extension on a CPU torch."""
    try:
        import torchvision

        return torchvision
    except RuntimeError as err:
        if "torchvision::nms" not in str(err):
            raise
    # The half-imported package is left in sys.modules; drop it and retry with schemas.
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    _define_missing_schemas()
    import torchvision

    return torchvision
