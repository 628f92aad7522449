"""Architectures as science.md defines them, and checkpoints with clear errors."""

from pathlib import Path

import pytest
import torch
from torch import nn

from fastland import models
from fastland.errors import UserError


@pytest.mark.parametrize("name,params", [("lenet", 62_006), ("vgg16", 14_728_266 - 8_448)])
def test_parameter_counts(name: str, params: int) -> None:
    assert sum(p.numel() for p in models.create(name).parameters()) == params


@pytest.mark.parametrize("name", models.MODELS)
def test_forward_shape_and_bn(name: str) -> None:
    m = models.create(name).eval()
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    n_bn = sum(isinstance(x, nn.modules.batchnorm._BatchNorm) for x in m.modules())
    expected = {"lenet": 0, "vgg16": 0, "lenet_bn": 4, "vgg16_bn": 13}[name]
    assert n_bn == expected
    assert models.has_batchnorm(m) == name.endswith("_bn")


def test_bn_comes_before_relu() -> None:
    layers = list(models.create("lenet_bn"))
    for i, layer in enumerate(layers):
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            assert isinstance(layers[i - 1], nn.Conv2d | nn.Linear) and isinstance(layers[i + 1], nn.ReLU)


def test_unknown_model() -> None:
    with pytest.raises(UserError, match="unknown model"):
        models.create("resnet")


def test_checkpoint_roundtrip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    m = models.create("lenet_bn")
    path = models.save_checkpoint(tmp_path / "a.pt", "lenet_bn", m, {"epoch": 3})
    m2, name, meta = models.load_checkpoint(path)
    assert name == "lenet_bn" and meta["epoch"] == 3
    for (k, v), (k2, v2) in zip(m.state_dict().items(), m2.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2)


def test_checkpoint_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        models.load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(UserError, match="cannot be read"):
        models.load_checkpoint(tmp_path / "junk.pt")
    path = models.save_checkpoint(tmp_path / "l.pt", "lenet", models.create("lenet"))
    with pytest.raises(UserError, match="not lenet_bn"):
        models.load_checkpoint(path, expect="lenet_bn")
    torch.save({"model": "lenet_bn", "state_dict": models.create("lenet").state_dict(), "meta": {}}, tmp_path / "x.pt")
    with pytest.raises(UserError, match="does not match"):
        models.load_checkpoint(tmp_path / "x.pt")
    torch.save({"model": "transformer", "state_dict": {}, "meta": {}}, tmp_path / "u.pt")
    with pytest.raises(UserError, match="unknown model"):
        models.load_checkpoint(tmp_path / "u.pt")
