"""Fast path: BatchNorm folded into the conv/linear layer before it (eval mode).

``conv → BN`` becomes a conv with per-point folded weights ``w·s`` and bias
``(b − μ)·s + β``, ``s = γ/√(σ² + ε)``: one pass over the activations fewer per BN layer,
exactly (up to rounding). The folded weights are made per grid point from the perturbed θ
(``folded_params``), so γ and β may be perturbed too.

Pattern (found on a ``torch.fx`` trace of the private copy, so it works for any traceable
model, ``nn.Sequential`` or not): a ``Conv1d/2d`` with ``groups=1`` or a ``Linear`` on 2-D input,
whose output goes only to an eval-mode BN with running statistics, each module called once.
A model that ``torch.fx`` cannot trace (data-dependent control flow) keeps its BN layers.

The same trace makes ReLUs in place where their input is a fresh tensor used by nothing else.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

BN = nn.modules.batchnorm._BatchNorm


@dataclass(frozen=True)
class BNFold:
    """A BatchNorm (eval mode) folded into the conv/linear ``layer`` right before it."""

    layer: str  # module name, e.g. "0" or "layers.0.conv1"
    bn: str
    mean: torch.Tensor
    var: torch.Tensor
    eps: float
    has_bias: bool  # whether the original layer had a bias


def foldable_bn(m: nn.Module) -> bool:
    return isinstance(m, BN) and not m.training and m.running_mean is not None and m.running_var is not None


def linear_layer(m: nn.Module) -> bool:
    """A layer linear in its weights with output channels first: Linear, or an ungrouped conv."""
    return isinstance(m, nn.Linear) or (isinstance(m, nn.Conv1d | nn.Conv2d) and m.groups == 1
                                        and m.padding_mode == "zeros")


def bn_scale(views: dict[str, torch.Tensor], bn: str, var: torch.Tensor, eps: float, p: int, c: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-point ``(γ/√(σ²+ε), β)`` as ``[P, C]`` (γ=1, β=0 for a BN without affine)."""
    gamma = views.get(f"{bn}.weight")
    beta = views.get(f"{bn}.bias")
    inv = torch.rsqrt(var.float() + eps)
    s = (gamma * inv) if gamma is not None else inv.expand(p, c)
    b = beta if beta is not None else torch.zeros(p, c, dtype=s.dtype, device=s.device)
    return s, b


def folded_params(views: dict[str, torch.Tensor], folds: tuple[BNFold, ...], out: dict[str, torch.Tensor]) -> None:
    """Write each folded layer's per-point ``weight [P, ...]`` and ``bias [P, C]`` into ``out``."""
    for f in folds:
        w = views[f"{f.layer}.weight"]
        p, c = w.shape[0], w.shape[1]
        s, beta = bn_scale(views, f.bn, f.var, f.eps, p, c)
        out[f"{f.layer}.weight"] = w * s.view(p, c, *([1] * (w.dim() - 2)))
        b = views[f"{f.layer}.bias"] if f.has_bias else 0.0
        out[f"{f.layer}.bias"] = (b - f.mean.float()) * s + beta


_RELUS = (torch.relu, F.relu)


class _Tracer(fx.Tracer):
    """Keeps fastland's own rewritten modules (``fastland_leaf = True``) as single calls."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return getattr(m, "fastland_leaf", False) or super().is_leaf_module(m, qualname)


def rewrite(model: nn.Module, sample: torch.Tensor, fold: bool, fresh_input: bool = False
            ) -> tuple[nn.Module, tuple[BNFold, ...], int]:
    """Fold BNs (when ``fold``) and make ReLUs in place on a ``torch.fx`` trace of ``model``.

    Returns ``(module, folds, in_place_relus)``; ``model`` itself when it cannot be traced or
    nothing applies. ``sample`` is a small input batch (for the shapes); ``fresh_input`` says
    the model's input is a fresh tensor nobody else reads (the factorized stem's output).
    """
    try:
        gm = fx.GraphModule(model, _Tracer().trace(model))
        ShapeProp(gm).propagate(sample)
    except Exception:  # noqa: BLE001 - not traceable (control flow, unsupported ops): no rewrite
        return model, (), 0
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):  # nn.Identity (e.g. a BN slot left empty) is no operation at all
        if node.op == "call_module" and isinstance(modules[node.target], nn.Identity) and len(node.args) == 1:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    folds: list[BNFold] = []
    if fold:
        for node in list(gm.graph.nodes):
            if node.op != "call_module" or not foldable_bn(modules[node.target]) or calls[node.target] != 1:
                continue
            prev = node.args[0]
            if not (isinstance(prev, fx.Node) and prev.op == "call_module" and len(prev.users) == 1
                    and calls.get(prev.target) == 1 and linear_layer(modules[prev.target])):
                continue
            layer = modules[prev.target]
            if isinstance(layer, nn.Linear) and len(prev.meta["tensor_meta"].shape) != 2:
                continue  # BN1d on [B, C, L] normalizes dim 1, not a Linear's features
            bn = modules[node.target]
            folds.append(BNFold(prev.target, node.target, bn.running_mean, bn.running_var, float(bn.eps),
                                layer.bias is not None))
            if layer.bias is None:  # the folded layer needs a bias parameter to receive
                layer.bias = nn.Parameter(torch.zeros(layer.weight.shape[0], device=layer.weight.device),
                                          requires_grad=False)
            node.replace_all_uses_with(prev)
            gm.graph.erase_node(node)
    relus = _relus_in_place(gm, modules, fresh_input)
    if not folds and not relus:
        return model, (), 0
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    return gm, tuple(folds), relus


def _makes_fresh(node: fx.Node, modules: dict[str, nn.Module], fresh_input: bool) -> bool:
    """Whether ``node``'s output is a new tensor (not a view of, or the same tensor as, another value)."""
    if node.op == "placeholder":
        return fresh_input
    if node.op == "call_module":
        m = modules[node.target]
        return isinstance(m, nn.Conv1d | nn.Conv2d | nn.Linear | BN | nn.MaxPool2d | nn.AvgPool2d | nn.LayerNorm
                          | nn.GroupNorm) or getattr(m, "fastland_leaf", False)
    if node.op == "call_function":
        return node.target in (operator.add, torch.add, operator.mul, torch.mul, torch.cat)
    return False


def _relus_in_place(gm: fx.GraphModule, modules: dict[str, nn.Module], fresh_input: bool) -> int:
    """Point every ReLU whose input is fresh and read by nothing else at ``torch.relu_``."""
    count = 0
    for node in gm.graph.nodes:
        is_relu = ((node.op == "call_function" and node.target in _RELUS)
                   or (node.op == "call_module" and isinstance(modules.get(node.target), nn.ReLU)))
        if not is_relu or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        src = node.args[0]
        if len(src.users) != 1 or not _makes_fresh(src, modules, fresh_input):
            continue
        node.op, node.target, node.args, node.kwargs = "call_function", torch.relu_, (src,), {}
        count += 1
    return count
