"""The reference evaluator: one grid point at a time, in plain PyTorch.

It sets the weights, runs the data set through in batches and returns the mean loss over
all samples (and the accuracy, for classification). It is deliberately simple: it is the
correctness oracle for the batched engine and the baseline of the benchmark suite.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.func import replace_all_batch_norm_modules_

from fastland.data import Data
from fastland.directions import perturb_reference
from fastland.losses import Task
from fastland.params import FlatSpace

BN_MODES = ("eval", "batch")
_BN = nn.modules.batchnorm._BatchNorm


def prepare_model(model: nn.Module, bn_mode: str) -> nn.Module:
    """A private copy of ``model`` set up for evaluation in ``bn_mode``, without gradients.

    Every module is in eval mode (dropout off). ``eval``: BN uses its stored running
    statistics (Li et al.). ``batch``: BN normalizes each batch with its own statistics; the
    copy's BN layers have no running statistics at all, so the caller's are never touched.
    """
    if bn_mode not in BN_MODES:
        raise ValueError(f"unknown bn_mode {bn_mode!r}; use eval or batch")
    m = copy.deepcopy(model)
    m.eval()
    if bn_mode == "batch":
        replace_all_batch_norm_modules_(m)
        for mod in m.modules():
            if isinstance(mod, _BN):
                mod.train()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


class ReferenceEvaluator:
    """Evaluates ``L(θ + Σ c_k d_k)`` point by point; see the module docstring."""

    name = "reference"
    precision = "fp32"
    strategy = "reference"

    def __init__(self, model: nn.Module, space: FlatSpace, theta: torch.Tensor, dirs: torch.Tensor, data: Data,
                 task: Task, bn_mode: str = "eval", batch_size: int = 128) -> None:
        self.model = prepare_model(model, bn_mode).to(data.device)
        self.space = space
        self.theta = theta.to(data.device)
        self.dirs = dirs.to(data.device)
        self.data, self.task = data, task
        self.batch_size = int(batch_size)
        self.chunk_size = 32  # points per saved chunk: a few seconds of work at most

    @torch.no_grad()
    def evaluate(self, coords: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Mean loss and accuracy (%, or None without one) per point, for ``coords [P, D]``; fp64 on the CPU."""
        losses, accs = [], []
        for c in coords.to(self.theta.device, torch.float32):
            w = perturb_reference(self.theta, self.dirs, c.unsqueeze(0))[0]
            self.space.load_into(self.model, w)
            loss_sum, correct = 0.0, 0
            for x, y in self.data.batches(self.batch_size):
                loss, hits = self.task.sums(self.model(x), y)
                loss_sum += float(loss)
                correct += int(hits) if hits is not None else 0
            n = len(self.data)
            losses.append(loss_sum / n)
            accs.append(100.0 * correct / n)
        acc = torch.tensor(accs, dtype=torch.float64) if self.task.accuracy else None
        return torch.tensor(losses, dtype=torch.float64), acc
