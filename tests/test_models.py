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
    expected = {"lenet": 0, "vgg16": 0, "lenet_bn": 4, "vgg16_bn": 13, "resnet20": 0, "resnet56": 0,
                "resnet20_bn": 21, "resnet56_bn": 57, "resnet20_noskip": 0, "resnet56_noskip": 0,
                "resnet20_noskip_bn": 19, "resnet56_noskip_bn": 55}[name]
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


def test_resnets_as_li_et_al() -> None:
    """ResNet-20 has 0.27M parameters; without skips the 1x1 projections go; without BN the convs get biases."""
    assert sum(p.numel() for p in models.create("resnet20_bn").parameters()) == 272_474
    assert not isinstance(models.create("resnet20_bn"), nn.Sequential)
    noskip = models.create("resnet20_noskip_bn")
    assert not any("shortcut" in n for n, _ in noskip.named_parameters())
    assert all(m.bias is not None for m in models.create("resnet20").modules() if isinstance(m, nn.Conv2d))
    x = torch.randn(2, 3, 32, 32)
    skip, plain = models.create("resnet20_bn").eval(), models.create("resnet20_noskip_bn").eval()
    plain.load_state_dict({k: v for k, v in skip.state_dict().items() if "shortcut" not in k})
    assert not torch.allclose(skip(x), plain(x))  # the skips change the function


def test_factory_models_and_their_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "mynets.py").write_text(
        "import torch.nn as nn\n"
        "def make(width=4):\n    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, width))\n"
        "def broken():\n    return 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    m = models.create("mynets:make", width=7)
    assert m[1].out_features == 7
    path = models.save_checkpoint(tmp_path / "m.pt", "mynets:make", m, model_args={"width": 7})
    m2, spec, _ = models.load_checkpoint(path)  # the checkpoint names its model and arguments
    assert spec == "mynets:make" and m2[1].out_features == 7
    torch.save(m.state_dict(), tmp_path / "plain.pt")
    with pytest.raises(UserError, match="plain state_dict"):
        models.load_checkpoint(tmp_path / "plain.pt")
    m3, _, _ = models.load_checkpoint(tmp_path / "plain.pt", spec="mynets:make", model_args={"width": 7})
    assert torch.equal(m3[1].weight, m[1].weight)
    for spec, match in (("nosuchmodule:make", "cannot import nosuchmodule"), ("mynets:nothing", "no attribute"),
                        ("mynets:broken", "not a torch.nn.Module"), ("mynets:", "package.module:factory")):
        with pytest.raises(UserError, match=match):
            models.create(spec)
    assert models.parse_model_args(["width=3", "name=abc", "xs=[1, 2]"]) == {"width": 3, "name": "abc", "xs": [1, 2]}
    with pytest.raises(UserError, match="KEY=VALUE"):
        models.parse_model_args(["width"])


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
        models.load_checkpoint(path, spec="lenet_bn")
    torch.save({"model": "lenet_bn", "state_dict": models.create("lenet").state_dict(), "meta": {}}, tmp_path / "x.pt")
    with pytest.raises(UserError, match=r"does not fit the model: missing 1\.weight, 1\.bias, 1\.running_mean \.\.\."):
        models.load_checkpoint(tmp_path / "x.pt")
    torch.save({"model": "transformer", "state_dict": {"w": torch.zeros(1)}, "meta": {}}, tmp_path / "u.pt")
    with pytest.raises(UserError, match="unknown model"):
        models.load_checkpoint(tmp_path / "u.pt")
    torch.save({"model": "lenet", "state_dict": [1, 2], "meta": {}}, tmp_path / "s.pt")
    with pytest.raises(UserError, match="not a dict of tensors"):
        models.load_checkpoint(tmp_path / "s.pt")
