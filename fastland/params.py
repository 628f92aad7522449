"""The flat parameter space: one contiguous θ ∈ R^N shared by every part of fastland.

Directions, kernels, the engine, the probes and the surface file all speak in flat
vectors; this module is the only place that walks ``named_parameters()``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# Segment kinds in the segment table (see FlatSpace.segments).
SEG_FILTER = 0  # a normalization unit of a tensor with >= 2 dims (a filter, or a whole tensor in layer mode)
SEG_SMALL = 1  # a whole tensor with <= 1 dim (bias, BN gamma/beta): handled by the ignore rule


@dataclass(frozen=True)
class ParamInfo:
    """Where one parameter tensor lives inside θ."""

    name: str
    shape: tuple[int, ...]
    offset: int
    numel: int

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def is_small(self) -> bool:
        """Tensors with 1 or fewer dimensions (biases, BN γ and β)."""
        return self.ndim <= 1


class FlatSpace:
    """Maps a model's parameters onto one flat vector and back.

    It records ``(name, shape, offset)`` of every parameter, in ``named_parameters()``
    order, and the segment tables used by filter and layer normalization.
    """

    def __init__(self, model: nn.Module, buffers: bool = False) -> None:
        infos = []
        offset = 0
        tensors = list(model.named_parameters())
        if buffers:  # floating buffers too (BN running statistics): for interpolating them between two models
            tensors += [(n, b) for n, b in model.named_buffers() if b.is_floating_point()]
        for name, p in tensors:
            infos.append(ParamInfo(name, tuple(p.shape), offset, p.numel()))
            offset += p.numel()
        if not infos:
            raise ValueError("model has no parameters")
        self.infos: tuple[ParamInfo, ...] = tuple(infos)
        self.numel: int = offset
        self.names: tuple[str, ...] = tuple(i.name for i in infos)
        self.with_buffers = buffers
        self._filter_segments = self._segments(per_filter=True)
        self._layer_segments = self._segments(per_filter=False)

    def _segments(self, per_filter: bool) -> torch.Tensor:
        rows = []
        for info in self.infos:
            if info.is_small:
                rows.append((info.offset, info.numel, SEG_SMALL))
            elif per_filter:
                length = info.numel // info.shape[0]
                rows.extend((info.offset + k * length, length, SEG_FILTER) for k in range(info.shape[0]))
            else:
                rows.append((info.offset, info.numel, SEG_FILTER))
        return torch.tensor(rows, dtype=torch.int64)

    def segments(self, norm: str) -> torch.Tensor:
        """Segment table ``[S, 3]`` of ``(start, length, kind)`` covering θ exactly once.

        ``norm='filter'``: one row per filter (slice along dim 0) of every tensor with
        >= 2 dims; ``'layer'`` (and ``'none'``): one row per such tensor. Tensors with
        <= 1 dim are always one row of kind ``SEG_SMALL``. Rows are in θ order.
        """
        if norm == "filter":
            return self._filter_segments
        if norm in ("layer", "none"):
            return self._layer_segments
        raise ValueError(f"unknown normalization {norm!r}; use filter, layer or none")

    # --- model <-> flat -------------------------------------------------------------
    def _tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        out = dict(model.named_parameters())
        if self.with_buffers:
            out |= {n: b for n, b in model.named_buffers() if b.is_floating_point()}
        return out

    def flatten(self, model: nn.Module) -> torch.Tensor:
        """θ of ``model`` as a new contiguous fp32 vector on the model's device."""
        params = self._tensors(model)
        self._check_names(params)
        return torch.cat([params[i.name].detach().reshape(-1).float() for i in self.infos])

    def flatten_state(self, state: dict[str, torch.Tensor]) -> torch.Tensor:
        """θ from a state_dict (parameters only; buffers are ignored)."""
        missing = [i.name for i in self.infos if i.name not in state]
        if missing:
            raise KeyError(f"state_dict lacks parameters {missing[:3]}")
        return torch.cat([state[i.name].detach().reshape(-1).float() for i in self.infos])

    def load_into(self, model: nn.Module, flat: torch.Tensor) -> None:
        """Copy a flat vector into the model's parameters (in place, no autograd)."""
        self._check_flat(flat, batched=False)
        params = self._tensors(model)
        self._check_names(params)
        with torch.no_grad():
            for info in self.infos:
                params[info.name].copy_(flat[info.offset : info.offset + info.numel].view(info.shape))

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{name: view}`` of a flat ``[N]`` vector, sharing its memory."""
        self._check_flat(flat, batched=False)
        return {i.name: flat[i.offset : i.offset + i.numel].view(i.shape) for i in self.infos}

    def batch_views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{name: [P, *shape]}`` views of a ``[P, N]`` batch, without copying.

        This is what ``vmap(functional_call)`` consumes: every view has a leading
        batch dim of size P and shares storage with ``flat``.
        """
        self._check_flat(flat, batched=True)
        p = flat.shape[0]
        return {i.name: flat[:, i.offset : i.offset + i.numel].view(p, *i.shape) for i in self.infos}

    def unflatten_state(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """A ``{name: tensor}`` dict of CPU copies, for saving directions to disk."""
        return {k: v.detach().cpu().clone() for k, v in self.views(flat).items()}

    def _check_flat(self, flat: torch.Tensor, batched: bool) -> None:
        want = 2 if batched else 1
        if flat.dim() != want or flat.shape[-1] != self.numel:
            shape = "[P, N]" if batched else "[N]"
            raise ValueError(f"expected a {shape} tensor with N={self.numel}, got shape {tuple(flat.shape)}")
        if flat.stride(-1) != 1:
            raise ValueError("flat parameter tensors must be contiguous along N")

    def _check_names(self, params: dict[str, torch.Tensor]) -> None:
        if tuple(params) != self.names:
            raise ValueError("model parameters do not match this FlatSpace")
