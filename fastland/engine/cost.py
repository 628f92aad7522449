"""The design.md cost model, measured on the model itself: MACs per sample and activation sizes."""

from __future__ import annotations

import torch
from torch import nn

from .fastpaths.im2col import Im2colConv2d


def macs_per_sample(model: nn.Module, sample: torch.Tensor) -> dict[str, int]:
    """Multiply-accumulates per sample of every conv/linear layer (the design.md cost model), by
    name, measured with hooks on one forward pass of ``sample`` (a prepared input batch)."""
    macs: dict[str, int] = {}
    n = sample.shape[0]

    def hook(m: nn.Module, inp: tuple, out: object, name: str) -> None:
        if not isinstance(out, torch.Tensor):
            return
        if isinstance(m, nn.Linear):
            macs[name] = macs.get(name, 0) + m.weight.numel() * (out.numel() // out.shape[-1]) // n
        else:
            macs[name] = macs.get(name, 0) + out.numel() // n * m.weight[0].numel()

    hooks = [mod.register_forward_hook(lambda m, i, o, name=name: hook(m, i, o, name))
             for name, mod in model.named_modules() if isinstance(mod, nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(sample)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return macs


def activation_floats_per_sample(body: nn.Module, h: torch.Tensor, output: bool = False) -> int:
    """The largest ``input + output`` element count of any module of ``body``, per sample (``h`` is
    the body's input for two or more samples); with ``output``, the body's own output size per
    sample instead. The engine sizes its blocks with these."""
    n = h.shape[0]
    peak = [h[0].numel()]
    if output:
        with torch.no_grad():
            out = body(h.clone())
        return max(1, out.numel() // n) if isinstance(out, torch.Tensor) else 1

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
