"""The batched evaluator: the core, a plan of fast paths, a strategy and sizes, put together.

Same protocol and results as ``fastland.reference.ReferenceEvaluator``: ``evaluate(coords
[P, D]) -> (mean loss [P], accuracy % [P] or None)`` as fp64 CPU tensors. Loss sums and
correct counts accumulate per point in fp32 within a batch and fp64 across batches, whatever
the compute precision.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

from fastland import directions
from fastland.data import Data
from fastland.device import free_memory
from fastland.losses import Task
from fastland.params import FlatSpace
from fastland.reference import BN_MODES

from . import core
from . import strategy as strategies
from .cost import activation_floats_per_sample, macs_per_sample
from .fastpaths import Plan, plan
from .precision import DTYPES, precision_context, resolve_precision

_BN = nn.modules.batchnorm._BatchNorm


class BatchedEvaluator:
    """Evaluates ``L(θ + Σ c_k d_k)`` for many grid points per pass over the data.

    In ``bn_mode='batch'`` BN normalizes each ``batch_size`` slice of the data (in order; a
    streamed DataLoader's own batches) with its own statistics; in ``eval`` mode the data batch
    is the engine's to choose. ``strategy`` is ``auto``, ``tune`` or one of ``STRATEGIES`` (see
    ``fastland.engine.strategy``); ``factorize``, ``fold_bn`` and ``fast_pool`` (None: on the CPU
    only) switch the fast paths, for tests and benchmarks; ``block`` (points per block) and
    ``batch`` (samples per data batch, eval mode) override the sizing.
    """

    name = "batched"

    def __init__(self, model: nn.Module, space: FlatSpace, theta: torch.Tensor, dirs: torch.Tensor, data: Data,
                 task: Task, bn_mode: str = "eval", batch_size: int = 128, precision: str = "auto",
                 strategy: str = "auto", factorize: bool = True, fold_bn: bool = True, fast_pool: bool | None = None,
                 channels_last: bool | None = None, block: int | None = None, batch: int | None = None,
                 verbose: bool = True) -> None:
        if bn_mode not in BN_MODES:
            raise ValueError(f"unknown bn_mode {bn_mode!r}; use eval or batch")
        self.device = data.device
        self.precision = resolve_precision(precision, self.device)
        self.dtype = DTYPES[self.precision]
        self.space, self.data, self.task, self.bn_mode = space, data, task, bn_mode
        self.theta = theta.to(self.device, torch.float32)
        self.dirs = dirs.to(self.device, torch.float32)
        self.verbose = verbose
        self._say_lines: list[str] = []
        # Pool2x2 is much faster than max_pool2d on the CPU; on CUDA max_pool2d is one kernel.
        fast_pool = self.device.type == "cpu" if fast_pool is None else fast_pool
        # Channels-last inputs: measured much faster with oneDNN on the CPU; on CUDA not measured yet (a GPU run is owed).
        channels_last = self.device.type == "cpu" if channels_last is None else channels_last
        self._options = {"factorize": factorize, "fold_bn": fold_bn, "fast_pool": fast_pool,
                         "channels_last": channels_last}
        self._model = model
        self._plans: dict[str, Plan] = {}
        # BN that normalizes with batch statistics fixes the data batch (same partition as the reference).
        self.batch_fixed = bn_mode == "batch" or any(isinstance(m, _BN) and m.running_mean is None
                                                     for m in model.modules())
        n = len(data)
        if not data.cached:
            self.batch = int(data.batch_size or batch_size)
        elif batch is not None:
            self.batch = int(batch)
        elif self.batch_fixed:
            self.batch = int(batch_size)
        else:
            self.batch = min(n, 256 if self.device.type == "cpu" else 1024)
        if self.batch_fixed and data.cached and self.batch != batch_size:
            raise ValueError(f"bn_mode batch normalizes per batch of {batch_size}; the data batch must be that size")
        self._x, self._y = self._cache_inputs(self.batch)
        self._sample = self._x[0][:2]

        macs = macs_per_sample(model, self._sample.to(_param_device(model)))
        self.macs_per_sample = sum(macs.values())
        self.macs_per_sample_factorized = self.macs_per_sample
        p0 = self._plan("loop")
        if p0.stem is not None and macs:
            # design.md's cost model: the first layer costs D MACs per output once factorized.
            outputs = p0.stem.maps(self._sample[:1])[0, 0].numel()
            self.macs_per_sample_factorized = self.macs_per_sample - next(iter(macs.values())) + outputs * self.dirs.shape[0]
        self._free = free_memory(self.device)
        self._maps_budget = int(strategies.MAPS_CACHE_FRACTION * self._free)
        self._maps: dict[int, object] = {}

        self.strategy, self.timings = strategies.choose(strategy, self.device, self._probe_case, self._say)
        self.block = int(block) if block is not None else self._block_for(self.strategy)
        # Timed once for chunk sizing only: chunks never change any point's value.
        per_point = self.timings.get(self.strategy) or self._probe_case(self.strategy)()
        self.seconds_per_point = per_point * n
        chunk = max(1, int(strategies.CHUNK_SECONDS / max(self.seconds_per_point, 1e-9)))
        if chunk >= self.block:
            chunk = chunk // self.block * self.block
        self.chunk_size = chunk
        self._say(self.describe(self._free))

    # --- setup helpers --------------------------------------------------------------
    def _say(self, msg: str) -> None:
        self._say_lines.append(msg)
        if self.verbose:
            print(msg, flush=True)

    def describe(self, free: int | None = None) -> str:
        """One line: strategy (and the probe timings it beat), precision, sizes and fast paths."""
        tim = ", ".join(f"{k} {v * 1e6:.2f}" for k, v in sorted(self.timings.items(), key=lambda kv: kv[1]))
        p = self._plan(self.strategy)
        mem = f"; {free / 2**30:.1f} GiB free" if free is not None else ""
        data = "cached" if self.data.cached else "streamed"
        return (f"engine: {self.strategy} strategy"
                f"{f' (probe µs per point-sample: {tim})' if tim else ''}, {self.precision}; "
                f"{self.block} points per block x {self.batch} samples per batch ({data}), {self.chunk_size} points "
                f"per chunk{'; ' + ', '.join(p.applied) if p.applied else ''}{mem}")

    def _plan(self, strategy: str) -> Plan:
        if strategy not in self._plans:
            options = dict(self._options)
            options["channels_last"] = options["channels_last"] and strategy == "loop"  # measured: no gain under vmap
            self._plans[strategy] = plan(self._model, self.space, self.theta, self.dirs, self.bn_mode, self._sample,
                                         im2col_convs=strategy == "im2col", **options)
        return self._plans[strategy]

    def _cache_inputs(self, batch: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Prepared batches, cached on the device for the whole run (the first one only when streamed)."""
        xs, ys = [], []
        for x, y in self.data.batches(batch):
            xs.append(x.contiguous())
            ys.append(y)
            if not self.data.cached:
                break
        return xs, ys

    def _batches(self) -> enumerate:
        if self.data.cached:
            return enumerate(zip(self._x, self._y, strict=True))
        return enumerate(self.data.batches(self.batch))

    def _block_for(self, strategy: str) -> int:
        p = self._plan(strategy)
        h = self._body_input_sample(p)
        if strategy == "loop":
            floats = activation_floats_per_sample(p.body, h, output=True)  # a block's outputs are stacked
        else:
            floats = activation_floats_per_sample(p.body, h)
            if p.stem is not None:
                floats = max(floats, 2 * p.stem.channels * _prod(p.stem.spatial))  # combined + pooled
        return strategies.block_size(self.device, self._free, self.space.numel, self.batch, floats)

    def _body_input_sample(self, p: Plan) -> torch.Tensor:
        coords = torch.zeros(1, self.dirs.shape[0], device=self.device)
        views = self.space.batch_views(self.theta[None].contiguous())
        inputs = p.inputs(p.context(self._sample.float()), self._sample, coords, views, torch.float32)
        return inputs.shared if inputs.shared is not None else inputs.stacked()[0]

    def _context(self, p: Plan, j: int | None, x: torch.Tensor) -> object:
        """The plan's per-batch context (the stem's maps), in this evaluator's precision; cached per
        batch ``j`` while the cache stays within MAPS_CACHE_FRACTION of the free memory seen at start."""
        if p.stem is None:
            return None
        if j is not None and j in self._maps:
            return self._maps[j]
        with precision_context(self.precision, self.device):
            ctx = p.context(x)
        maps = ctx[0]
        used = sum(c[0].numel() * c[0].element_size() for c in self._maps.values())
        if j is not None and used + maps.numel() * maps.element_size() <= self._maps_budget:
            self._maps[j] = ctx
        return ctx

    # --- strategy probe -------------------------------------------------------------
    def _probe_case(self, strategy: str) -> Callable[[], float]:
        """A timed run of ``strategy`` on a small probe (a slice of the first batch, about 0.1 s of
        work on the CPU): returns a function giving seconds per point-sample. Building it raises
        when the strategy cannot run the model."""
        cpu = self.device.type == "cpu"
        point_samples = max(16, int((2e10 if cpu else 2e12) / (2 * max(1, self.macs_per_sample_factorized))))
        block = self._block_for(strategy)
        points = max(1, min(block, 8 if cpu else block, point_samples // 8))
        first = self._x[0].shape[0]
        samples = max(min(8, first), min(first, point_samples // points))
        if self.batch_fixed:
            samples = first  # batch statistics: the probe must see a whole normalization batch
        x, y = self._x[0][:samples], self._y[0][:samples]
        coords = torch.linspace(-0.5, 0.5, points, device=self.device)[:, None].expand(points, self.dirs.shape[0])
        coords = coords.contiguous()
        p = self._plan(strategy)
        ctx = self._context(p, None, x)

        def timed() -> float:
            _sync(self.device)
            t0 = time.perf_counter()
            self._block_batch(strategy, p, coords, x, y, ctx)
            _sync(self.device)
            return (time.perf_counter() - t0) / (points * samples)

        return timed

    # --- evaluation -------------------------------------------------------------------
    @torch.no_grad()
    def _block_batch(self, strategy: str, p: Plan, coords: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                     ctx: object, params: dict[str, torch.Tensor] | None = None,
                     views: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Loss sums and correct counts ``[P]`` of one block of points on one data batch."""
        if params is None or views is None:
            views = self.space.batch_views(directions.perturb(self.theta, self.dirs, coords))
            params = p.body_params(views, self.dtype)
        with precision_context(self.precision, self.device):
            inputs = p.inputs(ctx, x, coords, views, self.dtype)
            return core.block_sums(strategy, p.body, params, inputs, y, self.task, coords.shape[0])

    def _evaluate_block(self, coords: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        p = self._plan(self.strategy)
        views = self.space.batch_views(directions.perturb(self.theta, self.dirs, coords))
        params = p.body_params(views, self.dtype)
        loss = torch.zeros(coords.shape[0], dtype=torch.float64, device=self.device)
        correct = torch.zeros(coords.shape[0], dtype=torch.int64, device=self.device) if self.task.accuracy else None
        for j, (x, y) in self._batches():
            ctx = self._context(p, j if self.data.cached else None, x)
            ls, cr = self._block_batch(self.strategy, p, coords, x, y, ctx, params, views)
            loss += ls.double()
            if correct is not None and cr is not None:
                correct += cr
        return loss, correct

    def _set_batch(self, batch: int) -> None:
        if batch != self.batch and self.data.cached:
            self.batch = batch
            self._x, self._y = self._cache_inputs(batch)
            self._maps.clear()

    @torch.no_grad()
    def evaluate(self, coords: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Mean loss and accuracy (%, or None) per point, for ``coords [P, D]``; fp64 on the CPU."""
        coords = coords.to(self.device, torch.float32).reshape(-1, self.dirs.shape[0])
        if coords.shape[0] == 0:
            return torch.zeros(0, dtype=torch.float64), (torch.zeros(0, dtype=torch.float64) if self.task.accuracy
                                                         else None)
        losses, corrects = [], []
        start = 0
        while start < coords.shape[0]:
            def attempt(block: int, batch: int, start: int = start) -> tuple[torch.Tensor, torch.Tensor | None]:
                self._set_batch(batch)
                return self._evaluate_block(coords[start : start + block].contiguous())

            want = min(self.block, coords.shape[0] - start)
            (loss, correct), used, batch = strategies.run_with_backoff(
                attempt, want, self.batch, self.batch_fixed or not self.data.cached,
                lambda b, bs: self._say(f"engine: out of memory; retrying with {b} points per block x {bs} samples"))
            if used < want:
                self.block = used  # remember the back-off for the next blocks and calls
            self._set_batch(batch)
            losses.append(loss)
            corrects.append(correct)
            start += loss.shape[0]
        n = len(self.data)
        loss = torch.cat(losses).cpu() / n
        acc = 100.0 * torch.cat(corrects).cpu().double() / n if self.task.accuracy else None
        return loss, acc


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _prod(shape: tuple[int, ...]) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


def _param_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")
