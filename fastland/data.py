"""Evaluation and training data: any tensors, Dataset or DataLoader, cached on the device when it fits.

Two shapes of data set, with one protocol (``len``, ``device``, ``batches``, ``attrs``):

- ``EvalSet``: inputs and targets held as tensors on the device, read in fixed consecutive
  batches. Images may be stored as uint8 and normalized per batch on the device (CIFAR-10,
  ImageFolder, the synthetic set); other inputs (features, token ids) are used as they are.
- ``StreamedSet``: a DataLoader read again on every pass, for data that does not fit.

``as_data(data, device)`` turns what a user passes to the API (an ``(inputs, targets)``
pair, a ``Dataset``, a ``DataLoader`` or an ``EvalSet``) into one of them; ``load(spec, ...)``
is the CLI's way in: ``cifar10`` (torchvision, checksum-verified), ``synthetic`` (a
deterministic, learnable CIFAR-shaped stand-in), ``auto`` (CIFAR-10, else synthetic with a
warning) and ``imagefolder:PATH`` (a torchvision ImageFolder tree with ``train/`` and ``test/``,
or a ``.tar.gz`` of one; decoded once and cached; normalization statistics from its training split).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import socket
import tarfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, RandomSampler

from fastland import files
from fastland.compat import import_torchvision
from fastland.device import free_memory
from fastland.errors import UserError, one_line

SOURCES = ("auto", "cifar10", "synthetic", "imagefolder:PATH")
SPLITS = ("train", "test")
SPLIT_SIZE = {"train": 50_000, "test": 10_000}
NUM_CLASSES = 10
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
SYNTHETIC_WARNING = "CIFAR-10 unavailable: synthetic data used instead"
CACHE_FRACTION = 0.25  # of free device memory: data up to this size is cached on the device
CIFAR_JPEG_NAME = "CIFAR-10 (JPEG copy)"
CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def default_root() -> Path:
    """Where CIFAR-10 lives: ``$FASTLAND_DATA`` or ``./data``. (``$FASTLAND_OFFLINE=1`` skips downloads.)"""
    return Path(os.environ.get("FASTLAND_DATA", "data"))


def cache_dir() -> Path:
    """Where decoded image folders are cached: ``$FASTLAND_CACHE`` or ``$XDG_CACHE_HOME/fastland``."""
    if os.environ.get("FASTLAND_CACHE"):
        return Path(os.environ["FASTLAND_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fastland"


@dataclass
class EvalSet:
    """A fixed data set on one device, with its provenance.

    ``inputs`` are stored as given; when ``mean``/``std`` are set they are uint8 images
    ``[N, C, H, W]`` normalized per batch on the device (``prepare``). ``targets`` are class
    indices, regression targets or anything the loss takes.
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    source: str
    split: str = "train"
    sample_seed: int = 0
    mean: torch.Tensor | None = None
    std: torch.Tensor | None = None
    warning: str | None = None
    name: str = ""  # how reports name the data, e.g. "CIFAR-10 (JPEG copy)"

    cached = True

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    @property
    def device(self) -> torch.device:
        return self.inputs.device

    def to(self, device: torch.device | str) -> EvalSet:
        dev = torch.device(device)
        if dev == self.device:
            return self
        return dataclasses.replace(self, inputs=self.inputs.to(dev), targets=self.targets.to(dev),
                                   mean=None if self.mean is None else self.mean.to(dev),
                                   std=None if self.std is None else self.std.to(dev))

    def prepare(self, inputs: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Stored inputs -> what the model takes: normalized images, floats in ``dtype``, integers as they are."""
        if self.mean is not None and self.std is not None:
            shape = (1, -1) + (1,) * (inputs.dim() - 2)
            scale = (1.0 / (255.0 * self.std)).to(dtype).view(shape)
            shift = (self.mean / self.std).to(dtype).view(shape)
            return inputs.to(dtype) * scale - shift
        return inputs.to(dtype) if inputs.is_floating_point() else inputs

    def take(self, index: torch.Tensor, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """The prepared samples at ``index`` (a training minibatch)."""
        return self.prepare(self.inputs[index], dtype), self.targets[index]

    def batch(self, start: int, stop: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        return self.prepare(self.inputs[start:stop], dtype), self.targets[start:stop]

    def batches(self, batch_size: int, dtype: torch.dtype = torch.float32) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Consecutive batches in a fixed order (the last one may be short)."""
        for start in range(0, len(self), batch_size):
            yield self.batch(start, min(start + batch_size, len(self)), dtype)

    def sample(self, n: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``n`` prepared samples: enough to run the model once and check the loss."""
        return self.batch(0, min(n, len(self)))

    @functools.cached_property
    def fingerprint(self) -> str:
        """sha256 of the stored inputs and targets: a resumed surface must use the same data."""
        h = hashlib.sha256()
        for t in (self.inputs, self.targets):
            a = t.detach().cpu().contiguous()
            h.update(str((tuple(a.shape), str(a.dtype))).encode())
            h.update(a.reshape(-1).view(torch.uint8).numpy().tobytes() if a.numel() else b"")
        return h.hexdigest()

    def attrs(self) -> dict[str, object]:
        """Provenance for output files."""
        out: dict[str, object] = {
            "data_source": self.source, "data_name": self.name or self.source, "split": self.split,
            "samples": len(self), "sample_seed": self.sample_seed, "data_warning": self.warning or "",
            "data_sha256": self.fingerprint, "data_cached": "device",
        }
        if self.mean is not None and self.std is not None:
            out["data_mean"] = [float(v) for v in self.mean.cpu()]
            out["data_std"] = [float(v) for v in self.std.cpu()]
        return out

    def describe(self) -> str:
        if self.source in ("tensors", "dataset", "dataloader"):
            return f"{len(self):,} samples ({self.source}), cached on {self.device.type}"
        return f"{len(self):,} {self.name or self.source} {self.split} samples, cached on {self.device.type}"


class StreamedSet:
    """A DataLoader read again on every pass, each batch moved to ``device``: for data that
    does not fit on the device. Its batches are the loader's, in the loader's order."""

    cached = False

    def __init__(self, loader: DataLoader, device: torch.device, source: str, length: int) -> None:
        self.loader, self._device, self.source, self._len = loader, device, source, length
        self.split, self.sample_seed, self.warning, self.name = "train", 0, None, source
        self.batch_size = loader.batch_size

    def __len__(self) -> int:
        return self._len

    @property
    def device(self) -> torch.device:
        return self._device

    def batches(self, batch_size: int | None = None, dtype: torch.dtype = torch.float32
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y in _pairs(self.loader):
            x = x.to(self._device, non_blocking=True)
            yield (x.to(dtype) if x.is_floating_point() else x), y.to(self._device, non_blocking=True)

    def sample(self, n: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = next(iter(self.batches()))
        return x[:n], y[:n]

    @functools.cached_property
    def fingerprint(self) -> str:
        """sha256 of the length and the first batch only (a full pass would cost as much as a grid point)."""
        x, y = next(iter(_pairs(self.loader)))
        h = hashlib.sha256(str(self._len).encode())
        for t in (x, y):
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def attrs(self) -> dict[str, object]:
        return {"data_source": self.source, "data_name": self.name, "split": self.split, "samples": len(self),
                "sample_seed": self.sample_seed, "data_warning": "", "data_sha256": self.fingerprint,
                "data_cached": "streamed"}

    def describe(self) -> str:
        return f"{len(self):,} samples streamed from a DataLoader (batch {self.batch_size}), too large to cache on " \
               f"{self._device.type}"


Data = EvalSet | StreamedSet


# --- the API's adapter ---------------------------------------------------------------------
def _pairs(loader: Any) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for item in loader:
        if not (isinstance(item, list | tuple) and len(item) == 2):
            raise UserError("data must yield (inputs, targets) pairs; got "
                            f"{type(item).__name__}{f' of {len(item)}' if isinstance(item, list | tuple) else ''}; "
                            "wrap your Dataset so that it returns (input, target)")
        x, y = item
        if not isinstance(x, torch.Tensor):
            raise UserError(f"data inputs must be tensors, got {type(x).__name__}; add a ToTensor-like transform")
        yield x, torch.as_tensor(y)


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def as_data(data: Any, device: torch.device | str, cache: bool | str = "auto", batch_size: int = 256) -> Data:
    """What the API accepts as ``data``, on ``device``: see the module docstring.

    ``cache='auto'`` caches on the device when the data take at most ``CACHE_FRACTION`` of its
    free memory and streams otherwise; ``True``/``False`` force one. A Dataset is read with
    ``batch_size`` (and a DataLoader with its own batches).
    """
    dev = torch.device(device)
    if cache not in ("auto", True, False):
        raise UserError(f"cache must be 'auto', True or False, not {cache!r}")
    if isinstance(data, EvalSet | StreamedSet):
        if isinstance(data, EvalSet):
            _check_nonempty(len(data))
            return data.to(dev)
        return data
    if isinstance(data, list | tuple) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        x, y = data
        if x.shape[0] != y.shape[0]:
            raise UserError(f"inputs and targets differ in length: {x.shape[0]} inputs, {y.shape[0]} targets")
        _check_nonempty(x.shape[0])
        return EvalSet(x.to(dev), y.to(dev), "tensors", name="tensors")
    if isinstance(data, DataLoader):
        loader, source = data, "dataloader"
    elif isinstance(data, Dataset | IterableDataset):
        loader, source = DataLoader(data, batch_size=batch_size, shuffle=False), "dataset"
    else:
        raise UserError(f"data must be an (inputs, targets) pair of tensors, a Dataset or a DataLoader, not "
                        f"{type(data).__name__}")
    length = _length(loader)
    _check_nonempty(length)
    if isinstance(getattr(loader, "sampler", None), RandomSampler):
        warnings.warn("the DataLoader shuffles: fastland reads it in its own order each pass, which changes nothing in "
                      "eval mode but gives other BN batches each pass in bn_mode='batch'; pass shuffle=False",
                      stacklevel=2)
    first_x, first_y = next(_pairs(loader))
    per_sample = _nbytes(first_x, first_y) / max(1, first_x.shape[0])
    fits = per_sample * length <= CACHE_FRACTION * free_memory(dev)
    if cache is True or (cache == "auto" and fits):
        xs, ys = zip(*_pairs(loader), strict=True)
        return EvalSet(torch.cat(xs).to(dev), torch.cat(ys).to(dev), source, name=source)
    return StreamedSet(loader, dev, source, length)


def _length(loader: DataLoader) -> int:
    try:
        return len(loader.dataset)  # type: ignore[arg-type]
    except TypeError:
        return sum(int(x.shape[0]) for x, _ in _pairs(loader))  # an IterableDataset: count once


def _check_nonempty(n: int) -> None:
    if n == 0:
        raise UserError("the data set is empty: nothing to evaluate; pass at least one sample")


# --- the CLI's data sets -------------------------------------------------------------------
def parse_samples(value: str | int | None, option: str = "--samples") -> int | None:
    """``'all'``/None -> None (the whole split); otherwise a positive int."""
    if value is None or (isinstance(value, str) and value.lower() == "all"):
        return None
    try:
        n = int(value)
    except ValueError:
        raise UserError(f"{option} must be a positive number or 'all', got {value!r}") from None
    if n <= 0:
        raise UserError(f"{option} must be at least 1, got {n}")
    return n


def check_spec(data: str) -> None:
    """Reject an unknown ``--data`` early, with the choices."""
    if data in ("auto", "cifar10", "synthetic") or data.startswith("imagefolder:"):
        if data == "imagefolder:":
            raise UserError("--data imagefolder: needs a path, e.g. --data imagefolder:/data/cifar10-jpeg")
        return
    raise UserError(f"unknown --data {data!r}; use auto, cifar10, synthetic or imagefolder:PATH")


def load(
    data: str = "auto",
    split: str = "train",
    samples: int | str | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    root: str | Path | None = None,
    download: bool = True,
    samples_option: str = "--samples",
) -> EvalSet:
    """Load a split of a named data set as an ``EvalSet`` on ``device``.

    ``samples`` picks a fixed subset with a seeded permutation (the same on every device);
    ``data='auto'`` falls back to synthetic data with a warning when CIFAR-10 is neither
    present nor downloadable.
    """
    check_spec(data)
    if split not in SPLITS:
        raise UserError(f"unknown --split {split!r}; use train or test")
    n_wanted = parse_samples(samples, samples_option)
    warning = None
    mean = std = None
    if data.startswith("imagefolder:"):
        folder = ImageFolderData.open(data.split(":", 1)[1])
        return folder.evalset(split, n_wanted, seed, torch.device(device), samples_option)
    root = Path(root) if root is not None else default_root()
    download = download and not os.environ.get("FASTLAND_OFFLINE")  # FASTLAND_OFFLINE=1: never try the network
    if data == "synthetic":
        inputs, targets, source = *synthetic(split), "synthetic"
    else:
        try:
            inputs, targets = cifar10(root, split, download)
            source = "cifar10"
        except UserError:
            if data == "cifar10":
                raise
            warning = SYNTHETIC_WARNING
            warnings.warn(f"{warning} (put cifar-10-python.tar.gz in {root}/ to use the real data)", stacklevel=2)
            inputs, targets, source = *synthetic(split), "synthetic"
    idx = _subset(targets.shape[0], n_wanted, seed, split, samples_option)
    if idx is not None:
        inputs, targets = inputs[idx], targets[idx]
    if source == "cifar10":
        mean, std = torch.tensor(CIFAR_MEAN), torch.tensor(CIFAR_STD)
    else:
        mean, std = synthetic_stats()
    dev = torch.device(device)
    name = "CIFAR-10" if source == "cifar10" else "synthetic CIFAR-shaped data"
    return EvalSet(inputs.contiguous().to(dev), targets.to(dev), source, split, int(seed), mean.to(dev), std.to(dev),
                   warning, name)


def _subset(total: int, n_wanted: int | None, seed: int, split: str, option: str) -> torch.Tensor | None:
    """The seeded subset of ``n_wanted`` indices (None: all)."""
    if n_wanted is None:
        return None
    if n_wanted > total:
        raise UserError(f"{option} {n_wanted} is more than the {split} split has ({total}); use at most {total} or 'all'")
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randperm(total, generator=gen)[:n_wanted]


# --- ImageFolder -------------------------------------------------------------------------
class ImageFolderData:
    """A torchvision ImageFolder tree ``PATH/{train,test}/<class>/<image>`` (or a ``.tar.gz`` of
    one), decoded once to uint8 arrays in ``cache_dir()``; all images must have one size.
    Normalization statistics are the per-channel mean and std of the decoded training split."""

    def __init__(self, root: Path, label: str) -> None:
        self.root, self.label = root, label

    @classmethod
    def open(cls, path: str) -> ImageFolderData:
        p = Path(path).expanduser()
        if not p.exists():
            raise UserError(f"imagefolder: {p} does not exist; give a folder with train/ and test/ (or a .tar.gz of one)")
        label = str(p.resolve())
        if p.is_file():
            p = _extract(p)
        if not (p / "train").is_dir():
            inner = [d for d in p.iterdir() if d.is_dir() and (d / "train").is_dir()] if p.is_dir() else []
            if len(inner) == 1:
                p = inner[0]
            else:
                raise UserError(f"imagefolder: {p} has no train/ folder; expected {p}/train/<class>/<image> and "
                                f"{p}/test/<class>/<image>")
        return cls(p, label)

    @property
    def name(self) -> str:
        classes = tuple(sorted(d.name for d in (self.root / "train").iterdir() if d.is_dir()))
        if "cifar10-jpeg" in self.label and classes == CIFAR_CLASSES:
            return CIFAR_JPEG_NAME
        return f"ImageFolder {self.label}"

    def split(self, split: str) -> dict[str, np.ndarray]:
        """One split, decoded and cached: uint8 ``images [N, C, H, W]``, int64 ``labels [N]``, and the
        per-channel ``mean``/``std`` (in [0, 1] units) of its images."""
        folder = self.root / split
        if not folder.is_dir():
            raise UserError(f"imagefolder: {self.root} has no {split}/ folder; expected {folder}/<class>/<image>")
        tv = import_torchvision()
        try:
            _, class_to_idx = tv.datasets.folder.find_classes(str(folder))
            items = tv.datasets.folder.make_dataset(str(folder), class_to_idx, extensions=tv.datasets.folder.IMG_EXTENSIONS)
        except (FileNotFoundError, OSError) as err:
            raise UserError(f"imagefolder: {folder}: {one_line(err)}") from None
        if not items:
            raise UserError(f"imagefolder: {folder} holds no images")
        stamp = hashlib.sha256(str((str(folder.resolve()), len(items), items[0][0], items[-1][0],
                                    os.stat(items[-1][0]).st_mtime)).encode()).hexdigest()[:16]
        cached = cache_dir() / f"imagefolder-{split}-{stamp}.npz"
        if cached.exists():
            with np.load(cached) as z:
                return {k: z[k] for k in z.files}
        images = _decode([p for p, _ in items], folder)
        out = {"images": images, "labels": np.array([c for _, c in items], dtype=np.int64), **_channel_stats(images)}
        tmp = cached.with_name(cached.name + f".{os.getpid()}.tmp.npz")
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            np.savez(tmp, **out)
            tmp.replace(cached)
        except OSError as err:
            files.discard(tmp)  # a full disk leaves no half-written cache behind
            warnings.warn(f"could not cache the decoded images in {cached.parent} ({err.strerror}); they will be "
                          "decoded again next time", stacklevel=2)
        return out

    def evalset(self, split: str, n: int | None, seed: int, device: torch.device, option: str = "--samples") -> EvalSet:
        """A split as an ``EvalSet``, normalized with the training split's statistics."""
        part = self.split(split)
        images, labels = part["images"], part["labels"]
        train = part if split == "train" else self.split("train")
        mean, std = torch.from_numpy(train["mean"]).float(), torch.from_numpy(train["std"]).float()
        idx = _subset(len(labels), n, seed, split, option)
        x, y = torch.from_numpy(images), torch.from_numpy(labels)
        if idx is not None:
            x, y = x[idx], y[idx]
        if torch.device(device).type != "cpu":  # the host copy was checked when it was decoded
            files.check_memory(x.numel(), f"{len(y):,} images of the {split} split on {device}",
                               "use --samples N (a subset)", device=device)
        return EvalSet(x.contiguous().to(device), y.to(device), f"imagefolder:{self.label}", split, int(seed),
                       mean.to(device), std.to(device), None, self.name)


def _channel_stats(images: np.ndarray, chunk: int = 4096) -> dict[str, np.ndarray]:
    """Per-channel mean and std of uint8 ``[N, C, H, W]`` images, in [0, 1] units (fp64 sums, in chunks)."""
    c = images.shape[1]
    s1, s2, count = np.zeros(c), np.zeros(c), 0
    for i in range(0, len(images), chunk):
        x = images[i : i + chunk].astype(np.float64) / 255
        s1 += x.sum(axis=(0, 2, 3))
        s2 += (x * x).sum(axis=(0, 2, 3))
        count += x.shape[0] * x.shape[2] * x.shape[3]
    mean = s1 / count
    return {"mean": mean, "std": np.sqrt(np.maximum(s2 / count - mean**2, 0) * count / max(count - 1, 1))}


def _decode(paths: list[str], folder: Path) -> np.ndarray:
    """Decode image files to one uint8 ``[N, C, H, W]`` array (RGB), with a progress bar."""
    from PIL import Image
    from tqdm import tqdm

    out: np.ndarray | None = None
    for i, path in enumerate(tqdm(paths, desc=f"decoding {folder.name}/", unit="img", disable=None, leave=False)):
        try:
            with Image.open(path) as im:
                a = np.asarray(im.convert("RGB"))
        except OSError as err:
            raise UserError(f"imagefolder: cannot decode {path} ({one_line(err)}); remove or replace it") from None
        if out is None:
            # the whole split is decoded into one array: refuse it up front
            files.check_memory(len(paths) * a.size, f"decoding {len(paths):,} images of {a.shape[1]}x{a.shape[0]} in "
                               f"{folder}", "use a smaller image folder (all of a split is decoded, whatever --samples asks)")
            out = np.empty((len(paths), a.shape[2], a.shape[0], a.shape[1]), dtype=np.uint8)
        if a.shape[:2] != out.shape[2:]:
            raise UserError(f"imagefolder: {path} is {a.shape[1]}x{a.shape[0]}, but the first image is "
                            f"{out.shape[3]}x{out.shape[2]}; all images must have one size (resize them first)")
        out[i] = a.transpose(2, 0, 1)
    assert out is not None
    return out


def _extract(archive: Path) -> Path:
    """Extract a .tar.gz of an image folder into the cache, once."""
    if not tarfile.is_tarfile(archive):
        raise UserError(f"imagefolder: {archive} is a file but not a tar archive; give a folder or a .tar.gz")
    st = archive.stat()
    key = hashlib.sha256(f"{archive.resolve()}:{st.st_size}:{st.st_mtime}".encode()).hexdigest()[:16]
    dest = cache_dir() / f"extracted-{key}"
    if (dest / ".complete").exists():
        return dest
    tmp = dest.with_name(dest.name + f".{os.getpid()}.tmp")
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        (tmp / ".complete").touch()
        if dest.exists():  # another process finished first
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.replace(dest)
    except (OSError, tarfile.TarError) as err:
        raise UserError(f"imagefolder: cannot extract {archive} into {dest.parent} ({one_line(err)})") from None
    return dest


# --- CIFAR-10 ----------------------------------------------------------------------
def cifar10_class(verify: bool = True) -> type:
    """torchvision's CIFAR10 (a subclass without the MD5 check when ``verify`` is off,
    which tests use for small fake batch folders)."""
    datasets = import_torchvision().datasets
    if verify:
        return datasets.CIFAR10

    class Unverified(datasets.CIFAR10):  # type: ignore[misc, valid-type]
        meta = {**datasets.CIFAR10.meta, "md5": None}  # check_integrity(path, None) only checks existence

        def _check_integrity(self) -> bool:
            return (Path(self.root) / self.base_folder).is_dir()

    return Unverified


def cifar10(root: Path, split: str, download: bool = True, verify: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10 as uint8 ``[N,3,32,32]`` and int64 labels; downloads when allowed."""
    cls = cifar10_class(verify)
    train = split == "train"
    try:
        ds = cls(str(root), train=train, download=False)
    except RuntimeError:
        if not download:
            raise UserError(_missing(root)) from None
        old = socket.getdefaulttimeout()
        socket.setdefaulttimeout(20)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = cls(str(root), train=train, download=True)
        except Exception as err:  # offline, refused, corrupt archive: all end the same way
            raise UserError(f"{_missing(root)} ({type(err).__name__}: {one_line(err)})") from None
        finally:
            socket.setdefaulttimeout(old)
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
    labels = torch.as_tensor(ds.targets, dtype=torch.int64)
    return images, labels


def _missing(root: Path) -> str:
    return (
        f"CIFAR-10 is not in {root}/cifar-10-batches-py and could not be downloaded; "
        f"put cifar-10-python.tar.gz in {root}/ (or set FASTLAND_DATA), or use --data synthetic or imagefolder:PATH"
    )


# --- synthetic ---------------------------------------------------------------------
_SYNTH_SEED = {"train": 1_000, "test": 2_000}
_SYNTH_VERSION = "v1"  # the generator below; change it whenever the generator changes (names the disk cache)
_CHUNK = 5_000


def _templates() -> torch.Tensor:
    """Ten smooth class prototypes ``[10,3,32,32]`` in [0, 1], fixed for all splits."""
    gen = torch.Generator().manual_seed(12345)
    coarse = torch.rand(NUM_CLASSES, 3, 4, 4, generator=gen)
    fine = torch.rand(NUM_CLASSES, 3, 8, 8, generator=gen)
    up = torch.nn.functional.interpolate
    t = 0.7 * up(coarse, size=32, mode="bicubic", align_corners=False) + 0.3 * up(fine, size=32, mode="bicubic", align_corners=False)
    return (0.5 + 0.6 * (t - 0.5)).clamp(0, 1)  # low contrast between classes: harder to learn


@functools.lru_cache(maxsize=2)
def synthetic(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A deterministic CIFAR-shaped data set that a CNN can learn, but not trivially.

    Each image is its class prototype under a random shift, contrast and brightness,
    blended with a random other class's prototype and Gaussian noise. Generated in
    fixed chunks from fixed seeds, so it is identical on every machine; kept in ``cache_dir()``.
    """
    cached = cache_dir() / f"synthetic-{split}-{_SYNTH_VERSION}.npz"
    try:
        with np.load(cached) as z:
            return torch.from_numpy(z["images"]), torch.from_numpy(z["labels"])
    except (OSError, KeyError, ValueError):
        pass  # not made yet (or damaged): make it, ~14 s for the training split
    n = SPLIT_SIZE[split]
    parts = [_synthetic_chunk(split, c0, min(_CHUNK, n - c0)) for c0 in range(0, n, _CHUNK)]
    images, labels = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    tmp = cached.with_name(cached.name + f".{os.getpid()}.tmp.npz")
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        np.savez(tmp, images=images.numpy(), labels=labels.numpy())
        tmp.replace(cached)
    except OSError:
        files.discard(tmp)  # a cache only: the set is made again next time; no half-written file stays
    return images, labels


def _synthetic_chunk(split: str, c0: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(_SYNTH_SEED[split] + c0)
    templates = _templates()
    y = torch.randint(0, NUM_CLASSES, (m,), generator=gen)
    other = (y + torch.randint(1, NUM_CLASSES, (m,), generator=gen)) % NUM_CLASSES
    mix = 0.6 * torch.rand(m, 1, 1, 1, generator=gen)
    contrast = 0.6 + 0.8 * torch.rand(m, 1, 1, 1, generator=gen)
    bright = 0.2 * torch.randn(m, 3, 1, 1, generator=gen)
    x = (1 - mix) * templates[y] + mix * templates[other]
    x = (x - 0.5) * contrast + 0.5 + bright
    shifts = torch.randint(-3, 4, (m, 2), generator=gen)
    for sy, sx in torch.unique(shifts, dim=0).tolist():  # one roll per distinct translation
        sel = ((shifts[:, 0] == sy) & (shifts[:, 1] == sx)).nonzero().squeeze(1)
        x[sel] = torch.roll(x[sel], shifts=(sy, sx), dims=(2, 3))
    x = x + 0.3 * torch.randn(m, 3, 32, 32, generator=gen)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8), y


@functools.lru_cache(maxsize=1)
def synthetic_stats() -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean/std of the synthetic training split's first chunk (fixed)."""
    images, _ = _synthetic_chunk("train", 0, _CHUNK)
    x = images.float() / 255
    return x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3))
