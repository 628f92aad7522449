"""Santurkar et al. smoothness probes: loss variation, gradient predictiveness, β-smoothness.

At a training step t, on the step's own minibatch, with BatchNorm in train mode (batch
statistics) and the running statistics untouched, let g = ∇L(θ_t) and, for each step
length η in H, θ' = θ_t − η·g. A probe records

- the loss variation band       [min_H L(θ'), max_H L(θ')],
- the gradient predictiveness band [min_H ‖g − ∇L(θ')‖, max_H ‖g − ∇L(θ')‖],
- the effective β-smoothness     max_H ‖g − ∇L(θ')‖ / ‖η·g‖.

The K perturbed weight sets are ``directions.perturb``'s line case (``dirs = g[None]``,
``coords = −η[:, None]``). Their K gradients are computed by one of three paths:

- *sequential*: one ``torch.func.grad`` of ``functional_call`` per weight set; the plain
  reference, for any model;
- *batched*: one ``vmap(grad(...))`` call over the K weight sets (fast on CUDA; on the CPU vmap
  turns convolutions into slow grouped ones);
- *layered* (``Layered``): for a flat ``nn.Sequential`` of Conv2d, Linear, BatchNorm, ReLU,
  MaxPool2d and Flatten (LeNet and VGG-16, with and without BN), each weight set's forward and
  backward written out layer by layer with the ATen kernels autograd records, without autograd's
  or functorch's per-call work. The first layer's weight gradients for all K step lengths are one
  convolution with K×C output channels; a ReLU before a 2×2 max-pool runs after it (they commute)
  and the pool is two ``torch.maximum`` (``max_pool2d`` is ~10x slower on the CPU) with the
  gradient routed as ``max_pool2d`` routes it (first maximum in row-major order, ties included);
  the weight sets are made one at a time in one buffer, and the buffers are kept between probes
  (a fresh buffer of hundreds of MB costs a page fault per 4 KB at every probe).

``auto`` is a fixed rule per device and model, so the same command gives the same numbers:
layered on the CPU where the model has that pattern, else sequential; batched on CUDA.

g from the training step. ``fastland.train`` calls the probe between ``backward()`` and
``optimizer.step()`` with ``from_grad=True``: g is the step's own ``.grad`` (same minibatch, BN in
train mode) and L(θ_t) its loss, instead of one more gradient; on the CPU these equal the recomputed
ones bit for bit (tested). On CUDA g is recomputed all the same: training may run its convolutions
in TF32 (PyTorch's default for cuDNN), while the probe runs in full fp32 (no TF32), because
‖g − ∇L(θ')‖ at small η is a small difference of two gradients that TF32 rounding would swamp.

Identical results. On the CPU, auto's numbers (layered, g from the step) are today's (sequential, g
recomputed) bit for bit, in every column of ``metrics.csv``, for LeNet, LeNet-BN, VGG-16 and
VGG-16-BN (tests: fresh random inputs, and two trainings whose steps are the same). Why: the forward
pass calls the same kernels on the same inputs (a max-pool, a ReLU and their swap are exact), so
every loss is the same; the backward calls the kernels autograd calls, with the gradient routed
through ReLU and max-pool by the same decisions, since they are taken on the same forward values;
and the first layer's stacked weight gradient equals the K separate ones bit for bit with oneDNN on
this CPU. That kernel is the one place another machine could round differently, and then
"identical" has to mean what it can for a column made from a gradient: a difference of ∇L(θ') of
fp32 rounding, at most 1e-6·‖∇L(θ')‖, so that |Δ‖g − ∇L(θ')‖| ≤ 1e-6·(‖g‖ + ‖g − ∇L(θ')‖) (the tests'
bound, from ``metrics.csv`` alone). Relative to ‖g − ∇L(θ')‖ itself that is larger wherever
‖g − ∇L(θ')‖ ≪ ‖∇L‖ (cancellation; see below), which is why "within 1e-6 relative per column" can
be promised for the losses and ‖g‖ on any machine, and for the gradient columns only as bit for bit
(this CPU) or relative to ‖∇L(θ')‖.

Cost (``benchmarks/bench_train.py``, results in ``benchmarks/results/train-cpu-*``): on the 2-core
dev CPU with one thread, a probe at every step costs about 6 plain training steps for LeNet and
LeNet-BN (today's: about 9.4) and about 7.5 for VGG-16 at batch 8 (today's: about 12). The issue's
4 is below what identical results allow here: the convolution kernels alone, the same the plain
step runs, once per step length, take about 4 plain steps for LeNet. A faster first layer,
conv(x, θ₁) − η·conv(x, g₁) (the engine's factorization), would save about one plain step, but it
changes the forward by rounding, and on CIFAR-10 (JPEG copy) LeNet it moved gradient predictiveness
by more than 1e-6 relative in 17 of 320 rows (up to 2e-4) through subgradient jumps (below).

A probe is an evaluation, never a training step: it runs on a parameter-free copy of the
model whose BatchNorm layers keep no running statistics
(``torch.func.replace_all_batch_norm_modules_``), takes θ by value, and never writes to
the model's parameters, ``.grad``, buffers, optimizer or RNG.

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
it vanishes with average pooling and softplus (max 1.2e-5 over 320 rows). That is why the layered
path keeps every forward kernel as it is. ``auto`` is a fixed rule per device, so one command always
takes one path and repeats its numbers bit for bit (``tests/test_hardening.py`` bounds the difference
between the batched and sequential paths).
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
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value, replace_all_batch_norm_modules_, vmap

from fastland import directions
from fastland.engine.fastpaths.pool import is_pool2
from fastland.engine.precision import precision_context
from fastland.errors import UserError
from fastland.losses import Task
from fastland.params import FlatSpace

MODES = ("auto", "layered", "batched", "sequential")
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


# --- the layered path ---------------------------------------------------------------------
# Each layer's ``forward(h, p, saved)`` returns its output and appends to ``saved`` what its
# ``backward(d, p, saved, grads, need_input)`` needs; backward puts the parameters' gradients in
# ``grads`` and returns the input's (None when ``need_input`` is False). ``p`` maps parameter
# names to the weight set's tensors. The kernels are the ones autograd records for the module's
# forward, so that the values are the sequential path's bit for bit.
_conv_backward = torch.ops.aten.convolution_backward
_threshold_backward = torch.ops.aten.threshold_backward
STACK_BYTES = 256 * 2**20  # the first layer's stacked output gradient above this: one weight gradient per η instead


class _NotLayered(Exception):
    """The model (or this input) does not have the pattern the layered path covers."""


class _Conv:
    def __init__(self, name: str, m: nn.Conv2d) -> None:
        if m.padding_mode != "zeros" or isinstance(m.padding, str):
            raise _NotLayered(f"{name}: padding {m.padding!r} ({m.padding_mode})")
        self.module, self.weight = m, f"{name}.weight"
        self.bias = f"{name}.bias" if m.bias is not None else None
        self.params = (self.weight, self.bias) if self.bias else (self.weight,)
        self.args = (list(m.stride), list(m.padding), list(m.dilation), False, [0] * len(m.stride), m.groups)

    def forward(self, h: torch.Tensor, p: dict[str, torch.Tensor], saved: list) -> torch.Tensor:
        saved.append(h)
        return self.module._conv_forward(h, p[self.weight], p[self.bias] if self.bias else None)

    def backward(self, d: torch.Tensor, p: dict[str, torch.Tensor], saved: list, grads: dict[str, torch.Tensor],
                 need_input: bool) -> torch.Tensor | None:
        h = saved.pop()
        gi, gw, gb = _conv_backward(d, h, p[self.weight], [self.module.out_channels] if self.bias else None, *self.args,
                                    [need_input, True, self.bias is not None])
        grads[self.weight] = gw
        if self.bias:
            grads[self.bias] = gb
        return gi


class _Linear:
    def __init__(self, name: str, m: nn.Linear) -> None:
        self.weight = f"{name}.weight"
        self.bias = f"{name}.bias" if m.bias is not None else None
        self.params = (self.weight, self.bias) if self.bias else (self.weight,)

    def forward(self, h: torch.Tensor, p: dict[str, torch.Tensor], saved: list) -> torch.Tensor:
        if h.dim() != 2:  # F.linear on [B, *, in] is a matmul with another backward
            raise _NotLayered(f"{self.weight}: a {h.dim()}-D input")
        saved.append(h)
        return F.linear(h, p[self.weight], p[self.bias] if self.bias else None)

    def backward(self, d: torch.Tensor, p: dict[str, torch.Tensor], saved: list, grads: dict[str, torch.Tensor],
                 need_input: bool) -> torch.Tensor | None:
        h = saved.pop()
        grads[self.weight] = d.t().mm(h)  # addmm's backward, in autograd's order of operands
        if self.bias:
            grads[self.bias] = d.sum(0)
        return d.mm(p[self.weight]) if need_input else None


class _BatchNorm:
    """Batch statistics, no running ones (what the probe's stateless copy computes)."""

    def __init__(self, name: str, m: nn.modules.batchnorm._BatchNorm) -> None:
        self.eps = float(m.eps)
        self.weight = f"{name}.weight" if m.weight is not None else None
        self.bias = f"{name}.bias" if m.bias is not None else None
        self.params = tuple(n for n in (self.weight, self.bias) if n)

    def forward(self, h: torch.Tensor, p: dict[str, torch.Tensor], saved: list) -> torch.Tensor:
        w, b = (p[self.weight] if self.weight else None), (p[self.bias] if self.bias else None)
        out, mean, invstd = torch.ops.aten.native_batch_norm(h, w, b, None, None, True, 0.0, self.eps)
        saved.append((h, mean, invstd))
        return out

    def backward(self, d: torch.Tensor, p: dict[str, torch.Tensor], saved: list, grads: dict[str, torch.Tensor],
                 need_input: bool) -> torch.Tensor | None:
        h, mean, invstd = saved.pop()
        gi, gw, gb = torch.ops.aten.native_batch_norm_backward(
            d, h, p[self.weight] if self.weight else None, None, None, mean, invstd, True, self.eps,
            [need_input, self.weight is not None, self.bias is not None])
        if self.weight:
            grads[self.weight] = gw
        if self.bias:
            grads[self.bias] = gb
        return gi


class _ReLU:
    params: tuple[str, ...] = ()

    def forward(self, h: torch.Tensor, p: dict[str, torch.Tensor], saved: list) -> torch.Tensor:
        out = torch.relu(h)
        saved.append(out)
        return out

    def backward(self, d: torch.Tensor, p: dict[str, torch.Tensor], saved: list, grads: dict[str, torch.Tensor],
                 need_input: bool) -> torch.Tensor | None:
        return _threshold_backward(d, saved.pop(), 0)


class _MaxPool:
    """``MaxPool2d``, with the ReLU before it when ``relu`` (max-pool then ReLU: the same values).

    A 2×2/stride-2 pool over even sizes is two ``torch.maximum`` (``max_pool2d`` is ~10x slower on
    the CPU); its backward sends each window's gradient to the first maximum in row-major order,
    ``max_pool2d``'s rule, by differences that are exactly 0 at a maximum. Any other pool is
    ``max_pool2d_with_indices`` and its backward.
    """

    params: tuple[str, ...] = ()

    def __init__(self, m: nn.MaxPool2d, relu: bool) -> None:
        self.module, self.relu, self.fast = m, relu, is_pool2(m)

    def forward(self, z: torch.Tensor, p: dict[str, torch.Tensor], saved: list) -> torch.Tensor:
        n, c, hh, ww = z.shape if z.dim() == 4 else (0, 0, 1, 1)
        if not (self.fast and z.dim() == 4 and hh % 2 == 0 and ww % 2 == 0):
            if self.relu:
                z = torch.relu(z)
            m = self.module
            out, idx = torch.ops.aten.max_pool2d_with_indices(z, _pair(m.kernel_size), _pair(m.stride or m.kernel_size),
                                                              _pair(m.padding), _pair(m.dilation), m.ceil_mode)
            saved.append((z, idx, None, None))
            return out
        zz = z.view(n, c, hh // 2, 2, ww // 2, 2)
        row0 = torch.maximum(zz[:, :, :, 0, :, 0], zz[:, :, :, 0, :, 1])
        row1 = torch.maximum(zz[:, :, :, 1, :, 0], zz[:, :, :, 1, :, 1])
        top = torch.maximum(row0, row1)
        out = torch.relu(top) if self.relu else top
        saved.append((z, row0, row1, (top, out)))
        return out

    def backward(self, d: torch.Tensor, p: dict[str, torch.Tensor], saved: list, grads: dict[str, torch.Tensor],
                 need_input: bool) -> torch.Tensor | None:
        z, a, b, tops = saved.pop()
        if tops is None:  # the general pool (a = indices); the ReLU, if any, came before it
            m = self.module
            gi = torch.ops.aten.max_pool2d_with_indices_backward(
                d, z, _pair(m.kernel_size), _pair(m.stride or m.kernel_size), _pair(m.padding), _pair(m.dilation),
                m.ceil_mode, a)
            return _threshold_backward(gi, z, 0) if self.relu else gi
        top, out = tops
        if self.relu:
            d = _threshold_backward(d, out, 0)
        n, c, hh, ww = z.shape
        zz = z.view(n, c, hh // 2, 2, ww // 2, 2)
        grad = torch.empty_like(zz)
        # threshold_backward(d, gap, 0) keeps d where gap > 0, i.e. where that candidate is below the
        # maximum; d minus it is d exactly at a maximum and +0 elsewhere (NaN aside: then all is NaN).
        first = d - _threshold_backward(d, top - a, 0)  # row 0 holds the maximum: it takes the gradient
        for r, g, row in ((0, first, a), (1, d - first, b)):
            left = g - _threshold_backward(g, row - zz[:, :, :, r, :, 0], 0)
            grad[:, :, :, r, :, 0] = left
            torch.sub(g, left, out=grad[:, :, :, r, :, 1])
        return grad.view(n, c, hh, ww)


def _pair(v: int | tuple[int, ...]) -> list[int]:
    return list(v) if isinstance(v, tuple) else [v, v]


class _Flatten:
    params: tuple[str, ...] = ()

    def forward(self, h: torch.Tensor, p: dict[str, torch.Tensor], saved: list) -> torch.Tensor:
        saved.append(h.shape)
        return h.flatten(1)

    def backward(self, d: torch.Tensor, p: dict[str, torch.Tensor], saved: list, grads: dict[str, torch.Tensor],
                 need_input: bool) -> torch.Tensor | None:
        return d.view(saved.pop())


def _leaves(module: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    """The modules of a (nested) ``nn.Sequential`` in execution order, with their dotted names."""
    if not isinstance(module, nn.Sequential):
        return [(prefix.rstrip("."), module)]
    return [leaf for name, child in module.named_children() for leaf in _leaves(child, f"{prefix}{name}.")]


def _layers(model: nn.Module) -> list:
    """The layered path's layers for ``model``; raises ``_NotLayered`` where the pattern does not fit."""
    if not isinstance(model, nn.Sequential):
        raise _NotLayered(f"{type(model).__name__} is not an nn.Sequential")
    leaves = _leaves(model)
    layers: list = []
    i = 0
    while i < len(leaves):
        name, m = leaves[i]
        nxt = leaves[i + 1][1] if i + 1 < len(leaves) else None
        if type(m) is nn.Conv2d:
            layers.append(_Conv(name, m))
        elif type(m) is nn.Linear:
            layers.append(_Linear(name, m))
        elif type(m) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
            layers.append(_BatchNorm(name, m))
        elif type(m) is nn.ReLU and type(nxt) is nn.MaxPool2d and not nxt.return_indices:
            layers.append(_MaxPool(nxt, relu=True))
            i += 1
        elif type(m) is nn.ReLU:
            layers.append(_ReLU())
        elif type(m) is nn.MaxPool2d and not m.return_indices:
            layers.append(_MaxPool(m, relu=False))
        elif type(m) is nn.Flatten and m.start_dim == 1 and m.end_dim == -1:
            layers.append(_Flatten())
        elif type(m) is not nn.Identity:
            raise _NotLayered(f"{name or 'the model'}: {type(m).__name__}")
        i += 1
    if not layers:
        raise _NotLayered("no layers")
    covered = [n for layer in layers for n in layer.params]
    if sorted(covered) != sorted(n for n, _ in model.named_parameters()):
        raise _NotLayered("parameters outside the layers")
    return layers


class Layered:
    """The layered path (see the module doc) for one model: ``gradients(weights, x, y, loss_fn)``."""

    def __init__(self, model: nn.Module, space: FlatSpace) -> None:
        self.layers = _layers(model)
        self.space = space
        self.slices = {i.name: (i.offset, i.offset + i.numel) for i in space.infos}
        first = self.layers[0]
        self.stack = isinstance(first, _Conv) and first.module.groups == 1
        self._buffers: dict[str, torch.Tensor] = {}  # see ``_keep``

    def _keep(self, key: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """A buffer of ``shape`` kept between probes: a fresh one of a few hundred MB costs the CPU a page
        fault per 4 KB at every probe (a third of a VGG-16 probe's time)."""
        n = math.prod(shape)
        buf = self._buffers.get(key)
        if buf is None or buf.device != like.device or buf.dtype != like.dtype or buf.numel() < n:
            self._buffers.pop(key, None)
            buf = self._buffers[key] = torch.empty(n, dtype=like.dtype, device=like.device)
        return buf[:n].view(shape)

    def _stacked(self, shape: torch.Size, k: int, like: torch.Tensor) -> torch.Tensor | None:
        """``[B, K·C, H, W]`` for the K first-layer output gradients, or None where it would be too large."""
        want = (shape[0], k * shape[1], *shape[2:])
        if math.prod(want) * like.element_size() > STACK_BYTES:
            return None
        return self._keep("stacked", want, like)

    def gradients(self, weights: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                  loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Losses ``[K]`` and flat gradients ``[K, N]`` at the K weight sets ``weights [K, N]``."""
        grads = torch.empty_like(weights)
        return self._run(weights.shape[0], lambda k: weights[k], weights, x, y, loss_fn, grads), grads

    def line_gradients(self, theta: torch.Tensor, g: torch.Tensor, etas: list[float], x: torch.Tensor, y: torch.Tensor,
                       loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The same at θ − η_k·g for the K step lengths, each weight set made when its turn comes in one kept
        buffer, as ``directions.perturb``'s reference makes row k (θ, then ``addcmul_`` of −η_k and g: the same
        bits; a test checks it); the gradients ``[K, N]`` are in a kept buffer that the next probe overwrites.
        For VGG-16 this spares allocating and filling the K weight sets, a quarter of a probe."""
        k_count = len(etas)
        coords = -torch.tensor(etas, dtype=torch.float32, device=theta.device)[:, None]
        row = self._keep("weights", tuple(theta.shape), theta)

        def weights(k: int) -> torch.Tensor:
            row.copy_(theta)
            return row.addcmul_(coords[k], g)

        first = self.layers[0]
        firsts = None
        if self.stack:  # the first layer's K weight sets side by side, for its stacked gradient
            a, b = self.slices[first.weight]
            firsts = torch.empty(k_count, b - a, dtype=theta.dtype, device=theta.device)
            firsts.copy_(theta[a:b].expand(k_count, -1)).addcmul_(coords, g[a:b])
        grads = self._keep("grads", (k_count, theta.shape[0]), theta)
        return self._run(k_count, weights, firsts, x, y, loss_fn, grads, first_offset=True), grads

    def _run(self, k_count: int, weights: Callable[[int], torch.Tensor], firsts: torch.Tensor | None, x: torch.Tensor,
             y: torch.Tensor, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], grads: torch.Tensor,
             first_offset: bool = False) -> torch.Tensor:
        """The K forward and backward passes; fills ``grads [K, N]`` and returns the losses ``[K]``.
        ``firsts``: the first layer's K weight sets (rows of ``[K, N]`` or, with ``first_offset``, of just
        that layer's weight), for its stacked gradient."""
        layers = self.layers
        losses = torch.empty(k_count, dtype=grads.dtype, device=grads.device)
        first, stacked = layers[0], None
        with torch.no_grad():
            for k in range(k_count):
                p = self.space.views(weights(k))
                saved: list[list] = [[] for _ in layers]
                h = x
                for layer, s in zip(layers, saved, strict=True):
                    h = layer.forward(h, p, s)
                with torch.enable_grad():
                    out = h.detach().requires_grad_()
                    loss = loss_fn(out, y)
                    (d,) = torch.autograd.grad(loss, out)
                losses[k] = loss.detach()
                found: dict[str, torch.Tensor] = {}
                for i in range(len(layers) - 1, 0, -1):
                    d = layers[i].backward(d, p, saved[i], found, need_input=True)
                if self.stack and k == 0:
                    stacked = self._stacked(d.shape, k_count, d)
                if stacked is not None:  # the first layer's weight gradients come after the loop, all K at once
                    c = d.shape[1]
                    stacked[:, k * c : (k + 1) * c] = d
                else:
                    first.backward(d, p, saved[0], found, need_input=False)
                for name, t in found.items():
                    a, b = self.slices[name]
                    grads[k, a:b] = t.reshape(-1)
            if stacked is not None:
                a, b = self.slices[first.weight]
                w = firsts if first_offset else firsts[:, a:b]
                self._first_layer(first, w, x, stacked, grads)
        return losses

    def _first_layer(self, first: _Conv, w: torch.Tensor, x: torch.Tensor, stacked: torch.Tensor,
                     grads: torch.Tensor) -> None:
        """The K first-layer weight (and bias) gradients as one convolution with K×C output channels
        (``w``: the K weight sets of that layer, ``[K, C·…]``)."""
        k_count = w.shape[0]
        w = w.reshape(k_count * first.module.out_channels, *first.module.weight.shape[1:])
        _, gw, gb = _conv_backward(stacked, x, w, [w.shape[0]] if first.bias else None, *first.args,
                                   [False, True, first.bias is not None])
        a, b = self.slices[first.weight]
        grads[:, a:b] = gw.view(k_count, -1)
        if first.bias:
            a, b = self.slices[first.bias]
            grads[:, a:b] = gb.view(k_count, -1)


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
        try:
            self.layered: Layered | None = Layered(self.skeleton, self.space)
            self.not_layered = ""
        except _NotLayered as why:
            self.layered, self.not_layered = None, str(why)
            if mode == "layered":
                raise UserError(f"--probe-mode layered needs a flat nn.Sequential of Conv2d, Linear, BatchNorm, ReLU, "
                                f"MaxPool2d and Flatten layers ({why}); use auto or sequential") from None

    def _loss(self, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = functional_call(self.skeleton, params, (x,))
        return self._loss_of(out, y)

    def _loss_of(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.task.batch_loss(out, y) if self.task is not None else nn.functional.cross_entropy(out, y)

    # --- the three paths: losses [K] and flat gradients [K, N] at K weight sets W [K, N] ----
    def gradients_batched(self, weights: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """All K gradients in one ``vmap(grad(...))`` call over ``batch_views(weights)``."""
        grads, losses = self._batched_grad(self.space.batch_views(weights), x, y)
        k = weights.shape[0]
        return losses, torch.cat([grads[n].reshape(k, -1) for n in self.space.names], dim=1)

    def gradients_sequential(self, weights: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The same K gradients, one ``grad`` call per weight set: the plain reference."""
        losses, flat = [], []
        for w in weights:
            grads, loss = self._grad(self.space.views(w), x, y)
            losses.append(loss)
            flat.append(torch.cat([grads[n].reshape(-1) for n in self.space.names]))
        return torch.stack(losses), torch.stack(flat)

    def gradients_layered(self, weights: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The same K gradients, layer by layer (``Layered``); raises ``_NotLayered`` where the model or
        this input does not fit the pattern."""
        if self.layered is None:
            raise _NotLayered(self.not_layered)
        return self.layered.gradients(weights, x, y, self._loss_of)

    def _path(self, mode: str) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        return {"batched": self.gradients_batched, "layered": self.gradients_layered}.get(mode, self.gradients_sequential)

    def _auto(self, device: torch.device) -> str:
        """``auto``'s fixed rule: batched on CUDA; on the CPU layered where the model fits, else sequential."""
        if device.type == "cuda":
            return "batched"
        return "layered" if self.layered is not None else "sequential"

    # --- one probe ------------------------------------------------------------------------
    def training_gradient(self, model: nn.Module) -> torch.Tensor | None:
        """g as the training step left it in ``.grad`` (flat, fp32), or None where a parameter has no
        gradient or is not fp32 (then the probe computes g itself)."""
        params = dict(model.named_parameters())
        found = [params[n].grad for n in self.space.names]
        if any(t is None or t.dtype != torch.float32 for t in found):
            return None
        return torch.cat([t.detach().reshape(-1) for t in found])

    def line(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, g: torch.Tensor | None = None,
             loss: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """θ_t, g, L(θ_t) and the perturbed weights θ_t − η_k·g ``[K, N]``; g and L(θ_t) are
        computed unless given (the training step's own)."""
        theta, g, loss0 = self._point(model, x, y, g, loss)
        return theta, g, loss0, self._weights(theta, g)

    def _point(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, g: torch.Tensor | None,
               loss: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        theta = self.space.flatten(model)
        if g is None:
            grads, loss = self._grad(self.space.views(theta), x, y)
            g = torch.cat([grads[n].reshape(-1) for n in self.space.names])
        elif loss is None:
            with torch.no_grad():
                loss = self._loss(self.space.views(theta), x, y)
        return theta, g, torch.as_tensor(loss).detach()

    def _weights(self, theta: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        eta = torch.tensor(self.etas, dtype=torch.float32, device=theta.device)
        return directions.perturb(theta, g[None], -eta[:, None])

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, from_grad: bool = False,
                 loss: torch.Tensor | float | None = None) -> ProbeResult:
        """Probe ``model`` at its current θ on the minibatch ``(x, y)``; the model is only read.

        ``from_grad=True``: the caller has just run ``backward()`` of the loss on ``(x, y)`` (BN in
        train mode) and ``.grad`` holds g; the probe takes it, and ``loss`` (that step's loss) as
        L(θ_t), instead of recomputing both. On CUDA g is recomputed all the same (see the module doc).
        """
        with precision_context("fp32", x.device):
            g = self.training_gradient(model) if from_grad and x.device.type == "cpu" else None
            theta, g, loss0 = self._point(model, x, y, g, torch.as_tensor(loss) if g is not None and loss is not None
                                          else None)
            if self.chosen is None:
                self.chosen = self._auto(x.device)
            try:
                if self.chosen == "layered" and self.layered is not None:  # the K weight sets made one at a time
                    losses, grads = self.layered.line_gradients(theta, g, self.etas, x, y, self._loss_of)
                else:
                    losses, grads = self._path(self.chosen)(self._weights(theta, g), x, y)
            except _NotLayered as why:  # this input does not fit (e.g. a Linear on a 3-D tensor)
                if self.mode == "layered":
                    raise UserError(f"--probe-mode layered cannot run this model on these inputs ({why}); "
                                    "use auto or sequential") from None
                self.chosen = "sequential"
                losses, grads = self.gradients_sequential(self._weights(theta, g), x, y)
            except torch.cuda.OutOfMemoryError:
                raise UserError(f"the {self.chosen} probe ran out of GPU memory with {len(self.etas)} step lengths; "
                                "use --probe-mode sequential or fewer --probe-steps") from None
        return self._result(loss0, g, losses, grads)

    def _result(self, loss0: torch.Tensor, g: torch.Tensor, losses: torch.Tensor, grads: torch.Tensor) -> ProbeResult:
        """The probe's numbers from the K gradients ``grads`` (overwritten: ∇L(θ') − g, in place)."""
        eta = torch.tensor(self.etas, dtype=torch.float32, device=g.device)
        gnorm = torch.linalg.vector_norm(g)
        change = torch.linalg.vector_norm(grads.sub_(g[None]), dim=1)
        beta = change / (eta * gnorm)
        # one transfer per probe: everything to the host at once
        host = torch.cat([loss0.reshape(1).to(losses), gnorm.reshape(1), losses, change, beta]).double().cpu().tolist()
        k = len(self.etas)
        return ProbeResult(loss=host[0], grad_norm=host[1], etas=list(self.etas), losses=host[2:2 + k],
                           gradpred=host[2 + k:2 + 2 * k], beta=host[2 + 2 * k:])

    def compare(self, weights: torch.Tensor, x: torch.Tensor, y: torch.Tensor, repeats: int = 2) -> str:
        """Time every path this model has on this minibatch (after a warm-up); returns the fastest (for benchmarks)."""
        modes = ["sequential", "batched"] + (["layered"] if self.layered is not None else [])
        for mode in modes:
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
            except (torch.cuda.OutOfMemoryError, _NotLayered):
                best = math.inf
                if x.device.type == "cuda":
                    torch.cuda.empty_cache()
            self.timings[mode] = best
        if all(math.isinf(self.timings[m]) for m in modes):
            raise UserError("the probe ran out of GPU memory on every path; use fewer --probe-steps or a smaller --batch")
        return min(modes, key=lambda m: self.timings[m])


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
