"""Data: synthetic determinism and learnability, subsets, CIFAR-10 layout, offline behaviour."""

import pickle
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from fastland import data, models
from fastland.errors import UserError


def test_synthetic_is_deterministic_and_cifar_shaped() -> None:
    a = data.load("synthetic", "test", 300, seed=1)
    b = data.load("synthetic", "test", 300, seed=1)
    assert a.inputs.dtype == torch.uint8 and a.inputs.shape == (300, 3, 32, 32)
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
    assert set(a.targets.tolist()) == set(range(10))
    c = data.load("synthetic", "test", 300, seed=2)
    assert not torch.equal(a.targets, c.targets)  # another seed, another subset
    assert a.source == "synthetic" and a.warning is None


def test_subset_is_a_subset_of_the_split() -> None:
    full = data.load("synthetic", "test", "all")
    sub = data.load("synthetic", "test", 50, seed=3)
    idx = torch.randperm(10_000, generator=torch.Generator().manual_seed(3))[:50]
    assert torch.equal(sub.inputs, full.inputs[idx]) and torch.equal(sub.targets, full.targets[idx])


def test_normalization_is_per_channel() -> None:
    ev = data.load("synthetic", "train", 2000, seed=0)
    x, _ = ev.batch(0, 2000)
    assert x.dtype == torch.float32
    assert torch.allclose(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=0.05)
    assert torch.allclose(x.std(dim=(0, 2, 3)), torch.ones(3), atol=0.05)


@pytest.mark.parametrize("bad", [0, -3, "many"])
def test_bad_sample_counts(bad: object) -> None:
    with pytest.raises(UserError):
        data.load("synthetic", "test", bad)


def test_too_many_samples() -> None:
    with pytest.raises(UserError, match="more than the test split has"):
        data.load("synthetic", "test", 10_001)


def test_synthetic_is_learnable() -> None:
    """A few hundred steps of LeNet reach far above chance: offline runs train to a real minimum."""
    torch.manual_seed(0)
    train = data.load("synthetic", "train", 4000, seed=0)
    test = data.load("synthetic", "test", 1000, seed=0)
    model = models.create("lenet")
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(2):
        for x, y in train.batches(128):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        x, y = test.batch(0, len(test))
        acc = (model(x).argmax(1) == y).float().mean().item()
    assert acc > 0.4, acc  # chance is 0.1


def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("network unreachable (test)")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)


def test_cifar10_offline_says_where_to_put_the_archive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _offline(monkeypatch)
    with pytest.raises(UserError, match=r"cifar-10-python\.tar\.gz"):
        data.load("cifar10", "train", 10, root=tmp_path)


def test_auto_falls_back_to_synthetic_with_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _offline(monkeypatch)
    with pytest.warns(UserWarning, match="synthetic"):
        ev = data.load("auto", "test", 10, root=tmp_path)
    assert ev.source == "synthetic" and ev.warning == data.SYNTHETIC_WARNING
    assert ev.attrs()["data_warning"] == data.SYNTHETIC_WARNING


def _fake_cifar(root: Path, n: int = 20) -> np.ndarray:
    """A small cifar-10-batches-py folder in the real pickle layout (channel-major rows)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    for name in ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]:
        with open(folder / name, "wb") as f:
            pickle.dump({"data": rows, "labels": [i % 10 for i in range(n)]}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    return rows


def test_cifar10_layout_through_torchvision(tmp_path: Path) -> None:
    rows = _fake_cifar(tmp_path)
    images, labels = data.cifar10(tmp_path, "test", download=False, verify=False)
    assert images.shape == (20, 3, 32, 32) and images.dtype == torch.uint8
    # A CIFAR row is R plane, then G, then B, each 32x32 row-major.
    assert torch.equal(images, torch.from_numpy(rows.reshape(20, 3, 32, 32)))
    assert labels.tolist() == [i % 10 for i in range(20)]
    train, _ = data.cifar10(tmp_path, "train", download=False, verify=False)
    assert train.shape[0] == 100  # five batches


def test_torchvision_imports_next_to_this_torch() -> None:
    """In a fresh interpreter (the CPU torch here breaks a plain `import torchvision`)."""
    code = "from fastland.compat import import_torchvision; tv = import_torchvision(); print(tv.datasets.CIFAR10.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "CIFAR10"


def test_synthetic_disk_cache_holds_what_the_generator_makes() -> None:
    images, labels = data.synthetic("test")  # from the cache after the first call on this machine
    fresh_x, fresh_y = data._synthetic_chunk("test", 5_000, 5_000)
    assert torch.equal(images[5_000:], fresh_x) and torch.equal(labels[5_000:], fresh_y)
