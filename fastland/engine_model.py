"""Exact rewrites of a model for the batched engine: less work, the same results.

The engine runs ``vmap(functional_call(body, params_p, h))`` (or a loop over points).
This module prepares the pieces around that core, each checked against the reference
evaluator in ``tests/test_engine.py``:

- ``Stem``: the **first layer, factorized**. The first conv/linear is linear in its
  weights, so ``conv(x, θ₁ + Σ_k c_k d₁ₖ) = conv(x, θ₁) + Σ_k c_k conv(x, d₁ₖ)``: the
  ``1 + D`` maps are computed once per data batch (and cached), and each grid point
  only combines them (3 MACs per output instead of 75 for LeNet's conv1). A BatchNorm
  right after it is folded into the combination coefficients, in eval mode from the
  running statistics, and in batch mode from the per-batch mean and 3×3 covariance of
  the maps (the batch statistics of a linear combination are a quadratic form in its
  coefficients), so no per-point pass computes statistics. A max-pool right after it
  (once ReLU and pool are swapped) belongs to the stem, which adds the BN shift after
  pooling. In the loop strategy each point costs one pass over the maps: a grid row
  shares ``maps[0] + β·maps[2]``, and a BN scale common to all points (γ unperturbed)
  is applied to the maps once per block.
- ``fold_bn``: in eval mode, ``conv → BN`` becomes a conv with per-point folded weights
  ``w·s`` and bias ``(b − μ)·s + β``, ``s = γ/√(σ² + ε)``: one pass fewer per BN layer.
- ``Pool2x2``: ``MaxPool2d(2)`` as two ``torch.maximum`` over strided views. Identical
  values (NaN propagates the same way); on the 2-core CPU ~30× faster than
  ``max_pool2d_with_indices``, which took more than half of a LeNet forward.
- ``ReLU → MaxPool`` is swapped to ``MaxPool → ReLU`` (they commute exactly), so ReLU
  runs on a quarter of the values, and it runs in place.
- ``Im2colConv2d``: a conv as ``unfold`` + matmul; under ``vmap`` this turns the P
  weight sets into one batched matmul instead of a grouped convolution (the ``im2col``
  strategy).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fastland.params import FlatSpace
from fastland.reference import prepare_model

_BN = nn.modules.batchnorm._BatchNorm


class Pool2x2(nn.Module):
    """Exact ``MaxPool2d(2)`` (stride 2, no padding, floor mode) over the last two dims."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        *lead, h, w = x.shape
        h2, w2 = h // 2, w // 2
        if h % 2 or w % 2:
            x = x[..., : 2 * h2, : 2 * w2]
        rows = x.reshape(*lead, h2, 2, 2 * w2)
        rows = torch.maximum(rows[..., 0, :], rows[..., 1, :])  # [.., h2, 2*w2], contiguous
        cols = rows.reshape(*lead, h2, w2, 2)
        return torch.maximum(cols[..., 0], cols[..., 1])


class Im2colConv2d(nn.Conv2d):
    """A ``Conv2d`` computed as ``unfold`` + matmul (same parameters, same result up to rounding)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        cols = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)  # [B, C·k·k, L]
        out = self.weight.flatten(1) @ cols  # [B, O, L]
        if self.bias is not None:
            out = out + self.bias[:, None]
        ho = (h + 2 * self.padding[0] - self.dilation[0] * (self.kernel_size[0] - 1) - 1) // self.stride[0] + 1
        wo = (w + 2 * self.padding[1] - self.dilation[1] * (self.kernel_size[1] - 1) - 1) // self.stride[1] + 1
        return out.view(*out.shape[:-1], ho, wo)


def _is_pool2(m: nn.Module) -> bool:
    if not isinstance(m, nn.MaxPool2d):
        return False
    def pair(v: int | tuple[int, ...]) -> tuple[int, ...]:
        return tuple(v) if isinstance(v, tuple) else (v, v)
    stride = m.stride if m.stride is not None else m.kernel_size
    return (pair(m.kernel_size) == (2, 2) and pair(stride) == (2, 2) and pair(m.padding) == (0, 0)
            and pair(m.dilation) == (1, 1) and not m.ceil_mode and not m.return_indices)


def _foldable_bn(m: nn.Module) -> bool:
    return isinstance(m, _BN) and m.running_mean is not None and m.running_var is not None


def _linear_layer(m: nn.Module) -> bool:
    return (isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1 and m.padding_mode == "zeros"))


@dataclass(frozen=True)
class BNFold:
    """A BatchNorm (eval mode) folded into the conv/linear ``layer`` right before it."""

    layer: str  # module name prefix, e.g. "0"
    bn: str  # e.g. "1"
    mean: torch.Tensor
    var: torch.Tensor
    eps: float
    has_bias: bool  # whether the original layer had a bias


def _bn_scale(views: dict[str, torch.Tensor], bn: str, var: torch.Tensor, eps: float, p: int, c: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-point ``(γ/√(σ²+ε), β)`` as ``[P, C]`` (γ=1, β=0 for a BN without affine)."""
    gamma = views.get(f"{bn}.weight")
    beta = views.get(f"{bn}.bias")
    inv = torch.rsqrt(var.float() + eps)
    s = (gamma * inv) if gamma is not None else inv.expand(p, c)
    b = beta if beta is not None else torch.zeros(p, c, dtype=s.dtype, device=s.device)
    return s, b


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
            bn_module is not None and _foldable_bn(bn_module) and not bn_module.training) else None
        flats = torch.cat([theta[None], dirs]).float()  # [K, N]
        self.k = flats.shape[0]
        views = [space.views(f) for f in flats]
        w = torch.cat([v[f"{name}.weight"] for v in views])  # [K·C, ...], ordered (k, c)
        b = torch.cat([v[f"{name}.bias"] for v in views]) if layer.bias is not None else None
        self.weight, self.bias = w.contiguous(), (b.contiguous() if b is not None else None)
        self.channels = layer.weight.shape[0]
        self.pool: nn.Module | None = None  # a 2x2 max-pool right after the layer (set by ``plan``)

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
        if coef is not None and bool((coef[:, :, 0] == coef[:1, :, 0]).all()):
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


@dataclass
class Plan:
    """A model prepared for the engine: the optional ``stem``, the ``body`` that runs per
    point, and how to turn the perturbed flat weights into the body's parameters."""

    stem: Stem | None
    body: nn.Module
    body_names: tuple[str, ...]  # parameter names the body takes, in θ order
    folds: tuple[BNFold, ...]

    def body_params(self, views: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """``{name: [P, *shape]}`` for the body: BN folded where planned, cast to ``dtype``."""
        out = {n: views[n] for n in self.body_names}
        for f in self.folds:
            w = views[f"{f.layer}.weight"]
            p, c = w.shape[0], w.shape[1]
            s, beta = _bn_scale(views, f.bn, f.var, f.eps, p, c)
            out[f"{f.layer}.weight"] = w * s.view(p, c, *([1] * (w.dim() - 2)))
            b = views[f"{f.layer}.bias"] if f.has_bias else 0.0
            out[f"{f.layer}.bias"] = (b - f.mean.float()) * s + beta
        return {k: v.to(dtype) for k, v in out.items()}


def plan(model: nn.Module, space: FlatSpace, theta: torch.Tensor, dirs: torch.Tensor, bn_mode: str,
         factorize: bool = True, fold_bn: bool = True, fast_pool: bool = True, im2col: bool = False) -> Plan:
    """Prepare a private copy of ``model`` for the engine (see the module docstring).

    Only a flat ``nn.Sequential`` gets the stem and the BN folds; any other model runs as a
    whole (its pools are still rewritten). ``theta`` and ``dirs`` must be on the model's
    device.
    """
    m = prepare_model(model, bn_mode).to(theta.device)  # a private copy: the caller's model stays put
    stem, folds = None, []
    if isinstance(m, nn.Sequential):
        names = [n for n, _ in m.named_children()]
        mods = OrderedDict(m.named_children())
        start = 0
        if factorize and names and _linear_layer(mods[names[0]]):
            first = names[0]
            nxt = mods[names[1]] if len(names) > 1 else None
            bn = names[1] if isinstance(nxt, _BN) else None
            stem = Stem(first, mods[first], space, theta, dirs, bn, nxt if bn else None)
            start = 2 if bn else 1
        kept = names[start:]
        if bn_mode == "eval" and fold_bn:
            for prev, cur in zip(kept[:-1], kept[1:], strict=True):
                if _linear_layer(mods[prev]) and _foldable_bn(mods[cur]):
                    lay = mods[prev]
                    folds.append(BNFold(prev, cur, mods[cur].running_mean, mods[cur].running_var,
                                        float(mods[cur].eps), lay.bias is not None))
                    if lay.bias is None:  # the folded layer needs a bias parameter to receive
                        lay.bias = nn.Parameter(torch.zeros(lay.weight.shape[0], device=lay.weight.device),
                                                requires_grad=False)
                    mods[cur] = nn.Identity()
        for a, b in zip(kept[:-1], kept[1:], strict=True):
            if isinstance(mods[a], nn.ReLU) and _is_pool2(mods[b]):
                mods[a], mods[b] = mods[b], mods[a]  # max and ReLU commute: ReLU on 1/4 of the values
        if stem is not None and kept and _is_pool2(mods[kept[0]]):
            stem.pool = Pool2x2() if fast_pool else mods[kept[0]]
            kept = kept[1:]
        for i, n in enumerate(kept):
            mod = mods[n]
            if isinstance(mod, nn.ReLU) and _fresh_input(mods, kept[:i], stem is not None):
                mods[n] = nn.ReLU(inplace=True)
            elif fast_pool and _is_pool2(mod):
                mods[n] = Pool2x2()
            elif im2col and isinstance(mod, nn.Conv2d) and mod.groups == 1 and mod.padding_mode == "zeros":
                mods[n] = _as_im2col(mod)
        body: nn.Module = nn.Sequential(OrderedDict((n, mods[n]) for n in kept))
    else:
        body = m
        for parent in list(body.modules()):
            for n, child in parent.named_children():
                if fast_pool and _is_pool2(child):
                    setattr(parent, n, Pool2x2())
                elif im2col and isinstance(child, nn.Conv2d) and child.groups == 1 and child.padding_mode == "zeros":
                    setattr(parent, n, _as_im2col(child))
    body_names = tuple(n for n, _ in body.named_parameters() if n in space.names)
    made = {f"{f.layer}.bias" for f in folds if not f.has_bias}
    strays = [n for n, _ in body.named_parameters() if n not in space.names and n not in made]
    if strays:
        raise ValueError(f"engine plan: body parameters {strays[:3]} are not in the flat space")
    return Plan(stem, body, body_names, tuple(folds))


def _fresh_input(mods: dict[str, nn.Module], before: list[str], stem: bool) -> bool:
    """Whether the module after ``before`` receives a freshly made tensor (the stem's output,
    or a layer's), so an in-place ReLU cannot touch the caller's input (the cached batch)."""
    for n in reversed(before):
        if not isinstance(mods[n], nn.Identity):
            return isinstance(mods[n], (nn.Conv2d, nn.Linear, _BN, nn.MaxPool2d, Pool2x2))
    return stem


def _as_im2col(conv: nn.Conv2d) -> Im2colConv2d:
    new = Im2colConv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                       conv.dilation, 1, conv.bias is not None, device=conv.weight.device)
    new.load_state_dict(conv.state_dict())
    new.requires_grad_(False)
    return new


def macs_per_image(model: nn.Module, image_shape: tuple[int, ...] = (3, 32, 32)) -> dict[str, int]:
    """Multiply-accumulates per image of every conv/linear layer (the design.md cost model), by name."""
    macs: dict[str, int] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Conv2d):
            def conv_hook(m: nn.Module, inp: tuple, out: torch.Tensor, name: str = name) -> None:
                k = m.weight[0].numel()
                macs[name] = out[0].numel() * k
            hooks.append(mod.register_forward_hook(conv_hook))
        elif isinstance(mod, nn.Linear):
            def lin_hook(m: nn.Module, inp: tuple, out: torch.Tensor, name: str = name) -> None:
                macs[name] = m.weight.numel()
            hooks.append(mod.register_forward_hook(lin_hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            p = next(model.parameters())
            model(torch.zeros(1, *image_shape, device=p.device, dtype=p.dtype))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return macs


def activation_floats_per_image(body: nn.Module, h: torch.Tensor) -> int:
    """The largest ``input + output`` element count of any module of ``body``, per image
    (``h`` is the body's input for two or more images); the engine sizes its blocks with it."""
    n = h.shape[0]
    peak = [h[0].numel()]

    def hook(m: nn.Module, inp: tuple, out: object) -> None:
        if isinstance(out, torch.Tensor) and inp and isinstance(inp[0], torch.Tensor):
            patches = m.weight[0].numel() * out[0, 0].numel() if isinstance(m, Im2colConv2d) else 0
            peak.append((inp[0].numel() + out.numel()) // n + patches)

    hooks = [mod.register_forward_hook(hook) for mod in body.modules() if not list(mod.children())]
    try:
        with torch.no_grad():
            body(h.clone())
    finally:
        for hk in hooks:
            hk.remove()
    return max(peak)
