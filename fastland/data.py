"""Evaluation and training data as uint8 tensors cached on the target device.

CIFAR-10 comes through ``torchvision.datasets.CIFAR10`` (checksum-verified); offline
runs use a deterministic, learnable synthetic stand-in of the same shape. Images stay
uint8 on the device and are normalized there per batch: no DataLoader in the hot path.
"""

from __future__ import annotations

import functools
import os
import socket
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from fastland.compat import import_torchvision
from fastland.errors import UserError

SOURCES = ("auto", "cifar10", "synthetic")
SPLITS = ("train", "test")
SPLIT_SIZE = {"train": 50_000, "test": 10_000}
NUM_CLASSES = 10
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
SYNTHETIC_WARNING = "CIFAR-10 unavailable: synthetic data used instead"


def default_root() -> Path:
    """Where CIFAR-10 lives: ``$FASTLAND_DATA`` or ``./data``. (``$FASTLAND_OFFLINE=1`` skips downloads.)"""
    return Path(os.environ.get("FASTLAND_DATA", "data"))


@dataclass
class EvalSet:
    """A fixed set of images (uint8, NCHW) and labels on one device, with its provenance."""

    images: torch.Tensor
    labels: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    source: str
    split: str
    sample_seed: int
    warning: str | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def device(self) -> torch.device:
        return self.images.device

    def normalize(self, images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """uint8 ``[B,3,32,32]`` -> normalized float, computed on the device."""
        scale = (1.0 / (255.0 * self.std)).to(dtype).view(1, 3, 1, 1)
        shift = (self.mean / self.std).to(dtype).view(1, 3, 1, 1)
        return images.to(dtype) * scale - shift

    def batch(self, start: int, stop: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        return self.normalize(self.images[start:stop], dtype), self.labels[start:stop]

    def batches(self, batch_size: int, dtype: torch.dtype = torch.float32) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Consecutive batches in a fixed order (the last one may be short)."""
        for start in range(0, len(self), batch_size):
            yield self.batch(start, min(start + batch_size, len(self)), dtype)

    def attrs(self) -> dict[str, object]:
        """Provenance for output files."""
        return {
            "data_source": self.source,
            "split": self.split,
            "samples": len(self),
            "sample_seed": self.sample_seed,
            "data_warning": self.warning or "",
        }


def parse_samples(value: str | int | None) -> int | None:
    """``'all'``/None -> None (the whole split); otherwise a positive int."""
    if value is None or (isinstance(value, str) and value.lower() == "all"):
        return None
    try:
        n = int(value)
    except ValueError:
        raise UserError(f"--samples must be a positive number or 'all', got {value!r}") from None
    if n <= 0:
        raise UserError(f"--samples must be at least 1, got {n}")
    return n


def load(
    data: str = "auto",
    split: str = "train",
    samples: int | str | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    root: str | Path | None = None,
    download: bool = True,
) -> EvalSet:
    """Load a split as an ``EvalSet`` on ``device``.

    ``samples`` picks a fixed subset with a seeded permutation (the same on every
    device); ``data='auto'`` falls back to synthetic data with a warning when CIFAR-10 is
    neither present nor downloadable.
    """
    if data not in SOURCES:
        raise UserError(f"unknown --data {data!r}; use one of {', '.join(SOURCES)}")
    if split not in SPLITS:
        raise UserError(f"unknown --split {split!r}; use train or test")
    n_wanted = parse_samples(samples)
    root = Path(root) if root is not None else default_root()
    download = download and not os.environ.get("FASTLAND_OFFLINE")  # FASTLAND_OFFLINE=1: never try the network
    warning = None
    if data == "synthetic":
        images, labels, source = *synthetic(split), "synthetic"
    else:
        try:
            images, labels = cifar10(root, split, download)
            source = "cifar10"
        except UserError:
            if data == "cifar10":
                raise
            warning = SYNTHETIC_WARNING
            warnings.warn(f"{warning} (put cifar-10-python.tar.gz in {root}/ to use the real data)", stacklevel=2)
            images, labels, source = *synthetic(split), "synthetic"
    total = labels.shape[0]
    if n_wanted is not None and n_wanted > total:
        raise UserError(f"--samples {n_wanted} is more than the {split} split has ({total}); use at most {total} or 'all'")
    if n_wanted is not None:
        gen = torch.Generator().manual_seed(int(seed))
        idx = torch.randperm(total, generator=gen)[:n_wanted]
        images, labels = images[idx], labels[idx]
    if source == "cifar10":
        mean, std = torch.tensor(CIFAR_MEAN), torch.tensor(CIFAR_STD)
    else:
        mean, std = synthetic_stats()
    dev = torch.device(device)
    return EvalSet(
        images=images.contiguous().to(dev),
        labels=labels.to(dev),
        mean=mean.to(dev),
        std=std.to(dev),
        source=source,
        split=split,
        sample_seed=int(seed),
        warning=warning,
    )


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
            raise UserError(f"{_missing(root)} ({type(err).__name__}: {err})") from None
        finally:
            socket.setdefaulttimeout(old)
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
    labels = torch.as_tensor(ds.targets, dtype=torch.int64)
    return images, labels


def _missing(root: Path) -> str:
    return (
        f"CIFAR-10 is not in {root}/cifar-10-batches-py and could not be downloaded; "
        f"put cifar-10-python.tar.gz in {root}/ (or set FASTLAND_DATA), or use --data synthetic"
    )


# --- synthetic ---------------------------------------------------------------------
_SYNTH_SEED = {"train": 1_000, "test": 2_000}
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
    fixed chunks from fixed seeds, so it is identical on every machine.
    """
    n = SPLIT_SIZE[split]
    parts = [_synthetic_chunk(split, c0, min(_CHUNK, n - c0)) for c0 in range(0, n, _CHUNK)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


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
