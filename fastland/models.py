"""Models: the built-in zoo, users' factories, and checkpoints.

The zoo: LeNet and VGG-16 (the seed's study) and the CIFAR ResNets of Li et al.'s Figure 5
(ResNet-20/56, with and without skip connections), each with (``_bn``) or without BatchNorm.
Any ``nn.Module`` works elsewhere in fastland; on the command line a user's model is
``--model package.module:factory`` (with ``--model-arg KEY=VALUE``).

A checkpoint is ``torch.save({"model": spec, "model_args": {...}, "state_dict": ..., "meta": {...}})``:
it names its model, so loading it needs no ``--model``. A plain ``state_dict`` file works
together with ``--model``.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import io
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastland.errors import UserError, one_line, os_error

_RESNETS = tuple(f"resnet{d}{v}" for d in (20, 56) for v in ("", "_noskip"))
MODELS = ("lenet", "lenet_bn", "vgg16", "vgg16_bn", *(f"{r}{b}" for r in _RESNETS for b in ("", "_bn")))
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


class BasicBlock(nn.Module):
    """He et al.'s CIFAR basic block: conv-BN-ReLU-conv-BN plus the shortcut, then ReLU.

    The shortcut is a 1x1 conv (+ BN) where the shape changes, the identity otherwise, and
    absent with ``skip=False``. Without BN the convs carry biases instead.
    """

    def __init__(self, c_in: int, c_out: int, stride: int, bn: bool, skip: bool) -> None:
        super().__init__()
        norm = (lambda c: nn.BatchNorm2d(c)) if bn else (lambda c: nn.Identity())
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=not bn)
        self.bn1 = norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=not bn)
        self.bn2 = norm(c_out)
        self.skip = skip
        self.shortcut: nn.Module = nn.Identity()
        if skip and (stride != 1 or c_in != c_out):
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=not bn), norm(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.skip:
            out = out + self.shortcut(x)
        return torch.relu(out)


class CifarResNet(nn.Module):
    """CIFAR ResNet-(6n+2) (He et al. 2016; Li et al. 2018, Fig. 5): conv 16, three stages of ``n``
    basic blocks (16, 32, 64 channels, stride 2 at the start of stages 2 and 3), global average
    pool, fc 10. Not an ``nn.Sequential``: the engine runs it through its general path."""

    def __init__(self, n: int, bn: bool = True, skip: bool = True, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=not bn)
        self.bn1: nn.Module = nn.BatchNorm2d(16) if bn else nn.Identity()
        blocks: list[nn.Module] = []
        c_in = 16
        for stage, width in enumerate((16, 32, 64)):
            for i in range(n):
                blocks.append(BasicBlock(c_in, width, 2 if (stage > 0 and i == 0) else 1, bn, skip))
                c_in = width
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        return self.fc(out.mean(dim=(2, 3)))


def _builtin(name: str) -> nn.Module:
    bn = name.endswith("_bn")
    base = name.removesuffix("_bn")
    if base == "lenet":
        return _lenet(bn)
    if base == "vgg16":
        return _vgg16(bn)
    depth, _, variant = base.removeprefix("resnet").partition("_")
    return CifarResNet((int(depth) - 2) // 6, bn=bn, skip=variant != "noskip")


def create(spec: str, **kwargs: Any) -> nn.Module:
    """Build a fresh model: a built-in name (``MODELS``) or ``package.module:factory`` called with ``kwargs``.

    Built-ins: ``lenet``, ``vgg16``, ``resnet20``, ``resnet56`` and ``resnet20_noskip``,
    ``resnet56_noskip`` (Li et al.'s no-skip variants); the suffix ``_bn`` adds BatchNorm.
    """
    if spec in MODELS:
        if kwargs:
            raise UserError(f"the built-in model {spec} takes no arguments (got {', '.join(kwargs)})")
        return _builtin(spec)
    if ":" not in spec:
        raise UserError(f"unknown model {spec!r}; choose one of {', '.join(MODELS)}, or give package.module:factory")
    return _from_factory(spec, kwargs)


def _from_factory(spec: str, kwargs: dict[str, Any]) -> nn.Module:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise UserError(f"--model {spec!r}: expected package.module:factory, e.g. mypkg.nets:make_model")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # noqa: BLE001 - any import failure is the user's to fix
        raise UserError(f"--model {spec}: cannot import {module_name} ({type(err).__name__}: {one_line(err)}); "
                        "check the name and that its folder is on PYTHONPATH") from None
    factory = module
    for part in attr.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            raise UserError(f"--model {spec}: {module_name} has no attribute {attr!r}")
    if not callable(factory):
        raise UserError(f"--model {spec}: {attr} is not callable; give a class or a function that returns an nn.Module")
    try:
        model = factory(**kwargs)
    except Exception as err:  # noqa: BLE001 - the user's factory failed
        raise UserError(f"--model {spec}: calling {attr}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}) failed "
                        f"({type(err).__name__}: {one_line(err)[:200]})") from None
    if not isinstance(model, nn.Module):
        raise UserError(f"--model {spec}: {attr} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def parse_model_args(items: list[str] | None) -> dict[str, Any]:
    """``["depth=3", "name=x"]`` -> ``{"depth": 3, "name": "x"}`` (Python literals where they parse)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, eq, value = item.partition("=")
        if not eq or not key.isidentifier():
            raise UserError(f"--model-arg {item!r}: expected KEY=VALUE, e.g. --model-arg depth=3")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def randomized(model: str | nn.Module, seed: int = 0) -> nn.Module:
    """A model with random Kaiming weights, non-zero biases and random BN affine parameters and
    running statistics: like a trained model, no zero tensors. For tests and benchmarks, which
    need a non-flat loss without training first. A module is randomized in place and returned."""
    gen = torch.Generator().manual_seed(seed)
    model = create(model) if isinstance(model, str) else model
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d | nn.Linear | nn.Conv1d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                if m.affine:
                    m.weight.copy_(0.5 + torch.rand(c, generator=gen))
                    m.bias.copy_(0.2 * torch.randn(c, generator=gen))
                if m.running_mean is not None:
                    m.running_mean.copy_(0.3 * torch.randn(c, generator=gen))
                    m.running_var.copy_(0.5 + torch.rand(c, generator=gen))
    return model


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def save_checkpoint(path: str | Path, name: str, model: nn.Module, meta: dict[str, Any] | None = None,
                    extra: dict[str, Any] | None = None, model_args: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint atomically (temp file + rename), so a crash never leaves half a file.

    It is serialized in memory first, so that a failed write (a full disk) is an ``OSError``
    naming ``path`` (one line, the temporary file removed) rather than torch's zip-writer error."""
    from fastland import files

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise os_error(err, str(path.parent)) from None
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    buf = io.BytesIO()
    torch.save({"model": name, "model_args": dict(model_args or {}), "state_dict": state, "meta": dict(meta or {}),
                **(extra or {})}, buf)
    files.write_bytes(path, buf.getbuffer())
    return path


def _is_state_dict(obj: object) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                       for k, v in obj.items())


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint as a dict with ``model`` (None for a plain state_dict), ``model_args``,
    ``state_dict`` and ``meta``; clear errors for missing, corrupt or foreign files."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"checkpoint {path} is a folder; give a .pt file (a run folder's final.pt, for example)")
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; check the path or omit --checkpoint to train one")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure to unpickle means a bad file
        raise UserError(
            f"checkpoint {path} cannot be read ({type(err).__name__}); it may be corrupt: retrain or pick another file"
        ) from None
    if _is_state_dict(ckpt):
        return {"model": None, "model_args": {}, "state_dict": ckpt, "meta": {}}
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise UserError(f"checkpoint {path} is neither a fastland checkpoint nor a state_dict (a dict of tensors)")
    if not _is_state_dict(ckpt["state_dict"]):
        raise UserError(f"checkpoint {path}: its 'state_dict' is a {type(ckpt['state_dict']).__name__}, not a dict of "
                        "tensors; save model.state_dict()")
    meta = ckpt.get("meta", {})
    args = ckpt.get("model_args", {})
    if not isinstance(meta, dict) or not isinstance(args, dict):
        raise UserError(f"checkpoint {path}: 'meta' and 'model_args' must be dicts")
    return {**ckpt, "model": ckpt.get("model"), "model_args": args, "meta": meta}


def load_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``model`` strictly; a mismatch names the first few keys that do not fit."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    problems = []
    if missing:
        problems.append(f"missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''} ({len(missing)})")
    if unexpected:
        problems.append(f"unexpected {', '.join(unexpected[:3])}{' ...' if len(unexpected) > 3 else ''} ({len(unexpected)})")
    if shapes:
        problems.append(f"shapes differ: {'; '.join(shapes[:3])}{' ...' if len(shapes) > 3 else ''}")
    if problems:
        raise UserError(f"{source} does not fit the model: {'; '.join(problems)}")
    model.load_state_dict(state, strict=True)


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu", spec: str | None = None,
                    model_args: dict[str, Any] | None = None) -> tuple[nn.Module, str, dict[str, Any]]:
    """Load ``(model, spec, meta)`` from a checkpoint, on ``device``.

    A fastland checkpoint names its model; ``spec`` (the user's ``--model``), when given, must
    agree with it. A plain state_dict needs ``spec``.
    """
    ckpt = read_checkpoint(path)
    named = ckpt["model"]
    if named is None and spec is None:
        raise UserError(f"checkpoint {path} is a plain state_dict that does not name its model; pass --model NAME "
                        "or --model package.module:factory")
    if named is not None and spec is not None and named != spec:
        raise UserError(f"checkpoint {path} holds a {named} model, not {spec}; drop --model (the checkpoint names its "
                        "model) or pick another checkpoint")
    use = spec or named
    args = model_args if model_args else ckpt["model_args"]
    model = create(use, **args)
    load_state(model, ckpt["state_dict"], f"checkpoint {path}")
    return model.to(device), use, dict(ckpt["meta"])


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
