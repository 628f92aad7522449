"""The engine comparison suite: grid points per second of fastland and of the tools people use.

Run: ``pytest benchmarks/bench_engine.py --benchmark-only --benchmark-json=FILE`` (add
``--gpu-sizes`` on a GPU), then ``python benchmarks/report.py FILE`` for the markdown table.

Groups (``extra_info["kind"]``):

- ``compare``: one LeNet (no BN: ``loss-landscapes`` divides by the norm of every tensor),
  the same 256 images (10,000 with ``--gpu-sizes``), the same 21×21 grid, four ways:
  the engine; the reference evaluator; a Li et al.-style loop (the official
  ``loss-landscape`` code's pattern: set ``p.data = w + d`` per point, then a torch
  ``DataLoader`` over a ``TensorDataset``, ``loss.item()`` per batch); and
  ``loss_landscapes.random_plane`` 3.0.6 (its own uniform directions, so compare speed,
  not values). Target on the 2-core CPU: engine ≥ 3× faster per grid point than
  ``loss-landscapes``.
- ``strategy``: the engine with each strategy forced, and ``auto``; ``auto`` records what it
  chose and its probe timings, so the table shows that it picks the fastest.
- ``scale_p``: points per ``evaluate`` call (and per block) P.
- ``resolution``: 21, 51, 101, 201 points per axis. At CPU sizes a 201×201 grid is ~1 min per
  round, so those cases time an evenly spaced subset of the grid and extrapolate
  (``extra_info["extrapolated"]``); ``--gpu-sizes`` runs full grids (and VGG-16-BN 51×51).
- ``peak``: a large fp32 matmul in the same run, the ceiling the FLOP/s are compared to.

Every engine case records ``points``, ``images`` and the cost model's MACs per image
(nominal and with the factorized first layer) so the report can compute FLOP/s.
"""

from __future__ import annotations

import copy
import functools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fastland import data, directions, losses, models
from fastland.engine import BatchedEvaluator, precision_context
from fastland.params import FlatSpace
from fastland.reference import ReferenceEvaluator

DEVICE = torch.device(os.environ.get("FASTLAND_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))
CUDA = DEVICE.type == "cuda"


@dataclass(frozen=True)
class Sizes:
    images: int  # evaluation images (the same for every implementation)
    compare_res: int  # grid of the four-way comparison
    strategy_points: int
    p_values: tuple[int, ...]
    resolutions: tuple[int, ...]
    res_points_cap: int | None  # time at most this many points of a grid and extrapolate (None: full grid)
    vgg_images: int
    vgg_points: int
    rounds_slow: int  # rounds of the slow per-point implementations


CPU_SIZES = Sizes(images=256, compare_res=21, strategy_points=64, p_values=(1, 4, 16, 64, 256),
                  resolutions=(21, 51, 101, 201), res_points_cap=441, vgg_images=32, vgg_points=4, rounds_slow=2)
GPU_SIZES = Sizes(images=10_000, compare_res=21, strategy_points=1024, p_values=(1, 16, 64, 256, 1024),
                  resolutions=(21, 51, 101, 201), res_points_cap=None, vgg_images=10_000, vgg_points=51 * 51,
                  rounds_slow=1)


@pytest.fixture(scope="module")
def sizes(gpu_sizes: bool) -> Sizes:
    return GPU_SIZES if gpu_sizes else CPU_SIZES


# --- setup ---------------------------------------------------------------------------------
@functools.cache
def problem(name: str, images: int) -> tuple[nn.Module, FlatSpace, torch.Tensor, torch.Tensor, data.EvalSet]:
    """Model, flat space, θ, two filter-normalized directions and the evaluation set."""
    model = models.randomized(name).to(DEVICE)
    space = FlatSpace(model)
    theta = space.flatten(model)
    dirs = directions.make(space, theta, dim=2, seed=1)
    evalset = data.load("synthetic", "test", images, seed=0, device=DEVICE)
    return model, space, theta, dirs, evalset


@functools.cache
def task(name: str, images: int) -> losses.Task:
    """Cross-entropy, resolved against the model's outputs on the problem's data."""
    model, _, _, _, ev = problem(name, images)
    x, y = ev.sample()
    with torch.no_grad():
        return losses.resolve(None, copy.deepcopy(model).eval()(x), y)


def grid(res: int) -> torch.Tensor:
    """``[res², 2]`` coordinates of a res×res grid over [-1, 1]², row by row."""
    x = torch.linspace(-1, 1, res)
    return torch.stack([x.repeat(res), x.repeat_interleave(res)], 1)


def subset(coords: torch.Tensor, cap: int | None) -> torch.Tensor:
    """At most ``cap`` evenly spaced points of a grid (all of them when ``cap`` is None)."""
    if cap is None or coords.shape[0] <= cap:
        return coords
    return coords[torch.linspace(0, coords.shape[0] - 1, cap).round().long()]


@functools.cache
def engine(name: str, images: int, bn_mode: str = "eval", strategy: str = "auto", block: int | None = None
           ) -> tuple[BatchedEvaluator, float]:
    """A built engine (cached: built once per configuration) and its construction time in seconds."""
    model, space, theta, dirs, ev = problem(name, images)
    t0 = time.perf_counter()
    e = BatchedEvaluator(model, space, theta, dirs, ev, task(name, images), bn_mode=bn_mode, strategy=strategy,
                         block=block)
    return e, time.perf_counter() - t0


@functools.cache
def reference(name: str, images: int, bn_mode: str = "eval") -> ReferenceEvaluator:
    """The reference evaluator (plain PyTorch, one point at a time) on ``problem(name, images)``."""
    model, space, theta, dirs, ev = problem(name, images)
    return ReferenceEvaluator(model, space, theta, dirs, ev, task(name, images), bn_mode, batch_size=128)


def engine_info(e: BatchedEvaluator, points: int, images: int, **more: object) -> dict[str, object]:
    return {"points": points, "images": images, "strategy": e.strategy, "precision": e.precision,
            "block": e.block, "batch": e.batch, "macs_per_image": e.macs_per_sample,
            "macs_per_image_factorized": e.macs_per_sample_factorized,
            "probe_us_per_point_image": {k: round(v * 1e6, 3) for k, v in e.timings.items()}, **more}


def run(benchmark, fn: Callable[[], object], rounds: int, warmup: int = 1) -> None:  # type: ignore[no-untyped-def]
    benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=warmup)


# --- the baselines ---------------------------------------------------------------------------
def li_et_al_loop(model: nn.Module, space: FlatSpace, theta: torch.Tensor, dirs: torch.Tensor, ev: data.EvalSet,
                  coords: torch.Tensor, batch_size: int = 128) -> list[tuple[float, float]]:
    """The official ``loss-landscape`` code's evaluation pattern (``net_plotter.set_weights`` +
    ``evaluation.eval_loss``): one point at a time, weights set through ``p.data``, a
    ``DataLoader`` over host tensors moved to the device batch by batch."""
    net = copy.deepcopy(model).eval()
    weights = [p.data.clone() for p in net.parameters()]
    dx = list(space.views(dirs[0]).values())
    dy = list(space.views(dirs[1]).values())
    x, y = ev.prepare(ev.inputs).cpu(), ev.targets.cpu()
    loader = DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)
    criterion = nn.CrossEntropyLoss()
    out = []
    for a, b in coords.tolist():
        changes = [d0 * a + d1 * b for d0, d1 in zip(dx, dy, strict=True)]
        for p, w, d in zip(net.parameters(), weights, changes, strict=True):
            p.data = w + d
        total_loss, correct, total = 0.0, 0, 0
        with torch.no_grad():
            for inputs, targets in loader:
                inputs, targets = inputs.to(DEVICE), targets.to(DEVICE)
                outputs = net(inputs)
                loss = criterion(outputs, targets)
                total_loss += loss.item() * inputs.size(0)
                _, predicted = torch.max(outputs.data, 1)
                correct += predicted.eq(targets).sum().item()
                total += inputs.size(0)
        out.append((total_loss / total, 100.0 * correct / total))
    return out


def loss_landscapes_plane(model: nn.Module, ev: data.EvalSet, res: int) -> object:
    """``loss_landscapes.random_plane`` over all images at once (its ``Loss`` metric), res×res points."""
    import loss_landscapes
    import loss_landscapes.metrics

    x, y = ev.prepare(ev.inputs), ev.targets
    metric = loss_landscapes.metrics.Loss(nn.CrossEntropyLoss(), x, y)
    m = copy.deepcopy(model).eval()
    with torch.no_grad():
        return loss_landscapes.random_plane(m, metric, distance=1, steps=res, normalization="filter",
                                            deepcopy_model=True)


# --- compare: the same model, data and points, four ways ------------------------------------
IMPLS = ["engine", "reference", "li_et_al_loop", "loss_landscapes"]


@pytest.mark.parametrize("impl", IMPLS)
def test_compare(benchmark, sizes: Sizes, impl: str) -> None:  # type: ignore[no-untyped-def]
    name, res = "lenet", sizes.compare_res
    model, space, theta, dirs, ev = problem(name, sizes.images)
    coords = grid(res)
    benchmark.group = f"compare: {name}, {sizes.images} images, {res}x{res} grid"
    info: dict[str, object] = {"kind": "compare", "impl": impl, "model": name, "points": res * res,
                               "images": sizes.images}
    if impl == "engine":
        e, build = engine(name, sizes.images)
        info.update(engine_info(e, res * res, sizes.images, build_seconds=round(build, 3)))
        run(benchmark, lambda: e.evaluate(coords), rounds=5)
    elif impl == "reference":
        ref = reference(name, sizes.images)
        run(benchmark, lambda: ref.evaluate(coords), rounds=sizes.rounds_slow, warmup=0)
    elif impl == "li_et_al_loop":
        run(benchmark, lambda: li_et_al_loop(model, space, theta, dirs, ev, coords), rounds=sizes.rounds_slow,
            warmup=0)
    else:
        pytest.importorskip("loss_landscapes")
        if CUDA:
            pytest.skip("loss-landscapes 3.0.6 draws its directions on the CPU (torch.rand without a device): "
                        "it cannot perturb a CUDA model")
        run(benchmark, lambda: loss_landscapes_plane(model, ev, res), rounds=sizes.rounds_slow, warmup=0)
    benchmark.extra_info.update(info)


# --- side by side: the candidates interleaved in one process -----------------------------------
def interleaved(cands: dict[str, tuple[Callable[[], object], int]], rounds: int) -> dict[str, float]:
    """Seconds per grid point of each candidate ``{name: (run, points it evaluates)}``: the candidates
    take turns (round-robin) and each keeps its best round, so a burst of load from a neighbour on
    this shared CPU hits all of them alike. One warm-up call each first."""
    for fn, _ in cands.values():
        fn()
    best = {k: float("inf") for k in cands}
    for _ in range(rounds):
        for k, (fn, points) in cands.items():
            _sync()
            t0 = time.perf_counter()
            fn()
            _sync()
            best[k] = min(best[k], (time.perf_counter() - t0) / points)
    return best


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


SIDE_BY_SIDE = {"lenet": 16, "resnet20_bn": 2}  # points per call of the slow per-point implementations


@pytest.mark.parametrize("name", list(SIDE_BY_SIDE))
def test_side_by_side(benchmark, sizes: Sizes, name: str) -> None:  # type: ignore[no-untyped-def]
    """The engine, the reference, a Li et al.-style loop and ``loss-landscapes`` (and one plain forward
    pass of the model over the same images, the floor of any one-point-at-a-time method), interleaved.
    ResNet-20 is not an ``nn.Sequential``: no model-specific shortcut applies to it."""
    model, space, theta, dirs, ev = problem(name, sizes.images)
    slow = SIDE_BY_SIDE[name]
    coords = subset(grid(21), 4 * slow)
    e, build = engine(name, sizes.images)
    ref = reference(name, sizes.images)
    plain = copy.deepcopy(model).eval()
    x = ev.prepare(ev.inputs)

    def forward() -> None:
        with torch.no_grad():
            plain(x)

    cands: dict[str, tuple[Callable[[], object], int]] = {
        "engine": (lambda: e.evaluate(coords), coords.shape[0]),
        "reference": (lambda: ref.evaluate(coords[:slow]), slow),
        "li_et_al_loop": (lambda: li_et_al_loop(model, space, theta, dirs, ev, coords[:slow]), slow),
        "plain_forward": (forward, 1),
    }
    try:
        import loss_landscapes  # noqa: F401

        if not CUDA:  # it draws its directions on the CPU: it cannot perturb a CUDA model
            side = max(2, round(slow**0.5))
            cands["loss_landscapes"] = (lambda: loss_landscapes_plane(model, ev, side), side * side)
    except ImportError:
        pass
    rounds = 3 if sizes is CPU_SIZES else 2
    result: dict[str, float] = {}
    benchmark.group = f"side by side: {name}, {sizes.images} images"
    benchmark.pedantic(lambda: result.update(interleaved(cands, rounds)), rounds=1, iterations=1, warmup_rounds=0)
    benchmark.extra_info.update({"kind": "side_by_side", "model": name, "images": sizes.images, "rounds": rounds,
                                 "ms_per_point": {k: round(v * 1e3, 3) for k, v in result.items()},
                                 **engine_info(e, coords.shape[0], sizes.images, build_seconds=round(build, 3))})


# --- strategies: auto must pick the fastest --------------------------------------------------
@pytest.mark.parametrize("strategy", ["auto", "loop", "vmap", "im2col"])
@pytest.mark.parametrize("name,bn_mode", [("lenet", "eval"), ("lenet_bn", "eval"), ("lenet_bn", "batch")])
def test_strategy(benchmark, sizes: Sizes, name: str, bn_mode: str, strategy: str) -> None:  # type: ignore[no-untyped-def]
    e, build = engine(name, sizes.images, bn_mode, strategy)
    coords = subset(grid(51), sizes.strategy_points)
    benchmark.group = f"strategy: {name} bn_mode={bn_mode}, {sizes.images} images"
    run(benchmark, lambda: e.evaluate(coords), rounds=3)
    benchmark.extra_info.update({"kind": "strategy", "model": name, "bn_mode": bn_mode, "requested": strategy,
                                 **engine_info(e, coords.shape[0], sizes.images, build_seconds=round(build, 3))})


# --- scaling with P ----------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["auto", "vmap"])
@pytest.mark.parametrize("p", [1, 4, 16, 64, 256, 1024])
def test_scale_p(benchmark, sizes: Sizes, p: int, strategy: str) -> None:  # type: ignore[no-untyped-def]
    if p not in sizes.p_values:
        pytest.skip(f"P={p} is not among this size's values {sizes.p_values}")
    name = "lenet_bn"
    e, _ = engine(name, sizes.images, "eval", strategy, block=p)
    coords = subset(grid(51), p)
    benchmark.group = f"scale_p: {name}, {sizes.images} images, strategy {strategy}"
    rounds = max(3, min(50, 256 // p))
    run(benchmark, lambda: e.evaluate(coords), rounds=rounds)
    benchmark.extra_info.update({"kind": "scale_p", "model": name, "requested": strategy, "p": p,
                                 **engine_info(e, p, sizes.images)})


# --- scaling with resolution -------------------------------------------------------------------
@pytest.mark.parametrize("res", [21, 51, 101, 201])
def test_resolution(benchmark, sizes: Sizes, res: int) -> None:  # type: ignore[no-untyped-def]
    name = "lenet_bn"
    e, _ = engine(name, sizes.images)
    full = grid(res)
    coords = subset(full, sizes.res_points_cap)
    benchmark.group = f"resolution: {name}, {sizes.images} images"
    run(benchmark, lambda: e.evaluate(coords), rounds=3 if sizes.res_points_cap else 1)
    benchmark.extra_info.update({"kind": "resolution", "model": name, "res": res, "grid_points": res * res,
                                 "extrapolated": coords.shape[0] < res * res,
                                 **engine_info(e, coords.shape[0], sizes.images)})


@pytest.mark.parametrize("impl", ["engine", "reference"])
def test_vgg(benchmark, sizes: Sizes, impl: str) -> None:  # type: ignore[no-untyped-def]
    """VGG-16-BN: at CPU sizes a few points on a few images; at GPU sizes the 51×51 target grid
    (the reference then times 4 points and the table extrapolates)."""
    name = "vgg16_bn"
    model, space, theta, dirs, ev = problem(name, sizes.vgg_images)
    points = sizes.vgg_points if impl == "engine" else min(sizes.vgg_points, 4)
    coords = subset(grid(51), points)
    benchmark.group = f"vgg: {name}, {sizes.vgg_images} images"
    info: dict[str, object] = {"kind": "vgg", "impl": impl, "model": name, "points": points,
                               "images": sizes.vgg_images, "grid_points": 51 * 51}
    if impl == "engine":
        e, build = engine(name, sizes.vgg_images)
        info.update(engine_info(e, points, sizes.vgg_images, build_seconds=round(build, 3)))
        run(benchmark, lambda: e.evaluate(coords), rounds=2, warmup=0)
    else:
        ref = reference(name, sizes.vgg_images)
        run(benchmark, lambda: ref.evaluate(coords), rounds=1, warmup=0)
    benchmark.extra_info.update(info)


# --- the ceiling --------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["fp32", "tf32", "bf16"])
def test_peak(benchmark, dtype: str) -> None:  # type: ignore[no-untyped-def]
    """Measured matmul throughput in this run: what the engine's FLOP/s are compared to."""
    if dtype == "tf32" and not CUDA:
        pytest.skip("tf32 is a CUDA format")
    n = 8192 if CUDA else 2048
    dt = torch.bfloat16 if dtype == "bf16" else torch.float32
    a = torch.randn(n, n, device=DEVICE, dtype=dt)
    b = torch.randn(n, n, device=DEVICE, dtype=dt)

    def mm() -> None:
        with precision_context(dtype, DEVICE):
            a @ b
        if CUDA:
            torch.cuda.synchronize()

    benchmark.group = "peak"
    run(benchmark, mm, rounds=10 if CUDA else 5)
    benchmark.extra_info.update({"kind": "peak", "dtype": dtype, "flop": 2 * n**3})
