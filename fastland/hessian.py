"""Hessian analysis: exact Hessian-vector products over a data set, top eigenpairs, trace, spectral density.

    values, vectors = fastland.hessian.top_eigenvalues(model, (inputs, targets), k=3)
    t = fastland.hessian.trace(model, (inputs, targets)); t.stderr
    grid, rho = fastland.hessian.density(model, (inputs, targets))

**The loss** is the mean over all N samples, ``L(θ) = (1/N) Σ_b n_b · loss_fn(model(x_b), y_b)``
(``loss_fn`` returns a batch *mean*), so a Hessian-vector product is the batch-size-weighted mean
of the per-batch HVPs. (Li et al.'s ``hess_vec_prod.py`` sums them, which multiplies every
eigenvalue by the number of batches.)

**Data and loss** mean what they mean for ``fastland.surface``: ``fastland.api.prepare`` turns
tensors, a Dataset, a DataLoader or an ``EvalSet`` into a set cached on the model's device (split
into batches of ``batch_size``) or streamed (read again for every product), and ``loss_fn`` (None,
``"cross_entropy"``, ``"mse"`` or a callable returning the batch mean) into a ``Task``.

**HVPs** go through ``functional_call`` on a private copy of the model, exactly: each batch's
forward and backward graph is kept between products when it fits in memory (``keep_graph="auto"``:
every further HVP is then one double backward, ``vjp(grad(loss))``, as PyHessian does for one
batch), else forward-over-reverse, ``jvp(grad(loss))``, with nothing kept (on channels-last inputs
for convolutional models on the CPU). ``HVPOperator`` takes a block of vectors ``[P, n]`` at once
and pushes up to ``block`` of them through one ``vmap``, which shares the primal forward and
backward among them where that is faster (``block="auto"`` times it), and ``hvp_points``
multiplies at several weights at once (curvature maps, ``fastland.curvature``);
``benchmarks/bench_hessian.py`` measures every choice. Attention runs through the math SDPA
kernel, since the fused kernels have no forward-mode or double-backward derivative.

**BN modes** (recorded in every result): ``eval`` uses the running statistics (the model in eval
mode, dropout off): they are constants, as in surfaces and in PyHessian. ``batch`` normalizes
every batch with its own statistics, which then depend on θ (the Hessian Santurkar et al. reason
about): BN modules of the private copy lose their running statistics
(``torch.func.replace_all_batch_norm_modules_``) and run in train mode; everything else, dropout
included, stays in eval mode; the caller's model and its buffers are never touched. In batch mode
the Hessian depends on how the samples are split into batches.

**Parameters**: by default all parameters that require grad; ``params=`` picks groups by name or
module prefix (``"features.0"``) for per-layer spectra. Parameters left out are constants.
A parameter that the forward pass never uses gets a zero row and column (no crash).

**Algorithms** (all in the flat space of the chosen parameters, ``ParamGroup``):

- ``lanczos``: (block) Lanczos with full reorthogonalization (two Gram-Schmidt passes) and a
  Rayleigh-Ritz step after every block. It stops when every wanted Ritz pair has a relative
  residual ``‖Hv − λv‖ / |λ| ≤ tol``; then some eigenvalue lies within ``tol·|λ|`` of each
  returned one (and, with a gap δ to the rest, within ``tol²λ²/δ``). Lanczos rather than
  ``torch.lobpcg``: it needs one HVP per step for one vector (LOBPCG needs a block of 3),
  it gives both ends of the spectrum from one run (curvature maps need λmax and λmin),
  the same recurrence serves stochastic Lanczos quadrature, and ``torch.lobpcg`` takes
  only a matrix, not an operator.
- ``estimate_trace``: Hutchinson with Rademacher vectors, or Hutch++ (Meyer et al. 2021: the
  trace of a sketched top subspace exactly, Hutchinson on the rest). It stops when the standard
  error is at most ``tol · |trace|`` (the absolute value: PyHessian's test on the signed trace
  stops at once on a negative trace).
- ``spectral_density``: stochastic Lanczos quadrature (Ghorbani et al. 2019): per run the nodes
  are the Ritz values and the weights the squared *first* components of the eigenvectors of the
  tridiagonal matrix (they sum to 1); Gaussian broadening, so the density integrates to 1.

A non-finite HVP stops with a ``UserError`` that names the step, the batch and its loss (under
torchrun on every rank). The command line is ``python -m fastland.hessian`` (``fastland.hessian_cli``).
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jvp, replace_all_batch_norm_modules_, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm import tqdm

from fastland import api, distributed
from fastland import data as data_mod
from fastland import device as device_mod
from fastland.engine.fastpaths import layout
from fastland.engine.precision import precision_context
from fastland.errors import UserError
from fastland.losses import Task
from fastland.params import FlatSpace, ParamInfo

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Batches = Sequence[tuple[torch.Tensor, torch.Tensor]]
BN_MODES = ("eval", "batch")
AD_MODES = ("forward", "reverse")
WHICH = ("largest", "smallest", "magnitude", "both")
TRACE_METHODS = ("hutch++", "hutchinson")
TOL_SCALES = ("eigenvalue", "norm")
EXACT_TRACE_MAX = 64  # parameter groups this small get their trace exactly (per-layer traces of biases, BN)
DEFAULT_BATCH_SIZE = 256  # per-HVP time is flat from 128 to 1024 images a batch on the CPU (LeNet-BN, ResNet-20)
MAX_BLOCK_CPU = 4  # the vmapped block that block='auto' weighs against one vector at a time
MAX_BLOCK_CUDA = 16
PROBE_SAMPLES = 64  # samples of the first batch that block='auto' times both ways on
# keep_graph='auto': a kept double-backward graph measured 3.6-4.3x the bytes of the forward pass's leaf-module
# outputs (LeNet-BN, ResNet-20, 64-1,024 images, growth of the CPU RSS); estimated as 4.5x, and kept when within half
# of the free memory (ResNet-20 on 1,024 images: ~8.8 GB estimated, ~7 GB used).
GRAPH_FACTOR = 4.5
GRAPH_FRACTION = 0.5


# --- the parameters a Hessian is taken over ------------------------------------------------
@dataclass(frozen=True)
class ParamGroup:
    """The chosen parameters of a ``FlatSpace``, packed in θ order into one vector of ``numel``.

    Vectors of the Hessian operator live in this packed space; ``embed`` puts one back into
    the full θ (zeros elsewhere) and ``to_dict`` gives ``{parameter name: tensor}``.
    """

    space: FlatSpace
    infos: tuple[ParamInfo, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(i.name for i in self.infos)

    @property
    def numel(self) -> int:
        return sum(i.numel for i in self.infos)

    @property
    def sizes(self) -> list[int]:
        return [i.numel for i in self.infos]

    @property
    def everything(self) -> bool:
        return self.numel == self.space.numel

    def split(self, sub: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{name: view}`` of a packed ``[n]`` vector. ``split`` (not slicing) so that the
        backward pass is one concatenation rather than a zero-filled copy per tensor."""
        return {i.name: t.view(i.shape) for i, t in zip(self.infos, sub.split(self.sizes), strict=True)}

    def gather(self, full: torch.Tensor) -> torch.Tensor:
        """The packed vector of the chosen parameters out of a full θ ``[N]``."""
        if self.everything:
            return full
        return torch.cat([full[i.offset : i.offset + i.numel] for i in self.infos])

    def embed(self, sub: torch.Tensor) -> torch.Tensor:
        """A full ``[N]`` vector holding ``sub`` at the chosen parameters and zeros elsewhere."""
        if self.everything:
            return sub.clone()
        full = sub.new_zeros(self.space.numel)
        for i, t in zip(self.infos, sub.split(self.sizes), strict=True):
            full[i.offset : i.offset + i.numel] = t
        return full

    def to_dict(self, sub: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{name: tensor}`` copies of a packed vector, on its device."""
        return {k: v.detach().clone() for k, v in self.split(sub).items()}


def _module_prefixes(names: Sequence[str]) -> list[str]:
    out: dict[str, None] = {}
    for n in names:
        parts = n.split(".")
        for j in range(1, len(parts)):
            out.setdefault(".".join(parts[:j]))
    return list(out)


def select_params(model: nn.Module, params: str | Sequence[str] | None = None,
                  space: FlatSpace | None = None) -> ParamGroup:
    """The parameters to take the Hessian over.

    ``None``: every parameter that requires grad. Otherwise names or module prefixes
    (``"features.0"`` picks ``features.0.weight`` and ``features.0.bias``); a named parameter is
    taken even if frozen, since it was asked for.
    """
    if space is None:
        try:
            space = FlatSpace(model)
        except ValueError:
            raise UserError("the model has no parameters: there is no Hessian to analyse") from None
    if params is None:
        frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
        chosen = [i for i in space.infos if i.name not in frozen]
        if not chosen:
            raise UserError("no parameter of the model requires grad (all are frozen): there is no Hessian to take; "
                            "unfreeze some (requires_grad_(True)) or name them with params= (--params)")
        return ParamGroup(space, tuple(chosen))
    patterns = [params] if isinstance(params, str) else list(params)
    if not patterns or not all(isinstance(p, str) and p for p in patterns):
        raise UserError(f"params must be parameter names or module prefixes (non-empty strings), got {params!r}")
    picked: set[str] = set()
    for pat in patterns:
        hits = [i.name for i in space.infos if i.name == pat or i.name.startswith(pat + ".")]
        if not hits:
            known = _module_prefixes(space.names) or list(space.names)
            more = f" (and {len(known) - 8} more)" if len(known) > 8 else ""
            raise UserError(f"the model has no parameter group {pat!r}; groups are module names such as "
                            f"{', '.join(known[:8])}{more}, or full parameter names such as {space.names[0]}")
        picked.update(hits)
    return ParamGroup(space, tuple(i for i in space.infos if i.name in picked))


# --- the batches a Hessian is summed over ----------------------------------------------------
class BatchList:
    """Batches held in memory (cached data): ``(inputs, targets)`` pairs on the device, reused by every product."""

    streamed = False

    def __init__(self, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], first_batch: int = 0, first_sample: int = 0,
                 total: int | None = None) -> None:
        self.pairs = list(pairs)
        # where these batches start in the whole set, and its batch count (a rank's share: for error messages)
        self.first_batch, self.first_sample = first_batch, first_sample
        self.total = len(self.pairs) if total is None else total

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return iter(self.pairs)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pairs[i]

    def first(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pairs[0]

    def samples(self) -> int:
        return sum(int(x.shape[0]) for x, _ in self.pairs)

    def map_inputs(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> BatchList:
        return BatchList([(fn(x), y) for x, y in self.pairs], self.first_batch, self.first_sample, self.total)

    def share(self, rank: int, world: int) -> BatchList:
        """Rank ``rank``'s contiguous share of whole batches (BN's batch statistics unchanged)."""
        b = len(self.pairs)
        lo, hi = b * rank // world, b * (rank + 1) // world
        return BatchList(self.pairs[lo:hi], lo, sum(int(x.shape[0]) for x, _ in self.pairs[:lo]), b)


class StreamedBatches:
    """A ``fastland.data.StreamedSet`` read again for every product (data too large to hold on the device),
    each batch moved to the device as it comes; ``share`` keeps a rank's contiguous range of batch indices."""

    streamed = True

    def __init__(self, data: data_mod.StreamedSet, lo: int = 0, hi: int | None = None,
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.data = data
        try:
            self.total = len(data.loader)
        except TypeError:  # an IterableDataset: count the batches once
            self.total = sum(1 for _ in data.batches())
        self.lo, self.hi = lo, self.total if hi is None else hi
        self.transform = transform
        self.first_batch = lo
        self.first_sample = lo * (data.batch_size or 0)  # the loader's fixed batch size (the last batch may be short)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for b, (x, y) in enumerate(self.data.batches()):
            if b >= self.hi:
                break
            if b >= self.lo:
                yield (self.transform(x) if self.transform else x), y

    def __len__(self) -> int:
        return self.hi - self.lo

    def first(self) -> tuple[torch.Tensor, torch.Tensor]:
        return next(iter(self))

    def samples(self) -> int:
        return len(self.data) if (self.lo, self.hi) == (0, self.total) else sum(int(x.shape[0]) for x, _ in self)

    def map_inputs(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> StreamedBatches:
        return StreamedBatches(self.data, self.lo, self.hi, fn)

    def share(self, rank: int, world: int) -> StreamedBatches:
        return StreamedBatches(self.data, self.total * rank // world, self.total * (rank + 1) // world, self.transform)


Source = BatchList | StreamedBatches


def _as_source(batches: Any) -> Source:
    if isinstance(batches, BatchList | StreamedBatches):
        return batches
    if isinstance(batches, data_mod.StreamedSet):
        return StreamedBatches(batches)
    return BatchList(list(batches))


# --- the Hessian-vector product --------------------------------------------------------------
def _private_copy(model: nn.Module, bn_mode: str) -> nn.Module:
    """A copy to run ``functional_call`` on: eval mode, and in batch mode BN modules in train mode
    without running statistics, so that nothing of the caller's model is ever changed."""
    module = copy.deepcopy(model).eval()
    if bn_mode == "batch":
        replace_all_batch_norm_modules_(module)
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.train()
    return module


def max_block(device: torch.device) -> int:
    """The largest vmapped block ``block='auto'`` considers: larger on a GPU."""
    return MAX_BLOCK_CUDA if device.type == "cuda" else MAX_BLOCK_CPU


def activation_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of every leaf module's output for the inputs ``x`` (one forward pass without gradients)."""
    total = [0]

    def hook(_m: nn.Module, _i: Any, out: Any) -> None:
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                total[0] += t.numel() * t.element_size()

    handles = [m.register_forward_hook(hook) for m in model.modules() if next(m.children(), None) is None]
    try:
        with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]):
            model(x)
    finally:
        for h in handles:
            h.remove()
    return total[0]


class HVPOperator:
    """``v ↦ H v`` for the mean loss over ``batches``, at weights θ that can be re-pointed cheaply.

    ``batches``: ``(inputs, targets)`` pairs already on the model's device (a list, a ``BatchList``,
    or a ``StreamedBatches``/``StreamedSet`` read again for every product), fed to ``model(x)`` as
    they are. ``loss_fn(outputs, targets)`` returns the batch mean. ``hvp`` takes ``[n]`` or
    ``[P, n]`` vectors in the packed space of ``group`` (``n = group.numel``).
    ``set_point(theta)`` moves the operator to other weights (a full θ of ``space.numel``) without
    copying the model again; ``hvp_points`` multiplies at several weights at once (curvature maps).

    ``block``: vectors per ``vmap`` call, or ``"auto"``: on the first call with several vectors,
    time one vector at a time against a vmapped block on ``PROBE_SAMPLES`` samples and keep the
    faster per vector (vmap wins for LeNet on the CPU and loses for ResNet-20, whose vmapped
    convolution backward is slow there; see the benchmark). ``ad``: ``"forward"``
    (``jvp`` of ``grad``) or ``"reverse"`` (``vjp`` of ``grad``, a double backward); equal results.
    ``keep_graph=True`` (reverse only) keeps every batch's forward and backward graph between calls,
    so that each further HVP is one double-backward pass with no forward pass: what PyHessian does
    for one batch; 1.4x faster per HVP than forward-over-reverse for ResNet-20 on the CPU (benchmark),
    at the memory of all those graphs (ResNet-20: ~1.7 GB per 256 images). ``"auto"`` keeps them when their estimate
    (``GRAPH_FACTOR`` × the forward pass's activations, a measured bound) fits in
    ``GRAPH_FRACTION`` of the free memory and the data are held in memory (``graph_bytes`` records
    it). ``set_point`` drops them.

    ``channels_last``: feed 4-D image inputs in channels-last memory order (equal up to rounding);
    ``"auto"``: on the CPU for models with ``Conv2d`` layers when no graph is kept: there it made
    ResNet-20's forward-over-reverse product 1.25x faster, but the double backward through a kept
    graph 7% slower (``benchmarks/results/hessian-cpu-*.md``, per-HVP table).

    ``data_parallel=True`` (under torchrun; ``operator`` sets it there): ``batches`` are this rank's
    share; each rank sums its ``n_b``-weighted batch HVPs over the *global* N (``num_samples``, or the
    all-reduced sum of the shares) and an all-reduce adds them up: the exact mean over every rank's
    data, the same on every rank. A non-finite product on any rank stops every rank (a flag is
    all-reduced before the products).
    """

    def __init__(self, model: nn.Module, batches: Any, loss_fn: LossFn, bn_mode: str = "eval",
                 params: str | Sequence[str] | None = None, block: int | str = "auto", ad: str | None = None,
                 keep_graph: bool | str = False, data_parallel: bool = False, channels_last: bool | str = False,
                 num_samples: int | None = None) -> None:
        if bn_mode not in BN_MODES:
            raise UserError(f"unknown bn_mode {bn_mode!r}; use {' or '.join(BN_MODES)}")
        if keep_graph not in (True, False, "auto"):
            raise UserError(f"keep_graph must be True, False or 'auto', got {keep_graph!r}")
        if ad is not None and ad not in AD_MODES:
            raise UserError(f"unknown ad {ad!r}; use {' or '.join(AD_MODES)}")
        if keep_graph is True and ad == "forward":
            raise UserError("keep_graph keeps the double-backward graph, so it needs ad='reverse' (or no ad)")
        if block != "auto" and (not isinstance(block, int) or isinstance(block, bool) or block < 1):
            raise UserError(f"block must be a positive integer or 'auto', got {block!r}")
        self.group = select_params(model, params)
        self.space = self.group.space
        self.bn_mode = bn_mode
        self.loss_fn = loss_fn
        first = next(model.parameters())
        self.device, self.dtype = first.device, first.dtype
        self.batches: Source = _as_source(batches)
        if isinstance(self.batches, BatchList):
            _check_batches(self.batches, bn_mode)
        self._module = _private_copy(model, bn_mode)
        sample_x = self.batches.first()[0]
        self.data_parallel = bool(data_parallel)
        if num_samples is None:
            num_samples = self.batches.samples()
            if self.data_parallel:  # every rank's batches: the global N
                num_samples = int(distributed.all_reduce_sum(torch.tensor([float(num_samples)], dtype=torch.float64)))
        self.num_samples = int(num_samples)
        self.graph_bytes = 0  # the estimate behind keep_graph='auto' (0 when not estimated)
        if keep_graph == "auto":
            keep_graph = ad != "forward" and self._graph_fits(model, sample_x)
        self.keep_graph = bool(keep_graph)
        self.ad = ad or ("reverse" if self.keep_graph else "forward")
        if channels_last == "auto":  # it pays for forward-over-reverse products only (the benchmark's HVP table)
            channels_last = self.device.type == "cpu" and not self.keep_graph and layout.applies(model, sample_x)
        self.channels_last = bool(channels_last) and sample_x.dim() == 4 and sample_x.is_floating_point()
        if self.channels_last:
            self.batches = self.batches.map_inputs(layout.to_channels_last)
        elif sample_x.dim() == 4 and not sample_x.is_contiguous() and sample_x.is_contiguous(memory_format=torch.channels_last):
            self.channels_last = True  # given so: vmapped blocks must not see them (below)
        self.block: int | None = None if block == "auto" else int(block)
        self.block_timings: dict[int, float] = {}  # block='auto': seconds per vector and probe sample
        self.hvps = 0  # vectors multiplied so far (each is one full pass's worth of HVP work)
        self.context = ""  # what the caller is doing, for error messages ("Lanczos step 7")
        self.loss_name = getattr(loss_fn, "__name__", type(loss_fn).__name__)  # operator() sets the resolved Task's name
        self._checked_gradient = False
        self.set_point(self.space.flatten(model).to(self.dtype))

    def _graph_fits(self, model: nn.Module, x: torch.Tensor) -> bool:
        """Whether every batch's kept graph fits: ``GRAPH_FACTOR`` × the forward activations of all samples
        (measured on ``PROBE_SAMPLES`` of them) within ``GRAPH_FRACTION`` of the free memory; never for streamed data."""
        if self.batches.streamed:
            return False
        probe = x[:PROBE_SAMPLES]
        per_sample = activation_bytes(self._module, probe) / probe.shape[0]
        self.graph_bytes = int(GRAPH_FACTOR * per_sample * self.num_samples)
        return self.graph_bytes <= GRAPH_FRACTION * device_mod.free_memory(self.device)

    @property
    def numel(self) -> int:
        return self.group.numel

    def set_point(self, theta: torch.Tensor) -> None:
        """Evaluate the Hessian at the full parameter vector ``theta`` ([space.numel]) from now on."""
        if theta.dim() != 1 or theta.numel() != self.space.numel:
            raise ValueError(f"theta must be a [{self.space.numel}] vector, got shape {tuple(theta.shape)}")
        self.theta = theta.detach().to(self.device, self.dtype).contiguous()
        chosen = set(self.group.names)
        self._fixed = {k: v for k, v in self.space.views(self.theta).items() if k not in chosen}
        self._sub = self.group.gather(self.theta)
        self._kept: dict[int, tuple[Callable[..., Any], torch.Tensor]] = {}

    def loss(self) -> float:
        """L(θ) at the current point, the same mean the HVPs differentiate."""
        total = 0.0
        with torch.no_grad():
            for x, y in self.batches:
                total += float(self._loss(self._sub, x, y)) * x.shape[0]
        if self.data_parallel:
            total = float(distributed.all_reduce_sum(torch.tensor([total], dtype=torch.float64)))
        return total / self.num_samples

    def _loss(self, sub: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
              fixed: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        out = functional_call(self._module, {**(self._fixed if fixed is None else fixed), **self.group.split(sub)}, (x,))
        return self.loss_fn(out, y)

    def _grad_fn(self, x: torch.Tensor, y: torch.Tensor,
                 fixed: dict[str, torch.Tensor] | None = None) -> Callable[[torch.Tensor], Any]:
        def loss_and_aux(sub: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            value = self._loss(sub, x, y, fixed)
            return value, value.detach()

        return grad(loss_and_aux, has_aux=True)

    def _pullback(self, b: int | None, x: torch.Tensor, y: torch.Tensor
                  ) -> tuple[Callable[..., Any], torch.Tensor, torch.Tensor]:
        """The gradient's vjp at θ on one batch (and the gradient and loss); kept per batch (until
        ``set_point``) with ``keep_graph``."""
        if self.keep_graph and b is not None and b in self._kept:
            return self._kept[b]
        g, pullback, value = vjp(self._grad_fn(x, y), self._sub, has_aux=True)
        if self.keep_graph and b is not None:
            self._kept[b] = (pullback, g, value)
        return pullback, g, value

    def _batch_hvp(self, vecs: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                   b: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``[P, n]`` HVPs of one batch's mean loss (batch ``b`` of ``batches``, or a probe), the gradient and the loss."""
        if self.ad == "reverse":  # H v = vjp of the gradient (H is symmetric); one graph shared by all P vectors
            pullback, g, value = self._pullback(b, x, y)
            if vecs.shape[0] == 1:
                hv = pullback(vecs[0])[0][None]
            elif self.channels_last:  # vmap cannot run a channels-last graph (NYI in torch 2.13): one vector at a time
                hv = torch.stack([pullback(v)[0] for v in vecs])
            else:
                hv = vmap(pullback)(vecs)[0]
            return hv, g, value
        grad_fn = self._grad_fn(x, y)

        def single(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            g, hv, value = jvp(grad_fn, (self._sub,), (v,), has_aux=True)
            return hv, g, value

        if vecs.shape[0] == 1:
            hv, g, value = single(vecs[0])
            return hv[None], g, value
        if self.channels_last:  # vmap cannot take channels-last inputs (NYI in torch 2.13): the block runs on NCHW
            grad_fn = self._grad_fn(x.contiguous(), y)
        hv, g, value = vmap(single, out_dims=(0, None, None))(vecs)
        return hv, g, value

    @contextlib.contextmanager
    def _exact(self) -> Iterator[None]:
        """How every product is computed: attention through the math kernel (the fused CPU/CUDA kernels have
        no forward-mode or double-backward derivative), and on CUDA true fp32 convolutions and matmuls, not
        the TF32 that PyTorch lets cuDNN use by default (10-bit mantissas: ~1e-3 relative error in each
        product, as large as Lanczos' default tolerance)."""
        with sdpa_kernel([SDPBackend.MATH]), precision_context("fp32", self.device):
            yield

    def hvp(self, v: torch.Tensor) -> torch.Tensor:
        """``H v`` for ``v`` of shape ``[n]``, or row by row for ``[P, n]``."""
        single = v.dim() == 1
        vecs = v[None] if single else v
        if vecs.dim() != 2 or vecs.shape[1] != self.numel:
            raise ValueError(f"expected [n] or [P, n] vectors with n={self.numel}, got shape {tuple(v.shape)}")
        vecs = vecs.to(self.device, self.dtype)
        out = torch.zeros_like(vecs)
        grad_sum = torch.zeros(self.numel, device=self.device, dtype=self.dtype) if not self._checked_gradient else None
        with self._exact():
            problem = self._accumulate(vecs, out, grad_sum)
        self._finish(out, problem, grad_sum)
        self.hvps += vecs.shape[0]
        return out[0] if single else out

    def _finish(self, out: torch.Tensor, problem: str | None, grad_sum: torch.Tensor | None) -> None:
        """Stop on a non-finite product (on every rank when data-parallel: a flag is all-reduced first, so that no
        rank waits for the others in the products' all-reduce), add the ranks' products up, and check once that the
        loss depends on the parameters at all."""
        if self.data_parallel:
            flag = distributed.all_reduce_sum(torch.tensor([1.0 if problem else 0.0], dtype=torch.float64))
            if float(flag[0]) > 0:
                raise UserError(problem if problem else
                                f"the Hessian-vector product is not finite on {int(flag[0])} other rank(s)"
                                f"{f' ({self.context})' if self.context else ''}; their message says where")
            distributed.all_reduce_sum(out)
            if grad_sum is not None:
                distributed.all_reduce_sum(grad_sum)
        elif problem:
            raise UserError(problem)
        if grad_sum is not None:
            self._checked_gradient = True
            if not bool(grad_sum.any()) and not bool(out.any()):
                raise UserError("the gradient and the Hessian-vector product are exactly zero: the loss does not depend "
                                f"on the parameters {_few(self.group.names)}; does the model run under torch.no_grad(), "
                                "detach its outputs, or leave those parameters unused?")

    def _accumulate(self, vecs: torch.Tensor, out: torch.Tensor, grad_sum: torch.Tensor | None) -> str | None:
        """Add every batch's weighted HVPs into ``out``; the message of the first non-finite one (or None)."""
        if self.block is None and vecs.shape[0] > 1:
            self.block = self._choose_block(vecs.shape[0])
        block = self.block or 1
        start = self.batches.first_sample
        count = self.batches.total
        for b, (x, y) in enumerate(self.batches, self.batches.first_batch):
            if self.batches.streamed:
                _check_batch(x, y, self.bn_mode)
            weight = x.shape[0] / self.num_samples
            for c in range(0, vecs.shape[0], block):
                hv, g, value = self._batch_hvp(vecs[c : c + block], x, y, b)
                if not bool(torch.isfinite(hv).all()):
                    return self._non_finite(hv, value, b, count, start, x.shape[0], c)
                out[c : c + block].add_(hv, alpha=weight)
                if grad_sum is not None and c == 0:
                    grad_sum.add_(g, alpha=weight)
            start += x.shape[0]
        return None

    def _choose_block(self, count: int) -> int:
        """One vector at a time or a vmapped block, whichever is faster per vector (each timed twice,
        alternating, on the first ``PROBE_SAMPLES`` samples of the first batch: about half an HVP)."""
        size = min(count, max_block(self.device))
        if size < 2:
            return 1
        x, y = self.batches.first()
        x, y = x[:PROBE_SAMPLES], y[:PROBE_SAMPLES]
        vecs = torch.randn(size, self.numel, generator=_generator(0), dtype=torch.float64).to(self.device, self.dtype)
        best = {1: math.inf, size: math.inf}
        self._batch_hvp(vecs[:1], x, y)  # warm-up
        for _ in range(2):
            for p in best:
                _sync(self.device)
                t0 = time.perf_counter()
                self._batch_hvp(vecs[:p], x, y)
                _sync(self.device)
                best[p] = min(best[p], (time.perf_counter() - t0) / p)
        self.block_timings = {p: t / x.shape[0] for p, t in best.items()}
        return min(best, key=lambda p: best[p])

    __call__ = hvp

    def hvp_points(self, thetas: torch.Tensor, vecs: torch.Tensor) -> torch.Tensor:
        """``H(θ_p) v_p`` for ``P`` points at once: full weights ``thetas [P, space.numel]`` and packed vectors
        ``vecs [P, n]``, through one ``vmap`` over the points per batch (forward-over-reverse; nothing kept).
        The operator's own point (``set_point``) is left as it is."""
        if thetas.dim() != 2 or thetas.shape[1] != self.space.numel or vecs.shape != (thetas.shape[0], self.numel):
            raise ValueError(f"expected thetas [P, {self.space.numel}] and vecs [P, {self.numel}], got "
                             f"{tuple(thetas.shape)} and {tuple(vecs.shape)}")
        thetas = thetas.to(self.device, self.dtype)
        vecs = vecs.to(self.device, self.dtype)
        chosen = set(self.group.names)
        infos = [i for i in self.space.infos if i.name not in chosen]
        subs = torch.stack([self.group.gather(t) for t in thetas])
        out = torch.zeros_like(vecs)
        count = self.batches.total

        def one(sub: torch.Tensor, theta: torch.Tensor, v: torch.Tensor, x: torch.Tensor, y: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
            fixed = {i.name: theta[i.offset : i.offset + i.numel].view(i.shape) for i in infos}
            _, hv, value = jvp(self._grad_fn(x, y, fixed), (sub,), (v,), has_aux=True)
            return hv, value

        problem = None
        start = self.batches.first_sample
        with self._exact():
            for b, (x, y) in enumerate(self.batches, self.batches.first_batch):
                if self.batches.streamed:
                    _check_batch(x, y, self.bn_mode)
                hv, value = vmap(one, in_dims=(0, 0, 0, None, None))(subs, thetas, vecs, x.contiguous(), y)
                if not bool(torch.isfinite(hv).all()):
                    bad = int((~torch.isfinite(hv)).any(dim=1).nonzero()[0, 0])
                    problem = self._non_finite(hv[bad : bad + 1], value[bad], b, count, start, x.shape[0], 0,
                                               point=bad)
                    break
                out.add_(hv, alpha=x.shape[0] / self.num_samples)
                start += x.shape[0]
        self._finish(out, problem, None)
        self.hvps += vecs.shape[0]
        return out

    def _non_finite(self, hv: torch.Tensor, value: torch.Tensor, b: int, count: int, start: int, n: int, c: int,
                    point: int | None = None) -> str:
        bad = int((~torch.isfinite(hv)).any(dim=1).nonzero()[0, 0]) + c
        where = f"{self.context}, " if self.context else ""
        which = f"point {point} of the block" if point is not None else f"vector {bad}"
        ctx = distributed.current() if self.data_parallel else None
        rank = f"rank {ctx.rank}, " if ctx is not None else ""
        return (f"the Hessian-vector product is not finite ({where}{rank}{which}, batch {b + 1} of {count}, "
                f"samples {start}-{start + n - 1}, where the loss is {float(value):.6g}, bn_mode={self.bn_mode}); "
                "the weights or the data give a non-finite loss or gradient there: check them, or use fewer or other samples")


def _few(names: Sequence[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (f" (and {len(names) - n} more)" if len(names) > n else "")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _check_batch(x: Any, y: Any, bn_mode: str) -> None:
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor) or x.shape[0] != y.shape[0]:
        raise UserError("every batch must be a pair of tensors (inputs, targets) with the same number of samples")
    if x.shape[0] == 0:
        raise UserError("a batch is empty: every batch needs at least one sample")
    if bn_mode == "batch" and x.shape[0] < 2:
        raise UserError("bn_mode='batch' cannot normalize a batch of one sample; use a batch size that leaves "
                        "no batch of one, or bn_mode='eval'")


def _check_batches(batches: BatchList, bn_mode: str) -> None:
    if not len(batches):
        raise UserError("the data is empty: give at least one (inputs, targets) batch")
    for x, y in batches:
        _check_batch(x, y, bn_mode)


# --- results -----------------------------------------------------------------------------
@dataclass
class EigenResult:
    """Eigenpairs of the Hessian. Unpacks as ``values, vectors``.

    ``values``: numpy ``[k]`` (largest first; for ``which='smallest'`` smallest first; for
    ``'both'`` the k largest then the k smallest); ``vectors``: one ``{name: tensor}`` per value
    (only the chosen parameters; ``flat`` holds them packed, ``group.embed`` gives full θ
    vectors); ``residuals``: ``‖Hv − λv‖ / |λ|`` per pair.
    """

    values: np.ndarray
    vectors: list[dict[str, torch.Tensor]]
    flat: torch.Tensor
    residuals: np.ndarray
    converged: bool
    hvps: int
    tol: float
    which: str
    bn_mode: str
    params: tuple[str, ...]
    num_samples: int
    seconds: float
    group: ParamGroup = field(repr=False)
    scale: str = "eigenvalue"  # residuals relative to |λ| ('eigenvalue') or to max |λ| ('norm')

    def __iter__(self) -> Iterator[Any]:
        return iter((self.values, self.vectors))

    def record(self) -> dict[str, Any]:
        """The numbers and settings, for JSON files."""
        return {"values": self.values.tolist(), "residuals": self.residuals.tolist(), "converged": self.converged,
                "hvps": self.hvps, "tol": self.tol, "tol_scale": self.scale, "which": self.which, "bn_mode": self.bn_mode,
                "params": list(self.params), "num_samples": self.num_samples, "seconds": self.seconds}


class TraceEstimate(float):
    """The trace estimate as a float, with ``stderr`` (its standard error) and how it was made."""

    stderr: float
    samples: np.ndarray  # the per-vector estimates vᵀHv of the stochastic part
    exact_part: float  # Hutch++: tr(QᵀHQ) of the sketched subspace; 0 for Hutchinson
    method: str
    hvps: int
    converged: bool
    tol: float
    bn_mode: str
    params: tuple[str, ...]
    num_samples: int
    seconds: float

    def __new__(cls, value: float, **info: Any) -> TraceEstimate:
        self = super().__new__(cls, value)
        for k, v in info.items():
            setattr(self, k, v)
        return self

    def __repr__(self) -> str:
        return f"TraceEstimate({float(self):.6g} ± {self.stderr:.2g}, {self.method}, bn_mode={self.bn_mode})"

    def record(self) -> dict[str, Any]:
        return {"trace": float(self), "stderr": self.stderr, "method": self.method, "hvps": self.hvps,
                "converged": self.converged, "tol": self.tol, "exact_part": self.exact_part, "bn_mode": self.bn_mode,
                "params": list(self.params), "num_samples": self.num_samples, "seconds": self.seconds}


@dataclass
class Density:
    """A spectral density. Unpacks as ``grid, density`` (numpy; the density integrates to 1).

    ``nodes`` and ``weights`` ``[runs, steps]`` are the quadrature behind it (each run's weights
    sum to 1); ``sigma`` is the Gaussian broadening.
    """

    grid: np.ndarray
    density: np.ndarray
    nodes: np.ndarray
    weights: np.ndarray
    sigma: float
    hvps: int
    bn_mode: str
    params: tuple[str, ...]
    num_samples: int
    seconds: float

    def __iter__(self) -> Iterator[Any]:
        return iter((self.grid, self.density))

    def record(self) -> dict[str, Any]:
        return {"grid": self.grid.tolist(), "density": self.density.tolist(), "nodes": self.nodes.tolist(),
                "weights": self.weights.tolist(), "sigma": self.sigma, "hvps": self.hvps, "bn_mode": self.bn_mode,
                "params": list(self.params), "num_samples": self.num_samples, "seconds": self.seconds}


# --- linear algebra helpers ----------------------------------------------------------------
def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def _randn(rows: int, n: int, gen: torch.Generator, op: HVPOperator) -> torch.Tensor:
    """Drawn on the CPU (the same numbers on every device), then moved."""
    return torch.randn(rows, n, generator=gen, dtype=torch.float64).to(op.device, op.dtype)


def _rademacher(rows: int, n: int, gen: torch.Generator, op: HVPOperator) -> torch.Tensor:
    return (torch.randint(0, 2, (rows, n), generator=gen, dtype=torch.int8) * 2 - 1).to(op.device, op.dtype)


def _orthogonalize(w: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``w - basis basisᵀ w`` twice (classical Gram-Schmidt with reorthogonalization), rows as vectors."""
    if basis.shape[0] == 0:
        return w
    for _ in range(2):
        w = w - (w @ basis.T) @ basis
    return w


def _orthonormal_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ``w`` orthonormalized: ``(q, r)`` with ``w = rᵀ q`` (a QR of ``wᵀ``)."""
    q, r = torch.linalg.qr(w.T.double())
    return q.T.to(w.dtype).contiguous(), r


def _progress(total: int, desc: str, enabled: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit="hvp", disable=not enabled, leave=False)


# --- eigenvalues -----------------------------------------------------------------------------
def _wanted(theta: np.ndarray, k: int, which: str) -> np.ndarray:
    """Indices into ascending Ritz values ``theta`` of the wanted ones, in the order they are reported."""
    order = np.arange(len(theta))
    if which == "largest":
        return order[::-1][:k]
    if which == "smallest":
        return order[:k]
    if which == "magnitude":
        return np.argsort(-np.abs(theta), kind="stable")[:k]
    return np.concatenate([order[::-1][:k], order[:k]])  # both


class LanczosRun:
    """The state of one (block) Lanczos run with full reorthogonalization, advanced one block at a time.

    ``pending`` is the block of orthonormal vectors to multiply next; ``update(H @ pending)``
    orthogonalizes the products against the whole basis (twice), takes the Ritz pairs of the
    projected matrix ``T = Qᵀ H Q`` (whose columns are exactly those orthogonalization
    coefficients) and tests them: each wanted pair must have ``‖Hv − λv‖ ≤ tol·s`` with
    ``s = |λ|`` (``scale='eigenvalue'``) or ``s = max |Ritz value|``, an estimate of ‖H‖
    (``scale='norm'``: what a curvature map needs for λmin, whose own size may be ~0). Residuals
    come from the recurrence: ``‖R s_last‖`` with ``R`` the last block's QR factor. ``done`` once
    converged or after ``max_iter`` products. ``start`` (rows in the packed space) replaces the
    random first block (a warm start from nearby eigenvectors); it is topped up with random
    directions to ``block`` rows. ``lanczos`` drives one run; curvature maps drive many in lockstep.
    """

    def __init__(self, n: int, k: int = 1, which: str = "largest", tol: float = 1e-3, max_iter: int | None = None,
                 seed: int = 0, block: int = 1, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 start: torch.Tensor | None = None, scale: str = "eigenvalue") -> None:
        _check_eig_args(k, tol, which, n)
        if scale not in TOL_SCALES:
            raise UserError(f"unknown scale {scale!r}; use {' or '.join(TOL_SCALES)}")
        max_iter = _default_max_iter(k, n) if max_iter is None else int(max_iter)
        b = int(block)
        if b < 1 or b > n:
            raise UserError(f"block must be between 1 and the number of parameters ({n}), got {block}")
        self.want = 2 * k if which == "both" else k
        if max_iter < self.want:
            raise UserError(f"max_iter ({max_iter}) must be at least the number of eigenvalues wanted ({self.want})")
        self.n, self.k, self.which, self.tol, self.b, self.scale = n, k, which, tol, b, scale
        self.max_iter = min(max_iter, n)
        self.device, self.dtype = torch.device(device), dtype
        self.gen = _generator(seed)
        cap = min(n, self.max_iter + b)
        self.basis = torch.empty(cap, n, device=self.device, dtype=dtype)
        self.proj = np.zeros((cap, cap))  # T = Qᵀ H Q, float64
        first = _randn(b, n, self.gen, self)
        if start is not None:
            start = start.to(self.device, dtype).reshape(-1, n)[:b]
            first = torch.cat([start, first[start.shape[0] :]]) if start.shape[0] < b else start
        self.pending, _ = _orthonormal_rows(first)
        self.m = 0  # basis vectors so far
        self.steps = 0
        self.theta = np.zeros(0)
        self.vecs_t = np.zeros((0, 0))
        self.residuals = np.full(self.want, np.inf)
        self.converged = False
        self.done = False

    def update(self, w: torch.Tensor) -> None:
        """Take ``H @ pending`` and prepare the next block (or finish)."""
        basis, rows = self.basis, self.pending.shape[0]
        basis[self.m : self.m + rows] = self.pending
        self.m += rows
        self.steps += 1
        m = self.m
        coef = w @ basis[:m].T
        w = w - coef @ basis[:m]
        coef2 = w @ basis[:m].T
        w = w - coef2 @ basis[:m]
        col = (coef + coef2).double().cpu().numpy().T  # [m, rows]
        self.proj[:m, m - rows : m] = col
        self.proj[m - rows : m, :m] = col.T
        tm = self.proj[:m, :m]
        self.theta, self.vecs_t = np.linalg.eigh((tm + tm.T) / 2)
        w_next, r = _orthonormal_rows(w)
        r = r.cpu().numpy()  # w = rᵀ w_next
        idx = _wanted(self.theta, self.k, self.which)
        # H y − θ y for y = Q s is (I − QQᵀ) H Q s = s_lastᵀ w = (r s_last)ᵀ w_next: only the last block's remainder.
        res = np.linalg.norm(r @ self.vecs_t[m - rows : m, idx], axis=0) if m < self.n else np.zeros(len(idx))
        tiny = np.finfo(np.float64).tiny
        size = np.abs(self.theta[idx]) if self.scale == "eigenvalue" else np.full(len(idx), np.abs(self.theta).max())
        self.residuals = res / np.maximum(size, tiny)
        if m >= self.want and bool(np.all(self.residuals <= self.tol)):
            self.converged = self.done = True
            return
        if m + self.b > min(self.max_iter, self.n):
            self.done = True
            return
        # The next block: the remainder, topped up with random directions where it has (almost) vanished
        # (an invariant subspace: Krylov breakdown). Orthogonalized against the basis again, then QR.
        top = max(float(np.abs(self.theta).max()), 1e-30)
        keep = np.abs(np.diag(r)) > 1e-10 * top
        if not keep.all():
            fresh = _orthogonalize(_randn(int((~keep).sum()), self.n, self.gen, self), basis[:m])
            w_next = torch.cat([w_next[torch.as_tensor(keep, device=w_next.device)], fresh])
        block_q, _ = _orthonormal_rows(_orthogonalize(w_next, basis[:m]))
        self.pending = block_q[: min(self.b, self.n - m)]

    def ritz(self) -> tuple[np.ndarray, torch.Tensor]:
        """The wanted Ritz values (in reporting order) and their vectors ``[want, n]``."""
        idx = _wanted(self.theta, self.k, self.which)
        s = torch.as_tensor(self.vecs_t[:, idx].T, device=self.device, dtype=torch.float64)  # [want, m]
        return self.theta[idx].copy(), (s.to(self.dtype) @ self.basis[: self.m]).contiguous()


def lanczos(op: HVPOperator, k: int = 1, which: str = "largest", tol: float = 1e-3, max_iter: int | None = None,
            seed: int = 0, block: int = 1, progress: bool = False, start: torch.Tensor | None = None,
            scale: str = "eigenvalue") -> EigenResult:
    """Extreme eigenpairs of ``op`` by (block) Lanczos with full reorthogonalization (``LanczosRun``).

    It stops when each wanted pair has ``‖Hv − λv‖ ≤ tol·|λ|`` (``scale='norm'``: ``tol·‖H‖``),
    or after ``max_iter`` HVPs (a warning). ``which``: ``largest``, ``smallest``, ``magnitude``
    (largest |λ|, PyHessian's notion) or ``both`` (the k largest and the k smallest from one run).
    ``start``: first vectors instead of random ones. The basis is kept on the device:
    ``max_iter × n`` numbers (100 × 14.7M × 4 bytes = 5.9 GB for VGG-16; lower ``max_iter`` there).
    """
    started = time.perf_counter()
    run = LanczosRun(op.numel, k, which, tol, max_iter, seed, block, op.device, op.dtype, start, scale)
    bar = _progress(run.max_iter, "Lanczos", progress)
    try:
        while not run.done:
            op.context = f"Lanczos step {run.steps + 1}"
            rows = run.pending.shape[0]
            run.update(op.hvp(run.pending))
            bar.update(rows)
    finally:  # an error's one line must not share a line with the bar
        bar.close()
        op.context = ""
    values, flat = run.ritz()
    if not run.converged:
        warnings.warn(f"Lanczos stopped after {run.m} Hessian-vector products with relative residual "
                      f"{float(run.residuals.max()):.2g} > tol {tol:g}; raise max_iter or tol", stacklevel=2)
    return EigenResult(values=values, vectors=[op.group.to_dict(v) for v in flat], flat=flat,
                       residuals=run.residuals, converged=run.converged, hvps=run.m, tol=tol, which=which,
                       bn_mode=op.bn_mode, params=op.group.names, num_samples=op.num_samples,
                       seconds=time.perf_counter() - started, group=op.group, scale=scale)


def _default_max_iter(k: int, n: int) -> int:
    return min(n, max(100, 20 * k))


def _check_eig_args(k: int, tol: float, which: str, n: int) -> None:
    if not isinstance(k, int | np.integer) or isinstance(k, bool) or k < 1:
        raise UserError(f"k must be a positive integer, got {k!r}")
    if which not in WHICH:
        raise UserError(f"unknown which {which!r}; use {', '.join(WHICH)}")
    want = 2 * k if which == "both" else k
    if want > n:
        raise UserError(f"k={k} asks for {want} eigenvalues, more than the {n} parameters the Hessian is taken over; "
                        f"use k <= {n // 2 if which == 'both' else n}")
    _check_tol(tol)


def _check_tol(tol: float) -> None:
    if not isinstance(tol, int | float) or isinstance(tol, bool) or not math.isfinite(tol) or tol <= 0:
        raise UserError(f"tol must be a positive number, got {tol!r}")


# --- trace ---------------------------------------------------------------------------------
def estimate_trace(op: HVPOperator, method: str = "hutch++", tol: float = 1e-2, max_iter: int = 500,
                   sketch: int | None = None, min_samples: int = 10, seed: int = 0,
                   progress: bool = False) -> TraceEstimate:
    """tr(H) by Hutchinson (Rademacher ``v``: ``E[vᵀHv] = tr H``) or Hutch++; exactly (``Σ e_iᵀHe_i``,
    ``method='exact'``) for at most ``EXACT_TRACE_MAX`` parameters, which costs fewer products.

    Samples are drawn in blocks of ``op.block`` (one vmapped pass each) until the standard error
    is at most ``tol·|trace|`` (after ``min_samples``) or ``max_iter`` HVPs have been spent (a
    warning). Hutch++ first spends ``2·sketch`` HVPs on a subspace Q that holds the top of the
    spectrum (``Q = orth(H S)``, Rademacher S), takes ``tr(QᵀHQ)`` exactly, and runs Hutchinson on
    ``(I − QQᵀ) H (I − QQᵀ)``, whose variance no longer carries the largest eigenvalues; the
    standard error is that of the Hutchinson part.
    """
    if method not in TRACE_METHODS:
        raise UserError(f"unknown trace method {method!r}; use {' or '.join(TRACE_METHODS)}")
    _check_tol(tol)
    n = op.numel
    started = time.perf_counter()
    # A small block: n products give the trace exactly, with no sampling.
    if n <= EXACT_TRACE_MAX and (not isinstance(max_iter, int) or n <= max_iter):
        op.context = "exact trace"
        eye = torch.eye(n, device=op.device, dtype=op.dtype)
        total = sum(float(torch.diagonal(op.hvp(eye[i : i + 16])[:, i : i + 16]).double().sum()) for i in range(0, n, 16))
        op.context = ""
        return TraceEstimate(total, stderr=0.0, samples=np.zeros(0), exact_part=total, method="exact", hvps=n,
                             converged=True, tol=tol, bn_mode=op.bn_mode, params=op.group.names,
                             num_samples=op.num_samples, seconds=time.perf_counter() - started)
    if sketch is None:
        sketch = min(16, max(1, n // 4))
    if method == "hutch++" and not 1 <= sketch < n:
        raise UserError(f"sketch must be between 1 and {n - 1} (the number of parameters - 1), got {sketch}")
    if not isinstance(max_iter, int) or max_iter < (2 * sketch if method == "hutch++" else 0) + 2:
        raise UserError(f"max_iter ({max_iter}) leaves no room for samples; raise it")
    gen = _generator(seed)
    bar = _progress(max_iter, f"trace ({method})", progress)
    try:
        hvps = 0
        exact = 0.0
        q = torch.zeros(0, n, device=op.device, dtype=op.dtype)
        if method == "hutch++":
            op.context = "Hutch++ sketch"
            y = op.hvp(_rademacher(sketch, n, gen, op))
            q, _ = _orthonormal_rows(y)
            op.context = "Hutch++ top subspace"
            hq = op.hvp(q)
            exact = float((hq * q).double().sum())
            hvps += 2 * sketch
            bar.update(2 * sketch)
        samples: list[float] = []
        converged = False
        mean = se = math.nan
        while hvps < max_iter:
            rows = min(op.block or max_block(op.device), max_iter - hvps)
            op.context = f"trace sample {len(samples) + 1}"
            v = _orthogonalize(_rademacher(rows, n, gen, op), q) if q.shape[0] else _rademacher(rows, n, gen, op)
            hv = op.hvp(v)
            samples += (hv * v).double().sum(dim=1).cpu().tolist()
            hvps += rows
            bar.update(rows)
            arr = np.asarray(samples)
            mean = exact + float(arr.mean())
            se = float(arr.std(ddof=1) / math.sqrt(len(arr))) if len(arr) > 1 else math.inf
            if len(arr) >= min_samples and se <= tol * abs(mean):
                converged = True
                break
    finally:  # an error's one line must not share a line with the bar
        bar.close()
        op.context = ""
    if not converged:
        warnings.warn(f"the trace estimate stopped after {hvps} Hessian-vector products with standard error "
                      f"{se:.3g} > tol·|trace| = {tol * abs(mean):.3g}; raise max_iter or tol", stacklevel=2)
    return TraceEstimate(mean, stderr=se, samples=np.asarray(samples), exact_part=exact, method=method, hvps=hvps,
                         converged=converged, tol=tol, bn_mode=op.bn_mode, params=op.group.names,
                         num_samples=op.num_samples, seconds=time.perf_counter() - started)


# --- spectral density ----------------------------------------------------------------------
def slq(op: HVPOperator, runs: int = 4, steps: int = 80, seed: int = 0,
        progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Stochastic Lanczos quadrature: ``(nodes, weights)``, each ``[runs, steps]``.

    ``runs`` independent Lanczos recurrences (full reorthogonalization) from normalized Rademacher
    vectors, advanced together so that each step is one vmapped block of HVPs. For run r, the
    nodes are the eigenvalues of its tridiagonal T_r and the weights the squared first components
    of T_r's eigenvectors: ``vᵀ f(H) v ≈ Σ_i w_i f(θ_i)`` with ``Σ_i w_i = 1``.
    """
    n = op.numel
    if not isinstance(runs, int) or runs < 1:
        raise UserError(f"runs must be a positive integer, got {runs!r}")
    if not isinstance(steps, int) or steps < 2:
        raise UserError(f"steps must be an integer of at least 2, got {steps!r}")
    steps = min(steps, n)
    gen = _generator(seed)
    v = _rademacher(runs, n, gen, op)
    v = v / v.norm(dim=1, keepdim=True)
    basis = torch.empty(runs, steps, n, device=op.device, dtype=op.dtype)
    alpha = np.zeros((runs, steps))
    beta = np.zeros((runs, steps))
    bar = _progress(runs * steps, "SLQ", progress)
    try:
        for j in range(steps):
            basis[:, j] = v
            op.context = f"SLQ step {j + 1}"
            w = op.hvp(v)
            bar.update(runs)
            alpha[:, j] = (w * v).double().sum(dim=1).cpu().numpy()
            # Full reorthogonalization of each run against its own basis, twice.
            q = basis[:, : j + 1]
            for _ in range(2):
                w = w - torch.einsum("rj,rjn->rn", torch.einsum("rn,rjn->rj", w, q), q)
            nrm = w.norm(dim=1)
            beta[:, j] = nrm.double().cpu().numpy()
            if j + 1 < steps:
                scale = np.maximum(np.abs(alpha[:, : j + 1]).max(axis=1), 1e-30)
                broken = beta[:, j] <= 1e-10 * scale
                if broken.any():  # an invariant subspace: continue with a fresh direction, decoupled (β = 0)
                    for r in np.nonzero(broken)[0]:
                        fresh = _orthogonalize(_randn(1, n, gen, op), basis[r, : j + 1])[0]
                        w[r] = fresh
                        beta[r, j] = 0.0
                    nrm = w.norm(dim=1)
                v = w / nrm[:, None]
    finally:  # an error's one line must not share a line with the bar
        bar.close()
        op.context = ""
    nodes = np.zeros((runs, steps))
    weights = np.zeros((runs, steps))
    for r in range(runs):
        t = np.diag(alpha[r]) + np.diag(beta[r, :-1], 1) + np.diag(beta[r, :-1], -1)
        theta, s = np.linalg.eigh(t)
        nodes[r], weights[r] = theta, s[0] ** 2  # first components: the quadrature weights
    return nodes, weights


def broaden(nodes: np.ndarray, weights: np.ndarray, sigma: float | None = None, points: int = 1000
            ) -> tuple[np.ndarray, np.ndarray, float]:
    """Gaussian-broadened density on a grid that covers every node by 6σ: ``(grid, density, sigma)``.

    ``sigma`` defaults to 1% of the node range. Each run's density integrates to 1 (its weights
    sum to 1 and each Gaussian is normalized); the result is their mean.
    """
    lo, hi = float(nodes.min()), float(nodes.max())
    if sigma is None:
        sigma = 0.01 * max(hi - lo, 1e-12 * max(abs(lo), abs(hi), 1.0))
    if not (math.isfinite(sigma) and sigma > 0):
        raise UserError(f"sigma must be a positive number, got {sigma!r}")
    if not isinstance(points, int) or points < 10:
        raise UserError(f"points must be an integer of at least 10, got {points!r}")
    grid = np.linspace(lo - 6 * sigma, hi + 6 * sigma, points)
    z = (grid[:, None, None] - nodes[None]) / sigma
    rho = (weights[None] * np.exp(-0.5 * z * z)).sum(axis=2).mean(axis=1) / (sigma * math.sqrt(2 * math.pi))
    return grid, rho, float(sigma)


def spectral_density(op: HVPOperator, runs: int = 4, steps: int = 80, sigma: float | None = None, points: int = 1000,
                     seed: int = 0, progress: bool = False) -> Density:
    """The Hessian's spectral density by stochastic Lanczos quadrature (see ``slq`` and ``broaden``)."""
    started = time.perf_counter()
    hvps0 = op.hvps
    nodes, weights = slq(op, runs, steps, seed, progress)
    grid, rho, sigma = broaden(nodes, weights, sigma, points)
    return Density(grid=grid, density=rho, nodes=nodes, weights=weights, sigma=sigma, hvps=op.hvps - hvps0,
                   bn_mode=op.bn_mode, params=op.group.names, num_samples=op.num_samples,
                   seconds=time.perf_counter() - started)


# --- the public API --------------------------------------------------------------------------
def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None) if isinstance(model, nn.Module) else None
    return p.device if p is not None else torch.device("cpu")


def task_loss(task: Task) -> LossFn:
    """The batch-mean loss the HVPs differentiate: ``task.batch_loss`` (fp32 for low-precision outputs), but a
    float64 model keeps float64 (``batch_loss`` would round its outputs to fp32)."""

    def loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if outputs.dtype == torch.float64:
            return task.loss_fn(outputs, targets)
        return task.batch_loss(outputs, targets)

    return loss


def prepare(model: nn.Module, data: Any, loss_fn: LossFn | str | None, batch_size: int | None = None
            ) -> tuple[Source, Task]:
    """``data`` and ``loss_fn`` as ``fastland.surface`` takes them (through ``fastland.api.prepare``), on the
    model's device: the batches (held in memory for a cached set, prepared once; re-read per product for a
    streamed one) and the resolved ``Task``.

    ``batch_size`` (default ``DEFAULT_BATCH_SIZE``) splits a cached set; a streamed set (a DataLoader too large
    to cache) keeps its loader's batches. In ``bn_mode='batch'`` the batches are BN's normalization batches."""
    if batch_size is not None and (not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1):
        raise UserError(f"batch_size must be a positive integer, got {batch_size!r}")
    bs = batch_size or DEFAULT_BATCH_SIZE
    if isinstance(model, nn.Module) and next(model.parameters(), None) is None:
        raise UserError("the model has no parameters: there is no Hessian to analyse")
    evalset, task, _ = api.prepare(model, data, loss_fn, _model_device(model), bs)
    if isinstance(evalset, data_mod.StreamedSet):
        return StreamedBatches(evalset), task
    return BatchList(list(evalset.batches(bs, dtype=_model_dtype(model)))), task


def _model_dtype(model: nn.Module) -> torch.dtype:
    p = next(model.parameters())
    return p.dtype if p.is_floating_point() else torch.float32


def reference_hvp(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], vecs: torch.Tensor,
                  bn_mode: str = "eval", loss_fn: LossFn = F.cross_entropy
                  ) -> torch.Tensor:
    """The plain reference for ``HVPOperator``: ``H v`` for each row of ``vecs`` by ``torch.autograd.grad`` twice
    on ``(1/N) Σ_b n_b loss_b`` (every parameter that requires grad, in ``parameters()`` order), on a copy whose
    BN modules are in train mode for ``bn_mode='batch'`` (their running statistics change on the copy only).
    Nothing is kept or batched: for tests and the GPU runner's checks."""
    ref = copy.deepcopy(model).eval()
    if bn_mode == "batch":
        for m in ref.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.train()
    params = [p for p in ref.parameters() if p.requires_grad]
    total = sum(x.shape[0] for x, _ in batches)
    rows = []
    with sdpa_kernel([SDPBackend.MATH]):  # the fused attention kernels have no double backward
        loss = sum(loss_fn(ref(x), y) * (x.shape[0] / total) for x, y in batches)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        for v in vecs:
            parts = v.split([p.numel() for p in params])
            hv = torch.autograd.grad(grads, params, [t.view(p.shape) for t, p in zip(parts, params, strict=True)],
                                     retain_graph=True)
            rows.append(torch.cat([h.reshape(-1) for h in hv]))
    return torch.stack(rows)


def operator(model: nn.Module, data: Any, loss_fn: LossFn | str | None = None, bn_mode: str = "eval",
             params: str | Sequence[str] | None = None, batch_size: int | None = None,
             block: int | str = "auto", ad: str | None = None, keep_graph: bool | str = "auto",
             data_parallel: bool | None = None, channels_last: bool | str = "auto") -> HVPOperator:
    """The Hessian-vector-product operator of ``model``'s mean loss over ``data`` (see ``HVPOperator``).

    ``data`` and ``loss_fn`` mean what they mean for ``fastland.surface`` (tensors, a Dataset, a
    DataLoader or an ``EvalSet``; None, ``"cross_entropy"``, ``"mse"`` or a callable returning the
    batch mean). Under torchrun (``data_parallel=None``) every rank passes the same ``data`` and
    takes a contiguous share of its batches; the products are all-reduced (``fastland.distributed``)."""
    if bn_mode not in BN_MODES:
        raise UserError(f"unknown bn_mode {bn_mode!r}; use {' or '.join(BN_MODES)}")
    batches, task = prepare(model, data, loss_fn, batch_size)
    num_samples = None
    if data_parallel is None:  # under torchrun, every rank takes a share of the batches
        data_parallel = distributed.current() is not None
    if data_parallel and (ctx := distributed.current()) is not None:
        if len(batches) < ctx.world_size:
            raise UserError(f"data-parallel Hessian-vector products need a batch per rank: {len(batches)} batch(es) for "
                            f"{ctx.world_size} ranks; use a smaller batch_size or more samples")
        if batches.streamed:
            num_samples = len(batches.data)  # every rank reads the same loader: the global N is known
        batches = batches.share(ctx.rank, ctx.world_size)
    op = HVPOperator(model, batches, task_loss(task), bn_mode=bn_mode, params=params, block=block, ad=ad,
                     keep_graph=keep_graph, data_parallel=data_parallel, channels_last=channels_last,
                     num_samples=num_samples)
    op.loss_name = task.name
    return op


def top_eigenvalues(model: nn.Module, data: Any, k: int = 1, loss_fn: LossFn | str | None = None, bn_mode: str = "eval",
                    params: str | Sequence[str] | None = None, tol: float = 1e-3, max_iter: int | None = None,
                    seed: int = 0, batch_size: int | None = None, which: str = "largest", block: int = 1,
                    ad: str | None = None, keep_graph: bool | str = "auto", progress: bool = False,
                    channels_last: bool | str = "auto") -> EigenResult:
    """The k largest Hessian eigenvalues (numpy, largest first) and their eigenvectors.

    Unpacks as ``values, vectors`` (one ``{parameter name: tensor}`` per eigenvalue); the result
    also holds the residuals, the HVP count and the BN mode. ``tol`` bounds each pair's relative
    residual ``‖Hv − λv‖ / |λ|``; ``max_iter`` caps the HVPs (default ``max(100, 20k)``).
    ``which='magnitude'`` ranks by |λ| (what power iteration finds), ``'smallest'`` gives the most
    negative first. ``block`` vectors per Lanczos step (1 needs the fewest HVPs); ``ad``,
    ``keep_graph`` and ``channels_last`` choose how HVPs are made (see ``HVPOperator``).
    """
    _check_tol(tol)
    op = operator(model, data, loss_fn, bn_mode, params, batch_size, block=block, ad=ad, keep_graph=keep_graph,
                  channels_last=channels_last)
    return lanczos(op, k=k, which=which, tol=tol, max_iter=max_iter, seed=seed, block=block, progress=progress)


def trace(model: nn.Module, data: Any, loss_fn: LossFn | str | None = None, bn_mode: str = "eval",
          params: str | Sequence[str] | None = None, tol: float = 1e-2, max_iter: int = 500, method: str = "hutch++",
          seed: int = 0, batch_size: int | None = None, ad: str | None = None, keep_graph: bool | str = "auto",
          progress: bool = False, channels_last: bool | str = "auto") -> TraceEstimate:
    """The Hessian's trace, a float with ``.stderr``: sampling stops when the standard error is at
    most ``tol · |trace|`` or after ``max_iter`` HVPs (see ``estimate_trace``)."""
    _check_tol(tol)
    op = operator(model, data, loss_fn, bn_mode, params, batch_size, ad=ad, keep_graph=keep_graph,
                  channels_last=channels_last)
    return estimate_trace(op, method=method, tol=tol, max_iter=max_iter, seed=seed, progress=progress)


def density(model: nn.Module, data: Any, loss_fn: LossFn | str | None = None, bn_mode: str = "eval",
            params: str | Sequence[str] | None = None, runs: int = 4, steps: int = 80, sigma: float | None = None,
            points: int = 1000, seed: int = 0, batch_size: int | None = None, ad: str | None = None,
            keep_graph: bool | str = "auto", progress: bool = False, channels_last: bool | str = "auto") -> Density:
    """The Hessian's spectral density by stochastic Lanczos quadrature. Unpacks as ``grid, density``."""
    op = operator(model, data, loss_fn, bn_mode, params, batch_size, ad=ad, keep_graph=keep_graph,
                  channels_last=channels_last)
    return spectral_density(op, runs=runs, steps=steps, sigma=sigma, points=points, seed=seed, progress=progress)


def curvature_map(model: nn.Module, data: Any, surface: Any, **kwargs: Any) -> Any:
    """λmax, λmin and |λmin/λmax| over a surface's grid (Li et al., Sec. 6): see ``fastland.curvature.curvature_map``."""
    from fastland import curvature

    return curvature.curvature_map(model, data, surface, **kwargs)


if __name__ == "__main__":  # python -m fastland.hessian: the CLI (fastland.hessian_cli) on the imported module
    from fastland.hessian_cli import main

    main()
