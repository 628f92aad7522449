"""Fast path: the first layer, factorized over the directions.

The first conv/linear is linear in its weights, so ``conv(x, θ₁ + Σ_k c_k d₁ₖ) = conv(x, θ₁) +
Σ_k c_k conv(x, d₁ₖ)``: the ``1 + D`` maps are computed once per data batch (and cached by the
evaluator), and each grid point only combines them (3 MACs per output instead of 75 for
LeNet's conv1). A BatchNorm right after it is folded into the combination coefficients, in eval
mode from the running statistics, and in batch mode from the per-batch mean and covariance of
the maps (the batch statistics of a linear combination are a quadratic form in its
coefficients), so no per-point pass computes statistics. A max-pool right after it (once ReLU
and pool are swapped) belongs to the stem, which adds the BN shift after pooling. In the loop
strategy each point costs one pass over the maps: a grid row shares ``maps[0] + β·maps[2]``,
and a BN scale common to all points (γ unperturbed) is applied to the maps once per block.

Pattern: an ``nn.Sequential`` whose first child is a ``Linear`` or an ungrouped, zero-padded
``Conv2d``, optionally followed by a BatchNorm.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fastland.params import FlatSpace

from .bnfold import foldable_bn


class Stem:
    """The first conv/linear layer, factorized over the directions (see the module docstring).

    ``maps(x)`` gives ``[K, B, C, S]`` (K = 1 + D: θ's map first, then one per direction,
    biases included; S = spatial size, 1 for a linear layer). A grid point with
    coordinates ``c`` has output ``Σ_k coef[c, k] · maps[k] + shift[c]`` per channel.
    """

    def __init__(self, name: str, layer: nn.Module, space: FlatSpace, theta: torch.Tensor, dirs: torch.Tensor,
                 bn: str | None, bn_module: nn.Module | None) -> None:
        self.name, self.layer, self.bn = name, layer, bn
        self.eps = float(bn_module.eps) if bn_module is not None else 0.0
        # Running statistics when BN uses them; otherwise (bn_mode batch, or a BN that tracks
        # none) the statistics of each data batch, from ``batch_stats``.
        self.running = (bn_module.running_mean.float(), bn_module.running_var.float()) if (
            bn_module is not None and foldable_bn(bn_module) and not bn_module.training) else None
        flats = torch.cat([theta[None], dirs]).float()  # [K, N]
        self.k = flats.shape[0]
        views = [space.views(f) for f in flats]
        w = torch.cat([v[f"{name}.weight"] for v in views])  # [K·C, ...], ordered (k, c)
        b = torch.cat([v[f"{name}.bias"] for v in views]) if layer.bias is not None else None
        self.weight, self.bias = w.contiguous(), (b.contiguous() if b is not None else None)
        self.channels = layer.weight.shape[0]
        self.pool: nn.Module | None = None  # a 2x2 max-pool right after the layer (set by ``plan``)
        # The BN scale is the same at every point when BN uses running statistics and no direction
        # moves γ. Decided here, from the structure, never from a block's values: a block of one point
        # would otherwise always take the shortcut and a point's last bits would depend on its block.
        gamma_moves = bn is not None and any(f"{bn}.weight" in v and bool(v[f"{bn}.weight"].ne(0).any())
                                             for v in views[1:])
        self.shared_scale = self.running is not None and not gamma_moves

    def maps(self, x: torch.Tensor) -> torch.Tensor:
        """``[K, B, C, S]`` fp32: the first layer applied to ``x`` with θ's and each direction's weights."""
        x = x.float()
        if isinstance(self.layer, nn.Conv2d):
            m = self.layer._conv_forward(x, self.weight, self.bias)
        else:
            m = F.linear(x, self.weight, self.bias)
        b = x.shape[0]
        self.spatial = tuple(m.shape[2:])
        return m.reshape(b, self.k, self.channels, -1).transpose(0, 1).contiguous()

    def batch_stats(self, maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel mean ``[K, C]`` and covariance ``[C, K, K]`` of the maps over batch and space (fp64)."""
        m64 = maps.double()
        mean = m64.mean(dim=(1, 3))
        z = m64 - mean[:, None, :, None]
        cov = torch.einsum("kbcs,lbcs->ckl", z, z) / (maps.shape[1] * maps.shape[3])
        return mean, cov

    def coefficients(self, coords: torch.Tensor, views: dict[str, torch.Tensor],
                     stats: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Per-point ``(coef [P, C, K], shift [P, C])`` when a BN is folded in; None without BN
        (then the coefficients are just ``(1, c_1, .., c_D)`` for every channel)."""
        if self.bn is None:
            return None
        p = coords.shape[0]
        ck = torch.cat([torch.ones(p, 1, dtype=torch.float64, device=coords.device), coords.double()], 1)  # [P, K]
        if self.running is not None:
            mean, var = self.running
            mu, var = mean.double().expand(p, -1), var.double().expand(p, -1)
        else:
            m, cov = stats
            mu = ck @ m  # [P, C]
            var = torch.einsum("pk,ckl,pl->pc", ck, cov, ck).clamp_min(0)
        gamma = views.get(f"{self.bn}.weight")
        beta = views.get(f"{self.bn}.bias")
        s = torch.rsqrt(var + self.eps)
        if gamma is not None:
            s = s * gamma.double()
        shift = -mu * s + (beta.double() if beta is not None else 0.0)
        coef = ck[:, None, :] * s[:, :, None]  # [P, C, K]
        return coef.float(), shift.float()

    def point_inputs(self, maps: torch.Tensor, coords: torch.Tensor, cs: tuple[torch.Tensor, torch.Tensor] | None
                     ) -> Callable[[int], torch.Tensor]:
        """``f(i)``: point i's first-layer output ``[B, C, *spatial]`` (fp32; pooled if the stem
        owns the pool), one point at a time for the loop strategy. Two exact savings:

        - a BN scale shared by every point (eval mode, γ not perturbed: ``coef[p, c, k] =
          c_pk · s_c``) is applied to the maps once per block, so each point's combination is
          the same scalar axpy as without BN;
        - points of one grid row (same last coordinate, consecutive in the surface's order)
          share the partial sum ``maps[0] + c_D · maps[D]``: per point one pass over the maps
          instead of D.
        """
        c = coords.tolist()
        coef, shift = cs if cs is not None else (None, None)
        if coef is not None and self.shared_scale:
            maps = maps * coef[0, :, 0].view(1, 1, -1, 1)  # coef[p, c, 0] = s_c: the scale, shared
            coef = None
        row: dict[str, object] = {}

        def scalar_axpys(ci: list[float]) -> torch.Tensor:
            if self.k == 2:  # one direction: a single pass anyway
                return torch.add(maps[0], maps[1], alpha=ci[0])
            if row.get("key") != ci[-1]:  # a new grid row: its partial sum, once
                row["key"], row["base"] = ci[-1], torch.add(maps[0], maps[-1], alpha=ci[-1])
            out = torch.add(row["base"], maps[1], alpha=ci[0])
            for k in range(2, self.k - 1):
                out.add_(maps[k], alpha=ci[k - 1])
            return out

        def one(i: int) -> torch.Tensor:
            if coef is None:
                out = scalar_axpys(c[i])
            else:
                out = torch.mul(maps[0], coef[i, :, 0, None])
                for k in range(1, self.k):
                    out.addcmul_(maps[k], coef[i, :, k, None])
            out = self._pool(out.view(out.shape[0], self.channels, *self.spatial))
            if shift is not None:  # after the pool: max commutes with adding a per-channel constant
                out.add_(shift[i].view(self.channels, *([1] * len(self.spatial))))
            return out

        return one

    def combine_all(self, maps: torch.Tensor, coords: torch.Tensor,
                    cs: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """All points' first-layer outputs ``[P, B, C, *spatial]`` (fp32), for the vmap strategies."""
        p = coords.shape[0]
        if cs is None:
            ck = torch.cat([torch.ones(p, 1, device=coords.device), coords.float()], 1)  # [P, K]
            out = (ck @ maps.flatten(1)).view(p, *maps.shape[1:])
        else:
            out = torch.einsum("pck,kbcs->pbcs", cs[0], maps)
        out = self._pool(out.reshape(p * maps.shape[1], self.channels, *self.spatial))
        out = out.view(p, maps.shape[1], *out.shape[1:])
        if cs is not None:
            out.add_(cs[1].view(p, 1, self.channels, *([1] * len(self.spatial))))
        return out

    def _pool(self, out: torch.Tensor) -> torch.Tensor:
        return self.pool(out) if self.pool is not None else out


class StemInputs:
    """The body's inputs for a block of points, made from the stem's maps of one data batch."""

    def __init__(self, stem: Stem, maps: torch.Tensor, coords: torch.Tensor,
                 cs: tuple[torch.Tensor, torch.Tensor] | None, dtype: torch.dtype) -> None:
        self.shared = None
        self._stem, self._maps, self._coords, self._cs, self._dtype = stem, maps, coords, cs, dtype
        self._point: Callable[[int], torch.Tensor] | None = None

    def point(self, i: int) -> torch.Tensor:
        if self._point is None:
            self._point = self._stem.point_inputs(self._maps, self._coords, self._cs)
        return self._point(i).to(self._dtype)

    def stacked(self) -> torch.Tensor:
        return self._stem.combine_all(self._maps, self._coords, self._cs).to(self._dtype)
