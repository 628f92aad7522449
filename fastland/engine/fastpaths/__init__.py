"""Exact rewrites of a model for the engine: less work, the same results.

``plan`` makes a private copy of the model (the caller's model is never touched) and applies
each fast path whose pattern it finds; each is an optional plugin in its own module, tested
against the reference evaluator (``tests/test_engine.py``):

- ``stem``: the factorized first layer of a flat ``nn.Sequential`` (with its BN and pool);
- ``pool``: exact 2x2 max-pools as ``Pool2x2``, and ReLU moved after the pool (Sequential);
- ``bnfold``: eval-mode BN folded into the conv/linear before it, and in-place ReLUs, on a
  ``torch.fx`` trace (any traceable model);
- ``im2col``: convs as unfold + matmul, for the ``im2col`` strategy;
- ``layout``: image inputs in channels-last memory order, where oneDNN's convolutions are faster.

The result is a ``Plan``: the ``body`` the engine runs per point (any ``nn.Module``), how to
turn perturbed flat weights into the body's parameters, and how to make the body's inputs for
a block of points from a data batch. The engine's core sees nothing else of the fast paths.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from fastland.params import FlatSpace
from fastland.reference import prepare_model

from . import bnfold, im2col, layout, pool
from .bnfold import BN, BNFold
from .pool import Pool2x2, is_pool2
from .stem import Stem, StemInputs

__all__ = ["BNFold", "Plan", "PointInputs", "Pool2x2", "Stem", "plan"]


class PointInputs:
    """The body's input for every point of a block: one tensor shared by all points."""

    def __init__(self, x: torch.Tensor) -> None:
        self.shared = x

    def point(self, i: int) -> torch.Tensor:
        return self.shared

    def stacked(self) -> torch.Tensor:  # pragma: no cover - shared inputs are never stacked
        raise NotImplementedError


@dataclass
class Plan:
    """A model prepared for the engine (see the module docstring)."""

    body: nn.Module
    body_names: tuple[str, ...]  # parameter names the body takes, in θ order
    folds: tuple[BNFold, ...] = ()
    stem: Stem | None = None
    applied: list[str] = field(default_factory=list)  # what was rewritten, for the engine's description
    channels_last: bool = False  # feed 4-D image inputs in NHWC memory order (see ``layout``)

    def body_params(self, views: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """``{name: [P, *shape]}`` for the body: BN folded where planned, floats cast to ``dtype``."""
        out = {n: views[n] for n in self.body_names}
        bnfold.folded_params(views, self.folds, out)
        return {k: v.to(dtype) for k, v in out.items()}

    def context(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None] | None:
        """Per-data-batch work shared by every point (the stem's maps and their batch statistics),
        worth caching across blocks; None without a stem."""
        if self.stem is None:
            return None
        maps = self.stem.maps(x)
        stats = self.stem.batch_stats(maps) if (self.stem.bn is not None and self.stem.running is None) else None
        return maps, stats

    def inputs(self, ctx: object, x: torch.Tensor, coords: torch.Tensor, views: dict[str, torch.Tensor],
               dtype: torch.dtype) -> PointInputs | StemInputs:
        """The body's inputs for the block of points ``coords`` on data batch ``x``."""
        if self.stem is None:
            x = x.to(dtype) if x.is_floating_point() else x
            return PointInputs(layout.to_channels_last(x) if self.channels_last else x)
        maps, stats = ctx  # type: ignore[misc]
        return StemInputs(self.stem, maps, coords, self.stem.coefficients(coords, views, stats), dtype)


def plan(model: nn.Module, space: FlatSpace, theta: torch.Tensor, dirs: torch.Tensor, bn_mode: str,
         sample: torch.Tensor, factorize: bool = True, fold_bn: bool = True, fast_pool: bool = True,
         im2col_convs: bool = False, channels_last: bool = False) -> Plan:
    """Prepare a private copy of ``model`` for the engine (see the module docstring).

    ``sample`` is a small prepared input batch on θ's device (for tracing shapes).
    """
    m = prepare_model(model, bn_mode).to(theta.device)  # a private copy: the caller's model stays put
    if space.with_buffers:  # per-point BN statistics (interpolated): the rewrites that read them as constants are off
        factorize = fold_bn = False
    applied: list[str] = []
    stem = None
    body: nn.Module = m
    body_sample = sample
    if isinstance(m, nn.Sequential):
        stem, body = _split_sequential(m, space, theta, dirs, factorize, fast_pool)
        if stem is not None:
            applied.append("factorized first layer")
            with torch.no_grad():
                body_sample = _stem_output(stem, sample, space, theta, dirs)
    if fast_pool and (n := pool.replace_pools(body)):
        applied.append(f"{n} fast 2x2 pools")
    body, folds, relus = bnfold.rewrite(body, body_sample, fold=fold_bn and bn_mode == "eval",
                                        fresh_input=stem is not None)
    if folds:
        applied.append(f"{len(folds)} BN folded")
    if relus:
        applied.append(f"{relus} ReLU in place")
    if im2col_convs and (n := im2col.replace_convs(body)):
        applied.append(f"{n} convs as im2col")
    nhwc = channels_last and stem is None and layout.applies(body, body_sample)
    if nhwc:
        applied.append("channels-last inputs")
    body_names = tuple(n for n, _ in (*body.named_parameters(), *body.named_buffers()) if n in space.names)
    made = {f"{f.layer}.bias" for f in folds if not f.has_bias}
    strays = [n for n, _ in body.named_parameters() if n not in space.names and n not in made]
    if strays:
        raise ValueError(f"engine plan: body parameters {strays[:3]} are not in the flat space")
    return Plan(body, body_names, folds, stem, applied, nhwc)


def _split_sequential(m: nn.Sequential, space: FlatSpace, theta: torch.Tensor, dirs: torch.Tensor, factorize: bool,
                      fast_pool: bool) -> tuple[Stem | None, nn.Module]:
    """The stem (first layer, its BN and its pool) and the rest of a flat Sequential, with
    ReLU → MaxPool swapped to MaxPool → ReLU (they commute exactly)."""
    names = [n for n, _ in m.named_children()]
    mods: OrderedDict[str, nn.Module] = OrderedDict(m.named_children())
    stem, start = None, 0
    if factorize and names and bnfold.linear_layer(mods[names[0]]) and not isinstance(mods[names[0]], nn.Conv1d):
        first = names[0]
        nxt = mods[names[1]] if len(names) > 1 else None
        bn = names[1] if isinstance(nxt, BN) else None
        stem = Stem(first, mods[first], space, theta, dirs, bn, nxt if bn else None)
        start = 2 if bn else 1
    kept = names[start:]
    for a, b in zip(kept[:-1], kept[1:], strict=True):
        if isinstance(mods[a], nn.ReLU) and is_pool2(mods[b]):
            mods[a], mods[b] = mods[b], mods[a]
    if stem is not None and kept and is_pool2(mods[kept[0]]):
        stem.pool = Pool2x2() if fast_pool else mods[kept[0]]
        kept = kept[1:]
    return stem, nn.Sequential(OrderedDict((n, mods[n]) for n in kept))


def _stem_output(stem: Stem, x: torch.Tensor, space: FlatSpace, theta: torch.Tensor, dirs: torch.Tensor) -> torch.Tensor:
    """The stem's output at θ for a sample batch: the body's input, for tracing its shapes."""
    maps = stem.maps(x)
    coords = torch.zeros(1, dirs.shape[0], device=theta.device)
    views = space.batch_views(theta[None].contiguous())
    stats = stem.batch_stats(maps) if (stem.bn is not None and stem.running is None) else None
    return stem.combine_all(maps, coords, stem.coefficients(coords, views, stats))[0]


PlanFactory = Callable[[str], Plan]
