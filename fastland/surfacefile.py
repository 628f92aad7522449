"""The surface file (HDF5): Li et al.-compatible layout, written chunk by chunk.

Layout (see design.md): ``xcoordinates`` (and ``ycoordinates``), ``{split}_loss`` and
``{split}_acc`` of shape ``(ny, nx)`` (``(nx,)`` in 1-D) with entry ``[j, i]`` at
``(x_i, y_j)``, a ``done`` mask, the directions actually used in groups ``xdirection``
(and ``ydirection``), and provenance attributes.

Crash safety: every dataset is allocated in full when the file is created, so a chunk
write afterwards only touches raw data, never HDF5 metadata. Losses are written and
flushed before their ``done`` flags, so a kill at any moment loses at most the chunk in
flight and never marks an unwritten point as done.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from fastland.errors import UserError

# Attributes that define a surface: a resumed run must match all of them.
SETTINGS = (
    "model", "checkpoint_sha256", "data_source", "split", "samples", "sample_seed",
    "dim", "xmin", "xmax", "nx", "ymin", "ymax", "ny", "direction", "direction_seed",
    "norm", "ignore", "bn_mode", "bn_batch", "precision", "engine",
)


@dataclass
class Surface:
    """A surface file read into memory."""

    path: Path
    x: np.ndarray
    y: np.ndarray | None
    loss: np.ndarray
    acc: np.ndarray
    done: np.ndarray
    attrs: dict[str, Any]

    @property
    def dim(self) -> int:
        return 1 if self.y is None else 2

    @property
    def split(self) -> str:
        return str(self.attrs.get("split", "train"))


def _norm(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.generic):
        return v.item()
    return v


def _plain(v: Any) -> Any:
    """h5py stores only plain str (not str subclasses such as torch's version string)."""
    return str(v) if isinstance(v, str) else v


def create(path: Path, x: np.ndarray, y: np.ndarray | None, directions: list[dict[str, np.ndarray]],
           attrs: dict[str, Any]) -> None:
    """Create a fresh surface file with every dataset allocated (NaN losses, done=0)."""
    shape = (len(x),) if y is None else (len(y), len(x))
    split = attrs["split"]
    tmp = path.with_suffix(path.suffix + ".tmp")
    with h5py.File(tmp, "w") as f:
        f.create_dataset("xcoordinates", data=np.asarray(x, dtype=np.float64))
        if y is not None:
            f.create_dataset("ycoordinates", data=np.asarray(y, dtype=np.float64))
        nan = np.full(shape, np.nan, dtype=np.float64)
        f.create_dataset(f"{split}_loss", data=nan)
        f.create_dataset(f"{split}_acc", data=nan)
        f.create_dataset("done", data=np.zeros(shape, dtype=np.uint8))
        for group, tensors in zip(("xdirection", "ydirection"), directions, strict=False):
            g = f.create_group(group)
            for name, value in tensors.items():
                g.create_dataset(name, data=value)
        for k, v in attrs.items():
            f.attrs[k] = _plain(v)
    tmp.replace(path)  # the file appears complete or not at all


def settings_of(path: Path) -> dict[str, Any]:
    try:
        with h5py.File(path, "r") as f:
            return {k: _norm(v) for k, v in f.attrs.items()}
    except OSError as err:
        raise UserError(f"{path} exists but is not a readable surface file ({err}); pass --overwrite to replace it") from None


def mismatches(existing: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """Names of the settings in which an existing file differs from the command."""
    out = []
    for key in SETTINGS:
        a, b = existing.get(key), _norm(wanted.get(key))
        if isinstance(a, float) or isinstance(b, float):
            same = a is not None and b is not None and float(a) == float(b)
        else:
            same = a == b
        if not same:
            out.append(f"{key}: file has {a!r}, command wants {b!r}")
    return out


class Writer:
    """Appends finished chunks to an existing surface file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.f = h5py.File(path, "r+")
        split = _norm(self.f.attrs["split"])
        self.loss = self.f[f"{split}_loss"]
        self.acc = self.f[f"{split}_acc"]
        self.done = self.f["done"]
        self.shape = self.done.shape

    def pending(self) -> np.ndarray:
        """Flat indices (row-major over ``done``) of the points not yet evaluated."""
        return np.flatnonzero(self.done[...].reshape(-1) == 0)

    def write(self, flat_idx: np.ndarray, loss: np.ndarray, acc: np.ndarray) -> None:
        """Store one chunk: values first, flushed; then their done flags, flushed."""
        order = np.argsort(flat_idx)
        flat_idx, loss, acc = flat_idx[order], loss[order], acc[order]
        # Chunks are runs of consecutive indices in practice; write each run as a slice.
        breaks = np.flatnonzero(np.diff(flat_idx) != 1) + 1
        runs = np.split(np.arange(len(flat_idx)), breaks)
        for name, values in ((self.loss, loss), (self.acc, acc)):
            flat = name  # h5py dataset
            for r in runs:
                self._put(flat, flat_idx[r[0]], values[r])
        self.f.flush()
        for r in runs:
            self._put(self.done, flat_idx[r[0]], np.ones(len(r), dtype=np.uint8))
        self.f.flush()

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

    def finish(self, attrs: dict[str, Any]) -> None:
        for k, v in attrs.items():
            self.f.attrs[k] = _plain(v)
        self.close()

    def close(self) -> None:
        if self.f.id.valid:
            self.f.close()


def read(path: str | Path) -> Surface:
    """Read a surface file; a clear error if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"surface file {path} does not exist")
    try:
        with h5py.File(path, "r") as f:
            attrs = {k: _norm(v) for k, v in f.attrs.items()}
            split = attrs.get("split", "train")
            x = f["xcoordinates"][...]
            y = f["ycoordinates"][...] if "ycoordinates" in f else None
            loss = f[f"{split}_loss"][...]
            acc = f[f"{split}_acc"][...]
            done = f["done"][...] if "done" in f else np.ones(loss.shape, dtype=np.uint8)
    except (OSError, KeyError) as err:
        raise UserError(f"{path} is not a fastland surface file ({err})") from None
    return Surface(path, x, y, loss, acc, done, attrs)


def settings_of_open(f: h5py.File) -> dict[str, Any]:
    """Attributes of an already open file."""
    return {k: _norm(v) for k, v in f.attrs.items()}
