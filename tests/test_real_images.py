"""Real images: CIFAR-10 (JPEG copy) from ``../shared/data`` through ``--data imagefolder:``.

The archive is extracted and decoded once into the repository's ignored ``.cache/`` (conftest
points ``XDG_CACHE_HOME`` there); the tests skip cleanly where ``../shared/data`` is absent, as
it is in a user's clone. The images are never committed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_main

import fastland
from fastland import data, surfacefile
from fastland import train as train_cli
from fastland.errors import UserError

ARCHIVE = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz"
SPEC = f"imagefolder:{ARCHIVE}"
pytestmark = pytest.mark.skipif(not ARCHIVE.exists(), reason=f"{ARCHIVE} is absent (it is not part of a user's clone)")


@pytest.fixture(autouse=True)
def _one_thread(one_thread: object) -> None:
    """One thread: see conftest."""


def test_the_jpeg_copy_is_named_and_normalized_with_its_own_statistics() -> None:
    ev = data.load(SPEC, "test", 500, seed=0)
    assert ev.name == "CIFAR-10 (JPEG copy)" and ev.inputs.dtype == torch.uint8 and ev.inputs.shape == (500, 3, 32, 32)
    # The training split's channel means, as CIFAR-10's published ones (the JPEG copy is lossy: std a bit lower).
    np.testing.assert_allclose(ev.mean.numpy(), data.CIFAR_MEAN, atol=2e-3)
    np.testing.assert_allclose(ev.std.numpy(), data.CIFAR_STD, atol=6e-3)
    assert sorted(set(ev.targets.tolist())) == list(range(10))
    attrs = ev.attrs()
    assert attrs["data_name"] == "CIFAR-10 (JPEG copy)" and len(attrs["data_mean"]) == 3


def test_a_small_model_learns_from_a_few_thousand_real_images(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                              ) -> None:
    code = run_main(train_cli.main, ["--model", "lenet_bn", "--data", SPEC, "--samples", "4000", "--epochs", "3",
                                     "--no-probe", "--device", "cpu", "--out", str(tmp_path / "run")], capsys)[0]
    assert code == 0
    model, _, _ = fastland.api.models.load_checkpoint(tmp_path / "run" / "final.pt")
    test = fastland.evaluate(model, data.load(SPEC, "test", 1000, seed=1), device="cpu")
    assert test["accuracy"] > 30.0, test  # chance is 10%; LeNet-BN on 4,000 real images after 3 epochs: ~40%
    s = fastland.surface(model, data.load(SPEC, "train", 64, seed=0), res=3, progress=False,
                         out=tmp_path / "s.h5")
    again = surfacefile.read(tmp_path / "s.h5")
    assert again.attrs["data_name"] == "CIFAR-10 (JPEG copy)" and np.isfinite(s.loss).all()
    assert again.attrs["data_source"] == f"imagefolder:{ARCHIVE.resolve()}"


def test_an_image_folder_without_train_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "test" / "cat").mkdir(parents=True)
    with pytest.raises(UserError, match="has no train/ folder"):
        data.load(f"imagefolder:{tmp_path}", "test", 4)
