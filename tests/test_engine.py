"""The batched engine against the reference evaluator (the oracle), point by point.

fp32 results must agree within 1e-5 relative per point for every strategy, both BN modes,
with and without the first-layer factorization and BN folding, on LeNet and VGG-16, for
chunks and blocks that do not divide the grid. Models get random (Kaiming) weights and
random BN statistics, and the directions perturb every tensor (``ignore='none'``), so no
shortcut can hide behind zeros or a flat loss.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from fastland import data, directions, losses, models, surface
from fastland.engine import BatchedEvaluator as _Batched
from fastland.engine import precision_context, resolve_precision, run_with_backoff
from fastland.engine.cost import macs_per_sample
from fastland.engine.fastpaths import Pool2x2, plan
from fastland.errors import UserError
from fastland.params import FlatSpace
from fastland.reference import ReferenceEvaluator as _Reference

RTOL = 1e-5
CE = losses.Task("cross_entropy", lambda o, t: F.cross_entropy(o, t), True, losses._per_sample_ce)


def ReferenceEvaluator(model, space, theta, dirs, ev, bn_mode="eval", batch_size=128):  # noqa: N802
    """The reference with cross-entropy, as the built-in models are scored."""
    return _Reference(model, space, theta, dirs, ev, CE, bn_mode, batch_size)


def BatchedEvaluator(model, space, theta, dirs, ev, **kw):  # noqa: N802
    return _Batched(model, space, theta, dirs, ev, CE, **kw)


def setup(name: str, samples: int, seed: int = 0, dim: int = 2):
    model = models.randomized(name, seed)
    evalset = data.load("synthetic", "test", samples, seed=seed)
    space = FlatSpace(model)
    theta = space.flatten(model)
    dirs = directions.make(space, theta, dim=dim, seed=seed + 1, norm="filter", ignore="none")
    return model, space, theta, dirs, evalset


def grid(points: int, scale: float, dim: int = 2, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    c = scale * (2 * torch.rand(points, dim, generator=gen) - 1)
    c[0] = 0.0
    return c


def check(name: str, bn_mode: str, strategy: str, samples: int, points: int, scale: float, batch_size: int,
          **options) -> None:
    model, space, theta, dirs, ev = setup(name, samples)
    coords = grid(points, scale)
    want_loss, want_acc = ReferenceEvaluator(model, space, theta, dirs, ev, bn_mode, batch_size).evaluate(coords)
    engine = BatchedEvaluator(model, space, theta, dirs, ev, bn_mode=bn_mode, batch_size=batch_size,
                              strategy=strategy, verbose=False, **options)
    loss, acc = engine.evaluate(coords)
    assert loss.dtype == torch.float64 and loss.device.type == "cpu" and loss.shape == (points,)
    assert want_loss.std() > 0.05 * want_loss.mean(), "test setup: the loss should vary across the grid"
    torch.testing.assert_close(loss, want_loss, rtol=RTOL, atol=0)
    torch.testing.assert_close(acc, want_acc, rtol=0, atol=0)


# --- LeNet: every strategy, BN mode and shortcut ------------------------------------------
@pytest.mark.parametrize("strategy", ["loop", "vmap", "im2col"])
@pytest.mark.parametrize("factorize", [True, False])
@pytest.mark.parametrize("bn_mode", ["eval", "batch"])
@pytest.mark.parametrize("name", ["lenet", "lenet_bn"])
def test_lenet_matches_reference(name: str, bn_mode: str, factorize: bool, strategy: str) -> None:
    check(name, bn_mode, strategy, samples=24, points=5, scale=1.0, batch_size=8, factorize=factorize)


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_lenet_bn_without_folding_matches_reference(strategy: str) -> None:
    check("lenet_bn", "eval", strategy, samples=16, points=4, scale=1.0, batch_size=8, fold_bn=False)


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
@pytest.mark.parametrize("bn_mode", ["eval", "batch"])
def test_cuda_plan_on_the_cpu_matches_reference(bn_mode: str, strategy: str) -> None:
    """The plan used on CUDA (max_pool2d kept, also inside the stem) checked here on the CPU."""
    check("lenet_bn", bn_mode, strategy, samples=16, points=4, scale=1.0, batch_size=8, fast_pool=False)


@pytest.mark.parametrize("name", ["lenet", "lenet_bn"])
def test_grid_rows_and_shared_bn_scale(name: str) -> None:
    """A row-major grid (points of a row share their partial sum) with ignore='biasbn' (γ not
    perturbed: one BN scale for every point, applied to the stem's maps once)."""
    model = models.randomized(name, 4)
    ev = data.load("synthetic", "test", 16, seed=4)
    space = FlatSpace(model)
    theta = space.flatten(model)
    dirs = directions.make(space, theta, dim=2, seed=4)
    xs = torch.linspace(-1, 1, 4)
    coords = torch.stack([xs.repeat(3), torch.linspace(-1, 1, 3).repeat_interleave(4)], 1)
    want = ReferenceEvaluator(model, space, theta, dirs, ev, "eval", 8).evaluate(coords)
    engine = BatchedEvaluator(model, space, theta, dirs, ev, strategy="loop", block=5, verbose=False)
    got = engine.evaluate(coords)
    assert want[0].std() > 0.05 * want[0].mean()
    torch.testing.assert_close(got[0], want[0], rtol=RTOL, atol=0)
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)


def test_short_last_batch_and_1d_directions() -> None:
    """20 samples in batches of 8 (the last one short), one direction."""
    model, space, theta, dirs, ev = setup("lenet_bn", 20, seed=3, dim=1)
    coords = grid(6, 1.0, dim=1, seed=3)
    for bn_mode in ("eval", "batch"):
        want = ReferenceEvaluator(model, space, theta, dirs, ev, bn_mode, 8).evaluate(coords)
        got = BatchedEvaluator(model, space, theta, dirs, ev, bn_mode=bn_mode, batch_size=8, strategy="loop",
                               verbose=False).evaluate(coords)
        torch.testing.assert_close(got[0], want[0], rtol=RTOL, atol=0)
        torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_odd_chunks_and_blocks(strategy: str) -> None:
    """11 points handed over in chunks of 4 (4+4+3), 3 points per block: nothing divides."""
    model, space, theta, dirs, ev = setup("lenet_bn", 16, seed=5)
    coords = grid(11, 1.0, seed=5)
    want_loss, want_acc = ReferenceEvaluator(model, space, theta, dirs, ev, "batch", 8).evaluate(coords)
    engine = BatchedEvaluator(model, space, theta, dirs, ev, bn_mode="batch", batch_size=8, strategy=strategy,
                              block=3, verbose=False)
    parts = [engine.evaluate(coords[s : s + 4]) for s in range(0, 11, 4)]
    torch.testing.assert_close(torch.cat([p[0] for p in parts]), want_loss, rtol=RTOL, atol=0)
    torch.testing.assert_close(torch.cat([p[1] for p in parts]), want_acc, rtol=0, atol=0)
    assert engine.evaluate(coords[:0])[0].shape == (0,)


def test_batch_mode_leaves_running_stats_alone() -> None:
    model, space, theta, dirs, ev = setup("lenet_bn", 16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    BatchedEvaluator(model, space, theta, dirs, ev, bn_mode="batch", batch_size=8, strategy="vmap",
                     verbose=False).evaluate(grid(3, 1.0))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


# --- VGG-16 (slow on the CPU: 8 samples, 3 points, one model for all cases) -----------------
@pytest.fixture(scope="module")
def vgg():
    model, space, theta, dirs, ev = setup("vgg16_bn", 8, seed=2)
    coords = grid(3, 0.5, seed=2)
    want = {m: ReferenceEvaluator(model, space, theta, dirs, ev, m, 4).evaluate(coords) for m in ("eval", "batch")}
    return model, space, theta, dirs, ev, coords, want


@pytest.mark.parametrize("bn_mode,strategy,factorize", [
    ("eval", "loop", True),
    ("eval", "im2col", False),
    ("batch", "loop", True),
    ("batch", "vmap", False),
])
def test_vgg16_bn_matches_reference(vgg, bn_mode: str, strategy: str, factorize: bool) -> None:  # type: ignore[no-untyped-def]
    model, space, theta, dirs, ev, coords, want = vgg
    engine = BatchedEvaluator(model, space, theta, dirs, ev, bn_mode=bn_mode, batch_size=4, strategy=strategy,
                              factorize=factorize, verbose=False)
    loss, acc = engine.evaluate(coords)
    torch.testing.assert_close(loss, want[bn_mode][0], rtol=RTOL, atol=0)
    torch.testing.assert_close(acc, want[bn_mode][1], rtol=0, atol=0)


# --- precision --------------------------------------------------------------------------
def test_bf16_is_close_to_fp32() -> None:
    model, space, theta, dirs, ev = setup("lenet_bn", 32, seed=7)
    coords = grid(5, 1.0, seed=7)
    fp32 = BatchedEvaluator(model, space, theta, dirs, ev, strategy="loop", verbose=False).evaluate(coords)
    engine = BatchedEvaluator(model, space, theta, dirs, ev, precision="bf16", strategy="loop", verbose=False)
    assert engine.precision == "bf16"
    bf16 = engine.evaluate(coords)
    assert not torch.equal(bf16[0], fp32[0]), "bf16 should not be bit-identical to fp32"
    torch.testing.assert_close(bf16[0], fp32[0], rtol=3e-2, atol=0)
    assert (bf16[1] - fp32[1]).abs().max() <= 100 * 3 / 32  # at most 3 of 32 predictions flip


def test_precision_resolution() -> None:
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == "fp32"
    assert resolve_precision("bf16", cpu) == "bf16"
    with pytest.raises(UserError, match="tf32"):
        resolve_precision("tf32", cpu)
    if torch.cuda.is_available():
        assert resolve_precision("auto", torch.device("cuda")) == "tf32"


@pytest.mark.cuda
@pytest.mark.parametrize("precision,rtol", [("tf32", 5e-3), ("bf16", 3e-2)])
def test_cuda_matches_reference(precision: str, rtol: float) -> None:
    model, space, theta, dirs, _ = setup("vgg16_bn", 8, seed=11)
    ev = data.load("synthetic", "test", 64, seed=11, device="cuda")
    coords = grid(20, 0.5, seed=11)
    with precision_context("fp32", ev.device):  # the oracle in true fp32 (cuDNN defaults to TF32 convs)
        want = ReferenceEvaluator(model, space, theta, dirs, ev, "eval", 32).evaluate(coords)
    for strategy in ("loop", "vmap", "im2col"):
        fp32 = BatchedEvaluator(model, space, theta, dirs, ev, precision="fp32", strategy=strategy, block=7,
                                verbose=False).evaluate(coords)
        torch.testing.assert_close(fp32[0], want[0], rtol=RTOL, atol=0)
        low = BatchedEvaluator(model, space, theta, dirs, ev, precision=precision, strategy=strategy,
                               verbose=False).evaluate(coords)
        torch.testing.assert_close(low[0], want[0], rtol=rtol, atol=0)


@pytest.mark.cuda
def test_cuda_batch_mode_matches_reference() -> None:
    model, space, theta, dirs, _ = setup("lenet_bn", 8, seed=12)
    ev = data.load("synthetic", "test", 1000, seed=12, device="cuda")
    coords = grid(33, 1.0, seed=12)
    with precision_context("fp32", ev.device):
        want = ReferenceEvaluator(model, space, theta, dirs, ev, "batch", 128).evaluate(coords)
    for strategy in ("loop", "vmap", "im2col"):
        got = BatchedEvaluator(model, space, theta, dirs, ev, bn_mode="batch", precision="fp32", strategy=strategy,
                               verbose=False).evaluate(coords)
        torch.testing.assert_close(got[0], want[0], rtol=RTOL, atol=0)
        torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)


@pytest.mark.cuda
def test_cuda_out_of_memory_backs_off_without_losing_points() -> None:
    """64 VGG points x 2048 images in one vmap block need ~200 GB: the engine must back off."""
    model, space, theta, dirs, _ = setup("vgg16_bn", 8, seed=13)
    ev = data.load("synthetic", "test", 2048, seed=13, device="cuda")
    coords = grid(64, 0.3, seed=13)
    engine = BatchedEvaluator(model, space, theta, dirs, ev, precision="fp32", strategy="vmap", block=4096,
                              batch=2048, verbose=False)
    loss, acc = engine.evaluate(coords)
    assert engine.block < 64 or engine.batch < 2048
    small = BatchedEvaluator(model, space, theta, dirs, ev, precision="fp32", strategy="vmap", block=4, batch=256,
                             verbose=False)
    want = small.evaluate(coords)
    torch.testing.assert_close(loss, want[0], rtol=RTOL, atol=0)
    torch.testing.assert_close(acc, want[1], rtol=0, atol=0)


# --- pieces -----------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (4, 2, 3, 7, 9)])
def test_pool2x2_is_max_pool2d(shape: tuple[int, ...]) -> None:
    x = torch.randn(shape)
    x.view(-1)[5] = float("nan")
    x.view(-1)[17] = float("inf")
    want = F.max_pool2d(x.reshape(-1, *shape[-3:]), 2).reshape(*shape[:-2], shape[-2] // 2, shape[-1] // 2)
    torch.testing.assert_close(Pool2x2()(x), want, equal_nan=True, rtol=0, atol=0)


def test_plan_shortcuts_for_lenet_bn() -> None:
    model, space, theta, dirs, ev = setup("lenet_bn", 8)
    sample = ev.sample(2)[0]
    p = plan(model, space, theta, dirs, "eval", sample)
    assert p.stem is not None and p.stem.bn == "1" and p.stem.k == 3
    assert [f.layer for f in p.folds] == ["4", "9", "12"]
    assert isinstance(p.stem.pool, Pool2x2)  # ReLU and pool swapped, the stem owns the pool
    kinds = [type(m).__name__ for m in p.body.modules()]
    assert "BatchNorm2d" not in kinds and "BatchNorm1d" not in kinds  # folded into the layers before them
    assert kinds.count("Pool2x2") == 1
    assert any("ReLU in place" in a for a in p.applied)
    pb = plan(model, space, theta, dirs, "batch", sample, factorize=False)
    assert pb.stem is None and not pb.folds


def test_cost_model_matches_design() -> None:
    x = data.load("synthetic", "test", 2).sample(2)[0]
    assert sum(macs_per_sample(models.create("lenet"), x).values()) == pytest.approx(651.7e3, rel=1e-3)
    model, space, theta, dirs, ev = setup("lenet", 16)
    engine = BatchedEvaluator(model, space, theta, dirs, ev, strategy="loop", verbose=False)
    assert engine.macs_per_sample_factorized == pytest.approx(308e3, rel=2e-3)


def test_run_with_backoff_halves_block_then_batch() -> None:
    calls = []

    def fn(block: int, batch: int) -> int:
        calls.append((block, batch))
        if block * batch > 16:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return block * batch

    assert run_with_backoff(fn, 8, 8, batch_fixed=False) == (16, 2, 8)
    assert calls == [(8, 8), (4, 8), (2, 8)]
    assert run_with_backoff(fn, 1, 64, batch_fixed=False) == (16, 1, 16)
    with pytest.raises(torch.OutOfMemoryError):
        run_with_backoff(fn, 1, 64, batch_fixed=True)
    with pytest.raises(ValueError):
        run_with_backoff(lambda b, s: (_ for _ in ()).throw(ValueError("not memory")), 4, 4, False)


def test_auto_is_deterministic_and_tune_measures(capsys: pytest.CaptureFixture) -> None:
    model, space, theta, dirs, ev = setup("lenet", 16)
    engine = BatchedEvaluator(model, space, theta, dirs, ev)
    assert engine.strategy == "loop" and engine.timings == {}  # auto on the CPU: the fixed rule, no timing
    assert engine.chunk_size >= 1 and engine.name == "batched" and engine.precision == "fp32"
    line = capsys.readouterr().out.strip().splitlines()
    assert len(line) == 1 and line[0].startswith("engine: ") and "points per block" in line[0]
    tuned = BatchedEvaluator(model, space, theta, dirs, ev, strategy="tune", verbose=False)
    assert set(tuned.timings) == {"loop", "vmap", "im2col"}
    assert tuned.strategy == min(tuned.timings, key=tuned.timings.get)
    assert surface.build_parser().parse_args([]).engine == "batched"  # the CLI uses it by default


@pytest.mark.parametrize("bn_mode", ["eval", "batch"])
def test_a_points_bits_do_not_depend_on_its_block(bn_mode: str) -> None:
    """The loop strategy gives every point the same bits whatever block it lands in (alone or with
    others), so chunking, resuming and the number of ranks never change a file."""
    model, space, theta, dirs, ev = setup("lenet_bn", 16, seed=9)  # ignore='none': γ moves too
    coords = grid(5, 1.0, seed=9)
    engine = BatchedEvaluator(model, space, theta, dirs, ev, bn_mode=bn_mode, batch_size=8, strategy="loop",
                              verbose=False)
    together = engine.evaluate(coords)
    alone = [engine.evaluate(coords[i : i + 1]) for i in range(5)]
    assert torch.equal(together[0], torch.cat([a[0] for a in alone]))
