"""Optimizer trajectories (Li et al. 2018, Sec. 7): PCA directions from a run's checkpoints, and the path on them.

Random directions cannot show an optimizer's path: in high dimensions they are nearly orthogonal
to it. Li et al. instead take the checkpoints θ_0 … θ_n of a run, form the rows ``θ_i − θ_n``
(i < n), apply the ``ignore`` rule (``biasbn``: tensors with ≤ 1 dim, i.e. biases and BN γ/β, are
zeroed, which is the same as leaving them out), centre the rows as scikit-learn's ``PCA`` does, and
use the top two principal components as the axes, labelled with their explained-variance ratios.
Each checkpoint's coordinates are found by least squares; θ_n sits at (0, 0).

``pca(runs)`` does this for one run folder written by ``fastland.train``, or for several runs that
start from the same initial weights (then one basis is fitted to all their rows about a common
reference, the first run's ``final.pt``). On top of it:

- ``surface(runs, data)``: the loss on a grid on that plane around the reference (through
  ``fastland.surface``, the same resumable HDF5 file), each checkpoint's own loss, and the paths,
  under Li et al.'s names (``proj_xcoord``...; see ``Trajectory.h5_fields``);
- ``figure(runs, out_png)``: Li et al.'s Figure 9 for a report (``fastland.viz.trajectory``);
- ``python -m fastland.trajectory RUN_DIR [RUN_DIR ...]``: the command line (``CLI_DOC``).

How (exact, bounded memory): each checkpoint is read once (``models.read_checkpoint``) and its
row ``θ_i − θ_ref`` (included parameters only, fp32) is written to a row buffer, held in RAM when
it fits ``memory_budget`` and in a temporary file otherwise. Two passes over that buffer, in blocks
of columns, then give everything:

1. the Gram matrix ``G = X Xᵀ`` (m × m) in fp64, since centring (``J G J``, ``J = I − 11ᵀ/m``) takes
   differences of its entries; its eigendecomposition gives the singular values and the left
   singular vectors ``U`` exactly, and ``G`` itself gives ``X V``, ``Vᵀ V`` and every distance
   between checkpoints;
2. the components ``V = Xᵀ J U / S``: each entry sums only m terms, so fp32 is as exact as the rows.

Memory is the buffer (≈ the checkpoints' size in RAM, or a few 32 MB blocks when it spills to disk)
plus a few vectors of N. The alternatives were measured or weighed (``benchmarks/bench_trajectory.py``,
20 VGG-16 checkpoints): a dense SVD of the stacked rows needs the matrix plus LAPACK's copies (3.2×
the checkpoints in fp32, and then its explained variance is off by 1e-3; 6× in fp64); a randomized
SVD (scikit-learn's choice for these shapes, so Li et al.'s) or an incremental PCA is approximate
and needs ``2q + 2`` passes for q power iterations. The Gram route is exact to fp64 rounding and
costs ``m² N`` flops, small next to reading the checkpoints up to a few hundred checkpoints of a
VGG-16; beyond that a randomized SVD would be cheaper.

Deviations from Li et al.'s code, on purpose:

- their ``plot_trajectory.py`` also feeds θ_n itself (a zero row) to the PCA; the paper's matrix,
  used here, has only i < n. Checkpoints at the same step (``epoch_020.pt`` and ``final.pt``) count once.
- the sign of each component follows scikit-learn ≥ 1.5: its largest-magnitude entry is positive.
- with three checkpoints (or any path whose centred rows have rank 1) the second component is
  undefined; it is then the direction from θ_n to the rows' mean, made orthogonal to the first
  (the plane through all the checkpoints), with an explained variance of 0.
- only parameters take part (Li et al.'s ``dir_type=weights``), never BN running statistics.

Checkpoints of a run folder: ``epoch_XXX.pt`` (``epoch_000.pt``: the initial weights, when saved),
``step_XXXXXXX.pt`` (finer ones, from ``--save-every STEPS``; see ``step_filename``) and ``final.pt``,
ordered by ``meta["step"]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from fastland import models
from fastland.directions import IGNORES
from fastland.errors import ArgumentParser, UserError, cli_entry, os_error
from fastland.params import FlatSpace, ParamInfo

FINAL = "final.pt"
_CKPT = re.compile(r"^(?:epoch_(\d+)|step_(\d+))\.pt$")
_BLOCK_BYTES = 32 << 20  # one fp64 block of columns of X: big enough for an efficient GEMM, small next to X
_MIN_BLOCK = 4096
_RANK_TOL = 1e-12  # relative variance below which a direction counts as absent (fp32 rows give ~1e-14)


def step_filename(step: int) -> str:
    """The file name of a checkpoint saved after ``step`` optimizer steps: ``step_XXXXXXX.pt``.

    ``fastland.train --save-every STEPS`` writes these; their ``meta`` holds ``step`` (steps taken)
    and ``epoch`` (the 1-based epoch they belong to, as in ``metrics.csv``).
    """
    return f"step_{int(step):07d}.pt"


@dataclass(frozen=True)
class RunPath:
    """One run's checkpoints in training order and their coordinates on the PCA plane.

    Distances (``residual``, ``length``, ``distance``) are in the space of the included parameters.
    """

    run: Path
    files: tuple[Path, ...]
    steps: np.ndarray  # [n] int64, meta["step"]
    epochs: np.ndarray  # [n] float64, meta["epoch"] (nan where absent)
    epoch_end: np.ndarray  # [n] bool: weights at the end of an epoch (epoch_XXX.pt, final.pt): the figure's markers
    coords: np.ndarray  # [n, 2] float64: least squares on the directions; the reference is (0, 0)
    residual: np.ndarray  # [n] float64: each checkpoint's distance from the plane (0: it lies on it)
    length: float  # the path's length: the sum of the distances between consecutive checkpoints
    distance: float  # from the first checkpoint to the last


@dataclass(frozen=True)
class Trajectory:
    """PCA directions of one or more runs and their projected paths (see the module docstring)."""

    model: str
    space: FlatSpace = field(repr=False)
    ignore: str
    included: tuple[str, ...]  # parameter names that take part (the others are 0 in the directions)
    directions: torch.Tensor = field(repr=False)  # [2, N] fp32, orthonormal, in FlatSpace order
    explained_variance_ratio: np.ndarray  # [2], scikit-learn's explained_variance_ratio_
    explained_variance: np.ndarray  # [2], explained_variance_ (ddof = 1)
    singular_values: np.ndarray  # [2], singular_values_ of the centred rows
    paths: tuple[RunPath, ...]  # one per run, in the order given
    theta_final: torch.Tensor = field(repr=False)  # [N]: the origin of the plane (the first run's final.pt)
    reference: Path  # the checkpoint holding theta_final (and, for a surface, its BN statistics)
    rows: int  # how many difference vectors the PCA saw
    storage: str  # where the rows were held: "memory" or "disk"

    @property
    def excluded(self) -> tuple[str, ...]:
        """Parameter names left out by the ``ignore`` rule."""
        keep = set(self.included)
        return tuple(n for n in self.space.names if n not in keep)

    def named_directions(self) -> list[dict[str, torch.Tensor]]:
        """The two directions as ``{parameter name: tensor}`` (views of ``directions``)."""
        return [self.space.views(self.directions[k]) for k in range(2)]

    def extent(self, margin: float = 0.2) -> tuple[float, float, float, float]:
        """``(xmin, xmax, ymin, ymax)`` around every path, widened by ``margin`` of the span on each side.

        Surfaces on PCA axes are plotted at the path's scale, not at ±1 (Li et al.).
        """
        pts = np.concatenate([p.coords for p in self.paths])
        lo, hi = pts.min(0), pts.max(0)
        pad = margin * np.maximum(hi - lo, 1e-12)
        return float(lo[0] - pad[0]), float(hi[0] + pad[0]), float(lo[1] - pad[1]), float(hi[1] + pad[1])

    def labels(self) -> list[str]:
        """A short name per run for legends: its folder name (with its parent's where two are alike), and
        the optimizer and learning rate its ``config.json`` names."""
        names = [p.run.name or str(p.run) for p in self.paths]
        if len(set(names)) < len(names):
            names = [f"{p.run.parent.name}/{p.run.name}" for p in self.paths]
        if len(set(names)) < len(names):
            names = [str(p.run) for p in self.paths]
        out = []
        for name, p in zip(names, self.paths, strict=True):
            cfg = _config(p.run) or {}
            number = {k: cfg[k] for k in ("lr", "momentum") if isinstance(cfg.get(k), int | float) and cfg[k]}
            how = ", ".join(([str(cfg["optimizer"])] if cfg.get("optimizer") else []) + [f"{k} {v:g}" for k, v in number.items()])
            out.append(f"{name} ({how})" if how else name)
        return out

    def h5_fields(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """The datasets and attributes to add to a surface file, under Li et al.'s names.

        The first run's path is ``proj_xcoord`` / ``proj_ycoord`` (one point per checkpoint, oldest
        first, ending at (0, 0)), with ``proj_step``, ``proj_epoch``, ``proj_epoch_end`` (1 where an
        epoch ends: the figures' markers), ``proj_residual`` (each checkpoint's distance from the
        plane) and ``proj_checkpoint``; further runs' are ``run{k}_proj_xcoord`` and so on (top-level
        datasets, so ``fastland.load(path).extras`` holds them all), named in the ``pca_labels``
        attribute. ``explained_variance_ratio_``, ``explained_variance_`` and ``singular_values_`` are
        as in Li et al.'s direction file, so their ``plot_2D.py`` reads them; ``pca_included`` names
        the parameters that take part.
        """
        import h5py  # only the surface file needs it

        text = h5py.string_dtype()
        data: dict[str, np.ndarray] = {}
        for k, p in enumerate(self.paths):
            pre = run_prefix(k)
            data |= {f"{pre}proj_xcoord": p.coords[:, 0].copy(), f"{pre}proj_ycoord": p.coords[:, 1].copy(),
                     f"{pre}proj_step": p.steps.copy(), f"{pre}proj_epoch": p.epochs.copy(),
                     f"{pre}proj_epoch_end": p.epoch_end.astype(np.uint8), f"{pre}proj_residual": p.residual.copy(),
                     f"{pre}proj_checkpoint": np.array([f.name for f in p.files], dtype=text)}
        data |= {"explained_variance_ratio_": self.explained_variance_ratio.copy(),
                 "explained_variance_": self.explained_variance.copy(),
                 "singular_values_": self.singular_values.copy(),
                 "pca_included": np.array(self.included, dtype=text)}
        attrs = {"direction": "pca", "pca_ignore": self.ignore, "pca_rows": self.rows,
                 "pca_runs": json.dumps([str(p.run.resolve()) for p in self.paths]),
                 "pca_reference": str(self.reference.resolve()),
                 "pca_labels": json.dumps(self.labels()),
                 "pca_method": "exact PCA (Gram eigendecomposition) of θ_i − θ_ref, centred as scikit-learn; "
                               "coordinates by least squares"}
        return data, attrs


def run_prefix(k: int) -> str:
    """How the surface file names run ``k``'s datasets: ``proj_xcoord`` for the first run (Li et al.'s
    name), ``run1_proj_xcoord`` for the second, and so on."""
    return "" if k == 0 else f"run{k}_"


# --- reading run folders ---------------------------------------------------------------------
@dataclass
class _Entry:
    """One distinct checkpoint of a run: where its row is (-1: the reference itself)."""

    file: Path
    step: int
    epoch: float
    epoch_end: bool
    row: int


def _candidates(run: Path) -> list[Path]:
    """The checkpoint files of a run folder, ``final.pt`` last."""
    if not run.exists():
        raise UserError(f"run folder {run} does not exist; pass a folder written by python -m fastland.train "
                        "(it holds epoch_XXX.pt and final.pt)")
    if not run.is_dir():
        raise UserError(f"{run} is a file, not a run folder; pass the folder that holds its checkpoints ({run.parent})")
    files = sorted(p for p in run.iterdir() if _CKPT.match(p.name))
    if not (run / FINAL).is_file():
        raise UserError(f"{run} has no {FINAL}: its training has not finished; resume it (run the same training "
                        "command again) or pass a finished run")
    if len(files) + 1 < 3:
        raise _too_few(run, len(files) + 1)
    return files + [run / FINAL]


def _is_init(path: Path) -> bool:
    """Named as the initial weights (step 0)."""
    return path.name in ("epoch_000.pt", step_filename(0))


def _too_few(run: Path, count: int) -> UserError:
    return UserError(f"{run} holds {count} distinct checkpoint(s); a trajectory needs at least 3: train more epochs, "
                     "or save more often with --save-every STEPS")


def _meta_step(path: Path, meta: dict[str, Any]) -> tuple[int, float]:
    if "step" not in meta:
        raise UserError(f"{path} has no meta['step'], so its place in training is unknown; fastland.train writes it: "
                        "save the checkpoint with meta={'step': ..., 'epoch': ...} or move it out of the folder")
    epoch = meta.get("epoch")
    return int(meta["step"]), float(epoch) if epoch is not None else float("nan")


def _config(run: Path) -> dict[str, Any] | None:
    try:
        return json.loads((run / "config.json").read_text())
    except (OSError, ValueError):
        return None


def _check_same_init(runs: list[Path], init_hash: dict[int, str]) -> None:
    """Refuse runs that do not start from the first run's initial weights.

    Evidence, best first: both runs saved their initial weights (step 0) and these are equal;
    else both ``config.json`` name the same model and seed (training draws the weights from that
    seed alone).
    """
    how = ("to share one basis, train the runs with the same --model and --seed (the same initial weights); "
           "otherwise plot each run on its own basis, one run folder at a time")
    for k in range(1, len(runs)):
        a, b = runs[0], runs[k]
        if 0 in init_hash and k in init_hash:
            if init_hash[0] != init_hash[k]:
                raise UserError(f"{a} and {b} start from different initial weights (their step-0 checkpoints differ), "
                                f"so they cannot share one PCA basis; {how}")
            continue
        ca, cb = _config(a), _config(b)
        if ca is None or cb is None or not {"model", "seed"} <= (ca.keys() & cb.keys()):
            raise UserError(f"cannot tell whether {a} and {b} start from the same initial weights (neither both "
                            f"epoch_000.pt nor both config.json with model and seed); {how}")
        if (ca["model"], ca.get("model_args") or {}, ca["seed"]) != (cb["model"], cb.get("model_args") or {}, cb["seed"]):
            raise UserError(f"{a} and {b} start from different initial weights (config.json: {ca['model']} seed "
                            f"{ca['seed']} vs {cb['model']} seed {cb['seed']}), so they cannot share one PCA basis; {how}")


# --- the row buffer ----------------------------------------------------------------------------
class _Rows:
    """The rows ``θ_i − θ_ref`` (fp32), in RAM or in a temporary file, read back in blocks of columns.

    The file is written and read with plain file I/O rather than ``np.memmap``: mapped pages would
    count towards the process's resident memory, which is what the disk path is there to bound.
    """

    def __init__(self, capacity: int, width: int, budget: int) -> None:
        self.width, self.m = width, 0
        need = capacity * width * 4
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if need <= budget:
            self.storage = "memory"
            self._mem = torch.empty(capacity, width, dtype=torch.float32)
            return
        self.storage = "disk"
        self._tmp = tempfile.TemporaryDirectory(prefix="fastland-pca-")
        free = shutil.disk_usage(self._tmp.name).free
        if free < need:
            self.close()
            raise UserError(f"the PCA rows need {need / 2**30:.1f} GiB of temporary disk space and only "
                            f"{free / 2**30:.1f} GiB is free in {tempfile.gettempdir()}; set TMPDIR to a larger disk "
                            "or raise the memory budget")
        self._path = Path(self._tmp.name) / "rows.f32"
        self._file = open(self._path, "w+b")  # closed by close()
        self._row = torch.empty(width, dtype=torch.float32)  # filled, then written out

    def slot(self) -> torch.Tensor:
        """The fp32 vector to fill with the next row; ``commit()`` then keeps it."""
        return self._mem[self.m] if self.storage == "memory" else self._row

    def commit(self) -> int:
        """Keep the row just filled; returns its index."""
        if self.storage == "disk":
            try:
                self._file.seek(self.m * self.width * 4)
                self._file.write(self._row.numpy().data)
            except OSError as err:
                raise os_error(err, f"the temporary PCA buffer {self._path}") from None
        self.m += 1
        return self.m - 1

    def blocks(self, double: bool) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield ``(start, X[:, start:stop])`` over the columns, in blocks of about 32 MB of fp64.

        ``double``: fp64 copies (for the Gram matrix); otherwise fp32, a view of the buffer in RAM.
        """
        m = self.m
        if self.storage == "memory" and not double:
            yield 0, self._mem[:m]  # one GEMM over the whole buffer, no copy
            return
        size = min(self.width, max(_MIN_BLOCK, _BLOCK_BYTES // (8 * m)))
        buf64 = torch.empty(m, size, dtype=torch.float64) if double else None  # reused: no page faults per block
        buf32 = None
        if self.storage == "disk":
            self._file.flush()
            buf32 = np.empty((m, size), dtype=np.float32)
        for a in range(0, self.width, size):
            b = min(a + size, self.width)
            if buf32 is None:
                block = self._mem[:m, a:b]
            else:
                part = buf32[:, : b - a]
                for i in range(m):
                    self._file.seek((i * self.width + a) * 4)
                    if self._file.readinto(memoryview(part[i]).cast("B")) != (b - a) * 4:
                        raise UserError(f"the temporary PCA buffer {self._path} was cut short; run again")
                block = torch.from_numpy(part)
            yield a, (buf64[:, : b - a].copy_(block) if buf64 is not None else block)

    def close(self) -> None:
        if self._tmp is not None:
            if hasattr(self, "_file"):
                self._file.close()
            self._tmp.cleanup()
            self._tmp = None


def _default_budget() -> int:
    """Half of the memory available now (MemAvailable), so the rows never push the machine into swap."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 // 2
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")) // 2


# --- the PCA -------------------------------------------------------------------------------------
def _plan(space: FlatSpace, ignore: str) -> list[tuple[ParamInfo, int]]:
    """The included parameters and each one's offset inside a row."""
    out, off = [], 0
    for info in space.infos:
        if ignore == "biasbn" and info.is_small:
            continue
        out.append((info, off))
        off += info.numel
    return out


def _model_of(path: Path, ckpt: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The model a checkpoint names: its spec (a zoo name or ``package.module:factory``) and arguments."""
    name = ckpt.get("model")
    if name is None:
        raise UserError(f"{path} is a plain state_dict that does not name its model; a trajectory needs fastland "
                        "checkpoints (python -m fastland.train writes them)")
    return str(name), dict(ckpt.get("model_args") or {})


def _space_of(name: str, args: dict[str, Any]) -> FlatSpace:
    """The parameter layout of the model, built on the meta device (no memory, no initialization)."""
    try:
        with torch.device("meta"):
            return FlatSpace(models.create(name, **args))
    except Exception:  # noqa: BLE001 - a user's factory may not build on the meta device; a CPU build reports real errors
        return FlatSpace(models.create(name, **args))


def _check_model(path: Path, ckpt: dict[str, Any], ref: Path, model: tuple[str, dict[str, Any]], space: FlatSpace) -> None:
    got = _model_of(path, ckpt)
    if got != model:
        def say(m: tuple[str, dict[str, Any]]) -> str:
            return m[0] + (f" {m[1]}" if m[1] else "")

        raise UserError(f"{path} holds a {say(got)} model but {ref} holds {say(model)}; a trajectory needs checkpoints "
                        "of one model: pass runs trained with the same --model")
    name, state = model[0], ckpt["state_dict"]
    for info in space.infos:
        t = state.get(info.name)
        if t is None or tuple(t.shape) != info.shape:
            shape = "missing" if t is None else tuple(t.shape)
            raise UserError(f"{path} does not match the {name} parameters ({info.name}: {shape} vs {info.shape}); "
                            "a trajectory needs checkpoints of one model")


def _state_hash(state: dict[str, torch.Tensor], space: FlatSpace) -> str:
    h = hashlib.sha256()
    for info in space.infos:
        h.update(state[info.name].detach().float().contiguous().reshape(-1).numpy().data)
    return h.hexdigest()


def _components(gram: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """From the uncentred Gram matrix ``X Xᵀ``: coefficients ``C`` [m, 2] such that ``Xᵀ C`` are the two
    unit principal directions, the two leading eigenvalues of the centred Gram matrix, and its trace.

    Raises when the rows do not span a plane.
    """
    m = gram.shape[0]
    j = np.eye(m) - 1.0 / m
    centred = j @ gram @ j
    centred = (centred + centred.T) / 2
    lam, u = np.linalg.eigh(centred)
    lam, u = lam[::-1], u[:, ::-1]
    total = float(np.trace(centred))
    lam = np.clip(lam, 0.0, None)
    scale = max(total, float(np.trace(gram)) / m, np.finfo(np.float64).tiny)
    rank = int(np.sum(lam > _RANK_TOL * scale))
    line = UserError("the checkpoints lie on one line (the path never turns), so a 2-D PCA plane is undefined; "
                     "plot the path in 1-D along the interpolation θ_0 → θ_n instead")
    if rank == 0:
        raise line
    coef = np.zeros((m, 2))
    c1 = u[:, 0] - u[:, 0].mean()
    coef[:, 0] = c1 / np.sqrt(lam[0])
    if rank >= 2:
        c2 = u[:, 1] - u[:, 1].mean()
        coef[:, 1] = c2 / np.sqrt(lam[1])
    else:
        # Rank 1 (e.g. three checkpoints): the mean row, i.e. the direction from θ_ref to the rows'
        # centre, made orthogonal to the first component: the plane through every checkpoint.
        mean = np.full(m, 1.0 / m)
        w = mean - (mean @ gram @ coef[:, 0]) * coef[:, 0]
        norm2 = float(w @ gram @ w)
        if norm2 <= _RANK_TOL * scale:
            raise line
        coef[:, 1] = w / np.sqrt(norm2)
    return coef, lam[:2].copy(), total


def pca(runs: str | Path | Sequence[str | Path], ignore: str = "biasbn", memory_budget: int | None = None,
        progress: bool = True) -> Trajectory:
    """Fit Li et al.'s PCA directions to one run's checkpoints (or several runs' with the same
    initial weights) and project every checkpoint onto them.

    ``runs``: one run folder or a list of them; the first run's ``final.pt`` is the origin.
    ``ignore``: ``biasbn`` (default; tensors with ≤ 1 dim left out, as Li et al.) or ``none``.
    ``memory_budget``: bytes the row buffer may take in RAM before it goes to a temporary file
    (default: half of the available memory).
    """
    run_dirs = [Path(runs)] if isinstance(runs, str | os.PathLike) else [Path(r) for r in runs]
    if not run_dirs:
        raise UserError("no run folder given; pass at least one folder written by python -m fastland.train")
    seen = set()
    for r in run_dirs:
        if r.resolve() in seen:
            raise UserError(f"run folder {r} is given twice; pass each run once")
        seen.add(r.resolve())
    if ignore not in IGNORES:
        raise UserError(f"unknown ignore rule {ignore!r}; use one of {', '.join(IGNORES)}")
    files = [_candidates(r) for r in run_dirs]
    budget = _default_budget() if memory_budget is None else int(memory_budget)

    ref_path = run_dirs[0] / FINAL
    ref = models.read_checkpoint(ref_path)
    model = _model_of(ref_path, ref)
    name = model[0]
    space = _space_of(*model)
    _check_model(ref_path, ref, ref_path, model, space)
    theta_ref = space.flatten_state(ref["state_dict"])
    ref_step, ref_epoch = _meta_step(ref_path, ref.get("meta", {}))
    del ref
    if not bool(torch.isfinite(theta_ref).all()):
        raise UserError(f"{ref_path} holds non-finite weights (nan or inf); a trajectory needs finite checkpoints")
    plan = _plan(space, ignore)
    width = sum(info.numel for info, _ in plan)
    ref_views = space.views(theta_ref)

    rows = _Rows(sum(len(f) for f in files) - 1, width, budget)
    try:
        entries: list[dict[int, _Entry]] = [{} for _ in run_dirs]
        entries[0][ref_step] = _Entry(ref_path, ref_step, ref_epoch, True, -1)
        init_hash: dict[int, str] = {}  # run -> hash of its step-0 weights
        init_rows: dict[str, int] = {}  # hash -> row: runs that share θ_0 share its row
        # Step-0 files first, so that runs with different initial weights are refused before the long read.
        first = [(k, p) for k, fs in enumerate(files) for p in fs if _is_init(p)]
        todo = first + [(k, p) for k, fs in enumerate(files) for p in fs if not _is_init(p) and p != ref_path]
        checked = len(run_dirs) == 1
        bar = tqdm(todo, desc="reading checkpoints", unit="ckpt", disable=None if progress else True, leave=False)
        for n, (k, path) in enumerate(bar):
            if n == len(first) and not checked:
                _check_same_init(run_dirs, init_hash)
                checked = True
            ckpt = models.read_checkpoint(path)
            _check_model(path, ckpt, ref_path, model, space)
            step, epoch = _meta_step(path, ckpt.get("meta", {}))
            state = ckpt["state_dict"]
            is_epoch = path.name.startswith("epoch_") or path.name == FINAL
            old = entries[k].get(step)
            if old is not None:  # the same weights under two names (epoch_020.pt and final.pt): one point
                old.epoch_end |= is_epoch
                if path.name == FINAL or (is_epoch and not old.file.name.startswith(("epoch_", FINAL))):
                    old.file = path
                continue
            digest = _state_hash(state, space) if step == 0 and len(run_dirs) > 1 else None
            if digest is not None:
                init_hash[k] = digest
                if digest in init_rows:
                    entries[k][step] = _Entry(path, step, epoch, is_epoch, init_rows[digest])
                    continue
            row = rows.slot()
            for info, off in plan:
                torch.sub(state[info.name].reshape(-1).float(), ref_views[info.name].reshape(-1),
                          out=row[off : off + info.numel])
            entries[k][step] = _Entry(path, step, epoch, is_epoch, rows.commit())
            if digest is not None:
                init_rows[digest] = entries[k][step].row
            del ckpt, state
        if not checked:
            _check_same_init(run_dirs, init_hash)
        for r, e in zip(run_dirs, entries, strict=True):
            if len(e) < 3:
                raise _too_few(r, len(e))
            last = e[max(e)]
            if last.file.name != FINAL:
                raise UserError(f"{last.file} comes after {r / FINAL} (step {last.step}); move the checkpoints of an "
                                "older run out of the folder")
        return _fit(rows, run_dirs, entries, space, plan, theta_ref, ref_path, ignore, name)
    finally:
        rows.close()


def _fit(rows: _Rows, run_dirs: list[Path], entries: list[dict[int, _Entry]], space: FlatSpace,
         plan: list[tuple[ParamInfo, int]], theta_ref: torch.Tensor, ref_path: Path, ignore: str,
         name: str) -> Trajectory:
    """The two passes over the row buffer (see the module docstring) and the per-run paths."""
    m = rows.m
    # Pass 1: the Gram matrix in fp64 (the centred one is a difference of its entries, so it needs the digits).
    gram = torch.zeros(m, m, dtype=torch.float64)
    for _, xb in rows.blocks(double=True):
        gram.addmm_(xb, xb.T)
    g = gram.numpy()
    bad = ~np.isfinite(np.diag(g))
    if bad.any():
        files = {e.row: e.file for ents in entries for e in ents.values()}
        raise UserError(f"{files[int(np.argmax(bad))]} holds non-finite weights (nan or inf); a trajectory needs "
                        "finite checkpoints: move it out of the run folder")
    coef, lam2, total = _components(g)

    # Pass 2: the directions V = Xᵀ C. Each entry sums m terms, so fp32 is as exact as the fp32 rows;
    # everything summed over N (Vᵀ V, X V) comes from the fp64 Gram matrix instead: X V = G C.
    c32 = torch.from_numpy(np.ascontiguousarray(coef.T)).float()  # [2, m]
    v = torch.empty(2, rows.width, dtype=torch.float32)
    for a, xb in rows.blocks(double=False):
        v[:, a : a + xb.shape[1]] = c32 @ xb
    lo, hi = torch.aminmax(v, dim=1)
    sign = np.where(-lo.numpy() > hi.numpy(), -1.0, 1.0)  # scikit-learn >= 1.5: the largest |entry| is positive
    v *= torch.from_numpy(sign).float()[:, None]
    coef = coef * sign
    vtv = coef.T @ g @ coef  # ≈ I
    coords = np.linalg.solve(vtv, (g @ coef).T).T  # least squares x_i ≈ V a_i: a_i = (VᵀV)⁻¹ Vᵀ x_i

    directions = v  # ignore=none: every parameter takes part, in FlatSpace order
    if rows.width != space.numel:
        directions = torch.zeros(2, space.numel, dtype=torch.float32)
        for info, off in plan:
            directions[:, info.offset : info.offset + info.numel] = v[:, off : off + info.numel]
        del v
    cz = np.vstack([coords, np.zeros((1, 2))])  # row m: the reference itself, at (0, 0)
    gz = np.pad(g, ((0, 1), (0, 1)))

    paths = []
    for run, ents in zip(run_dirs, entries, strict=True):
        order = [ents[s] for s in sorted(ents)]
        idx = np.array([e.row if e.row >= 0 else m for e in order])
        xy = cz[idx]
        sq = gz[idx, idx] - np.einsum("ij,jk,ik->i", xy, vtv, xy)
        d2 = gz[idx[:-1], idx[:-1]] + gz[idx[1:], idx[1:]] - 2 * gz[idx[:-1], idx[1:]]
        span = gz[idx[0], idx[0]] + gz[idx[-1], idx[-1]] - 2 * gz[idx[0], idx[-1]]
        paths.append(RunPath(
            run=run, files=tuple(e.file for e in order), steps=np.array([e.step for e in order], dtype=np.int64),
            epochs=np.array([e.epoch for e in order], dtype=np.float64),
            epoch_end=np.array([e.epoch_end for e in order], dtype=bool), coords=xy,
            residual=np.sqrt(np.clip(sq, 0, None)), length=float(np.sqrt(np.clip(d2, 0, None)).sum()),
            distance=float(np.sqrt(max(span, 0.0)))))
    ratio = lam2 / total if total > 0 else np.zeros(2)
    return Trajectory(
        model=name, space=space, ignore=ignore, included=tuple(info.name for info, _ in plan), directions=directions,
        explained_variance_ratio=ratio, explained_variance=lam2 / max(m - 1, 1), singular_values=np.sqrt(lam2),
        paths=tuple(paths), theta_final=theta_ref, reference=ref_path, rows=m, storage=rows.storage)


# --- the surface on the PCA plane ----------------------------------------------------------------
MIN_ASPECT = 0.5  # the default grid's shorter side is at least this fraction of its longer one
ANIMATIONS = ("gif", "mp4", "none")


def default_range(traj: Trajectory, margin: float = 0.2) -> tuple[float, float, float, float]:
    """The grid around every path: ``traj.extent(margin)``, its shorter side widened (about its centre)
    to ``MIN_ASPECT`` of the longer one, since the 2nd component usually spans far less than the 1st and
    a sliver of a map would show nothing beside the path. The axes are orthonormal, so the picture
    keeps the path's true shape (equal aspect)."""
    if not (margin >= 0 and math.isfinite(margin)):
        raise UserError(f"margin must be a number >= 0, got {margin}")
    lo_x, hi_x, lo_y, hi_y = traj.extent(margin)
    sx, sy = hi_x - lo_x, hi_y - lo_y
    if sy < MIN_ASPECT * sx:
        c = (lo_y + hi_y) / 2
        lo_y, hi_y = c - MIN_ASPECT * sx / 2, c + MIN_ASPECT * sx / 2
    elif sx < MIN_ASPECT * sy:
        c = (lo_x + hi_x) / 2
        lo_x, hi_x = c - MIN_ASPECT * sy / 2, c + MIN_ASPECT * sy / 2
    return lo_x, hi_x, lo_y, hi_y


def run_data(run: str | Path) -> str:
    """The ``--data`` a run was trained on, from its ``config.json`` (``auto`` as it resolved then)."""
    run = Path(run)
    cfg = _config(run)
    if cfg is None or "data" not in cfg:
        raise UserError(f"{run} has no readable config.json naming its data, so the data it was trained on is unknown; "
                        "pass --data (cifar10, synthetic or imagefolder:PATH)")
    spec, source = str(cfg["data"]), cfg.get("data_source")
    if spec == "auto" and source in ("cifar10", "synthetic"):
        return str(source)
    if spec in ("auto", "cifar10", "synthetic") or spec.startswith("imagefolder:"):
        return spec
    raise UserError(f"{run} was trained on data given in Python ({spec}); pass the data to evaluate on "
                    "(--data, or data= in Python)")


def surface(runs: str | Path | Sequence[str | Path] | Trajectory, data: Any = None, loss_fn: Any = None, *,
            res: int | Sequence[int] = 51, range: Sequence[float] | None = None, margin: float = 0.2,  # noqa: A002
            ignore: str = "biasbn", split: str = "train", samples: int | str | None = None, sample_seed: int = 0,
            bn_mode: str = "eval", out: str | Path | None = None, device: str | torch.device | None = None,
            precision: str = "auto", batch_size: int = 128, engine: str = "batched", strategy: str = "auto",
            overwrite: bool = False, progress: bool = True, chunk: int | None = None,
            memory_budget: int | None = None) -> Any:
    """The loss surface on the PCA plane of ``runs`` (Li et al. Sec. 7), around the first run's final
    weights, with every run's path and the loss at each checkpoint; returns a ``fastland.Surface``.

    ``runs``: run folders (see ``pca``) or a ``Trajectory`` already fitted. ``data``: what
    ``fastland.surface`` takes, or a name (``"synthetic"``, ``"cifar10"``, ``"imagefolder:PATH"``)
    loaded with ``split``, ``samples`` (default 10,000 on CUDA, 256 on the CPU) and ``sample_seed``;
    None: what the first run was trained on. ``range``: ``(xmin, xmax, ymin, ymax)`` on the PCA
    axes (default ``default_range``: the paths' extent plus ``margin``). The directions are used as
    they are (not filter-normalized, as Li et al.). The rest is as ``fastland.surface``; with
    ``out`` the file resumes when called again, like any surface file.

    Besides the surface the result's ``extras`` hold, per run (see ``Trajectory.h5_fields``; the
    first run under Li et al.'s names): ``proj_xcoord``, ``proj_ycoord``, ``proj_step``,
    ``proj_epoch``, ``proj_epoch_end``, ``proj_residual``, ``proj_checkpoint``; ``proj_{split}_loss``
    (and ``_acc``): each checkpoint evaluated as it is (``fastland.evaluate``: its own biases and BN
    statistics); ``proj_plane_{split}_loss``: the loss at its projected point on the plane, which is
    what the surface shows there (the two agree for checkpoints on the plane); and
    ``explained_variance_ratio_``, ``pca_included``.
    """
    from fastland import api
    from fastland import data as data_mod

    traj = runs if isinstance(runs, Trajectory) else pca(runs, ignore=ignore, memory_budget=memory_budget,
                                                         progress=progress)
    dev = api.resolve_device(device)
    if data is None or isinstance(data, str):
        from fastland import surface as surface_cli

        if samples is None:
            samples = surface_cli.DEFAULT_CUDA_SAMPLES if dev.type == "cuda" else surface_cli.DEFAULT_CPU_SAMPLES
        evalset = data_mod.load(data or run_data(traj.paths[0].run), split, samples, seed=sample_seed, device=dev)
    else:
        evalset = data_mod.as_data(data, dev, batch_size=batch_size)
        split = evalset.split
    model, spec, meta = models.load_checkpoint(traj.reference, dev)
    old = _resumable(Path(out), traj, overwrite) if out is not None else None
    dirs = [{k: torch.as_tensor(v) for k, v in d.items()} for d in old.directions] if old else traj.named_directions()
    if range is None:
        a = old.attrs if old else {}
        range = (a["xmin"], a["xmax"], a["ymin"], a["ymax"]) if old else default_range(traj, margin)  # noqa: A001
    extras, attrs = traj.h5_fields()
    if old is None or f"proj_{split}_loss" not in old.extras:
        extras |= checkpoint_losses(traj, evalset, loss_fn, dirs, split=split, bn_mode=bn_mode, batch_size=batch_size,
                                    device=dev, progress=progress)
    attrs |= {"model": spec, "checkpoint": str(traj.reference), "checkpoint_sha256": models.sha256(traj.reference),
              "checkpoint_epoch": float(meta.get("epoch", -1)), "ignore": traj.ignore, "norm": "none"}
    return api.surface(model, evalset, loss_fn, directions=dirs, res=res, range=range, bn_mode=bn_mode, out=out,
                       device=dev, precision=precision, batch_size=batch_size, engine=engine, strategy=strategy,
                       overwrite=overwrite, progress=progress, chunk=chunk, attrs=attrs, extras=extras)


def _resumable(path: Path, traj: Trajectory, overwrite: bool) -> Any:
    """The existing trajectory surface at ``path`` that this call continues, or None (nothing to resume).

    A resumed file keeps its own directions and range: recomputed ones differ in the last bits
    when the thread count changed, and the surface's settings must match exactly. They must still
    be the same directions (to 1e-5), from the same runs and checkpoints; otherwise one line.
    """
    from fastland import surfacefile

    if overwrite or not path.is_file():
        return None
    try:
        old = surfacefile.read(path, directions=True)
    except UserError:
        return None  # not a surface file: fastland.surface says so
    a = old.attrs
    if a.get("direction") != "pca":
        return None  # another kind of surface: refused as other settings
    fix = "pass --overwrite (overwrite=True) to replace it or choose another --out"
    try:
        runs = json.loads(str(a.get("pca_runs", "[]")))
    except ValueError:
        runs = []
    if runs != [str(p.run.resolve()) for p in traj.paths] or a.get("pca_ignore") != traj.ignore:
        raise UserError(f"{path} holds the trajectory surface of other runs or another --ignore ({', '.join(runs)}; "
                        f"ignore {a.get('pca_ignore')}); {fix}")
    for k, p in enumerate(traj.paths):
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in old.extras.get(f"{run_prefix(k)}proj_checkpoint", [])]
        if names != [f.name for f in p.files]:
            raise UserError(f"{path} was made from other checkpoints of {p.run} ({len(names)} then, {len(p.files)} now); "
                            f"{fix}")
    want = traj.directions
    for k, d in enumerate(old.directions):
        got = torch.cat([torch.as_tensor(d[name]).reshape(-1).float() for name in traj.space.names])
        if got.shape != want[k].shape or float((got - want[k]).abs().max()) > 1e-5 * float(want[k].abs().max()):
            raise UserError(f"{path} holds a surface on other PCA directions (a checkpoint changed since it was made); {fix}")
    return old


def checkpoint_losses(traj: Trajectory, data: Any, loss_fn: Any = None, directions: Any = None, *, split: str = "train",
                      bn_mode: str = "eval", batch_size: int = 128, device: str | torch.device | None = None,
                      progress: bool = True) -> dict[str, np.ndarray]:
    """Each checkpoint's loss as it is (``proj_{split}_loss``, ``_acc``), and the loss at its projected
    point on the plane through the reference along ``directions`` (default the trajectory's), with the
    reference's other parameters and BN statistics (``proj_plane_{split}_loss``: what the surface
    shows there). Datasets named as in ``Trajectory.h5_fields``; ``fastland.evaluate`` throughout."""
    from fastland import api

    dev = api.resolve_device(device)
    work, _, _ = models.load_checkpoint(traj.reference, dev)
    final_state = {k: v.clone() for k, v in work.state_dict().items()}
    space = FlatSpace(work)
    if directions is None:
        dirs = traj.directions.to(dev)
    else:
        dirs = torch.stack([torch.cat([torch.as_tensor(d[n]).reshape(-1).float() for n in space.names])
                            for d in directions]).to(dev)
    theta = traj.theta_final.to(dev)
    out: dict[str, np.ndarray] = {}
    total = sum(2 * len(p.files) for p in traj.paths)
    bar = tqdm(total=total, desc="checkpoint losses", unit="eval", disable=None if progress else True, leave=False)
    try:
        for k, p in enumerate(traj.paths):
            pre = run_prefix(k)
            loss, acc, plane = (np.full(len(p.files), np.nan) for _ in range(3))
            for i, f in enumerate(p.files):
                models.load_state(work, models.read_checkpoint(f)["state_dict"], str(f))
                r = api.evaluate(work, data, loss_fn, bn_mode=bn_mode, batch_size=batch_size, device=dev)
                loss[i], acc[i] = r["loss"], r.get("accuracy", np.nan)
                bar.update()
            work.load_state_dict(final_state)
            for i, (a, b) in enumerate(p.coords):
                space.load_into(work, theta + float(a) * dirs[0] + float(b) * dirs[1])
                plane[i] = api.evaluate(work, data, loss_fn, bn_mode=bn_mode, batch_size=batch_size, device=dev)["loss"]
                bar.update()
            out |= {f"{pre}proj_{split}_loss": loss, f"{pre}proj_plane_{split}_loss": plane}
            if np.isfinite(acc).any():
                out[f"{pre}proj_{split}_acc"] = acc
    finally:
        bar.close()
    return out


def figure(runs: str | Path | Sequence[str | Path], out_png: str | Path, data: Any = None, *,
           surface_out: str | Path | None = None, res: int = 31, progress: bool = True, **options: Any) -> Path:
    """Li et al.'s Figure 9 for a report: the paths of ``runs`` (one run, or several with the same
    initial weights: each in its own colour) over the contour map of their PCA surface.

    The surface is computed into ``surface_out`` (default: ``out_png`` with ``.h5``), or resumed, or
    reused when complete; ``options`` go to ``surface`` (``samples``, ``device``, ``range``...).
    Returns the path of the picture.
    """
    from fastland.viz import trajectory as viz

    out_png = Path(out_png)
    s = surface(runs, data, res=res, out=Path(surface_out) if surface_out else out_png.with_suffix(".h5"),
                progress=progress, **options)
    return viz.path_png(s, out_png)


# --- the command line --------------------------------------------------------------------------
CLI_DOC = """\
Optimizer trajectories on the loss landscape (Li et al. 2018, Section 7).

The checkpoints a run saved (epoch_XXX.pt, step_XXXXXXX.pt from --save-every, final.pt) give
PCA directions: the top two principal components of θ_i − θ_final. The loss is evaluated on a
grid on that plane around the final weights, each checkpoint is evaluated as it is, and the
path is drawn over the surface: a contour map with a marker per epoch and axes labelled with
the explained variance (Li et al.'s Figure 9), a 3-D render with the path as a tube (needs
PyVista), and an animation of training with the loss curve beside it.

Several run folders that start from the same initial weights (the same --model and --seed,
e.g. Adam and SGD) share one basis and appear on one picture, each path in its own colour.
Biases and BN parameters (with --ignore biasbn) and BN running statistics stay at the final
weights' values on the plane, so the surface under a checkpoint's point differs from that
checkpoint's own loss unless it lies on the plane; the summary says how far each run strays.

    python -m fastland.train --model lenet --epochs 10 --save-every 50 --out runs/adam
    python -m fastland.trajectory runs/adam
    python -m fastland.trajectory runs/adam runs/sgd --res 41

The surface file (HDF5) is a fastland surface file, resumable like any other, that also holds
the paths under Li et al.'s names (proj_xcoord, proj_ycoord, explained_variance_ratio_...), so
their plot_2D.py reads it.
"""


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m fastland.trajectory`` options: the surface CLI's data, grid and evaluation groups."""
    from fastland import surface as surface_cli
    from fastland.directions import IGNORES

    p = ArgumentParser(prog="python -m fastland.trajectory", description=CLI_DOC,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR",
                   help="run folders written by python -m fastland.train (at least 3 checkpoints each); several "
                        "must start from the same initial weights and then share one PCA basis, centred on the "
                        "first one's final weights")
    g = p.add_argument_group("PCA")
    g.add_argument("--ignore", default="biasbn", choices=IGNORES,
                   help="biasbn (default, as Li et al.): biases and BN parameters (tensors with <= 1 dimension) take "
                        "no part in the PCA and stay at the final weights' values on the plane; none: every "
                        "parameter takes part")
    g.add_argument("--margin", type=float, default=0.2,
                   help="without --range, the grid spans the paths plus this fraction of their extent on each side "
                        "(default 0.2), its shorter side widened to half of the longer one")
    surface_cli.add_data_args(p, data_default=None,
                              data_help="cifar10, synthetic, auto or imagefolder:PATH (as python -m fastland.surface); "
                                        "default: what the first run was trained on (its config.json)")
    surface_cli.add_grid_args(p, "XMIN XMAX [YMIN YMAX] on the PCA axes (y defaults to x's range); default: the "
                                 "paths' extent plus --margin (Li et al. plot at the path's scale, not at ±1)")
    surface_cli.add_evaluation_args(p)
    g = surface_cli.add_output_args(p, "surface file (default surfaces/trajectory-RUNS-SPLITN-NXxNY.h5); the pictures "
                                       "go beside it: PREFIX_path.png (contour map and paths), PREFIX_path_3d.png "
                                       "(3-D, with PyVista) and PREFIX_path.gif (the animation)")
    g.add_argument("--animation", default="gif", choices=ANIMATIONS,
                   help="the animation of training: gif (default; Pillow), mp4 (needs ffmpeg) or none")
    return p


def _check_args(args: argparse.Namespace) -> None:
    """Bad options as one line, before any checkpoint is read."""
    from fastland import api
    from fastland import data as data_mod
    from fastland import surface as surface_cli

    nx = args.xres if args.xres is not None else args.res
    ny = args.yres if args.yres is not None else args.res
    for name, n in (("--res/--xres", nx), ("--res/--yres", ny)):
        if n < 2:
            raise UserError(f"{name} must be at least 2, got {n}")
    args.nx, args.ny = nx, ny
    if args.range is not None:
        if len(args.range) not in (2, 4):
            raise UserError(f"--range takes XMIN XMAX or XMIN XMAX YMIN YMAX, got {len(args.range)} numbers")
        api._grid(2, (nx, ny), args.range)  # finite, increasing
    if not (args.margin >= 0 and math.isfinite(args.margin)):
        raise UserError(f"--margin must be a number >= 0, got {args.margin}")
    surface_cli.check_evaluation_args(args)
    if args.data is not None:
        data_mod.check_spec(args.data)
    data_mod.parse_samples(args.samples)
    if args.animation == "mp4":
        from matplotlib import animation

        if not animation.FFMpegWriter.isAvailable():
            raise UserError("--animation mp4 needs ffmpeg, which is not installed; use --animation gif, or install "
                            "ffmpeg (apt-get install ffmpeg)")
    from fastland import files

    files.check_memory(nx * ny * 41, f"a {nx}x{ny} grid", "use a smaller --res")


def default_out(runs: Sequence[Path], split: str, samples: int, nx: int, ny: int) -> Path:
    """``surfaces/trajectory-RUNS-SPLITN-NXxNY.h5``, RUNS the run folders' names joined by ``+``."""
    from fastland.train import slug

    names = "+".join(slug(str(r)) for r in runs)
    if len(names) > 80:
        names = f"{names[:60]}+{len(runs) - 1}more"
    return Path("surfaces") / f"trajectory-{names}-{split}{samples}-{nx}x{ny}.h5"


def run(args: argparse.Namespace) -> Path:
    """The whole command: PCA, data, the surface (``surface``), pictures, summary."""
    from fastland import data as data_mod
    from fastland import device as device_mod
    from fastland import files
    from fastland import surface as surface_cli

    _check_args(args)
    runs = [Path(r) for r in args.runs]
    for r in runs:
        _candidates(r)  # a missing or unfinished folder: one line before anything else
    spec = args.data or run_data(runs[0])
    dev = device_mod.resolve(args.device)
    samples = args.samples if args.samples is not None else (
        surface_cli.DEFAULT_CUDA_SAMPLES if dev.type == "cuda" else surface_cli.DEFAULT_CPU_SAMPLES)
    if args.out is None:
        n = data_mod.parse_samples(samples)
        out = default_out(runs, args.split, n if n is not None else 0, args.nx, args.ny)
    else:
        out = Path(args.out)
    files.check_output_file(out)  # before the PCA and the evaluation
    traj = pca(runs, ignore=args.ignore)
    evalset = data_mod.load(spec, args.split, samples, seed=args.sample_seed, device=dev)
    if args.out is None and args.samples is None:
        out = default_out(runs, args.split, len(evalset), args.nx, args.ny)
    result = surface(traj, evalset, None if args.loss == "auto" else args.loss, res=(args.nx, args.ny),
                     range=args.range, margin=args.margin, bn_mode=args.bn_mode, out=out, device=dev,
                     precision=args.precision, batch_size=args.batch_size, engine=args.engine, strategy=args.strategy,
                     overwrite=args.overwrite, chunk=args.chunk)
    outputs = [] if args.no_render else render(result, out, args.animation)
    summary(traj, result, out, outputs)
    return out


def render(result: Any, path: Path, animation: str = "gif") -> list[Path]:
    """The trajectory pictures beside the surface file: ``_path.png``, ``_path_3d.png`` (PyVista; skipped,
    with a line saying so, without it) and ``_path.gif``/``.mp4``."""
    from fastland.viz import trajectory as viz

    prefix = str(path.with_suffix(""))
    outputs = [viz.path_png(result, prefix + "_path.png")]
    try:
        from fastland.viz import render as viz_render
    except ImportError:
        print("PyVista is not installed: the 3-D picture is skipped (install the viz extra: pip install -e .[viz])")
    else:
        outputs.append(viz_render.path_screenshot(result, prefix + "_path_3d.png"))
    if animation != "none":
        outputs.append(viz.animate(result, f"{prefix}_path.{animation}"))
    return outputs


def summary(traj: Trajectory, s: Any, path: Path, outputs: list[Path]) -> None:
    """A one-screen report: the PCA, each run's path (length, start to end, off the plane, loss), the grid."""
    from fastland import api

    a, ratio = s.attrs, traj.explained_variance_ratio
    split = s.split
    runs = f"{len(traj.paths)} runs on one PCA basis" if len(traj.paths) > 1 else "one run"
    lines = ["", f"trajectory  {path}  ({traj.model}; {runs}; {a.get('data_name', a.get('data_source'))} {split}, "
                 f"{a.get('samples')} samples; bn_mode {a.get('bn_mode')})",
             f"PCA         {traj.rows} difference vectors; 1st PC {100 * ratio[0]:.2f} %, 2nd PC {100 * ratio[1]:.2f} % "
             f"of the variance ({100 * ratio.sum():.2f} % together); {len(traj.included)} of {len(traj.space.names)} "
             f"parameter tensors take part (--ignore {traj.ignore})"]
    if a.get("data_warning"):
        lines.append(f"note        {a['data_warning']}")
    labels = json.loads(str(a.get("pca_labels", "[]"))) or traj.labels()
    width = max(len(t) for t in labels)
    lines.append(f"{'run':<{width + 2}}  points  length    start→end  off plane (max)     {split} loss first → last")
    for k, (p, label) in enumerate(zip(traj.paths, labels, strict=False)):
        loss = s.extras.get(f"{run_prefix(k)}proj_{split}_loss")
        first_last = f"{loss[0]:.4g} → {loss[-1]:.4g}" if loss is not None else "-"
        off = float(p.residual.max())
        share = f" ({100 * off / p.distance:.0f} % of it)" if p.distance > 0 else ""
        lines.append(f"  {label:<{width}}  {len(p.files):>6}  {p.length:<9.4g} {p.distance:<10.4g} "
                     f"{off:<.3g}{share:<13}  {first_last}")
    loss = np.where(s.done == 1, s.loss, np.nan)
    if np.isfinite(loss).any():
        j, i = divmod(int(np.nanargmin(np.where(np.isfinite(loss), loss, np.inf))), len(s.x))
        lines.append(f"surface     {len(s.x)}x{len(s.y)} grid on [{s.x[0]:.3g}, {s.x[-1]:.3g}] x [{s.y[0]:.3g}, "
                     f"{s.y[-1]:.3g}]; minimum loss {loss[j, i]:.4g} at ({s.x[i]:+.3g}, {s.y[j]:+.3g}); "
                     f"{int(s.done.sum()):,}/{s.done.size:,} points done")
    elapsed = float(a.get("last_run_seconds", 0.0))
    lines.append(f"time        {api.fmt_time(elapsed)} this run; {api.fmt_time(float(a.get('wall_time', elapsed)))} in total")
    lines += [f"wrote       {p}" for p in outputs]
    print("\n".join(lines))


@cli_entry
def main(argv: list[str] | None = None) -> None:
    run(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
