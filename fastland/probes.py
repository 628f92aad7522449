"""Santurkar et al. smoothness probes: loss variation, gradient predictiveness, β-smoothness.

At a training step t, on the step's own minibatch, with BatchNorm in train mode (batch
statistics) and the running statistics untouched, let g = ∇L(θ_t) and, for each step
length η in H, θ' = θ_t − η·g. A probe records

- the loss variation band       [min_H L(θ'), max_H L(θ')],
- the gradient predictiveness band [min_H ‖g − ∇L(θ')‖, max_H ‖g − ∇L(θ')‖],
- the effective β-smoothness     max_H ‖g − ∇L(θ')‖ / ‖η·g‖.

The K perturbed weight sets come from ``directions.perturb`` (the line case
``dirs = g[None]``, ``coords = −η[:, None]``) and their K gradients are computed either in
one ``vmap(grad(...))`` call (*batched*) or one after another (*sequential*). ``auto`` is
sequential on the CPU (measured faster there for every built-in model: vmap turns convolutions
into slow grouped ones) and batched on CUDA; a fixed rule, so the same command gives the same
numbers (the two paths agree only to rounding).

A probe is an evaluation, never a training step: it runs on a parameter-free copy of the
model whose BatchNorm layers keep no running statistics
(``torch.func.replace_all_batch_norm_modules_``), takes θ by value, and never writes to
the model's parameters, ``.grad``, buffers, optimizer or RNG. g is recomputed by the probe
(one extra gradient) so that g and every ∇L(θ') come from the same function at the same
precision; on CUDA the probe runs in full fp32 (no TF32), because ‖g − ∇L(θ')‖ at small η
is a small difference of two gradients that TF32 rounding would swamp.

Batched and sequential (issue 16 saw up to 0.56% between them in gradient predictiveness and
β-smoothness, with identical weights and losses). Both use the same g (``line``); they compute
∇L(θ') with different kernels (vmap's batched convolutions vs plain ones), so

    |‖g − ∇_b L(θ')‖ − ‖g − ∇_s L(θ')‖| ≤ ‖∇_b L(θ') − ∇_s L(θ')‖,

which is fp32 rounding of a gradient: about 2e-6·‖∇L‖ (LeNet-BN, CPU), and each path is as close
to the fp64 value, so neither is the better one. Relative to ‖g − ∇L(θ')‖ ≈ η·‖Hg‖ that is
cancellation, growing as 1/η: measured (median over 8 minibatches of 128, LeNet-BN with average
pooling and softplus, so no kinks) 1e-7 between the paths and 4e-6 from fp64 at ‖Δ‖/‖g‖ ≈ 1;
1.5e-6 / 3e-6 at 0.1; 1.4e-5 / 4e-5 at 1e-2; 1.5e-4 / 1.3e-4 at 1e-3; 7e-4 / 3e-3 at 1e-4. Rows
whose ‖g − ∇L(θ')‖ is near 1e-4·‖g‖ or below therefore carry 0.1% or more of rounding noise,
whichever path computes them. Taking g from the same call as ∇L(θ') does not help (the
rounding at θ and at θ' is not correlated); fp64 removes it, at 5.6x (LeNet-BN) and 8.3x
(ResNet-20) the time on the CPU, so it is not the default. The other source is not rounding: where a ReLU input or a max-pool pair
is within rounding of a tie, the two paths (or fp32 and fp64) take different subgradients of the
non-smooth loss and ∇L jumps; in LeNet-BN this gave 3e-5 to 2e-3 relative in about 1% of rows, and
it vanishes with average pooling and softplus (max 1.2e-5 over 320 rows). ``auto`` is a fixed
rule per device, so one command always takes one path and repeats its numbers bit for bit
(``tests/test_hardening.py`` bounds the difference between the paths).
"""

from __future__ import annotations

import copy
import csv
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad_and_value, replace_all_batch_norm_modules_, vmap

from fastland import directions
from fastland.engine.precision import precision_context
from fastland.errors import UserError
from fastland.losses import Task
from fastland.params import FlatSpace

MODES = ("auto", "batched", "sequential")
ETA_LOW, ETA_HIGH, ETA_COUNT = 0.5, 4.0, 8  # H = linspace(0.5·lr, 4·lr, 8) = {0.5, 1.0, ..., 4.0}·lr
MAX_ETAS = 64


def default_etas(lr: float, count: int = ETA_COUNT) -> tuple[float, ...]:
    """The default step-length grid H: ``count`` *linearly* spaced values from 0.5·lr to 4·lr.

    Linear, because with the default 8 values it is exactly {0.5, 1.0, …, 4.0}·lr and so
    contains η = lr, the step plain SGD actually takes (Santurkar et al. use [1/2, 4]·lr
    and do not give a count). One value means 0.5·lr alone.
    """
    if count < 1 or count > MAX_ETAS:
        raise UserError(f"--probe-count must be between 1 and {MAX_ETAS}, got {count}")
    if count == 1:
        return (ETA_LOW * lr,)
    step = (ETA_HIGH - ETA_LOW) / (count - 1)
    return tuple(float(lr * (ETA_LOW + k * step)) for k in range(count))


def parse_etas(text: str) -> tuple[float, ...]:
    """An explicit η list such as ``"0.005,0.01,0.02"`` (commas or spaces), each > 0 and finite."""
    parts = [p for p in text.replace(",", " ").split() if p]
    if not parts:
        raise UserError("--probe-steps is empty; give step lengths like 0.005,0.01,0.02")
    etas = []
    for p in parts:
        try:
            v = float(p)
        except ValueError:
            raise UserError(f"--probe-steps: {p!r} is not a number; give step lengths like 0.005,0.01,0.02") from None
        if not (v > 0 and math.isfinite(v)):
            raise UserError(f"--probe-steps: every step length must be a positive number, got {p}")
        etas.append(v)
    if len(etas) > MAX_ETAS:
        raise UserError(f"--probe-steps: at most {MAX_ETAS} step lengths, got {len(etas)}")
    return tuple(etas)


@dataclass(frozen=True)
class ProbeConfig:
    """How to probe a training run: every ``every`` steps, over H = ``etas`` (or the default grid)."""

    every: int = 1
    etas: tuple[float, ...] | None = None  # None: default_etas(lr, count)
    count: int = ETA_COUNT
    mode: str = "auto"

    def check(self) -> None:
        if self.every < 1:
            raise UserError(f"--probe-every must be at least 1, got {self.every}")
        if self.mode not in MODES:
            raise UserError(f"unknown --probe-mode {self.mode!r}; use {', '.join(MODES)}")
        if self.etas is not None:
            parse_etas(",".join(repr(float(e)) for e in self.etas))
        else:
            default_etas(1.0, self.count)

    def resolve(self, lr: float) -> tuple[float, ...]:
        """H as absolute step lengths for a run with learning rate ``lr``."""
        self.check()
        return tuple(float(e) for e in self.etas) if self.etas is not None else default_etas(lr, self.count)


@dataclass
class ProbeResult:
    """One probe: L(θ_t), ‖g‖ and, per η in H, L(θ − ηg) and ‖g − ∇L(θ − ηg)‖."""

    loss: float
    grad_norm: float
    etas: list[float]
    losses: list[float]
    gradpred: list[float]
    beta: list[float]  # ‖g − ∇L(θ')‖ / ‖η g‖ per η

    # min/max with NaN propagation: non-finite values are results, never dropped.
    @property
    def loss_min(self) -> float:
        return _nanpropagating(min, self.losses)

    @property
    def loss_max(self) -> float:
        return _nanpropagating(max, self.losses)

    @property
    def gradpred_min(self) -> float:
        return _nanpropagating(min, self.gradpred)

    @property
    def gradpred_max(self) -> float:
        return _nanpropagating(max, self.gradpred)

    @property
    def beta_smooth(self) -> float:
        return _nanpropagating(max, self.beta)


def _nanpropagating(fn: Callable[[list[float]], float], values: list[float]) -> float:
    return math.nan if any(math.isnan(v) for v in values) else fn(values)


def stateless_copy(model: nn.Module) -> nn.Module:
    """A train-mode copy whose BatchNorm layers normalize with batch statistics and keep none.

    Its own parameters are never used (weights come in through ``functional_call``); it
    exists so that BN under ``vmap`` has no shared running buffers to write to.
    """
    skeleton = copy.deepcopy(model)
    for p in skeleton.parameters():
        p.grad = None
        p.requires_grad_(False)
    replace_all_batch_norm_modules_(skeleton)
    return skeleton.train()


class SmoothnessProbe:
    """Measures the three Santurkar probes of ``model`` on a minibatch; see the module doc."""

    def __init__(self, model: nn.Module, etas: tuple[float, ...] | list[float], mode: str = "auto",
                 task: Task | None = None) -> None:
        if mode not in MODES:
            raise UserError(f"unknown --probe-mode {mode!r}; use {', '.join(MODES)}")
        if not etas:
            raise UserError("the probe needs at least one step length")
        self.space = FlatSpace(model)
        self.skeleton = stateless_copy(model)
        self.etas = [float(e) for e in etas]
        self.mode = mode
        self.chosen: str | None = None if mode == "auto" else mode
        self.timings: dict[str, float] = {}  # seconds for the K perturbed gradients, per path (timed by ``compare``)
        self.task = task
        self._grad = grad_and_value(self._loss)
        self._batched_grad = vmap(self._grad, in_dims=(0, None, None))

    def _loss(self, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = functional_call(self.skeleton, params, (x,))
        return self.task.batch_loss(out, y) if self.task is not None else nn.functional.cross_entropy(out, y)

    # --- the two paths: losses [K] and flat gradients [K, N] at K weight sets W [K, N] ------
    def gradients_batched(self, weights: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """All K gradients in one ``vmap(grad(...))`` call over ``batch_views(weights)``."""
        grads, losses = self._batched_grad(self.space.batch_views(weights), x, y)
        k = weights.shape[0]
        return losses, torch.cat([grads[n].reshape(k, -1) for n in self.space.names], dim=1)

    def gradients_sequential(self, weights: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The same K gradients, one ``grad`` call per weight set."""
        losses, flat = [], []
        for w in weights:
            grads, loss = self._grad(self.space.views(w), x, y)
            losses.append(loss)
            flat.append(torch.cat([grads[n].reshape(-1) for n in self.space.names]))
        return torch.stack(losses), torch.stack(flat)

    def _path(self, mode: str) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        return self.gradients_batched if mode == "batched" else self.gradients_sequential

    # --- one probe ------------------------------------------------------------------------
    def line(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """θ_t, g, L(θ_t) and the perturbed weights θ_t − η_k·g ``[K, N]``."""
        theta = self.space.flatten(model)
        grads, loss0 = self._grad(self.space.views(theta), x, y)
        g = torch.cat([grads[n].reshape(-1) for n in self.space.names])
        eta = torch.tensor(self.etas, dtype=torch.float32, device=theta.device)
        weights = directions.perturb(theta, g[None], -eta[:, None])
        return theta, g, loss0, weights

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> ProbeResult:
        """Probe ``model`` at its current θ on the minibatch ``(x, y)``; the model is only read."""
        with precision_context("fp32", x.device):
            _, g, loss0, weights = self.line(model, x, y)
            if self.chosen is None:
                self.chosen = "batched" if x.device.type == "cuda" else "sequential"
            try:
                losses, grads = self._path(self.chosen)(weights, x, y)
            except torch.cuda.OutOfMemoryError:
                raise UserError(f"the {self.chosen} probe ran out of GPU memory with {len(self.etas)} step lengths; "
                                "use --probe-mode sequential or fewer --probe-steps") from None
        return self._result(loss0, g, losses, grads)

    def _result(self, loss0: torch.Tensor, g: torch.Tensor, losses: torch.Tensor, grads: torch.Tensor) -> ProbeResult:
        eta = torch.tensor(self.etas, dtype=torch.float32, device=g.device)
        gnorm = torch.linalg.vector_norm(g)
        change = torch.linalg.vector_norm(grads - g[None], dim=1)
        beta = change / (eta * gnorm)
        # one transfer per probe: everything to the host at once
        host = torch.cat([loss0.reshape(1), gnorm.reshape(1), losses, change, beta]).double().cpu().tolist()
        k = len(self.etas)
        return ProbeResult(loss=host[0], grad_norm=host[1], etas=list(self.etas), losses=host[2:2 + k],
                           gradpred=host[2 + k:2 + 2 * k], beta=host[2 + 2 * k:])

    def compare(self, weights: torch.Tensor, x: torch.Tensor, y: torch.Tensor, repeats: int = 2) -> str:
        """Time both paths on this minibatch (after a warm-up); returns the faster (for benchmarks)."""
        for mode in ("sequential", "batched"):
            fn = self._path(mode)
            try:
                fn(weights, x, y)  # warm-up: kernel selection, allocator
                best = math.inf
                for _ in range(repeats):
                    _sync(x.device)
                    t0 = time.perf_counter()
                    fn(weights, x, y)
                    _sync(x.device)
                    best = min(best, time.perf_counter() - t0)
            except torch.cuda.OutOfMemoryError:
                best = math.inf
                torch.cuda.empty_cache()
            self.timings[mode] = best
        if math.isinf(self.timings["sequential"]) and math.isinf(self.timings["batched"]):
            raise UserError("the probe ran out of GPU memory on both paths; use fewer --probe-steps or a smaller --batch")
        return "batched" if self.timings["batched"] <= self.timings["sequential"] else "sequential"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- metrics.csv: one row per probed step -----------------------------------------------
BASE_COLUMNS = ("epoch", "step", "loss", "batch_acc", "grad_norm", "loss_min", "loss_max",
                "gradpred_min", "gradpred_max", "beta_smooth")


def metric_columns(k: int) -> list[str]:
    """The header of ``metrics.csv`` for a grid of ``k`` step lengths.

    ``epoch`` is 1-based (as the checkpoints); ``step`` is the 0-based global index of the
    update about to be taken; ``loss``/``batch_acc`` are the training step's own values on
    the minibatch; then the probe summaries, then L(θ − η_i g) and ‖g − ∇L(θ − η_i g)‖ per η_i.
    """
    return [*BASE_COLUMNS, *(f"loss_eta{i}" for i in range(k)), *(f"gradpred_eta{i}" for i in range(k))]


def metric_row(epoch: int, step: int, loss: float, batch_acc: float, r: ProbeResult) -> list[float | int]:
    """One ``metrics.csv`` row, in ``metric_columns`` order."""
    return [epoch, step, loss, batch_acc, r.grad_norm, r.loss_min, r.loss_max, r.gradpred_min, r.gradpred_max,
            r.beta_smooth, *r.losses, *r.gradpred]


def read_metrics(path: str | Path) -> dict[str, np.ndarray]:
    """``metrics.csv`` as ``{column: float64 array}`` (NaN and inf kept as they are)."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        return {}
    header, body = rows[0], rows[1:]
    table = np.array([[float(v) for v in r] for r in body], dtype=np.float64).reshape(len(body), len(header))
    return {name: table[:, i] for i, name in enumerate(header)}
