"""Kernel benchmarks: Triton vs the torch eager reference vs ``torch.compile`` of the reference.

Run: ``pytest benchmarks/bench_kernels.py --benchmark-only [--benchmark-json=FILE]``.

The cases run on whatever device is here: CUDA when present, else CPU (override with
``FASTLAND_BENCH_DEVICE=cpu|cuda``; ``benchmarks/conftest.py`` applies ``FASTLAND_BENCH_THREADS=N``:
on this shared 2-core machine 2 threads turned a neighbour's time slice into a stall, a 5 MB
copy going from 0.09 ms to 8 ms). ``--gpu-sizes`` changes nothing here: the sizes are fixed.
The Triton cases need CUDA and are skipped on CPU (the interpreter measures Python, not the
kernel). Sizes are the study's: LeNet-BN (62k params) at P ∈ {16, 64, 256} and VGG-16-BN
(14.7M) at P ∈ {8, 32}; VGG at P = 32 is skipped on CPU (a 1.9 GB output per call on 2 cores).

Every case records ``extra_info``: ``bytes`` (the compulsory traffic: every input read once,
the output written once) and ``gbps`` = bytes / median time, so implementations compare on one
scale. On CUDA each case also measures a device-to-device copy moving the same number of
bytes in the same run and records ``copy_gbps`` and ``frac_of_copy`` (design target for the
perturbation kernel at VGG size: ≥ 0.8). The ``copy`` cases benchmark that copy on its own.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from fastland import directions, models
from fastland.kernels import dispatch
from fastland.params import FlatSpace

# One compiled graph per (case, shape), all kept (the name changed across torch versions).
_LIMIT = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
setattr(torch._dynamo.config, _LIMIT, 64)

DEVICE = torch.device(os.environ.get("FASTLAND_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))
CUDA = DEVICE.type == "cuda"
MODELS = {"lenet": "lenet_bn", "vgg16": "vgg16_bn"}
POINTS = [("lenet", 16), ("lenet", 64), ("lenet", 256), ("vgg16", 8), ("vgg16", 32)]
IMPLS = ["triton", "eager", "compile"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@functools.cache
def _setup(size: str) -> tuple[FlatSpace, torch.Tensor, torch.Tensor]:
    """Flat space, θ (no zero tensors) and two raw directions on the bench device."""
    gen = torch.Generator().manual_seed(0)
    model = models.create(MODELS[size])
    space = FlatSpace(model)
    theta = space.flatten(model) + 0.05 * torch.randn(space.numel, generator=gen)
    raw = torch.randn(2, space.numel, generator=gen)
    return space, theta.to(DEVICE), raw.to(DEVICE)


def _skip(impl: str, size: str, points: int = 0) -> None:
    if impl == "triton" and not CUDA:
        pytest.skip("Triton kernels need CUDA (the CPU interpreter is a test tool, not a benchmark)")
    if not CUDA and size == "vgg16" and points > 8:
        pytest.skip("VGG-16 at P > 8 is too slow for the CPU run")


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def _copy_gbps(nbytes: int) -> float:
    """Measured device copy bandwidth for a copy moving ``nbytes`` in total (read + write)."""
    src = torch.empty(max(nbytes // 2, 1), dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    reps = 20
    start.record()
    for _ in range(reps):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    return 2 * src.numel() * reps / (start.elapsed_time(end) * 1e-3) / 1e9


def _run(benchmark, fn: Callable[[], object], nbytes: int, size: str, **info: object) -> None:  # noqa: ANN001
    """Benchmark ``fn`` (synchronized on CUDA; first call, e.g. compilation, is warm-up) and
    record bytes moved and achieved GB/s."""

    def call() -> None:
        fn()
        _sync()

    rounds = (50 if size == "lenet" else 10) if CUDA else (30 if size == "lenet" else 3)
    benchmark.extra_info.update(device=_device_name(), bytes=nbytes, loadavg_1min=os.getloadavg()[0], **info)
    benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=1)
    median = benchmark.stats.stats.median
    benchmark.extra_info["gbps"] = nbytes / median / 1e9
    if CUDA:
        copy = _copy_gbps(nbytes)
        benchmark.extra_info.update(copy_gbps=copy, frac_of_copy=benchmark.extra_info["gbps"] / copy)


@functools.cache
def _device_name() -> str:
    return torch.cuda.get_device_name(DEVICE) if CUDA else f"cpu ({torch.get_num_threads()} threads)"


def _fused_reference(theta: torch.Tensor, raw: torch.Tensor, scales: torch.Tensor, segments: torch.Tensor,
                     coords: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    dirs = dispatch.scaled_directions_reference(theta, raw, scales, segments, "biasbn")
    return directions.perturb_reference(theta, dirs, coords, dtype)


def _impl(impl: str, reference: Callable, triton_fn: Callable) -> Callable:
    if impl == "triton":
        return triton_fn
    if impl == "compile":
        return torch.compile(reference, dynamic=False)
    return reference


@pytest.mark.parametrize("impl", [*IMPLS, "triton_aligned"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize(("size", "points"), POINTS, ids=[f"{s}-P{p}" for s, p in POINTS])
def test_perturb(benchmark, size: str, points: int, dtype: str, impl: str) -> None:  # noqa: ANN001
    """``[P, N] = θ + α d1 + β d2`` from normalized directions (the engine's per-chunk step).
    ``triton_aligned`` writes into rows padded to 16 elements (vector stores)."""
    _skip(impl.removesuffix("_aligned"), size, points)
    if not CUDA and dtype == "bf16" and size == "vgg16":
        pytest.skip("bf16 at VGG size is slow on the CPU and tells nothing new there")
    space, theta, raw = _setup(size)
    dirs = torch.stack([directions.normalize_reference(raw[k], theta, space.segments("filter"), "filter", "biasbn")
                        for k in range(2)])
    coords = torch.randn(points, 2, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    out_dtype = DTYPES[dtype]
    fn = _impl(impl, directions.perturb_reference,
               lambda t, d, c, dt: dispatch.perturb(t, d, c, dt, backend="triton"))
    if impl == "triton_aligned":
        import fastland.kernels.perturb as kp

        out = kp.row_aligned_empty(points, space.numel, out_dtype, DEVICE)
        fn = lambda t, d, c, dt: dispatch.perturb(t, d, c, dt, backend="triton", out=out)  # noqa: E731
    nbytes = 3 * space.numel * 4 + points * space.numel * out_dtype.itemsize
    _run(benchmark, lambda: fn(theta, dirs, coords, out_dtype), nbytes, size, n=space.numel, p=points, d=2,
         dtype=dtype, impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("size", "points"), POINTS, ids=[f"{s}-P{p}" for s, p in POINTS])
def test_perturb_fused(benchmark, size: str, points: int, impl: str) -> None:  # noqa: ANN001
    """The same from *raw* directions + per-segment scales: normalization fused into the write."""
    _skip(impl, size, points)
    space, theta, raw = _setup(size)
    seg = space.segments("filter")
    scales = torch.stack([directions.segment_scales(raw[k], theta, seg, "filter") for k in range(2)])
    coords = torch.randn(points, 2, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    fn = _impl(impl, _fused_reference,
               lambda t, r, s, g, c, dt: dispatch.perturb_scaled(t, r, s, g, c, "biasbn", dt, backend="triton"))
    nbytes = 3 * space.numel * 4 + points * space.numel * 4
    _run(benchmark, lambda: fn(theta, raw, scales, seg, coords, torch.float32), nbytes, size, n=space.numel,
         p=points, d=2, dtype="fp32", impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("norm", ["filter", "layer"])
@pytest.mark.parametrize("size", list(MODELS))
def test_normalize(benchmark, size: str, norm: str, impl: str) -> None:  # noqa: ANN001
    """One direction normalized against θ (read d, θ; write the result)."""
    _skip(impl, size)
    space, theta, raw = _setup(size)
    seg = space.segments(norm)
    fn = _impl(impl, directions.normalize_reference,
               lambda d, t, s, nm, ig: dispatch.normalize(d, t, s, nm, ig, backend="triton"))
    nbytes = 3 * space.numel * 4
    _run(benchmark, lambda: fn(raw[0], theta, seg, norm, "biasbn"), nbytes, size, n=space.numel, norm=norm,
         impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("size", list(MODELS))
def test_segment_scales(benchmark, size: str, impl: str) -> None:  # noqa: ANN001
    """Per-filter scale factors only (read d, θ): what the fused perturbation consumes."""
    _skip(impl, size)
    space, theta, raw = _setup(size)
    seg = space.segments("filter")
    fn = _impl(impl, directions.segment_scales,
               lambda d, t, s, nm: dispatch.segment_scales(d, t, s, nm, backend="triton"))
    _run(benchmark, lambda: fn(raw[0], theta, seg, "filter"), 2 * space.numel * 4, size, n=space.numel, impl=impl)


@pytest.mark.parametrize(("size", "points"), POINTS, ids=[f"{s}-P{p}" for s, p in POINTS])
def test_copy(benchmark, size: str, points: int) -> None:  # noqa: ANN001
    """Baseline: a device copy moving as many bytes as the fp32 perturbation of the same case."""
    _skip("copy", size, points)
    space, _, _ = _setup(size)
    nbytes = 3 * space.numel * 4 + points * space.numel * 4
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    _run(benchmark, lambda: dst.copy_(src), nbytes, size, n=space.numel, p=points, impl="copy")


def _markdown(path: str, command: str) -> str:
    """A short table of medians from a ``--benchmark-json`` file:
    ``python benchmarks/bench_kernels.py FILE.json "COMMAND THAT MADE IT" > FILE.md``."""
    import json

    import triton

    data = json.loads(Path(path).read_text())
    rows = sorted(data["benchmarks"], key=lambda b: (b["name"].split("[")[0], b["param"]))
    extra0 = rows[0]["extra_info"] if rows else {}
    loads = [b["extra_info"]["loadavg_1min"] for b in rows if "loadavg_1min" in b["extra_info"]]
    lines = [
        f"# Kernel benchmarks, {extra0.get('device', '?')}",
        "",
        f"- date: {data['datetime'][:10]}; torch {torch.__version__}; triton {triton.__version__}; "
        f"python {data['machine_info']['python_version']}; cpu: {data['machine_info'].get('cpu', {}).get('brand_raw', '?')}",
        f"- command: `{command}`",
        "- GB/s = compulsory bytes (inputs read once, output written once) / median time.",
        f"- 1-minute load average during the cases: {min(loads):.1f} to {max(loads):.1f}"
        f" (on {os.cpu_count()} CPUs; other jobs running make CPU timings noisy)." if loads else "",
        "" if any(b["extra_info"].get("impl", "").startswith("triton") for b in rows)
        else "- No Triton rows: the kernels need CUDA; these are the torch baselines only.",
        "",
        "| case | impl | N | P | median (ms) | GB/s | copy GB/s | frac of copy |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for b in rows:
        e = b["extra_info"]
        param = b["param"].removesuffix(f"-{e.get('impl')}")
        case = f"{b['name'].split('[')[0].removeprefix('test_')}[{param}]"
        copy = f"{e['copy_gbps']:.0f}" if "copy_gbps" in e else "-"
        frac = f"{e['frac_of_copy']:.2f}" if "frac_of_copy" in e else "-"
        lines.append(f"| {case} | {e.get('impl', '')} | {e.get('n', '')} | {e.get('p', '-')} | "
                     f"{b['stats']['median'] * 1e3:.3f} | {e['gbps']:.2f} | {copy} | {frac} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import sys

    sys.stdout.write(_markdown(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "?"))
