"""The study's architectures (LeNet, VGG-16; each with or without BatchNorm) and checkpoints.

A checkpoint is ``torch.save({"model": name, "state_dict": ..., "meta": {...}})``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastland.errors import UserError

MODELS = ("lenet", "lenet_bn", "vgg16", "vgg16_bn")
VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def _lenet(bn: bool) -> nn.Sequential:
    def block(layer: nn.Module, width: int, norm: type[nn.Module]) -> list[nn.Module]:
        return [layer, norm(width), nn.ReLU()] if bn else [layer, nn.ReLU()]

    return nn.Sequential(
        *block(nn.Conv2d(3, 6, 5), 6, nn.BatchNorm2d),
        nn.MaxPool2d(2),
        *block(nn.Conv2d(6, 16, 5), 16, nn.BatchNorm2d),
        nn.MaxPool2d(2),
        nn.Flatten(),
        *block(nn.Linear(400, 120), 120, nn.BatchNorm1d),
        *block(nn.Linear(120, 84), 84, nn.BatchNorm1d),
        nn.Linear(84, 10),
    )


def _vgg16(bn: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    c_in = 3
    for v in VGG16_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
            continue
        layers.append(nn.Conv2d(c_in, int(v), 3, padding=1))
        if bn:
            layers.append(nn.BatchNorm2d(int(v)))
        layers.append(nn.ReLU())
        c_in = int(v)
    layers += [nn.Flatten(), nn.Linear(512, 10)]
    return nn.Sequential(*layers)


def create(name: str) -> nn.Module:
    """Build a fresh model by name: ``lenet``, ``lenet_bn``, ``vgg16`` or ``vgg16_bn``."""
    if name not in MODELS:
        raise UserError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    bn = name.endswith("_bn")
    return _lenet(bn) if name.startswith("lenet") else _vgg16(bn)


def randomized(name: str, seed: int = 0) -> nn.Module:
    """A model with random Kaiming weights, non-zero biases and random BN affine parameters and
    running statistics: like a trained model, no zero tensors. For tests and benchmarks, which
    need a non-flat loss without training first."""
    gen = torch.Generator().manual_seed(seed)
    model = create(name)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.weight.copy_(0.5 + torch.rand(c, generator=gen))
                m.bias.copy_(0.2 * torch.randn(c, generator=gen))
                m.running_mean.copy_(0.3 * torch.randn(c, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(c, generator=gen))
    return model


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def save_checkpoint(path: str | Path, name: str, model: nn.Module, meta: dict[str, Any] | None = None,
                    extra: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint atomically (temp file + rename), so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"model": name, "state_dict": state, "meta": dict(meta or {}), **(extra or {})}, tmp)
    tmp.replace(path)
    return path


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The raw checkpoint dict, with clear errors for missing or corrupt files."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; check the path or omit --checkpoint to train one")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UserError(
            f"checkpoint {path} cannot be read ({type(err).__name__}); it may be corrupt: retrain or pick another file"
        ) from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "state_dict" not in ckpt:
        raise UserError(f"checkpoint {path} is not a fastland checkpoint (expected keys 'model' and 'state_dict')")
    return ckpt


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu", expect: str | None = None
                    ) -> tuple[nn.Module, str, dict[str, Any]]:
    """Load ``(model, name, meta)`` from a checkpoint, on ``device``.

    ``expect`` is the model name the caller wants; a different one is an error.
    """
    ckpt = read_checkpoint(path)
    name = ckpt["model"]
    if name not in MODELS:
        raise UserError(f"checkpoint {path} holds unknown model {name!r}; fastland knows {', '.join(MODELS)}")
    if expect is not None and expect != name:
        raise UserError(f"checkpoint {path} holds a {name} model, not {expect}; pass --model {name} or another checkpoint")
    model = create(name)
    try:
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as err:
        first = str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else str(err)
        raise UserError(f"checkpoint {path} does not match the {name} architecture: {first}") from None
    return model.to(device), name, dict(ckpt.get("meta", {}))


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
