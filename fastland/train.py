"""``python -m fastland.train``: train a model from cached tensors, one checkpoint per epoch.

Defaults follow the seed: Adam, lr 0.01, batch 128, 20 epochs, cross-entropy, no
augmentation. A ``probe`` callback (the Santurkar smoothness probes) sees every step
between the gradient computation and the optimizer update.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from fastland import data as data_mod
from fastland import device as device_mod
from fastland import models
from fastland.errors import UserError, cli_entry

# probe(step, model, x, y, loss) is called after backward() and before optimizer.step();
# the gradients are in p.grad. It must not change parameters, gradients or buffers.
Probe = Callable[[int, nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], None]


@dataclass
class TrainConfig:
    """Every hyper-parameter of a run; saved as ``config.json`` in the run directory."""

    model: str = "lenet_bn"
    data: str = "auto"
    samples: str = "all"
    epochs: int = 20
    lr: float = 0.01
    batch: int = 128
    optimizer: str = "adam"
    momentum: float = 0.0
    weight_decay: float = 0.0
    seed: int = 0
    device: str = "auto"


def default_run_dir(model: str, source: str) -> Path:
    """Where the cached checkpoint for ``model`` on ``source`` data lives."""
    return Path("runs") / f"{model}-{source}"


def make_optimizer(cfg: TrainConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    raise UserError(f"unknown --optimizer {cfg.optimizer!r}; use adam or sgd")


def check_config(cfg: TrainConfig) -> None:
    if cfg.epochs < 1:
        raise UserError(f"--epochs must be at least 1, got {cfg.epochs}")
    if cfg.batch < 2:
        raise UserError(f"--batch must be at least 2 (BatchNorm needs 2 samples), got {cfg.batch}")
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise UserError(f"--lr must be a positive number, got {cfg.lr}")
    models.create(cfg.model)  # validates the name


def epoch_order(n: int, seed: int, epoch: int, device: torch.device) -> torch.Tensor:
    """The sample order of one epoch: a function of (seed, epoch) alone, so resume is exact."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=gen).to(device)


def train(cfg: TrainConfig, out: Path, probe: Probe | None = None, progress: bool = True,
          trainset: data_mod.EvalSet | None = None) -> Path:
    """Train (or resume) a run in ``out``; returns the path of ``final.pt``.

    Writes ``epoch_XXX.pt`` after each epoch and ``final.pt`` at the end. An existing
    run directory with the same config resumes after its last complete epoch.
    """
    check_config(cfg)
    dev = device_mod.resolve(cfg.device)
    out = Path(out)
    final = out / "final.pt"
    if trainset is None:
        trainset = data_mod.load(cfg.data, "train", cfg.samples, seed=cfg.seed, device=dev)
    out.mkdir(parents=True, exist_ok=True)
    cfg_path = out / "config.json"
    cfg_dict = asdict(cfg) | {"data_source": trainset.source}
    if cfg_path.exists():
        old = json.loads(cfg_path.read_text())
        if {k: v for k, v in old.items() if k != "device"} != {k: v for k, v in cfg_dict.items() if k != "device"}:
            raise UserError(f"{out} holds a run with another configuration; pick another --out or delete it")
    cfg_path.write_text(json.dumps(cfg_dict, indent=2) + "\n")
    if final.exists():
        return final

    torch.manual_seed(cfg.seed)
    model = models.create(cfg.model).to(dev)
    opt = make_optimizer(cfg, list(model.parameters()))
    start_epoch = 0
    done = sorted(out.glob("epoch_*.pt"))
    if done:
        ckpt = models.read_checkpoint(done[-1])
        model.load_state_dict(ckpt["state_dict"])
        opt.load_state_dict(ckpt["optimizer"])
        start_epoch = int(ckpt["meta"]["epoch"])
        if progress:
            print(f"resuming {out} after epoch {start_epoch}")
    n = len(trainset)
    steps = math.ceil(n / cfg.batch)
    step = start_epoch * steps
    meta_base = {"data": trainset.attrs(), "optimizer": cfg.optimizer, "lr": cfg.lr, "batch": cfg.batch,
                 "seed": cfg.seed}
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        order = epoch_order(n, cfg.seed, epoch, dev)
        bar = tqdm(range(steps), desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress, leave=False)
        loss_sum, correct, t0 = 0.0, 0, time.perf_counter()
        for b in bar:
            idx = order[b * cfg.batch : (b + 1) * cfg.batch]
            if idx.numel() < 2 and models.has_batchnorm(model):
                continue  # a batch of one cannot be batch-normalized
            x = trainset.normalize(trainset.images[idx])
            y = trainset.labels[idx]
            opt.zero_grad(set_to_none=True)
            logits = model(x)
            loss = nn.functional.cross_entropy(logits, y)
            loss.backward()
            if not torch.isfinite(loss):
                raise UserError(f"training diverged at epoch {epoch + 1}, step {step}: loss is {float(loss)}; "
                                f"checkpoints up to epoch {epoch} are kept in {out}; try a smaller --lr")
            if probe is not None:
                probe(step, model, x, y, loss.detach())
            opt.step()
            step += 1
            loss_sum += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(1) == y).sum())
            if b % 20 == 0:
                bar.set_postfix(loss=f"{float(loss):.3f}")
        meta = meta_base | {"epoch": epoch + 1, "step": step, "train_loss": loss_sum / n,
                            "train_acc": 100.0 * correct / n, "epoch_seconds": time.perf_counter() - t0}
        models.save_checkpoint(out / f"epoch_{epoch + 1:03d}.pt", cfg.model, model, meta,
                               extra={"optimizer": opt.state_dict()})
        if progress:
            print(f"epoch {epoch + 1}/{cfg.epochs}: loss {meta['train_loss']:.4f}, acc {meta['train_acc']:.1f}%, "
                  f"{meta['epoch_seconds']:.1f}s")
    models.save_checkpoint(final, cfg.model, model, meta)
    return final


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(prog="python -m fastland.train", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=d.model, choices=models.MODELS, help="architecture to train")
    p.add_argument("--data", default=d.data, choices=data_mod.SOURCES,
                   help="cifar10, synthetic, or auto (CIFAR-10 if present or downloadable, else synthetic)")
    p.add_argument("--samples", default=d.samples, help="training samples: a number (seeded subset) or 'all'")
    p.add_argument("--epochs", type=int, default=d.epochs, help="number of epochs")
    p.add_argument("--lr", type=float, default=d.lr, help="learning rate")
    p.add_argument("--batch", type=int, default=d.batch, help="minibatch size")
    p.add_argument("--optimizer", default=d.optimizer, choices=("adam", "sgd"), help="optimizer")
    p.add_argument("--momentum", type=float, default=d.momentum, help="SGD momentum")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="L2 weight decay")
    p.add_argument("--seed", type=int, default=d.seed, help="seed for initialization, data subset and order")
    p.add_argument("--device", default=d.device, help="auto, cpu, cuda or cuda:N")
    p.add_argument("--out", default=None, help="run directory (default runs/MODEL-SOURCE)")
    return p


@cli_entry
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    cfg = TrainConfig(model=args.model, data=args.data, samples=args.samples, epochs=args.epochs, lr=args.lr,
                      batch=args.batch, optimizer=args.optimizer, momentum=args.momentum,
                      weight_decay=args.weight_decay, seed=args.seed, device=args.device)
    check_config(cfg)
    dev = device_mod.resolve(cfg.device)
    trainset = data_mod.load(cfg.data, "train", cfg.samples, seed=cfg.seed, device=dev)
    out = Path(args.out) if args.out else default_run_dir(cfg.model, trainset.source)
    t0 = time.perf_counter()
    final = train(cfg, out, trainset=trainset)
    meta = models.read_checkpoint(final)["meta"]
    print(f"done in {time.perf_counter() - t0:.1f}s: final train loss {meta.get('train_loss', float('nan')):.4f}, "
          f"acc {meta.get('train_acc', float('nan')):.1f}% -> {final}")


if __name__ == "__main__":
    main()
