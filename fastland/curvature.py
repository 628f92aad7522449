"""Curvature over a surface: Li et al.'s maps of λmax, λmin and |λmin/λmax|, and Hessian eigenvector axes.

    surf = fastland.surface(model, data, res=21, out="s.h5")
    cmap = fastland.hessian.curvature_map(model, data, "s.h5")      # stored beside the loss, resumable
    cmap.ratio, cmap.lambda_max, cmap.lambda_min                     # [ny, nx] on the map's grid
    axes = fastland.surface(model, data, directions="hessian")       # the top two eigenvectors as axes

**Curvature maps** (Li et al. 2018, Sec. 6): at each grid point ``θ + α·δ + β·η`` of a surface, the
largest and the smallest Hessian eigenvalue of the mean loss, from one Lanczos run that converges at
both ends (``which='both'``), and the ratio ``|λmin/λmax|``: near 0 where the surface is locally
convex, large where it is strongly non-convex. Each pair is converged to ``‖Hv − λv‖ ≤ tol·‖H‖``
(``‖H‖ ≈ max |λ|``, the scale of the map): λmin, often ~0, is then within ``tol·λmax`` of an
eigenvalue and the ratio within about ``tol``. Li et al.'s ARPACK calls (``eigsh(tol=1e-2)`` on the
shifted operator ``H − 0.51·λmax``) have about 1e-2 in this sense; the default here is 1e-3,
because at 1e-2 a run can stop before the bottom of the spectrum has entered its Krylov space and
report an interior Ritz value as λmin (LeNet-BN on CIFAR-10: λmin off by up to 99% at 1e-2 from a
random start, 0.14% at 1e-3, for 16 instead of 10 products a point). The grid is walked in a
serpentine order and each Lanczos run starts from the previous point's two eigenvectors (plus a little
noise), which cuts the products per point (``warm_start``). With ``points > 1`` that many grid points
run in lockstep, their products through one ``vmap`` over the weights (``HVPOperator.hvp_points``):
``points='auto'`` uses 1 on the CPU, where the benchmark found the batched products no faster, and
``CUDA_POINTS`` on a GPU.

In a surface file the maps are datasets beside the loss, of the loss's shape: ``{split}_lambda_max``,
``{split}_lambda_min``, ``{split}_curvature_ratio``, ``curvature_hvps`` and a ``curvature_done`` mask
(0: not computed, 1: converged, 2: stopped at ``max_iter`` with its estimate), with the settings as
``curvature_*`` attributes. With ``stride`` s only every s-th point of each axis is
computed (the others stay NaN and not done). They are added once (the file is copied with them and
renamed over the original, so a crash never damages the loss), then written point by point, values
before done flags: an interrupted map resumes, and a map with other settings is refused
(``overwrite=True`` starts it again).

**Eigenvector axes** (``hessian_directions``; ``fastland.surface(..., directions='hessian')``): the top
``dim`` eigenvectors of the Hessian of every parameter that requires grad, at θ, in the surface's BN
mode (tolerance ``HESSIAN_AXIS_TOL``). Each unit eigenvector is multiplied by the length a random
direction of the same ``norm``/``ignore`` settings has (the norm of θ over the filters it covers:
``‖θ‖`` of the tensors with ≥ 2 dims for ``ignore='biasbn'``, of all of θ for ``'none'``; 1 for
``norm='none'``), so that α = ±1 moves the weights as far as a filter-normalized random direction;
the scaling, the eigenvalues, residuals and BN mode are recorded in the file. Along an axis
``L(θ + α·d) ≈ L(θ) + α·gᵀd + λ/2·α²·‖d‖²``. Their sign is fixed (largest entry positive), and a
resumed file keeps the axes it holds.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from fastland import api, distributed, errors, files, hessian, surfacefile
from fastland import data as data_mod
from fastland import directions as dir_mod
from fastland.errors import UserError
from fastland.params import SEG_FILTER, FlatSpace
from fastland.surfacefile import Surface

DATASETS = ("lambda_max", "lambda_min", "curvature_ratio")  # each prefixed with the split: train_lambda_max, ...
DONE = "curvature_done"
HVPS = "curvature_hvps"
CUDA_POINTS = 8  # grid points per vmapped product on a GPU (points='auto'); not yet measured there
DEFAULT_TOL = 1e-3  # at 1e-2 a cold-started run can stop at an interior Ritz value: λmin off by up to 99% (measured)
DEFAULT_MAX_ITER = 300
WARM_NOISE = 0.1  # the weight of a random unit vector added to a warm start (never a start inside an invariant subspace)
HESSIAN_AXIS_TOL = 1e-4
# The curvature settings a resumed map must share (attributes curvature_<name>).
SETTINGS = ("split", "bn_mode", "tol", "max_iter", "params", "batch_size", "loss", "data_sha256", "samples", "stride", "seed",
            "model_sha256", "directions_sha256")


# --- results -------------------------------------------------------------------------------------
@dataclass
class CurvatureMap:
    """λmax, λmin, |λmin/λmax| and the products spent, on the map's grid ``x`` (and ``y``): ``[ny, nx]``
    (``[nx]`` in 1-D); NaN where not (yet) computed, ``done`` marks the computed points. ``attrs``: the
    settings; ``path``: the surface file it is stored in (None in memory)."""

    x: np.ndarray
    y: np.ndarray | None
    lambda_max: np.ndarray
    lambda_min: np.ndarray
    ratio: np.ndarray
    hvps: np.ndarray
    done: np.ndarray
    attrs: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    def __repr__(self) -> str:
        shape = "x".join(str(s) for s in self.ratio.shape)
        return f"CurvatureMap({shape}, {int(self.done.sum())} done, bn_mode={self.attrs.get('bn_mode', '?')})"


def _names(split: str) -> tuple[str, str, str]:
    return tuple(f"{split}_{d}" for d in DATASETS)  # type: ignore[return-value]


def read(surface: Surface | str | Path) -> CurvatureMap | None:
    """The curvature map stored in a surface (file), on its computed sub-grid; None when there is none."""
    surf = surface if isinstance(surface, Surface) else surfacefile.read(surface)
    lmax, lmin, ratio = _names(surf.split)
    if DONE not in surf.extras or ratio not in surf.extras:
        return None
    s = max(1, int(surf.attrs.get("curvature_stride", 1)))
    sub = (slice(None, None, s),) if surf.dim == 1 else (slice(None, None, s), slice(None, None, s))
    attrs = {k[len("curvature_"):]: v for k, v in surf.attrs.items() if k.startswith("curvature_")}
    return CurvatureMap(surf.x[::s], None if surf.y is None else surf.y[::s], surf.extras[lmax][sub],
                        surf.extras[lmin][sub], surf.extras[ratio][sub], surf.extras[HVPS][sub], surf.extras[DONE][sub],
                        attrs, surf.path)


# --- eigenvector axes ------------------------------------------------------------------------------
def axis_scale(space: FlatSpace, theta: torch.Tensor, norm: str, ignore: str) -> float:
    """The length of a random direction normalized with ``norm`` and ``ignore`` (``fastland.directions``): every
    filter gets θ's norm there, small tensors 0 (``biasbn``) or θ itself (``none``); 1 for ``norm='none'``."""
    if norm == "none":
        return 1.0
    if ignore == "none":
        return float(theta.double().norm())
    seg = space.segments(norm)
    keep = torch.repeat_interleave(seg[:, 2] == SEG_FILTER, seg[:, 1]).to(theta.device)
    return float(theta.double()[keep].norm())


def hessian_directions(model: nn.Module, data: Any, loss_fn: Any, *, dim: int, norm: str, ignore: str, bn_mode: str,
                       batch_size: int | None, seed: int, out: str | Path | None = None, overwrite: bool = False,
                       progress: bool = False) -> tuple[torch.Tensor, dict[str, Any]]:
    """The top ``dim`` Hessian eigenvectors at the model's weights as surface axes ``[dim, N]`` (scaled by
    ``axis_scale``), and the attributes that record them. A surface file at ``out`` that already holds Hessian
    axes of this model, data and BN mode gives them back unchanged (a resume computes nothing again)."""
    space = FlatSpace(model)
    theta = space.flatten(model)
    scale = axis_scale(space, theta, norm, ignore)
    kept = _kept_axes(out, model, data, space, dim, bn_mode, norm, ignore) if out is not None and not overwrite else None
    if kept is not None:
        return kept
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = hessian.top_eigenvalues(model, data, k=dim, loss_fn=loss_fn, bn_mode=bn_mode, tol=HESSIAN_AXIS_TOL,
                                      seed=seed, batch_size=batch_size, progress=progress)
    for w in caught:
        warnings.warn(f"Hessian axes: {w.message}", stacklevel=2)
    dirs = []
    for v in res.flat:
        full = res.group.embed(v).to(theta.device, torch.float32)
        full = full / full.norm()
        if float(full[full.abs().argmax()]) < 0:  # a fixed sign: the largest entry positive
            full = -full
        dirs.append(full * scale)
    meta = {"direction": "hessian", "direction_seed": seed, "norm": norm, "ignore": ignore,
            "hessian_eigenvalues": [float(v) for v in res.values], "hessian_residuals": [float(r) for r in res.residuals],
            "hessian_bn_mode": bn_mode, "hessian_tol": HESSIAN_AXIS_TOL, "hessian_hvps": int(res.hvps),
            "hessian_converged": bool(res.converged), "hessian_scale": scale,
            "hessian_scaling": f"unit eigenvector x {scale:.6g} (the length of a random direction with norm={norm}, "
                               f"ignore={ignore}); the Hessian of all {res.group.numel:,} parameters that require grad",
            "hessian_data_sha256": _fingerprint(data)}
    return torch.stack(dirs), meta


def _fingerprint(data: Any) -> str:
    return str(getattr(data, "fingerprint", ""))


def _kept_axes(out: str | Path, model: nn.Module, data: Any, space: FlatSpace, dim: int, bn_mode: str, norm: str,
               ignore: str) -> tuple[torch.Tensor, dict[str, Any]] | None:
    path = Path(out)
    if not path.is_file():
        return None
    try:
        surf = surfacefile.read(path, directions=True)
    except UserError:
        return None
    a = surf.attrs
    same = (a.get("direction") == "hessian" and a.get("model_sha256") == api.state_sha256(model)
            and a.get("hessian_bn_mode") == bn_mode and a.get("norm") == norm and a.get("ignore") == ignore
            and a.get("hessian_data_sha256") == _fingerprint(data) and len(surf.directions) == dim)
    if not same:
        return None
    dirs = torch.stack([space.flatten_state(d) for d in surf.directions])
    keys = ("direction", "direction_seed", "norm", "ignore", "hessian_eigenvalues", "hessian_residuals", "hessian_bn_mode",
            "hessian_tol", "hessian_hvps", "hessian_converged", "hessian_scale", "hessian_scaling", "hessian_data_sha256")
    return dirs, {k: a[k] for k in keys if k in a}


# --- curvature maps --------------------------------------------------------------------------------
def snake(idx: np.ndarray, nx: int) -> np.ndarray:
    """Flat row-major grid indices in serpentine order (rows alternate direction), so that consecutive points are
    neighbours and each Lanczos run can start from the last one's eigenvectors."""
    rows, cols = np.divmod(idx, nx)
    key = rows * nx + np.where(rows % 2 == 0, cols, nx - 1 - cols)
    return idx[np.argsort(key, kind="stable")]


def _directions(space: FlatSpace, given: Any, device: torch.device) -> torch.Tensor:
    rows = given if isinstance(given, list | tuple) else [given]
    flat = []
    for r in rows:
        if isinstance(r, Mapping):
            extra = [k for k in r if k not in space.names]
            if extra:
                raise UserError(f"the surface's directions also move {extra[0]} (not a parameter: BN running statistics "
                                "interpolated by --to); a curvature map needs directions over the parameters only")
            flat.append(space.flatten_state(dict(r)))
        else:
            flat.append(torch.as_tensor(r).reshape(-1).float())
    out = torch.stack(flat).to(device)
    if out.shape[1] != space.numel:
        raise UserError(f"the directions have {out.shape[1]:,} values per axis, the model {space.numel:,}")
    return out


def curvature_map(model: nn.Module, data: Any, surface: Surface | str | Path | Any, loss_fn: Any = None, *,
                  res: int | Sequence[int] = 21, range: Sequence[float] = (-1.0, 1.0),  # noqa: A002
                  stride: int = 1, bn_mode: str = "eval", tol: float = DEFAULT_TOL, max_iter: int = DEFAULT_MAX_ITER,
                  params: str | Sequence[str] | None = None, batch_size: int | None = None, points: int | str = "auto",
                  warm_start: bool = True, seed: int = 0, overwrite: bool = False, progress: bool = True) -> CurvatureMap:
    """λmax, λmin and |λmin/λmax| of the Hessian over a surface's grid (see the module's docstring).

    ``surface``: a surface file (the maps are written into it, resumably), a ``Surface`` (into its file when it
    has one, else in memory), or one or two directions (``{name: tensor}`` or flat) with ``res`` and ``range``
    as for ``fastland.surface``. ``model`` must be the surface's model (its weights are the origin); ``data``
    and ``loss_fn`` as for ``fastland.surface`` (they may differ from the surface's: recorded).
    ``stride``: every s-th grid point per axis. ``tol``: ``‖Hv − λv‖ ≤ tol·‖H‖`` for both ends, at most
    ``max_iter`` products per point (a point that does not converge keeps its estimate, and the map says how
    many did not). ``points``: grid points per vmapped product (``'auto'``: 1 on the CPU). ``params``: the
    Hessian of those parameter groups only (the others still move with the grid).
    """
    hessian._check_tol(tol)
    if not isinstance(stride, int) or isinstance(stride, bool) or stride < 1:
        raise UserError(f"stride must be a positive integer, got {stride!r}")
    if not isinstance(max_iter, int) or max_iter < 2:
        raise UserError(f"max_iter must be an integer of at least 2 (two eigenvalues per point), got {max_iter!r}")
    if points != "auto" and (not isinstance(points, int) or isinstance(points, bool) or points < 1):
        raise UserError(f"points must be a positive integer or 'auto', got {points!r}")
    path: Path | None = None
    if isinstance(surface, str | Path):
        surf = surfacefile.read(surface, directions=True)
        path = surf.path
    elif isinstance(surface, Surface):
        surf, path = surface, surface.path
        if path is not None and not surf.directions:
            surf = surfacefile.read(path, directions=True)
    else:
        surf = None
    if surf is not None and surf.path is None and not surf.directions:
        raise UserError("the surface holds no directions; give its file, or the directions with res= and range=")
    space = FlatSpace(model)
    dev = hessian._model_device(model)
    theta = space.flatten(model).to(dev)
    if surf is not None:
        if surf.attrs.get("model_sha256") not in (None, "", api.state_sha256(model)):
            raise UserError(f"the model is not the one {surf.path or 'the surface'} was computed at (its weights or "
                            "BN statistics differ); pass the same model or checkpoint")
        dirs = _directions(space, surf.directions, dev)
        x, y = surf.x, surf.y
        shape = surf.loss.shape
    else:
        dirs = _directions(space, surface, dev)
        x, y = api._grid(dirs.shape[0], res, range)
        shape = (len(x),) if y is None else (len(y), len(x))
    nx = len(x)
    op = hessian.operator(model, data, loss_fn, bn_mode, params, batch_size)
    if op.numel < 2:
        raise UserError("a curvature map needs at least two parameters (λmax and λmin)")
    split = surf.split if surf is not None else "train"  # the maps sit beside this split's loss
    settings = {"split": str(getattr(data, "split", "train")), "bn_mode": bn_mode, "tol": float(tol), "max_iter": int(max_iter),
                "params": ",".join(op.group.names) if params is not None else "all",
                # the batches matter only to BN's batch statistics
                "batch_size": int(batch_size or hessian.DEFAULT_BATCH_SIZE) if bn_mode == "batch" else 0,
                "loss": op.loss_name,
                "data_sha256": _data_fingerprint(data), "samples": op.num_samples, "stride": stride, "seed": seed,
                "model_sha256": api.state_sha256(model), "directions_sha256": api._tensor_sha256(dirs)}
    grid = np.zeros(shape, dtype=bool)
    grid[(slice(None, None, stride),) * len(shape)] = True
    want = np.flatnonzero(grid.reshape(-1))
    sink: _FileSink | _MemorySink
    lock = None
    writer = distributed.is_writer()  # under torchrun every rank computes the same map (data-parallel products)
    if path is not None and writer:
        lock = files.WriteLock(path)
        lock.acquire()
    try:
        with distributed.rank_zero_first():  # rank 0 adds the datasets before the others read the done mask
            if path is None:
                sink = _MemorySink(shape)
            elif writer:
                sink = _FileSink(path, shape, split, settings, overwrite)
            else:
                sink = _MemorySink.of_file(path, shape, split)
        pending = snake(want[sink.done.reshape(-1)[want] == 0], nx)
        npoints = _resolve_points(points, dev)
        if progress and writer:
            every = f", every {stride}th" if stride > 1 else ""
            print(f"curvature: {len(want):,} grid points ({'x'.join(str(s) for s in _sub_shape(shape, stride))}"
                  f"{every}), {len(pending):,} to compute; Hessian of "
                  f"{op.numel:,} parameters on {op.num_samples:,} samples, bn_mode {bn_mode}, tol {tol:g} (of ‖H‖)"
                  f"{f'; into {path}' if path else ''}", flush=True)
        t0 = time.perf_counter()
        try:
            _compute(op, theta, dirs, x, y, pending, sink, tol, max_iter, seed, npoints, warm_start, progress and writer)
        finally:
            sink.finish(time.perf_counter() - t0, len(pending))
    finally:
        if lock is not None:
            lock.release()
    x_sub = x[::stride]
    y_sub = None if y is None else y[::stride]
    sub = (slice(None, None, stride),) * len(shape)
    attrs = dict(settings) | sink.attrs
    return CurvatureMap(x_sub, y_sub, sink.lmax[sub], sink.lmin[sub], sink.ratio[sub], sink.hvps[sub], sink.done[sub],
                        attrs, path)


def _sub_shape(shape: tuple[int, ...], stride: int) -> tuple[int, ...]:
    return tuple(len(range(0, n, stride)) for n in shape)


def _data_fingerprint(data: Any) -> str:
    """The data's sha256 as a surface file records it (an EvalSet's; of tensors as EvalSet would hash them)."""
    if isinstance(data, data_mod.EvalSet | data_mod.StreamedSet):
        return data.fingerprint
    if isinstance(data, list | tuple) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        return data_mod.EvalSet(data[0], data[1], "tensors").fingerprint
    return f"{type(data).__name__}"


def _resolve_points(points: int | str, dev: torch.device) -> int:
    if points == "auto":
        return CUDA_POINTS if dev.type == "cuda" else 1
    return int(points)


def _compute(op: hessian.HVPOperator, theta: torch.Tensor, dirs: torch.Tensor, x: np.ndarray, y: np.ndarray | None,
             pending: np.ndarray, sink: Any, tol: float, max_iter: int, seed: int, npoints: int, warm: bool,
             progress: bool) -> None:
    """Lanczos at every pending point: one at a time (its graphs kept when they fit), or ``npoints`` in lockstep."""
    bar = tqdm(total=len(pending), unit="pt", desc="curvature", dynamic_ncols=True, file=sys.stderr, disable=not progress)
    last: torch.Tensor | None = None  # the last point's two eigenvectors
    queue = list(pending)
    active: list[tuple[int, hessian.LanczosRun, torch.Tensor]] = []
    total_hvps = 0
    finished = 0
    t0 = time.perf_counter()

    def weights(flat: int) -> torch.Tensor:  # θ + α·δ + β·η, as the surface's reference perturbs it
        return dir_mod.perturb_reference(theta, dirs, api.grid_coords(np.array([flat]), x, y).to(theta.device))[0]

    def start_run(flat: int) -> hessian.LanczosRun:
        start = None
        if warm and last is not None:
            noise = hessian._randn(1, op.numel, hessian._generator(seed + flat), op)[0]
            start = (last[0] + last[1] + WARM_NOISE * math.sqrt(2) * noise / noise.norm())[None]
        return hessian.LanczosRun(op.numel, k=1, which="both", tol=tol, max_iter=max_iter, seed=seed + flat,
                                  device=op.device, dtype=op.dtype, start=start, scale="norm")

    try:
        while queue or active:
            while queue and len(active) < npoints:
                flat = int(queue.pop(0))
                active.append((flat, start_run(flat), weights(flat)))
            if npoints == 1:
                flat, run, w = active[0]
                op.set_point(w)
                while not run.done:
                    op.context = f"curvature map, grid point {_where(flat, x, y)}, Lanczos step {run.steps + 1}"
                    run.update(op.hvp(run.pending))
                done_runs = [active.pop(0)]
            else:
                op.context = f"curvature map, {len(active)} grid points in lockstep"
                hv = op.hvp_points(torch.stack([w for _, _, w in active]), torch.cat([r.pending for _, r, _ in active]))
                for (_, run, _), h in zip(active, hv, strict=True):
                    run.update(h[None])
                done_runs = [a for a in active if a[1].done]
                active = [a for a in active if not a[1].done]
            for flat, run, _ in done_runs:
                values, vecs = run.ritz()
                last = vecs / vecs.norm(dim=1, keepdim=True)
                sink.write(flat, float(values[0]), float(values[1]), run.m, run.converged)
                total_hvps += run.m
                finished += 1
                bar.update(1)
                bar.set_postfix(hvps_per_point=f"{total_hvps / finished:.1f}", refresh=False)
                if finished == 1 and len(pending) > 1 and progress:
                    per = time.perf_counter() - t0
                    bar.write(f"estimated time: {api.fmt_time(per * len(pending))} ({run.m} products at the first point)")
    finally:
        op.context = ""
        bar.close()


def _where(flat: int, x: np.ndarray, y: np.ndarray | None) -> str:
    if y is None:
        return f"α={x[flat]:+.3g}"
    j, i = divmod(flat, len(x))
    return f"(α, β) = ({x[i]:+.3g}, {y[j]:+.3g})"


def _ratio(lmax: float, lmin: float) -> float:
    return abs(lmin) / abs(lmax) if lmax != 0 else math.nan


class _MemorySink:
    """The maps in memory. ``done``: 0 not computed, 1 converged, 2 stopped at ``max_iter`` (its estimate kept)."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.lmax, self.lmin, self.ratio = (np.full(shape, np.nan) for _ in range(3))
        self.hvps = np.zeros(shape, dtype=np.int32)
        self.done = np.zeros(shape, dtype=np.uint8)
        self.attrs: dict[str, Any] = {}

    @classmethod
    def of_file(cls, path: Path, shape: tuple[int, ...], split: str) -> _MemorySink:
        """What a surface file holds so far (read-only: the other ranks of a distributed run)."""
        sink = cls(shape)
        with surfacefile._open(path) as f:
            sink.lmax, sink.lmin, sink.ratio = (f[n][...] for n in _names(split))
            sink.hvps, sink.done = f[HVPS][...], f[DONE][...]
        return sink

    def write(self, flat: int, lmax: float, lmin: float, hvps: int, converged: bool) -> None:
        for arr, v in ((self.lmax, lmax), (self.lmin, lmin), (self.ratio, _ratio(lmax, lmin)), (self.hvps, hvps)):
            arr.reshape(-1)[flat] = v
        self.done.reshape(-1)[flat] = 1 if converged else 2

    def finish(self, seconds: float, points: int) -> None:
        self.attrs |= {"last_run_seconds": seconds, "last_run_points": points,
                       "unconverged": int((self.done == 2).sum())}


class _FileSink(_MemorySink):
    """The maps in a surface file: datasets added once (a copy renamed over the file), then point by point."""

    def __init__(self, path: Path, shape: tuple[int, ...], split: str, settings: dict[str, Any], overwrite: bool) -> None:
        self.path, self.names = path, _names(split)
        files.discard_stale(path.parent, path.name)
        with surfacefile._open(path) as f:
            old = {k[len("curvature_"):]: surfacefile._norm(v) for k, v in f.attrs.items() if k.startswith("curvature_")}
            have = all(n in f and tuple(f[n].shape) == shape for n in (*self.names, DONE, HVPS))
        if have and not overwrite:
            diff = [f"{k}: file has {old.get(k)!r}, command wants {settings[k]!r}" for k in SETTINGS
                    if str(old.get(k)) != str(settings[k])]
            if diff:
                raise UserError(f"{path} holds a curvature map with other settings ({diff[0]}"
                                f"{f' and {len(diff) - 1} more' if len(diff) > 1 else ''}); pass overwrite=True "
                                "(--overwrite) to compute it again")
        else:
            self._add(shape, settings)
        self.f = surfacefile._open(path, "r+")
        self.dsets = [self.f[n] for n in (*self.names, HVPS)]
        self.done_ds = self.f[DONE]
        self.done = self.done_ds[...]
        self.lmax, self.lmin, self.ratio = (self.f[n][...] for n in self.names)
        self.hvps = self.f[HVPS][...]
        self.attrs = {}

    def _add(self, shape: tuple[int, ...], settings: dict[str, Any]) -> None:
        """Copy the file with the (re)allocated map datasets and attributes, and rename it over the original."""
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            shutil.copyfile(self.path, tmp)
            with errors.quiet_h5py_dealloc(), h5py.File(tmp, "r+") as f:
                for name in (*self.names, DONE, HVPS):
                    if name in f:
                        del f[name]
                for name in self.names:
                    f.create_dataset(name, data=np.full(shape, np.nan))
                f.create_dataset(HVPS, data=np.zeros(shape, dtype=np.int32))
                f.create_dataset(DONE, data=np.zeros(shape, dtype=np.uint8))
                for k, v in settings.items():
                    f.attrs[f"curvature_{k}"] = surfacefile._plain(v)
                f.attrs["curvature_wall_time"] = 0.0
            tmp.replace(self.path)
        except (OSError, RuntimeError) as err:
            files.discard(tmp)
            failure = surfacefile._write_failure(err, self.path)
            if failure is None:
                raise
            raise failure from None

    def write(self, flat: int, lmax: float, lmin: float, hvps: int, converged: bool) -> None:
        super().write(flat, lmax, lmin, hvps, converged)
        idx = np.unravel_index(flat, self.done.shape)
        try:
            for ds, v in zip(self.dsets, (lmax, lmin, _ratio(lmax, lmin), hvps), strict=True):
                ds[idx] = v
            self.f.flush()
            self.done_ds[idx] = 1 if converged else 2
            self.f.flush()
        except (OSError, RuntimeError) as err:
            failure = surfacefile._write_failure(err, self.path)
            self.close()
            if failure is None:
                raise
            raise failure from None

    def finish(self, seconds: float, points: int) -> None:
        super().finish(seconds, points)
        try:
            if self.f.id.valid:
                self.f.attrs["curvature_wall_time"] = float(self.f.attrs.get("curvature_wall_time", 0.0)) + seconds
                self.f.attrs["curvature_last_run_seconds"] = seconds
                self.f.attrs["curvature_last_run_points"] = points
        finally:
            self.close()

    def close(self) -> None:
        with errors.quiet_h5py_dealloc():
            if self.f.id.valid:
                self.f.close()


def summary_lines(cmap: CurvatureMap) -> list[str]:
    """A few lines for a CLI's summary: coverage, cost, and the maps' ranges and values at the origin."""
    done = cmap.done != 0
    a = cmap.attrs
    shape = "x".join(str(s) for s in cmap.ratio.shape)
    spent = cmap.hvps[done]
    every = f", every {a.get('stride')}th" if int(a.get("stride", 1)) > 1 else ""
    lines = [f"curvature {int(done.sum()):,}/{done.size:,} points ({shape}{every}); "
             f"bn_mode {a.get('bn_mode')}, tol {float(a.get('tol', 0)):g}·‖H‖, {spent.mean() if spent.size else 0:.1f} "
             f"products per point; {int((cmap.done == 2).sum())} stopped at max_iter"]
    if done.any():
        origin = (int(np.argmin(np.abs(cmap.x))),) if cmap.y is None else (int(np.argmin(np.abs(cmap.y))),
                                                                          int(np.argmin(np.abs(cmap.x))))
        for name, arr, fmt in (("λmax", cmap.lambda_max, ".5g"), ("λmin", cmap.lambda_min, ".5g"),
                               ("|λmin/λmax|", cmap.ratio, ".3g")):
            vals = arr[done]
            at = f"; at the origin {arr[origin]:{fmt}}" if done[origin] else ""
            lines.append(f"  {name:12s}{vals.min():{fmt}} .. {vals.max():{fmt}} (median {np.median(vals):{fmt}}){at}")
        near = float((cmap.ratio[done] < 0.05).mean())
        lines.append(f"  {near:.0%} of the points have |λmin/λmax| < 0.05 (locally near-convex, Li et al.)")
    if "last_run_seconds" in a:
        lines.append(f"  time {api.fmt_time(float(a['last_run_seconds']))} for {int(a.get('last_run_points', 0)):,} points this run")
    return lines
