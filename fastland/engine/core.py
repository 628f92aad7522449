"""The engine's core: many weight sets through one model, for any ``nn.Module`` and any loss.

This is PyTorch's model-ensembling idiom. The perturbed weights of a block of P grid points
are one ``[P, N]`` tensor, viewed as ``{name: [P, *shape]}``; ``vmap(functional_call)`` runs
the body for all P weight sets over one data batch, or a plain loop runs it one point at a
time (``loop``, which also runs models that ``vmap`` cannot, e.g. with data-dependent control
flow). The task turns outputs into per-point loss sums and correct counts.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, vmap

from fastland.losses import Task

from .fastpaths import PointInputs
from .fastpaths.stem import StemInputs


def batched_forward(body: nn.Module, params: dict[str, torch.Tensor], h: torch.Tensor, shared_input: bool
                    ) -> torch.Tensor:
    """``body`` run with P weight sets at once: ``params`` are ``{name: [P, *shape]}``; ``h``
    is one input ``[B, ...]`` shared by all points, or ``[P, B, ...]``. Returns ``[P, B, ...]``."""

    def one_point(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(body, p, (x,))

    return vmap(one_point, in_dims=(0, None if shared_input else 0))(params, h)


def looped_forward(body: nn.Module, params: dict[str, torch.Tensor], inputs: PointInputs | StemInputs,
                   points: int) -> torch.Tensor:
    """The same as ``batched_forward``, one point at a time."""
    return torch.stack([functional_call(body, {k: v[i] for k, v in params.items()}, (inputs.point(i),))
                        for i in range(points)])


def block_sums(strategy: str, body: nn.Module, params: dict[str, torch.Tensor], inputs: PointInputs | StemInputs,
               y: torch.Tensor, task: Task, points: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Loss sums ``[P]`` (fp32) and correct counts ``[P]`` (or None) of P points on one data batch."""
    if strategy == "loop":
        outputs = looped_forward(body, params, inputs, points)
    elif inputs.shared is not None:
        outputs = batched_forward(body, params, inputs.shared, shared_input=True)
    else:
        outputs = batched_forward(body, params, inputs.stacked(), shared_input=False)
    return task.batched_sums(outputs, y)
