"""Fast path: a conv as ``unfold`` + matmul, so that under ``vmap`` the P weight sets become one
batched matmul instead of a grouped convolution (the engine's ``im2col`` strategy).

Pattern: an ``nn.Conv2d`` with ``groups=1`` and zero padding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Im2colConv2d(nn.Conv2d):
    """A ``Conv2d`` computed as ``unfold`` + matmul (same parameters, same result up to rounding)."""

    fastland_leaf = True  # one call in a torch.fx trace (see bnfold)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        cols = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)  # [B, C·k·k, L]
        out = self.weight.flatten(1) @ cols  # [B, O, L]
        if self.bias is not None:
            out = out + self.bias[:, None]
        ho = (h + 2 * self.padding[0] - self.dilation[0] * (self.kernel_size[0] - 1) - 1) // self.stride[0] + 1
        wo = (w + 2 * self.padding[1] - self.dilation[1] * (self.kernel_size[1] - 1) - 1) // self.stride[1] + 1
        return out.view(*out.shape[:-1], ho, wo)


def applies(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and not isinstance(m, Im2colConv2d) and m.groups == 1 and m.padding_mode == "zeros"


def as_im2col(conv: nn.Conv2d) -> Im2colConv2d:
    new = Im2colConv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                       conv.dilation, 1, conv.bias is not None, device=conv.weight.device)
    new.load_state_dict(conv.state_dict())
    new.requires_grad_(False)
    return new


def replace_convs(root: nn.Module) -> int:
    """Replace every eligible ``Conv2d`` inside ``root`` by ``Im2colConv2d``; returns how many."""
    count = 0
    for parent in list(root.modules()):
        for name, child in parent.named_children():
            if applies(child):
                setattr(parent, name, as_im2col(child))
                count += 1
    return count
