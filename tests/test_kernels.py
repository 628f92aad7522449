"""Triton kernels (normalization, perturbation, fused) against the plain-torch references.

Without a GPU the kernels run through Triton's interpreter (conftest sets TRITON_INTERPRET),
about 1 ms per program, so the CPU cases use small vectors or shrunken block sizes; the
``cuda``-marked tests at the end run the compiled kernels at LeNet and VGG-16 sizes.
Every output buffer is poisoned with NaN first, so an element a kernel forgets to write fails.

Where Triton's interpreter itself is broken (triton 3.6 with numpy >= 2.4 cannot run a loop
whose bound is loaded from memory), the tests that launch kernels on the CPU skip and say why.
That is decided by running one tiny kernel of that shape (``interpreter_problem``), not by
version numbers; ``test_interpreter_probe_agrees_with_a_real_kernel`` keeps the probe honest.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import fastland.kernels.normalize as kn  # noqa: E402 - after the importorskip
import fastland.kernels.perturb as kp  # noqa: E402
from fastland import directions, models  # noqa: E402
from fastland.kernels import dispatch  # noqa: E402
from fastland.kernels.segments import check_table, reduce_plan, tile_plan  # noqa: E402
from fastland.params import SEG_FILTER, SEG_SMALL, FlatSpace  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
F, S = SEG_FILTER, SEG_SMALL
# A synthetic table with every kind of segment the models have, and a few they don't:
# LeNet conv1 filters (75), 1- and 3-element biases, a zero-length row, 400/512-wide rows,
# a VGG 512x3x3 filter (4,608) and a 2,000-element filter. N = 9,228 is no multiple of a block.
MIXED = [(75, F)] * 5 + [(3, S), (400, F), (400, F), (1, S), (0, F), (400, F), (512, F), (512, F),
                         (10, S), (4608, F), (7, S), (2000, F)]
# (block, chunk, max_group): tiny blocks split almost everything; medium ones group the small
# filters and split the large ones; the defaults are what the GPU runs.
SPLITS = [(64, 256, 4), (512, 1024, 8), (kn.BLOCK, kn.CHUNK, kn.MAX_GROUP)]


def _table(rows: list[tuple[int, int]]) -> torch.Tensor:
    lengths = torch.tensor([r[0] for r in rows], dtype=torch.int64)
    starts = torch.cumsum(lengths, 0) - lengths
    return torch.stack([starts, lengths, torch.tensor([r[1] for r in rows])], dim=1)


def _space(name: str, seed: int = 0) -> tuple[FlatSpace, torch.Tensor]:
    """A model's flat space and a θ with no all-zero tensors (fresh BN biases are 0)."""
    torch.manual_seed(seed)
    model = models.create(name)
    space = FlatSpace(model)
    return space, (space.flatten(model) + 0.05 * torch.randn(space.numel)).to(DEV)


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEV)


def _nan(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=DEV)


def _check(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: torch.Tensor | float = 0.0) -> None:
    """Elementwise ``|a - e| <= rtol·|e| + atol``, and every element written (no NaN left)."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    assert not torch.isnan(actual).any(), f"{int(torch.isnan(actual).sum())} elements not written"
    a, e = actual.double(), expected.double()
    err = (a - e).abs()
    bad = err > rtol * e.abs() + atol
    assert not bad.any(), (f"{int(bad.sum())}/{bad.numel()} elements off; worst abs err {float(err.max()):.3g}, "
                           f"rel {float((err / e.abs().clamp_min(1e-30)).max()):.3g}")


def _perturb_atol(theta: torch.Tensor, dirs: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Absolute slack for fp32 rounding where θ and α·d cancel: ~2 ulp of the largest term."""
    return 2.5e-7 * (theta.double().abs()[None] + coords.double().abs() @ dirs.double().abs())


# --- the interpreter itself ----------------------------------------------------------------------


@triton.jit
def _loaded_loop_bound(n_ptr, out_ptr):
    """The construct ``segments.segment_index`` relies on: a loop whose bound is loaded from memory."""
    n = tl.load(n_ptr)
    acc = 0
    for j in range(0, n):
        acc += j
    tl.store(out_ptr, acc)


def _root_cause(err: BaseException) -> BaseException:
    while err.__cause__ is not None:
        err = err.__cause__
    return err


@functools.cache
def interpreter_problem() -> str | None:
    """Why Triton's CPU interpreter cannot run the kernels here, or None where it can (or where a
    GPU compiles them instead). Runs one tiny kernel once; version numbers only go into the message."""
    if DEV.type != "cpu":
        return None
    n, out = torch.tensor([5], dtype=torch.int32), torch.full((1,), -1, dtype=torch.int32)
    try:
        _loaded_loop_bound[(1,)](n, out)
    except Exception as err:  # noqa: BLE001 - whatever the interpreter raises, it cannot run the kernels
        cause = _root_cause(err)
        return (f"Triton {triton.__version__}'s interpreter cannot run a loop whose bound is loaded from memory "
                f"under numpy {np.__version__} ({type(cause).__name__}: {cause}); this is an interpreter bug, not "
                "fastland's (fixed in later Triton). The kernels are still compiled for sm_90 here and checked on a "
                "GPU by the cuda tests")
    if int(out[0]) != 10:
        return f"Triton {triton.__version__}'s interpreter computed 0+1+2+3+4 = {int(out[0])}; it cannot be trusted here"
    return None


@pytest.fixture
def working_interpreter() -> None:
    """Skips a test that launches kernels where they would run through a broken interpreter."""
    problem = interpreter_problem()
    if problem:
        pytest.skip(problem)


runs_kernels = pytest.mark.usefixtures("working_interpreter")


def test_interpreter_probe_agrees_with_a_real_kernel() -> None:
    """The probe's verdict holds for a real kernel: where it says broken, normalization fails the
    same way (so the skips hide nothing of ours); where it says working, normalization is right."""
    seg = _table([(75, F)] * 3 + [(3, S), (400, F)])
    n = int(seg[:, 1].sum())
    d, theta = _randn(n, seed=40), _randn(n, seed=41)
    if interpreter_problem():
        with pytest.raises(Exception) as info:  # noqa: PT011 - the interpreter's own error, whatever its type
            dispatch.normalize(d, theta, seg, backend="triton", out=_nan(n))
        cause = _root_cause(info.value)
        assert f"{type(cause).__name__}: {cause}" in interpreter_problem()
    else:
        got = dispatch.normalize(d, theta, seg, backend="triton", out=_nan(n))
        _check(got, directions.normalize_reference(d, theta, seg, "filter", "biasbn"), rtol=1e-6)


# --- plans (pure host code, so VGG-16 tables are cheap to check) ---------------------------------


@pytest.mark.parametrize("name", ["lenet_bn", "vgg16_bn"])
@pytest.mark.parametrize("norm", ["filter", "layer"])
def test_plans_cover_every_element_once(name: str, norm: str) -> None:
    model = models.create(name)
    space = FlatSpace(model)
    seg = space.segments(norm)
    table = check_table(seg, space.numel)
    starts, lengths = table[:, 0], table[:, 1]
    plan = reduce_plan(seg, space.numel, kn.BLOCK, kn.CHUNK, kn.MAX_GROUP, torch.device("cpu"))
    lo, hi, seg0, nseg = (t.numpy().astype(np.int64) for t in (plan.lo, plan.hi, plan.seg0, plan.nseg))
    assert lo[0] == 0 and hi[-1] == space.numel and (lo[1:] == hi[:-1]).all()  # contiguous, in order
    assert ((hi - lo) <= kn.CHUNK).all()
    grouped = nseg > 1
    assert ((hi - lo)[grouped] <= kn.BLOCK).all()  # a group fits in one block
    # A grouped program holds whole segments; a program of one segment holds a piece of it.
    last = seg0 + nseg - 1
    assert (starts[seg0[grouped]] == lo[grouped]).all()
    assert (starts[last[grouped]] + lengths[last[grouped]] == hi[grouped]).all()
    single = ~grouped
    assert (lo[single] >= starts[seg0[single]]).all()
    assert (hi[single] <= starts[seg0[single]] + lengths[seg0[single]]).all()
    # Entries: nseg per program; per segment, ceil(len / chunk) for split ones, else 1.
    want = np.where(lengths > kn.BLOCK, -(-lengths // kn.CHUNK), 1)
    assert (plan.seg_nentries.numpy() == want).all() and plan.entries == want.sum()
    if norm == "filter":
        assert grouped.any()  # small filters share programs
    if name == "vgg16_bn" and norm == "layer":
        assert plan.max_nentries == -(-2_359_296 // kn.CHUNK)  # a 512x512x3x3 layer is split

    tiles = tile_plan(seg, space.numel, kn.BLOCK, torch.device("cpu"))
    idx = np.random.default_rng(0).integers(0, space.numel, 4096)
    t = idx // kn.BLOCK
    seg_of = np.searchsorted(starts, idx, side="right") - 1
    s0, ns = tiles.seg0.numpy()[t], tiles.nseg.numpy()[t]
    assert ((seg_of >= s0) & (seg_of < s0 + ns)).all()


def test_reduce_plan_packs_exactly() -> None:
    seg = _table([(10, S), (500, F), (514, F), (1, S), (2000, F), (3, S), (3, S)])
    plan = reduce_plan(seg, 3031, 512, 1024, 32, torch.device("cpu"))
    assert plan.lo.tolist() == [0, 510, 1024, 1025, 2049, 3025]  # 10+500 fit a block of 512, +514 would not
    assert plan.hi.tolist() == [510, 1024, 1025, 2049, 3025, 3031]  # 2,000 -> pieces of 1,024 + 976
    assert plan.nseg.tolist() == [2, 1, 1, 1, 1, 2]
    assert plan.seg_nentries.tolist() == [1, 1, 1, 1, 2, 1, 1] and plan.entries == 8
    assert plan.seg_entry0.tolist() == [0, 1, 2, 3, 4, 6, 7]
    one = reduce_plan(seg, 3031, 512, 1024, 1, torch.device("cpu"))  # max_group=1: nothing shares
    assert one.nseg.max() == 1 and one.programs == 8


@runs_kernels
def test_bad_tables_are_rejected() -> None:
    good = _table(MIXED)
    n = int(good[:, 1].sum())
    gap = good.clone()
    gap[3, 0] += 1
    short = good[:-1]
    kind = good.clone()
    kind[0, 2] = 7
    for bad, n_ in [(gap, n), (short, n), (kind, n), (good, n + 1), (good[:, :2], n)]:
        with pytest.raises(ValueError):
            check_table(bad, n_)
    d = _randn(n, seed=1)
    with pytest.raises(ValueError, match="cover"):
        dispatch.normalize(d, d, gap, backend="triton")
    table = good.clone()
    dispatch.normalize(d, d, table, backend="triton", out=_nan(n))  # validated and cached ...
    table[3, 0] += 1
    with pytest.raises(ValueError, match="cover"):  # ... until it is changed in place
        dispatch.normalize(d, d, table, backend="triton")


# --- segment scales and normalization ----------------------------------------------------------


@runs_kernels
@pytest.mark.parametrize("split", SPLITS, ids=lambda s: f"block{s[0]}")
def test_segment_scales_match_reference(split: tuple[int, int, int]) -> None:
    block, chunk, max_group = split
    seg = _table(MIXED)
    n = int(seg[:, 1].sum())
    d, theta = _randn(n, seed=2), _randn(n, seed=3)
    plan = reduce_plan(seg, n, block, chunk, max_group, DEV)
    # Both kernel paths are exercised: split segments (all but the default chunk) and grouped ones.
    assert (plan.seg_nentries.max() > 1) == (chunk < 4608)
    assert plan.nseg.max() >= (2 if block < 512 else 5)  # at least the 1- and 0-element rows; or 5 filters
    got = kn.segment_scales(d, theta, seg, "filter", block=block, chunk=chunk, max_group=max_group)
    _check(got, directions.segment_scales(d, theta, seg, "filter"), rtol=1e-6)


@runs_kernels
@pytest.mark.parametrize("norm", ["filter", "layer", "none"])
@pytest.mark.parametrize("ignore", ["biasbn", "none"])
@pytest.mark.parametrize("source", ["lenet_bn", "mixed"])
def test_normalize_matches_reference(source: str, norm: str, ignore: str) -> None:
    if source == "mixed":
        seg = _table(MIXED)
        theta = _randn(int(seg[:, 1].sum()), seed=4)
        kwargs = {"block": 512, "chunk": 1024, "max_group": 8}
    else:
        space, theta = _space(source)
        seg = space.segments(norm)
        kwargs = {}
    d = _randn(theta.numel(), seed=5)
    out = _nan(theta.numel())
    got = kn.normalize(d, theta, seg, norm, ignore, out=out, **kwargs)
    assert got.data_ptr() == out.data_ptr()
    want = directions.normalize_reference(d, theta, seg, norm, ignore)
    _check(got, want, rtol=1e-6)
    small = torch.repeat_interleave(seg[:, 2] == SEG_SMALL, seg[:, 1]).to(DEV)
    assert torch.equal(got[small], torch.zeros_like(got[small]) if ignore == "biasbn" else theta[small])
    if norm == "none":
        assert torch.equal(got[~small], d[~small])


@runs_kernels
def test_zero_norm_filters_and_epsilon() -> None:
    seg = _table([(75, F)] * 5 + [(6, S)])
    n = int(seg[:, 1].sum())
    d, theta = _randn(n, seed=6), _randn(n, seed=7)
    d[0:75] = 0  # zero direction filter: 0 · |θ| / (0 + eps) = 0
    theta[75:150] = 0  # zero weight filter: scale 0
    d[150:225] = 0
    theta[150:225] = 0  # both zero: 0 / eps = 0, not NaN
    d[225:300] *= 1e-12  # |d| ~ 1e-11 < eps: the normalized norm is |θ|·|d|/(|d| + eps) ≈ 0.08·|θ|
    out = kn.normalize(d, theta, seg, "filter", "biasbn", out=_nan(n), block=128, chunk=256)
    _check(out, directions.normalize_reference(d, theta, seg, "filter", "biasbn"), rtol=1e-6)
    assert torch.all(out[:225] == 0)
    dn, tn = d[225:300].double().norm(), theta[225:300].double().norm()
    _check(out[225:300].double().norm()[None], (tn * dn / (dn + 1e-10))[None], rtol=1e-6)
    assert out[225:300].norm() < 0.5 * theta[225:300].norm()  # eps really bites here
    _check(out[300:375].norm()[None], theta[300:375].norm()[None], rtol=1e-6)  # an ordinary filter


# --- perturbation ------------------------------------------------------------------------------


@runs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("dims", [1, 2])
@pytest.mark.parametrize("points", [1, 5, 37])
def test_perturb_matches_reference(points: int, dims: int, dtype: torch.dtype) -> None:
    n = 3001  # no multiple of the block; P = 37 is no multiple of rows either
    theta, dirs = _randn(n, seed=8), _randn(dims, n, seed=9)
    coords = _randn(points, dims, seed=10)
    got = kp.perturb(theta, dirs, coords, dtype, out=_nan(points, n, dtype=dtype), block_n=256, rows=4)
    want = directions.perturb_reference(theta, dirs, coords, dtype)
    _check(got, want, rtol=1e-6 if dtype == torch.float32 else 1e-2, atol=_perturb_atol(theta, dirs, coords))


@runs_kernels
def test_perturb_lenet_size_default_blocks() -> None:
    space, theta = _space("lenet")
    dirs, coords = _randn(2, space.numel, seed=11), _randn(64, 2, seed=12)
    got = dispatch.perturb(theta, dirs, coords, backend="triton", out=_nan(64, space.numel))
    _check(got, directions.perturb_reference(theta, dirs, coords), 1e-6, _perturb_atol(theta, dirs, coords))


@runs_kernels
def test_row_aligned_output_is_written_in_place_and_padding_untouched() -> None:
    n, points = 2999, 9  # rows padded from 2,999 to 3,008 elements
    theta, dirs, coords = _randn(n, seed=37), _randn(2, n, seed=38), _randn(points, 2, seed=39)
    out = kp.row_aligned_empty(points, n, torch.float32, DEV)
    assert out.stride() == (3008, 1)
    whole = out.as_strided((points, 3008), (3008, 1))
    whole.fill_(float("nan"))
    pad = whole[:, n:]
    got = dispatch.perturb(theta, dirs, coords, backend="triton", out=out)
    assert got.data_ptr() == out.data_ptr()
    _check(got, directions.perturb_reference(theta, dirs, coords), 1e-6, _perturb_atol(theta, dirs, coords))
    assert torch.isnan(pad).all()  # nothing written past N in any row
    with pytest.raises(ValueError, match="contiguous rows"):  # overlapping rows are refused
        dispatch.perturb(theta, dirs, coords, out=torch.empty(points, 2 * n, device=DEV).as_strided((points, n), (5, 1)))


def test_rows_per_program(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda _: SimpleNamespace(multi_processor_count=132))
    cuda = torch.device("cuda")
    assert kp.rows_per_program(8, 14383, cuda) == 8  # VGG: the column blocks fill an H100; inputs read once
    assert kp.rows_per_program(32, 14383, cuda) == 32
    assert kp.rows_per_program(256, 61, cuda) == 14  # LeNet: 61 x ceil(256/14) = 1,159 programs >= 8 x 132
    assert kp.rows_per_program(16, 61, cuda) == 1
    assert kp.rows_per_program(37, 3, torch.device("cpu")) == 37  # interpreter: fewest programs


@runs_kernels
def test_probe_line_theta_minus_eta_g() -> None:
    n = 2500
    theta, g = _randn(n, seed=13), _randn(n, seed=14)
    eta = torch.linspace(0.05, 0.4, 8, device=DEV)
    got = dispatch.perturb(theta, g[None], -eta[:, None], backend="triton")
    want = theta[None] - eta[:, None] * g[None]  # negation is exact, so this is θ + (-η)·g bit for bit
    _check(got, want, rtol=1e-6, atol=_perturb_atol(theta, g[None], eta[:, None]))


@runs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("ignore", ["biasbn", "none"])
@pytest.mark.parametrize("dims", [1, 2])
def test_perturb_scaled_equals_normalize_then_perturb(dims: int, ignore: str, dtype: torch.dtype) -> None:
    seg = _table(MIXED)
    n = int(seg[:, 1].sum())
    theta, raw = _randn(n, seed=15), _randn(dims, n, seed=16)
    coords = _randn(19, dims, seed=17)
    scales = torch.stack([directions.segment_scales(raw[k], theta, seg, "filter") for k in range(dims)])
    got = kp.perturb_scaled(theta, raw, scales, seg, coords, ignore, dtype, out=_nan(19, n, dtype=dtype),
                            block_n=512, rows=8)
    dirs = torch.stack([directions.normalize_reference(raw[k], theta, seg, "filter", ignore) for k in range(dims)])
    want = directions.perturb_reference(theta, dirs, coords, dtype)
    _check(got, want, rtol=1e-6 if dtype == torch.float32 else 1e-2, atol=_perturb_atol(theta, dirs, coords))


@runs_kernels
def test_perturb_scaled_lenet_bn_with_kernel_scales() -> None:
    """The whole fused pipeline on a real table: kernel scales, then the fused kernel."""
    space, theta = _space("lenet_bn")
    seg = space.segments("filter")
    raw, coords = _randn(2, space.numel, seed=18), _randn(16, 2, seed=19)
    scales = torch.stack([dispatch.segment_scales(raw[k], theta, seg, backend="triton") for k in range(2)])
    got = dispatch.perturb_scaled(theta, raw, scales, seg, coords, backend="triton", out=_nan(16, space.numel))
    dirs = torch.stack([directions.normalize_reference(raw[k], theta, seg, "filter", "biasbn") for k in range(2)])
    want = directions.perturb_reference(theta, dirs, coords)
    # Scales from the kernel differ from the reference's by ~1 ulp, which the output inherits.
    _check(got, want, rtol=1e-6, atol=_perturb_atol(theta, dirs, coords) * 2)


# --- dispatcher --------------------------------------------------------------------------------


def test_backend_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert dispatch.resolve_backend("auto", cpu) == "torch"
    assert dispatch.resolve_backend("auto", cuda) == "triton"
    assert dispatch.resolve_backend("auto", cuda, supported=False) == "torch"
    assert dispatch.resolve_backend("torch", cuda) == "torch"
    with pytest.raises(ValueError, match="unknown backend"):
        dispatch.resolve_backend("cuda", cpu)
    if DEV.type == "cpu":
        assert dispatch.interpreted()
        assert dispatch.resolve_backend("triton", cpu) == "triton"
    monkeypatch.setattr(dispatch, "interpreted", lambda: False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        dispatch.resolve_backend("triton", cpu)


@pytest.mark.skipif(DEV.type != "cpu", reason="CPU routing")
def test_cpu_auto_is_the_reference_bit_for_bit() -> None:
    space, theta = _space("lenet_bn")
    d, dirs, coords = _randn(space.numel, seed=20), _randn(2, space.numel, seed=21), _randn(3, 2, seed=22)
    seg = space.segments("filter")
    assert torch.equal(directions.normalize(d, theta, space), directions.normalize_reference(d, theta, seg, "filter",
                                                                                             "biasbn"))
    assert torch.equal(directions.perturb(theta, dirs, coords), directions.perturb_reference(theta, dirs, coords))
    assert torch.equal(dispatch.segment_scales(d, theta, seg), directions.segment_scales(d, theta, seg, "filter"))
    scales = torch.rand(2, seg.shape[0])
    want = directions.perturb_reference(theta, dispatch.scaled_directions_reference(theta, dirs, scales, seg), coords)
    assert torch.equal(dispatch.perturb_scaled(theta, dirs, scales, seg, coords), want)
    three = _randn(3, space.numel, seed=23)  # D = 3: the reference handles it, the kernel refuses
    assert dispatch.perturb(theta, three, _randn(2, 3, seed=24)).shape == (2, space.numel)
    with pytest.raises(ValueError, match="1 or 2 directions"):
        dispatch.perturb(theta, three, _randn(2, 3, seed=24), backend="triton")


@runs_kernels
def test_non_contiguous_inputs_are_handled() -> None:
    n, points = 2100, 6
    theta = _randn(2 * n, seed=25)[::2]  # stride 2
    d = _randn(n, 2, seed=26)[:, 1]  # stride 2
    dirs = _randn(n, 2, seed=27).t()  # [2, N] with column stride 2
    coords = _randn(2, points, seed=28).t()  # [P, 2] with strides (1, P)
    assert not (theta.is_contiguous() or d.is_contiguous() or dirs.is_contiguous() or coords.is_contiguous())
    seg = _table([(300, F)] * 6 + [(300, S)])
    got = dispatch.normalize(d, theta, seg, backend="triton")
    _check(got, directions.normalize_reference(d, theta, seg, "filter", "biasbn"), rtol=1e-6)
    got = dispatch.perturb(theta, dirs, coords, backend="triton")
    _check(got, directions.perturb_reference(theta, dirs, coords), 1e-6, _perturb_atol(theta, dirs, coords))
    scales = torch.stack([directions.segment_scales(dirs[k], theta, seg, "filter") for k in range(2)])
    got = dispatch.perturb_scaled(theta, dirs, scales, seg, coords, backend="triton")
    want = directions.perturb_reference(theta, dispatch.scaled_directions_reference(theta, dirs, scales, seg), coords)
    _check(got, want, 1e-6, _perturb_atol(theta, dirs, coords))


def test_bad_arguments_raise_clear_errors() -> None:
    n = 1000
    theta, dirs, coords = _randn(n, seed=29), _randn(2, n, seed=30), _randn(4, 2, seed=31)
    with pytest.raises(ValueError, match="contiguous rows"):
        dispatch.perturb(theta, dirs, coords, backend="triton", out=_nan(n, 4).t())
    with pytest.raises(ValueError, match="bfloat16"):  # out is fp32, bf16 asked for
        dispatch.perturb(theta, dirs, coords, torch.bfloat16, backend="triton", out=_nan(4, n))
    with pytest.raises(ValueError, match="coords"):
        dispatch.perturb(theta, dirs, coords[:, :1], backend="triton")
    with pytest.raises(ValueError, match="N=1000"):
        dispatch.perturb(theta, dirs[:, :-1], coords, backend="triton")
    with pytest.raises(ValueError, match="unknown normalization"):
        dispatch.normalize(theta, theta, _table([(n, F)]), "filters", backend="triton")
    with pytest.raises(ValueError, match="fp32, bf16 or fp16"):
        dispatch.perturb(theta, dirs, coords, torch.float64, backend="triton")
    assert dispatch.perturb(theta, dirs, coords[:0], backend="triton").shape == (0, n)


# --- compiled for the GPU without one: catches errors the interpreter cannot see ---------------

_AOT = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import fastland.kernels.normalize as kn
import fastland.kernels.perturb as kp

def compile(fn, sig, consts):
    sig = {**sig, **{k: "constexpr" for k in consts}}
    triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32))

i = "*i32"
compile(kn._partials_kernel, dict(d_ptr="*fp32", t_ptr="*bf16", starts_ptr=i, lo_ptr=i, hi_ptr=i, seg0_ptr=i,
        nseg_ptr=i, entry0_ptr=i, part_ptr="*fp32"), dict(BLOCK=kn.BLOCK))
compile(kn._scales_kernel, dict(part_ptr="*fp32", seg_entry0_ptr=i, seg_nentries_ptr=i, scale_ptr="*fp32",
        S="i32", eps="fp32"), dict(SCALE_BLOCK=kn.SCALE_BLOCK))
compile(kn._apply_kernel, dict(d_ptr="*fp32", t_ptr="*fp32", out_ptr="*fp32", scale_ptr="*fp32", kind_ptr=i,
        starts_ptr=i, seg0_ptr=i, nseg_ptr=i, N="i32"), dict(SMALL_IS_THETA=True, SMALL=1, BLOCK=kn.BLOCK))
for out, d, fused in [("*fp32", 2, False), ("*bf16", 2, True), ("*fp32", 1, True), ("*bf16", 1, False)]:
    compile(kp._perturb_kernel, dict(theta_ptr="*fp32", d1_ptr="*fp32", d2_ptr="*fp32", coords_ptr="*fp32",
            out_ptr=out, N="i32", P="i32", stride_cp="i32", stride_cd="i32", stride_op="i32", s1_ptr="*fp32",
            s2_ptr="*fp32", kind_ptr=i, starts_ptr=i, seg0_ptr=i, nseg_ptr=i, rows="i32"),
            dict(D=d, FUSED=fused, SMALL_IS_THETA=fused, SMALL=1, BLOCK_N=kp.BLOCK_N))
print("compiled")
"""


def test_kernels_compile_for_sm90(tmp_path: pytest.TempPathFactory) -> None:
    """Lower every kernel to PTX/cubin for an H100 (sm_90) without a GPU (with one, the cuda
    tests compile them for real)."""
    if torch.cuda.is_available():
        pytest.skip("the cuda-marked tests compile and run the kernels on this GPU")
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1")
    run = subprocess.run([sys.executable, "-c", _AOT], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "compiled" in run.stdout, run.stderr[-3000:]


# --- GPU: the compiled kernels at the study's sizes (skipped without CUDA) ---------------------


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["lenet_bn", "vgg16_bn"])
@pytest.mark.parametrize("norm", ["filter", "layer"])
@pytest.mark.parametrize("ignore", ["biasbn", "none"])
def test_cuda_normalize_model_sizes(name: str, norm: str, ignore: str) -> None:
    space, theta = _space(name)
    seg = space.segments(norm)
    d = _randn(space.numel, seed=32)
    got = dispatch.normalize(d, theta, seg, norm, ignore, out=_nan(space.numel))
    _check(got, directions.normalize_reference(d, theta, seg, norm, ignore), rtol=1e-6)
    _check(dispatch.segment_scales(d, theta, seg, norm), directions.segment_scales(d, theta, seg, norm), 1e-6)


@pytest.mark.cuda
@pytest.mark.parametrize(("name", "points"), [("lenet_bn", 16), ("lenet_bn", 256), ("vgg16_bn", 8), ("vgg16_bn", 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_perturb_model_sizes(name: str, points: int, dtype: torch.dtype) -> None:
    space, theta = _space(name)
    seg = space.segments("filter")
    raw, coords = _randn(2, space.numel, seed=33), _randn(points, 2, seed=34)
    dirs = torch.stack([directions.normalize_reference(raw[k], theta, seg, "filter", "biasbn") for k in range(2)])
    rtol = 1e-6 if dtype == torch.float32 else 1e-2
    want = directions.perturb_reference(theta, dirs, coords, dtype)
    atol = _perturb_atol(theta, dirs, coords)
    _check(dispatch.perturb(theta, dirs, coords, dtype, out=_nan(points, space.numel, dtype=dtype)), want, rtol, atol)
    scales = torch.stack([directions.segment_scales(raw[k], theta, seg, "filter") for k in range(2)])
    got = dispatch.perturb_scaled(theta, raw, scales, seg, coords, "biasbn", dtype,
                                  out=_nan(points, space.numel, dtype=dtype))
    _check(got, want, rtol, atol)
    line = dispatch.perturb(theta, raw[:1], -coords[:, :1].abs())  # the probe line θ − η g
    _check(line, theta[None] - coords[:, :1].abs() * raw[:1], 1e-6, _perturb_atol(theta, raw[:1], coords[:, :1]))


@pytest.mark.cuda
def test_cuda_auto_uses_the_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = kp.perturb
    monkeypatch.setattr(kp, "perturb", lambda *a, **k: calls.append(1) or real(*a, **k))
    space, theta = _space("lenet")
    directions.perturb(theta, _randn(2, space.numel, seed=35), _randn(4, 2, seed=36))
    assert calls == [1]
    d = directions.make(space, theta, dim=2, seed=1)  # CUDA: Triton normalization
    raw = directions.random(space, 1, 2, device=DEV)
    want = torch.stack([directions.normalize_reference(raw[k], theta, space.segments("filter"), "filter", "biasbn")
                        for k in range(2)])
    _check(d, want, rtol=1e-6)
