"""The loss (and accuracy, where it means something) that every part of fastland evaluates.

A ``Task`` turns a model's outputs and the targets into per-point *sums* over a batch, so
that the value at a grid point is the mean over the whole data set, exactly what a plain
loop gives: ``L = Σ_b n_b · loss_fn(outputs_b, targets_b) / N``. ``loss_fn`` returns the
batch *mean* (PyTorch's default ``reduction='mean'``), and weighting each batch by its
size makes a short last batch count as much as it should.

- ``loss_fn=None``: cross-entropy for integer targets, mean squared error for float ones.
- ``"cross_entropy"`` / ``"mse"``: the same by name (the CLI's ``--loss``).
- any callable ``loss_fn(outputs, targets) -> scalar``, e.g. ``nn.SmoothL1Loss()``.

Accuracy (%) is computed for classification only: outputs ``[B, C]`` and integer targets ``[B]``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import vmap

from fastland.errors import UserError, one_line

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NAMED = ("cross_entropy", "mse")


def _per_sample_ce(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    per = F.cross_entropy(outputs, targets, reduction="none")
    return per.reshape(per.shape[0], -1).mean(1) if per.dim() > 1 else per


def _per_sample_mse(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    per = F.mse_loss(outputs, targets.to(outputs.dtype), reduction="none")
    return per.reshape(per.shape[0], -1).mean(1)


_BUILTIN = {"cross_entropy": _per_sample_ce, "mse": _per_sample_mse}


@dataclass
class Task:
    """How to score a batch: ``name`` is recorded in output files; ``accuracy`` says whether
    an accuracy is computed (classification only)."""

    name: str
    loss_fn: LossFn  # batch mean, as PyTorch losses
    accuracy: bool
    per_sample: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None  # built-ins only

    def batch_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The batch mean (what a training step minimizes)."""
        if self.per_sample is not None:
            return self.per_sample(outputs.float(), targets).mean()
        return self.loss_fn(outputs, targets)

    def sums(self, outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Loss sum (fp32, 0-d) and correct count (0-d, or None) of one point over one batch."""
        n = targets.shape[0]
        if self.per_sample is not None:
            loss = self.per_sample(outputs.float(), targets).sum()
        else:
            loss = self.loss_fn(outputs.float(), targets).float() * n
        return loss, self._correct(outputs, targets)

    def batched_sums(self, outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``sums`` for P points at once: ``outputs [P, B, ...]`` -> ``([P], [P] or None)``."""
        p, n = outputs.shape[0], targets.shape[0]
        out = outputs.float()
        if self.per_sample is not None:
            flat = out.reshape(p * n, *out.shape[2:])
            loss = self.per_sample(flat, targets.repeat(p, *([1] * (targets.dim() - 1)))).view(p, n).sum(1)
        else:
            try:
                loss = vmap(self.loss_fn, in_dims=(0, None))(out, targets).float() * n
            except Exception:  # noqa: BLE001 - a loss that cannot run under vmap runs point by point
                loss = torch.stack([self.loss_fn(out[i], targets).float() for i in range(p)]) * n
        correct = None
        if self.accuracy:
            correct = (out.argmax(-1) == targets).sum(1)
        return loss, correct

    def _correct(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | None:
        return (outputs.argmax(-1) == targets).sum() if self.accuracy else None


def _is_integer(t: torch.Tensor) -> bool:
    return not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)


def _name_of(fn: object) -> str:
    if isinstance(fn, nn.Module):
        return f"custom:{type(fn).__name__}"
    qual = getattr(fn, "__qualname__", None) or type(fn).__name__
    mod = getattr(fn, "__module__", None)
    return f"custom:{mod}.{qual}" if mod and mod != "builtins" else f"custom:{qual}"


def resolve(loss_fn: LossFn | str | None, outputs: torch.Tensor, targets: torch.Tensor) -> Task:
    """The ``Task`` for ``loss_fn`` (see the module docstring), checked on a sample of the
    model's ``outputs`` and the matching ``targets``: a loss that does not fit them is a
    ``UserError`` that says why."""
    if not isinstance(outputs, torch.Tensor):
        raise UserError(f"the model returns a {type(outputs).__name__}, not a tensor; wrap it so that forward "
                        "returns the output tensor the loss takes")
    classification = outputs.dim() == 2 and targets.dim() == 1 and _is_integer(targets) and outputs.is_floating_point()
    if loss_fn is None:
        loss_fn = "cross_entropy" if _is_integer(targets) else "mse"
    if isinstance(loss_fn, str):
        if loss_fn not in NAMED:
            raise UserError(f"unknown loss {loss_fn!r}; use {', '.join(NAMED)} or pass a callable loss_fn(outputs, targets)")
        _check_builtin(loss_fn, outputs, targets)
        per = _BUILTIN[loss_fn]
        task = Task(loss_fn, lambda o, t, per=per: per(o, t).mean(), classification and loss_fn == "cross_entropy", per)
    else:
        if not callable(loss_fn):
            raise UserError(f"loss_fn must be a callable loss_fn(outputs, targets) or a name, not {type(loss_fn).__name__}")
        reduction = getattr(loss_fn, "reduction", "mean")
        if reduction != "mean":
            raise UserError(f"loss_fn has reduction={reduction!r}; fastland needs the batch mean (reduction='mean') "
                            "and weights each batch by its size itself")
        task = Task(_name_of(loss_fn), loss_fn, classification)
    try:
        value = task.batch_loss(outputs, targets)
    except Exception as err:  # noqa: BLE001 - any failure here means the loss does not fit the data
        raise UserError(f"the loss {task.name} cannot be computed on the model's outputs {tuple(outputs.shape)} and "
                        f"targets {tuple(targets.shape)} ({type(err).__name__}: {one_line(err)[:200]})") from None
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        raise UserError(f"the loss {task.name} must return one number (the batch mean), got "
                        f"{tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__}")
    return task


def _check_builtin(name: str, outputs: torch.Tensor, targets: torch.Tensor) -> None:
    if name == "cross_entropy":
        if not _is_integer(targets):
            raise UserError(f"cross-entropy needs integer class targets, got {targets.dtype}; pass loss_fn='mse' or "
                            "your own loss_fn")
        if outputs.dim() < 2:
            raise UserError(f"cross-entropy needs outputs [batch, classes, ...], got shape {tuple(outputs.shape)}")
        if tuple(targets.shape) != (outputs.shape[0], *outputs.shape[2:]):
            raise UserError(f"cross-entropy targets {tuple(targets.shape)} do not fit outputs {tuple(outputs.shape)}; "
                            f"expected targets of shape {(outputs.shape[0], *outputs.shape[2:])}")
        check_classes(outputs.shape[1], targets)
    elif tuple(outputs.shape) != tuple(targets.shape):
        raise UserError(f"MSE needs outputs shaped like the targets: outputs {tuple(outputs.shape)}, targets "
                        f"{tuple(targets.shape)}")


def check_classes(num_outputs: int, targets: torch.Tensor) -> None:
    """For cross-entropy: every target is a valid class index of the model's ``num_outputs`` classes."""
    if targets.numel() == 0:
        return
    lo, hi = int(targets.min()), int(targets.max())
    if lo < 0 or hi >= num_outputs:
        raise UserError(f"the targets run from {lo} to {hi}, but the model outputs {num_outputs} classes; "
                        "the targets must be class indices 0..classes-1")
