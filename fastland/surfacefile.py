"""The surface file (HDF5): Li et al.-compatible layout, written chunk by chunk.

Layout (see design.md): ``xcoordinates`` (and ``ycoordinates``), ``{split}_loss`` and, for
classification, ``{split}_acc`` of shape ``(ny, nx)`` (``(nx,)`` in 1-D) with entry ``[j, i]`` at
``(x_i, y_j)``, a ``done`` mask, the directions actually used in groups ``xdirection`` (and
``ydirection``), any extra datasets of the caller (a trajectory's ``proj_xcoord``, ...), and
provenance attributes.

Crash safety: every dataset is allocated in full when the file is created (written in row
slabs, so memory stays small), so a chunk write afterwards only touches raw data, never HDF5
metadata. Losses are written and flushed before their ``done`` flags, so a kill at any moment
loses at most the chunk in flight and never marks an unwritten point as done. One process
writes a file at a time (``fastland.files.WriteLock``); readers open it without HDF5's file
lock, so a file can be looked at while it is being written.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from fastland import errors, files
from fastland.errors import UserError, one_line

# Attributes that define a surface: a resumed run must match all of them.
SETTINGS = (
    "model", "model_sha256", "checkpoint_sha256", "data_source", "data_sha256", "split", "samples", "sample_seed",
    "loss", "dim", "xmin", "xmax", "nx", "ymin", "ymax", "ny", "direction", "direction_seed",
    "interpolation_target_sha256", "directions_sha256", "norm", "ignore", "bn_stats", "bn_mode", "bn_batch", "precision", "engine",
    "data_mean", "data_std",  # the inputs' normalization (an image folder's comes from its train/ split)
)
ROW_SLAB = 1 << 20  # values per write when filling a new dataset


@dataclass
class Surface:
    """A surface: coordinates, the loss, the metrics, and how it was made.

    ``loss`` is ``[len(y), len(x)]`` (``[len(x)]`` in 1-D); ``metrics`` maps a name
    (``"accuracy"``, in %) to an array of the same shape, and is empty when the loss has no
    accuracy; ``done`` marks evaluated points; ``directions`` holds one ``{parameter name:
    tensor}`` per axis when they were read; ``path`` is the HDF5 file (None when not saved).
    """

    x: np.ndarray
    y: np.ndarray | None
    loss: np.ndarray
    metrics: dict[str, np.ndarray]
    done: np.ndarray
    attrs: dict[str, Any]
    path: Path | None = None
    directions: list[dict[str, Any]] = field(default_factory=list)
    extras: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return 1 if self.y is None else 2

    @property
    def split(self) -> str:
        return str(self.attrs.get("split", "train"))

    @property
    def acc(self) -> np.ndarray | None:
        """Accuracy (%) per point, or None when the loss has no accuracy."""
        return self.metrics.get("accuracy")

    def __repr__(self) -> str:
        shape = "x".join(str(s) for s in self.loss.shape)
        where = f", path={str(self.path)!r}" if self.path else ""
        return f"Surface({self.attrs.get('model', '?')}, {shape}, loss={self.attrs.get('loss', '?')}{where})"


def _norm(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return v


def _plain(v: Any) -> Any:
    """h5py stores plain str (not str subclasses such as torch's version string), numbers and
    numeric lists; anything else goes in as JSON."""
    if isinstance(v, str):
        return str(v)
    if isinstance(v, bool | int | float | np.generic):
        return v
    if isinstance(v, list | tuple) and all(isinstance(e, int | float) for e in v) and v:
        return np.asarray(v)
    return json.dumps(v)


def _fill(dset: h5py.Dataset, value: float) -> None:
    flat = int(np.prod(dset.shape))
    rows = dset.shape[0]
    per_row = flat // rows if rows else 1
    step = max(1, ROW_SLAB // max(1, per_row))
    for r in range(0, rows, step):
        n = min(step, rows - r)
        dset[r : r + n] = np.full((n, *dset.shape[1:]), value, dtype=dset.dtype)


def size_estimate(nx: int, ny: int, metrics: int, numel: int, dims: int) -> int:
    """Bytes of a new surface file: the grids (loss, metrics: fp64; done: uint8) and the directions."""
    return nx * ny * (8 * (1 + metrics) + 1) + dims * numel * 4 + (1 << 16)


def _write_failure(err: BaseException, path: Path) -> UserError | None:
    """One line for a failed write of ``path``: a file-system error (a full disk: HDF5 raises a
    RuntimeError that names the errno) or an ``OSError`` from h5py; None for anything else (a bug)."""
    failure = errors.write_error(err, path)
    if failure is None and isinstance(err, OSError):
        failure = UserError(f"cannot write {path}: {one_line(err)[:300]}")
    return failure


def create(path: Path, x: np.ndarray, y: np.ndarray | None, directions: list[dict[str, np.ndarray]],
           attrs: dict[str, Any], accuracy: bool = True, extras: dict[str, np.ndarray] | None = None) -> None:
    """Create a fresh surface file with every dataset allocated (NaN values, done=0).

    It is written under a temporary name and renamed when complete; on a failure (a full disk)
    the temporary file is removed and one line names ``path``."""
    shape = (len(x),) if y is None else (len(y), len(x))
    split = attrs["split"]
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    failure: UserError | None = None
    try:
        with errors.quiet_h5py_dealloc(), h5py.File(tmp, "w") as f:
            f.create_dataset("xcoordinates", data=np.asarray(x, dtype=np.float64))
            if y is not None:
                f.create_dataset("ycoordinates", data=np.asarray(y, dtype=np.float64))
            for name in (f"{split}_loss", *([f"{split}_acc"] if accuracy else [])):
                _fill(f.create_dataset(name, shape=shape, dtype=np.float64), np.nan)
            _fill(f.create_dataset("done", shape=shape, dtype=np.uint8), 0)
            for group, tensors in zip(("xdirection", "ydirection"), directions, strict=False):
                g = f.create_group(group)
                for name, value in tensors.items():
                    g.create_dataset(name, data=value)
            for name, value in (extras or {}).items():
                f.create_dataset(name, data=value)
            for k, v in attrs.items():
                f.attrs[k] = _plain(v)
        tmp.replace(path)  # the file appears complete or not at all
    except (OSError, RuntimeError) as err:
        failure = _write_failure(err, path)
        if failure is None:
            files.discard(tmp)
            raise
    except BaseException:
        files.discard(tmp)
        raise
    if failure is not None:
        with errors.quiet_h5py_dealloc():
            f = None  # noqa: F841 - the failed file's objects go now, while their complaints are muted
        files.discard(tmp)
        raise failure


def _open(path: Path, mode: str = "r") -> h5py.File:
    try:
        return h5py.File(path, mode, locking=False)
    except OSError as err:
        raise UserError(f"{path} is not a readable HDF5 file ({one_line(err)}); pass --overwrite to replace it or "
                        "choose another --out") from None


def settings_of(path: Path) -> dict[str, Any]:
    with _open(path) as f:
        return {k: _norm(v) for k, v in f.attrs.items()}


def check_structure(path: Path, shape: tuple[int, ...], split: str, accuracy: bool) -> None:
    """A file to resume must hold the datasets of a surface of ``shape``; one line otherwise."""
    with _open(path) as f:
        want = [f"{split}_loss", "done", *([f"{split}_acc"] if accuracy else [])]
        missing = [n for n in want if n not in f]
        if missing:
            raise UserError(f"{path} lacks {', '.join(missing)}: it is not a complete fastland surface file; pass "
                            "--overwrite to replace it or choose another --out")
        for n in want:
            if tuple(f[n].shape) != shape:
                raise UserError(f"{path}: {n} has shape {tuple(f[n].shape)} but this command's grid is {shape}; "
                                "pass --overwrite to replace it or choose another --out")


def mismatches(existing: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """Names of the settings in which an existing file differs from the command."""
    out = []
    for key in SETTINGS:
        a, b = existing.get(key), _norm(_plain(wanted.get(key))) if wanted.get(key) is not None else None
        if a is None and b is None:
            continue
        if isinstance(a, float) or isinstance(b, float):
            try:
                same = a is not None and b is not None and float(a) == float(b)
            except (TypeError, ValueError):
                same = False
        else:
            same = a == b
        if not same:
            out.append(f"{key}: file has {a!r}, command wants {b!r}")
    return out


class Writer:
    """Appends finished chunks to an existing surface file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        files.discard_stale(path.parent, path.name)  # what a killed creation left (the caller holds the lock)
        self.f = _open(path, "r+")
        split = _norm(self.f.attrs["split"])
        self.loss = self.f[f"{split}_loss"]
        self.acc = self.f.get(f"{split}_acc")
        self.done = self.f["done"]
        self.shape = self.done.shape

    def pending(self) -> np.ndarray:
        """Flat indices (row-major over ``done``) of the points not yet evaluated."""
        return np.flatnonzero(self.done[...].reshape(-1) == 0)

    def write(self, flat_idx: np.ndarray, loss: np.ndarray, acc: np.ndarray | None = None) -> None:
        """Store one chunk: values first, flushed; then their done flags, flushed."""
        order = np.argsort(flat_idx)
        flat_idx, loss = flat_idx[order], loss[order]
        # Chunks are runs of consecutive indices in practice; write each run as a slice.
        breaks = np.flatnonzero(np.diff(flat_idx) != 1) + 1
        runs = np.split(np.arange(len(flat_idx)), breaks)
        pairs = [(self.loss, loss)]
        if self.acc is not None and acc is not None:
            pairs.append((self.acc, acc[order]))
        try:
            for dset, values in pairs:
                for r in runs:
                    self._put(dset, flat_idx[r[0]], values[r])
            self.f.flush()
            for r in runs:
                self._put(self.done, flat_idx[r[0]], np.ones(len(r), dtype=np.uint8))
            self.f.flush()
        except (OSError, RuntimeError) as err:
            failure = _write_failure(err, self.path)
            if failure is None:
                raise
        else:
            return
        self.close()  # the points flushed before stay done; this chunk is evaluated again on resume
        raise failure

    def _put(self, dset: h5py.Dataset, start: int, values: np.ndarray) -> None:
        # A run of flat indices may span rows of a 2-D dataset: write row by row.
        if dset.ndim == 1:
            dset[start : start + len(values)] = values
            return
        nx = dset.shape[1]
        pos = 0
        while pos < len(values):
            j, i = divmod(start + pos, nx)
            take = min(nx - i, len(values) - pos)
            dset[j, i : i + take] = values[pos : pos + take]
            pos += take

    def attrs(self) -> dict[str, Any]:
        """The file's attributes ({} once a failed write has closed it)."""
        return {k: _norm(v) for k, v in self.f.attrs.items()} if self.f.id.valid else {}

    def finish(self, attrs: dict[str, Any]) -> None:
        """Record the run's timing attributes and close. They are bookkeeping: when they cannot be
        written (a full disk), a warning says so and the values, already flushed, stand."""
        try:
            if self.f.id.valid:
                for k, v in attrs.items():
                    self.f.attrs[k] = _plain(v)
        except (OSError, RuntimeError) as err:
            failure = _write_failure(err, self.path)
            if failure is None:
                raise
            import warnings

            warnings.warn(f"{failure} (the run's timing attributes are not recorded; its values are)", stacklevel=2)
        finally:
            self.close()

    def close(self) -> None:
        """Close the file; a failure here (a full disk) loses nothing: values and done flags were flushed
        chunk by chunk."""
        with errors.quiet_h5py_dealloc():
            if self.f.id.valid:
                try:
                    self.f.close()
                except (OSError, RuntimeError):
                    pass


def read(path: str | Path, directions: bool = False) -> Surface:
    """Read a surface file (with its directions as tensors when asked); a clear error if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"surface file {path} does not exist")
    try:
        with h5py.File(path, "r", locking=False) as f:
            attrs = {k: _norm(v) for k, v in f.attrs.items()}
            split = attrs.get("split", "train")
            x = f["xcoordinates"][...]
            y = f["ycoordinates"][...] if "ycoordinates" in f else None
            loss = f[f"{split}_loss"][...]
            metrics = {"accuracy": f[f"{split}_acc"][...]} if f"{split}_acc" in f else {}
            done = f["done"][...] if "done" in f else np.ones(loss.shape, dtype=np.uint8)
            dirs = []
            if directions:
                import torch

                for g in ("xdirection", "ydirection"):
                    if g in f:
                        dirs.append({k: torch.from_numpy(v[...]) for k, v in f[g].items()})
            known = {"xcoordinates", "ycoordinates", f"{split}_loss", f"{split}_acc", "done", "xdirection", "ydirection"}
            extras = {k: f[k][...] for k in f if k not in known and isinstance(f[k], h5py.Dataset)}
    except (OSError, KeyError) as err:
        from fastland.files import is_locked

        still = " (it is still being written and not yet complete)" if is_locked(path) else ""
        raise UserError(f"{path} is not a fastland surface file{still} ({type(err).__name__}: {one_line(err)})") from None
    return Surface(x, y, loss, metrics, done, attrs, path, dirs, extras)
