"""The batched evaluator: many grid points per forward pass, with torch.func.

The core is the model-ensembling idiom: the perturbed weights of a block of P grid points
are one ``[P, N]`` tensor (``directions.perturb``), viewed as ``{name: [P, *shape]}``
(``FlatSpace.batch_views``), and ``vmap(functional_call)`` runs the model for all P
weight sets over each cached data batch (``batched_forward``). Loss sums and correct
counts accumulate per point in fp32 (fp64 across batches), whatever the compute precision.

Around that core, in small named pieces:

- ``engine_model.plan``: exact rewrites (factorized first layer, BN folding, fast pooling);
- strategies: ``vmap`` (grouped convolutions), ``im2col`` (vmap over unfold+matmul convs,
  i.e. batched matmuls) and ``loop`` (one point at a time through the same rewritten
  body, ``looped_forward``). ``strategy="auto"`` times each on a small probe and keeps the
  fastest for the device it runs on (on the 2-core CPU that is ``loop``; see
  ``benchmarks/README.md``);
- sizing: points per block and images per data batch from free device memory, backing
  off (and redoing only the block that failed) on out-of-memory;
- precision: ``fp32``, ``tf32`` (CUDA) or ``bf16``; ``auto`` is fp32 on CPU, tf32 on CUDA.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from fastland import directions
from fastland.data import EvalSet
from fastland.engine_model import Plan, activation_floats_per_image, macs_per_image, plan
from fastland.errors import UserError
from fastland.params import FlatSpace
from fastland.reference import BN_MODES

STRATEGIES = ("loop", "vmap", "im2col")
PRECISIONS = ("auto", "fp32", "tf32", "bf16")
DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16}
CHUNK_SECONDS = 2.0  # target wall time of one chunk handed to evaluate(): a few seconds at most
MEMORY_FRACTION = 0.5  # of free device memory, for one block's weights and activations
MAPS_CACHE_FRACTION = 0.2  # of free device memory, for the cached first-layer maps


# --- the core ----------------------------------------------------------------------------
def batched_forward(body: nn.Module, params: dict[str, torch.Tensor], h: torch.Tensor, shared_input: bool
                    ) -> torch.Tensor:
    """``body`` run with P weight sets at once: ``params`` are ``{name: [P, *shape]}``; ``h``
    is one input ``[B, ...]`` shared by all points, or ``[P, B, ...]``. Returns ``[P, B, ...]``."""

    def one_point(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(body, p, (x,))

    return vmap(one_point, in_dims=(0, None if shared_input else 0))(params, h)


def looped_forward(body: nn.Module, params: dict[str, torch.Tensor], inputs: Callable[[int], torch.Tensor],
                   points: int) -> torch.Tensor:
    """The same as ``batched_forward``, one point at a time (``inputs(i)`` is point i's input)."""
    return torch.stack([functional_call(body, {k: v[i] for k, v in params.items()}, (inputs(i),))
                        for i in range(points)])


def loss_and_correct(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-point cross-entropy sum (fp32) and correct count over one batch; ``logits [P, B, C]``."""
    p, b, c = logits.shape
    logits = logits.float()
    loss = F.cross_entropy(logits.reshape(p * b, c), y.repeat(p), reduction="none").view(p, b).sum(1)
    correct = (logits.argmax(-1) == y).sum(1)
    return loss, correct


# --- precision ---------------------------------------------------------------------------
def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> fp32 on CPU, tf32 on CUDA. tf32 is a CUDA format: asking for it elsewhere is an error."""
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "tf32" if device.type == "cuda" else "fp32"
    if precision == "tf32" and device.type != "cuda":
        raise UserError("--precision tf32 needs a CUDA GPU; use fp32 or bf16 on the CPU")
    return precision


@contextlib.contextmanager
def precision_context(precision: str, device: torch.device) -> Iterator[None]:
    """On CUDA, fp32 matmuls and convolutions run as TF32 for ``tf32`` and as true fp32 (IEEE)
    otherwise; PyTorch's own default lets cuDNN convolutions use TF32, which would make an
    "fp32" run silently TF32. The global settings are restored afterwards. No-op on the CPU."""
    if device.type != "cuda":
        yield
        return
    tf32 = precision == "tf32"
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):  # torch >= 2.9
        mm, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
        saved = (mm.fp32_precision, conv.fp32_precision)
        mm.fp32_precision = conv.fp32_precision = "tf32" if tf32 else "ieee"
        try:
            yield
        finally:
            mm.fp32_precision, conv.fp32_precision = saved
    else:
        saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# --- memory ------------------------------------------------------------------------------
def free_memory(device: torch.device) -> int:
    """Free bytes on ``device``: CUDA's free memory, or the host's MemAvailable."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def is_oom(err: BaseException) -> bool:
    """Whether ``err`` is an allocation failure (CUDA or host) that a smaller block can avoid."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    msg = str(err)
    return isinstance(err, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg)


def run_with_backoff(fn: Callable[[int, int], object], block: int, batch: int, batch_fixed: bool,
                     on_backoff: Callable[[int, int], None] | None = None) -> tuple[object, int, int]:
    """Call ``fn(block, batch)``; on out-of-memory halve the block (then the batch, unless it is
    fixed by BN batch statistics) and call again. Returns ``(result, block, batch)`` that worked."""
    while True:
        try:
            return fn(block, batch), block, batch
        except (RuntimeError, torch.OutOfMemoryError) as err:
            if not is_oom(err):
                raise
            if block > 1:
                block //= 2
            elif not batch_fixed and batch > 1:
                batch //= 2
            else:
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if on_backoff is not None:
                on_backoff(block, batch)


# --- the evaluator -----------------------------------------------------------------------
class BatchedEvaluator:
    """Evaluates ``L(θ + Σ c_k d_k)`` for many grid points per forward pass (see the module docstring).

    Same protocol and results as ``fastland.reference.ReferenceEvaluator``: ``evaluate(coords
    [P, D]) -> (mean loss [P], accuracy % [P])`` as fp64 CPU tensors. In ``bn_mode='batch'``
    BN normalizes each ``batch_size`` slice of the evaluation set (in order) with its own
    statistics; in ``eval`` mode the data batch is the engine's to choose.

    ``strategy``, ``factorize``, ``fold_bn`` and ``fast_pool`` (None: on the CPU only) switch
    the strategy and the exact shortcuts, for tests and benchmarks; ``block`` (points per
    block) and ``batch`` (images per data batch, eval mode) override the sizing.
    """

    name = "batched"

    def __init__(self, model: nn.Module, space: FlatSpace, theta: torch.Tensor, dirs: torch.Tensor,
                 evalset: EvalSet, bn_mode: str = "eval", batch_size: int = 128, precision: str = "auto",
                 strategy: str = "auto", factorize: bool = True, fold_bn: bool = True, fast_pool: bool | None = None,
                 block: int | None = None, batch: int | None = None, verbose: bool = True) -> None:
        if bn_mode not in BN_MODES:
            raise ValueError(f"unknown bn_mode {bn_mode!r}; use eval or batch")
        if strategy not in ("auto", *STRATEGIES):
            raise ValueError(f"unknown strategy {strategy!r}; use auto or one of {', '.join(STRATEGIES)}")
        self.device = evalset.device
        self.precision = resolve_precision(precision, self.device)
        self.dtype = DTYPES[self.precision]
        self.space, self.evalset, self.bn_mode = space, evalset, bn_mode
        self.theta = theta.to(self.device, torch.float32)
        self.dirs = dirs.to(self.device, torch.float32)
        self.verbose = verbose
        # Pool2x2 is much faster than max_pool2d on the CPU; on CUDA max_pool2d is one kernel.
        fast_pool = self.device.type == "cpu" if fast_pool is None else fast_pool
        self._options = {"factorize": factorize, "fold_bn": fold_bn, "fast_pool": fast_pool}
        self._plans: dict[str, Plan] = {}
        # BN that normalizes with batch statistics fixes the data batch (same partition as the reference).
        self.batch_fixed = bn_mode == "batch" or any(
            isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is None for m in model.modules())
        macs = macs_per_image(model, tuple(evalset.images.shape[1:]))
        self.macs_per_image = sum(macs.values())
        first = next(iter(macs), None)
        self.macs_per_image_factorized = self.macs_per_image
        self._model = model

        n = len(evalset)
        free = free_memory(self.device)
        if batch is not None:
            self.batch = int(batch)
        elif self.batch_fixed:
            self.batch = int(batch_size)
        else:
            self.batch = min(n, 256 if self.device.type == "cpu" else 1024)
        if self.batch_fixed and self.batch != batch_size:
            raise ValueError(f"bn_mode batch normalizes per batch of {batch_size}; the data batch must be that size")
        self._x, self._y = self._cache_inputs(self.batch)
        p0 = self._plan("loop")
        if p0.stem is not None and first is not None:
            # design.md's cost model: the first layer costs D MACs per output once factorized.
            outputs = p0.stem.maps(self._x[0][:1])[0, 0].numel()
            self.macs_per_image_factorized = self.macs_per_image - macs[first] + outputs * self.dirs.shape[0]
        self._maps_budget = int(MAPS_CACHE_FRACTION * free)
        self._maps: dict[int, tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]] = {}

        self._free = free
        self.timings: dict[str, float] = {}
        self.strategy = self._tune(STRATEGIES) if strategy == "auto" else strategy
        self.block = int(block) if block is not None else self._block_for(self.strategy)
        # A forced strategy is timed once, warm-up included: an overestimate, fine for sizing chunks.
        per_point = self.timings.get(self.strategy) or self._probe_case(self.strategy)()
        self.seconds_per_point = per_point * n
        chunk = max(1, int(CHUNK_SECONDS / self.seconds_per_point))
        if chunk >= self.block:
            chunk = chunk // self.block * self.block
        self.chunk_size = chunk
        self._say(self.describe(free))

    # --- setup helpers --------------------------------------------------------------
    def _say(self, msg: str) -> None:
        if self.verbose:
            print(msg, flush=True)

    def describe(self, free: int | None = None) -> str:
        """One line: strategy (and the probe timings it beat), precision and sizes."""
        tim = ", ".join(f"{k} {v * 1e6:.2f}" for k, v in sorted(self.timings.items(), key=lambda kv: kv[1]))
        p = self._plan(self.strategy)
        shortcuts = [s for s, on in (("factorized first layer", p.stem is not None),
                                     (f"{len(p.folds)} BN folded", bool(p.folds))) if on]
        mem = f"; {free / 2**30:.1f} GiB free" if free is not None else ""
        return (f"engine: {self.strategy} strategy"
                f"{f' (probe µs per point-image: {tim})' if tim else ''}, {self.precision}; "
                f"{self.block} points per block x {self.batch} images per batch, {self.chunk_size} points per chunk"
                f"{'; ' + ', '.join(shortcuts) if shortcuts else ''}{mem}")

    def _block_for(self, strategy: str) -> int:
        """Points per block that fit in MEMORY_FRACTION of free memory (at most 256 on the CPU,
        where a block only bounds the weights held at once, 1024 on CUDA). The vmap strategies
        hold every point's activations at once: the largest layer input + output (im2col's
        unfolded patches included), the stem's unpooled output, and a factor 3 of slack."""
        weights = self.space.numel * 4 * 3
        acts = 0
        if strategy != "loop":
            p = self._plan(strategy)
            floats = activation_floats_per_image(p.body, self._body_input_sample(p).float())
            if p.stem is not None:
                floats = max(floats, 2 * p.stem.channels * math.prod(p.stem.spatial))  # combined + pooled
            acts = self.batch * floats * 4 * 3
        cap = 256 if self.device.type == "cpu" else 1024
        return max(1, min(cap, int(MEMORY_FRACTION * self._free) // (weights + acts)))

    def _plan(self, strategy: str) -> Plan:
        if strategy not in self._plans:
            self._plans[strategy] = plan(self._model, self.space, self.theta, self.dirs, self.bn_mode,
                                         im2col=strategy == "im2col", **self._options)
        return self._plans[strategy]

    def _cache_inputs(self, batch: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Normalized fp32 batches, cached on the device for the whole run."""
        xs, ys = [], []
        for x, y in self.evalset.batches(batch):
            xs.append(x.contiguous())
            ys.append(y)
        return xs, ys

    def _body_input_sample(self, p: Plan) -> torch.Tensor:
        x = self._x[0][:2]
        if p.stem is None:
            return x
        maps = p.stem.maps(x)
        coords = torch.zeros(1, self.dirs.shape[0], device=self.device)
        views = self.space.batch_views(directions.perturb(self.theta, self.dirs, coords))
        stats = p.stem.batch_stats(maps) if (p.stem.bn is not None and p.stem.running is None) else None
        return p.stem.combine_all(maps, coords, p.stem.coefficients(coords, views, stats))[0]  # [2, ...]

    def _maps_of(self, p: Plan, x: torch.Tensor) -> torch.Tensor:
        """The stem's maps of ``x``, computed in this evaluator's precision (true fp32 for fp32 on CUDA)."""
        with precision_context(self.precision, self.device):
            return p.stem.maps(x)

    def _stem_maps(self, p: Plan, j: int) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """First-layer maps (and their batch statistics, when a BN uses them) of batch ``j``; cached
        while they fit in MAPS_CACHE_FRACTION of the free memory seen at start."""
        if j in self._maps:
            return self._maps[j]
        maps = self._maps_of(p, self._x[j])
        stats = p.stem.batch_stats(maps) if (p.stem.bn is not None and p.stem.running is None) else None
        used = sum(m.numel() * m.element_size() for m, _ in self._maps.values())
        if used + maps.numel() * maps.element_size() <= self._maps_budget:
            self._maps[j] = (maps, stats)
        return maps, stats

    # --- strategy choice ------------------------------------------------------------
    def _probe_case(self, strategy: str) -> Callable[[], float]:
        """A timed run of ``strategy`` on a small probe (a slice of the first batch, about 0.1 s
        of work on the CPU): returns a function giving seconds per point-image."""
        cpu = self.device.type == "cpu"
        point_images = max(16, int((2e10 if cpu else 2e12) / (2 * max(1, self.macs_per_image_factorized))))
        block = self._block_for(strategy)
        points = max(1, min(block, 8 if cpu else block, point_images // 8))
        images = max(min(8, self._x[0].shape[0]), min(self._x[0].shape[0], point_images // points))
        x, y = self._x[0][:images], self._y[0][:images]
        coords = torch.linspace(-0.5, 0.5, points, device=self.device)[:, None].expand(points, self.dirs.shape[0])
        coords = coords.contiguous()
        p = self._plan(strategy)
        maps = stats = None
        if p.stem is not None:
            maps = self._maps_of(p, x)
            stats = p.stem.batch_stats(maps) if (p.stem.bn is not None and p.stem.running is None) else None

        def timed() -> float:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            t0 = time.perf_counter()
            self._block_batch(strategy, p, coords, x, y, maps, stats)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            return (time.perf_counter() - t0) / (points * images)

        return timed

    def _tune(self, candidates: tuple[str, ...], rounds: int = 4) -> str:
        """The fastest of ``candidates`` on the probe. Rounds interleave the candidates and each
        keeps its best time, so a burst of load from a neighbour hits all of them alike; a
        candidate 3× slower than the best after a round is dropped."""
        cases = {s: self._probe_case(s) for s in candidates}
        alive = []
        for s, run in cases.items():
            try:
                run()  # warm-up: first-call allocations and kernel selection
                alive.append(s)
            except (RuntimeError, torch.OutOfMemoryError) as err:
                if not is_oom(err):
                    raise
                self.timings[s] = math.inf  # does not fit even at its own block size: not a candidate
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
        if not alive:
            raise UserError("the model does not fit in device memory with any strategy, even one point at a time")
        for _ in range(rounds):
            for s in alive:
                self.timings[s] = min(self.timings.get(s, math.inf), cases[s]())
            best = min(self.timings[s] for s in alive)
            alive = [s for s in alive if self.timings[s] <= 3 * best]
        return min(self.timings, key=self.timings.get)

    # --- evaluation -------------------------------------------------------------------
    @torch.no_grad()
    def _block_batch(self, strategy: str, p: Plan, coords: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                     maps: torch.Tensor | None, stats: tuple[torch.Tensor, torch.Tensor] | None,
                     params: dict[str, torch.Tensor] | None = None, views: dict[str, torch.Tensor] | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss sums and correct counts ``[P]`` of one block of points on one data batch."""
        if params is None:
            views = self.space.batch_views(directions.perturb(self.theta, self.dirs, coords))
            params = p.body_params(views, self.dtype)
        with precision_context(self.precision, self.device):
            cs = p.stem.coefficients(coords, views, stats) if p.stem is not None else None
            points = coords.shape[0]
            if strategy == "loop":
                if p.stem is None:
                    xd = x.to(self.dtype)
                    logits = looped_forward(p.body, params, lambda i: xd, points)
                else:
                    inputs = p.stem.point_inputs(maps, coords, cs)
                    logits = looped_forward(p.body, params, lambda i: inputs(i).to(self.dtype), points)
            elif p.stem is None:
                logits = batched_forward(p.body, params, x.to(self.dtype), shared_input=True)
            else:
                logits = batched_forward(p.body, params, p.stem.combine_all(maps, coords, cs).to(self.dtype),
                                         shared_input=False)
        return loss_and_correct(logits, y)

    def _evaluate_block(self, coords: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = self._plan(self.strategy)
        views = self.space.batch_views(directions.perturb(self.theta, self.dirs, coords))
        params = p.body_params(views, self.dtype)
        loss = torch.zeros(coords.shape[0], dtype=torch.float64, device=self.device)
        correct = torch.zeros(coords.shape[0], dtype=torch.int64, device=self.device)
        for j, (x, y) in enumerate(zip(self._x, self._y, strict=True)):
            maps, stats = self._stem_maps(p, j) if p.stem is not None else (None, None)
            ls, cr = self._block_batch(self.strategy, p, coords, x, y, maps, stats, params, views)
            loss += ls.double()
            correct += cr
        return loss, correct

    def _set_batch(self, batch: int) -> None:
        if batch != self.batch:
            self.batch = batch
            self._x, self._y = self._cache_inputs(batch)
            self._maps.clear()

    @torch.no_grad()
    def evaluate(self, coords: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean loss and accuracy (%) per point, for ``coords [P, D]``; fp64 on the CPU."""
        coords = coords.to(self.device, torch.float32).reshape(-1, self.dirs.shape[0])
        if coords.shape[0] == 0:
            return torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64)
        losses, corrects = [], []
        start = 0
        while start < coords.shape[0]:
            def attempt(block: int, batch: int, start: int = start) -> tuple[torch.Tensor, torch.Tensor]:
                self._set_batch(batch)
                return self._evaluate_block(coords[start : start + block].contiguous())

            want = min(self.block, coords.shape[0] - start)
            (loss, correct), used, batch = run_with_backoff(
                attempt, want, self.batch, self.batch_fixed,
                lambda b, bs: self._say(f"engine: out of memory; retrying with {b} points per block x {bs} images"))
            if used < want:
                self.block = used  # remember the back-off for the next blocks and calls
            self._set_batch(batch)
            losses.append(loss)
            corrects.append(correct)
            start += loss.shape[0]
        n = len(self.evalset)
        loss = torch.cat(losses).cpu() / n
        acc = 100.0 * torch.cat(corrects).cpu().double() / n
        return loss, acc
