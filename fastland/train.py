"""``python -m fastland.train``: train a model with Santurkar et al.'s smoothness probes.

Presets: ``seed`` (the default; Adam, lr 0.01, batch 128, 20 epochs, cross-entropy, no
augmentation) and ``santurkar`` (plain SGD, lr 0.1, batch 128, 20 epochs); any option
given on the command line overrides its preset value. By default every training step is
probed (as in the paper): on the step's own minibatch, with g = ∇L(θ_t), the loss and the
gradient are measured at θ_t − η·g for every η in H, and ``metrics.csv`` receives the loss
variation, gradient predictiveness and effective β-smoothness (see ``fastland.probes``).
A probe never changes training: the optimizer's update is the one it would have been.

The run directory holds ``config.json``, ``epoch_XXX.pt`` after each epoch, ``final.pt``,
``metrics.csv`` + ``metrics.json`` (probe settings) and ``smoothness.png``. Re-running the
same command resumes after the last complete epoch; ``--compare lenet lenet_bn`` trains
both side by side and overlays their probes in one figure.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from fastland import api, files, losses, models, probes
from fastland import data as data_mod
from fastland import device as device_mod
from fastland._callable import make_callable
from fastland.errors import ArgumentParser, UserError, cli_entry, os_error
from fastland.losses import LossFn, Task
from fastland.probes import ProbeConfig


@dataclass
class TrainConfig:
    """Every hyper-parameter of a run; saved as ``config.json`` in the run directory.

    These, and only these, decide the weights; the probe settings (which never change
    training) are saved next to the metrics they produce, in ``metrics.json``.
    """

    model: str = "lenet_bn"  # a built-in name or package.module:factory
    data: str = "auto"  # auto, cifar10, synthetic or imagefolder:PATH (a Python API run: what the caller passed)
    samples: str = "all"
    loss: str = "auto"  # auto (cross-entropy for integer targets, MSE for float ones), a name, or custom:NAME
    epochs: int = 20
    lr: float = 0.01
    batch: int = 128
    optimizer: str = "adam"
    momentum: float = 0.0
    weight_decay: float = 0.0
    seed: int = 0
    device: str = "auto"
    save_every: int = 0  # also save step_XXXXXXX.pt every this many steps (0: per epoch only), for trajectories
    model_args: dict[str, Any] = field(default_factory=dict)


PRESETS: dict[str, dict[str, Any]] = {
    # The seed's experiment.
    "seed": {"optimizer": "adam", "lr": 0.01, "batch": 128, "epochs": 20, "momentum": 0.0, "weight_decay": 0.0},
    # Santurkar et al.'s VGG runs: SGD at lr 0.1, batch 128, no augmentation. Plain SGD
    # (no momentum), so that the probed line θ − η·g contains the step actually taken.
    "santurkar": {"optimizer": "sgd", "lr": 0.1, "batch": 128, "epochs": 20, "momentum": 0.0, "weight_decay": 0.0},
}


def default_run_dir(model: str, source: str) -> Path:
    """Where the cached checkpoint for ``model`` on ``source`` data lives."""
    return Path("runs") / f"{slug(model)}-{slug(source)}"


def slug(text: str) -> str:
    """A file-name-safe form of a model spec or data source (``mypkg.nets:make`` -> ``mypkg.nets-make``)."""
    base = text.rstrip("/").split("/")[-1]
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in base).strip("-") or "run"


def make_optimizer(cfg: TrainConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """Adam or SGD with the config's learning rate, momentum and weight decay."""
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    raise UserError(f"unknown --optimizer {cfg.optimizer!r}; use adam or sgd")


def check_config(cfg: TrainConfig) -> None:
    """Refuse a config that cannot train, with a message that says what to change."""
    if cfg.epochs < 1:
        raise UserError(f"--epochs must be at least 1, got {cfg.epochs}")
    if cfg.batch < 2:
        raise UserError(f"--batch must be at least 2 (BatchNorm needs 2 samples), got {cfg.batch}")
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise UserError(f"--lr must be a positive number, got {cfg.lr}")
    if cfg.optimizer not in ("adam", "sgd"):
        raise UserError(f"unknown --optimizer {cfg.optimizer!r}; use adam or sgd")
    if not (cfg.momentum >= 0 and math.isfinite(cfg.momentum)):
        raise UserError(f"--momentum must be a number >= 0, got {cfg.momentum}")
    if not (cfg.weight_decay >= 0 and math.isfinite(cfg.weight_decay)):
        raise UserError(f"--weight-decay must be a number >= 0, got {cfg.weight_decay}")
    if cfg.save_every < 0:
        raise UserError(f"--save-every must be 0 (per epoch only) or a number of steps, got {cfg.save_every}")
    data_mod.parse_samples(cfg.samples)


def epoch_order(n: int, seed: int, epoch: int, device: torch.device) -> torch.Tensor:
    """The sample order of one epoch: a function of (seed, epoch) alone, so resume is exact."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=gen).to(device)


# --- metrics.csv ------------------------------------------------------------------------
def truncate_metrics(path: Path, before_step: int) -> tuple[list[str] | None, int]:
    """Keep only the rows of ``metrics.csv`` with ``step < before_step``: the rows that the
    checkpoint being resumed from has seen. A torn last line (a crash mid-write) goes too.

    Returns the file's header (None if there is no file) and the number of rows kept.
    """
    if not path.exists():
        return None, 0
    with open(path, newline="") as f:
        lines = f.read().splitlines(keepends=True)
    if not lines:
        return None, 0
    header = next(csv.reader([lines[0]]))
    step_col = header.index("step") if "step" in header else 1
    kept = [lines[0]]
    for line in lines[1:]:
        fields = next(csv.reader([line]), [])
        if not line.endswith("\n") or len(fields) != len(header):
            break
        if int(fields[step_col]) >= before_step:
            break
        kept.append(line)
    if len(kept) != len(lines):
        files.write_text_atomic(path, "".join(kept))
    return header, len(kept) - 1


class MetricsLog:
    """Appends probe rows to ``metrics.csv``, one flushed row at a time, so a crash or a
    divergence keeps everything recorded; ``metrics.json`` says how they were measured."""

    def __init__(self, out: Path, settings: dict[str, Any], columns: list[str], start_step: int) -> None:
        self.path = out / "metrics.csv"
        self.meta_path = out / "metrics.json"
        header, kept = truncate_metrics(self.path, start_step)
        old = json.loads(self.meta_path.read_text()) if self.meta_path.exists() else {}
        if kept and (header != columns or old.get("probe") != settings):
            raise UserError(f"{self.path} holds {kept} rows probed with other settings ({old.get('probe')}); "
                            f"use the same --probe-* options to resume, or another --out")
        self.meta: dict[str, Any] = {"probe": settings, "columns": columns}
        if kept and old.get("chosen"):
            self.meta |= {k: old[k] for k in ("chosen", "timings_s", "device") if k in old}
        self.write_meta()
        self.rows = kept
        fresh = header is None or not kept
        self._file = open(self.path, "w" if fresh else "a", newline="")  # closed by close()
        self._writer = csv.writer(self._file, lineterminator="\n")
        if fresh:
            self._writer.writerow(columns)
            self._file.flush()

    def write_meta(self) -> None:
        files.write_text_atomic(self.meta_path, json.dumps(self.meta, indent=2) + "\n")

    def write(self, row: list[float | int]) -> None:
        try:
            self._writer.writerow([repr(v) if isinstance(v, float) else v for v in row])
            self._file.flush()
        except OSError as err:  # a full disk: the rows before are kept (a torn last row is dropped on resume)
            raise os_error(err, str(self.path)) from None
        self.rows += 1

    def close(self) -> None:
        try:
            self._file.close()
        except OSError:
            pass  # the row that could not be flushed was reported by write(); the rows before are on disk


def _setup_probe(probe: ProbeConfig, cfg: TrainConfig, model: nn.Module, task: Task, out: Path, start_step: int,
                 dev: torch.device) -> tuple[probes.SmoothnessProbe, MetricsLog]:
    etas = probe.resolve(cfg.lr)
    settings = {"every": probe.every, "etas": list(etas), "mode": probe.mode}
    log = MetricsLog(out, settings, probes.metric_columns(len(etas)), start_step)
    prober = probes.SmoothnessProbe(model, etas, probe.mode, task)
    # a resumed run keeps the path it chose at its start, so its rows stay bit-identical
    if log.meta.get("chosen") and log.meta.get("device") == device_mod.describe(dev):
        prober.chosen = log.meta["chosen"]
    return prober, log


class Progress:
    """A progress bar with ETA on a terminal; otherwise a line every ``LINE_SECONDS``, so a log shows the run moving."""

    LINE_SECONDS = 30.0

    def __init__(self, total: int, desc: str, enabled: bool) -> None:
        self.enabled, self.total, self.desc = enabled, total, desc
        self.tty = enabled and sys.stderr.isatty()
        self.bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True) if self.tty else None
        self.t0 = self.last = time.perf_counter()
        self.done = 0

    def update(self, loss: float) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
            if self.done % 20 == 1:
                self.bar.set_postfix(loss=f"{loss:.3f}")
            return
        now = time.perf_counter()
        if self.enabled and now - self.last >= self.LINE_SECONDS:
            self.last = now
            rate = self.done / (now - self.t0)
            eta = (self.total - self.done) / rate if rate > 0 else float("nan")
            print(f"{self.desc}: step {self.done}/{self.total}, loss {loss:.4f}, {rate:.2f} steps/s, "
                  f"ETA {eta / 60:.1f} min", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --- training ---------------------------------------------------------------------------
def train(cfg: TrainConfig, out: Path, probe: ProbeConfig | None = None, progress: bool = True,
          trainset: data_mod.EvalSet | None = None, model: nn.Module | None = None,
          loss_fn: LossFn | str | None = None) -> Path:
    """Train (or resume) a run in ``out``; returns the path of ``final.pt``.

    Writes ``epoch_000.pt`` (the initial weights), ``epoch_XXX.pt`` after each epoch, with
    ``cfg.save_every`` also ``step_XXXXXXX.pt``, and ``final.pt`` at the end. An existing run
    directory with the same config resumes after its last complete epoch; ``metrics.csv`` is
    cut back to that epoch's last step, so the rows that follow are the ones an uninterrupted
    run writes. With ``probe``, the smoothness probes run every ``probe.every`` steps between
    ``backward()`` and ``optimizer.step()``. ``model`` (initial weights) and ``loss_fn`` override
    ``cfg.model`` and ``cfg.loss`` for the Python API. A non-finite loss stops the run with a
    ``UserError``; what was recorded is kept. One process trains in a folder at a time.
    """
    check_config(cfg)
    if probe is not None:
        probe.check()
    dev = device_mod.resolve(cfg.device)
    out = files.check_output_dir(out, option="--out")
    with files.WriteLock(out, "run folder"):
        return _train_locked(cfg, out, probe, progress, trainset, model, loss_fn, dev)


def _train_locked(cfg: TrainConfig, out: Path, probe: ProbeConfig | None, progress: bool,
                  trainset: data_mod.EvalSet | None, given: nn.Module | None, loss_fn: LossFn | str | None,
                  dev: torch.device) -> Path:
    final = out / "final.pt"
    files.discard_stale(out)  # checkpoints a killed run was writing (this process holds the folder's lock)
    if trainset is None:
        trainset = data_mod.load(cfg.data, "train", cfg.samples, seed=cfg.seed, device=dev)
    if not isinstance(trainset, data_mod.EvalSet):
        raise UserError("training needs data that fit in memory (an EvalSet); this DataLoader was too large to cache")
    trainset = trainset.to(dev)
    torch.manual_seed(cfg.seed)
    model = copy.deepcopy(given).to(dev) if given is not None else models.create(cfg.model, **cfg.model_args).to(dev)
    model.train()
    x0, y0 = trainset.take(torch.arange(min(2, len(trainset)), device=dev))
    with torch.no_grad():
        task = losses.resolve(loss_fn if loss_fn is not None else (None if cfg.loss == "auto" else cfg.loss),
                              model.eval()(x0), y0)
    model.train()
    if task.name == "cross_entropy":
        losses.check_classes(int(model.eval()(x0).shape[1]), trainset.targets)
        model.train()
    cfg_path = out / "config.json"
    cfg_dict = asdict(cfg) | {"data_source": trainset.source, "data_sha256": trainset.fingerprint, "loss": task.name,
                              "init_sha256": _init_sha(model)}
    if cfg_path.exists():
        try:
            old = json.loads(cfg_path.read_text())
        except (ValueError, UnicodeDecodeError):
            raise UserError(f"{cfg_path} is empty or corrupt; delete it (or the whole folder) to start the run again, "
                            "or choose another --out") from None
        if not isinstance(old, dict):
            raise UserError(f"{cfg_path} is not a fastland run config; choose another --out")
        diff = [k for k in sorted(set(old) | set(cfg_dict)) if k != "device" and old.get(k) != cfg_dict.get(k)]
        if diff:
            raise UserError(f"{out} holds a run with another configuration ({diff[0]}: {old.get(diff[0])!r} there, "
                            f"{cfg_dict.get(diff[0])!r} now); pick another --out or delete it")
    if not final.exists():  # room for the rest of the run, before writing anything
        last = max((int(p.stem[6:]) for p in out.glob("epoch_*.pt") if p.stem[6:].isdigit()), default=0)
        files.check_disk(out, run_size(cfg, model, math.ceil(len(trainset) / cfg.batch), last, probe), "--out", out)
    files.write_text_atomic(cfg_path, json.dumps(cfg_dict, indent=2) + "\n")
    if final.exists():
        if probe is not None and progress and not (out / "metrics.csv").exists():
            print(f"note: {out} was trained without probes and is finished; use another --out to probe a new run")
        return final

    opt = make_optimizer(cfg, list(model.parameters()))
    name = cfg.model if given is None else None  # a module given in Python names no buildable model
    meta_base = {"data": trainset.attrs(), "optimizer": cfg.optimizer, "lr": cfg.lr, "batch": cfg.batch,
                 "seed": cfg.seed, "loss": task.name}
    start_epoch, step, meta = 0, 0, dict(meta_base, epoch=0, step=0)
    done = sorted(out.glob("epoch_*.pt"))
    if done:
        ckpt = models.read_checkpoint(done[-1])
        if "optimizer" not in ckpt:
            raise UserError(f"{done[-1]} has no optimizer state, so the run cannot resume from it; delete it (and "
                            "later epochs) to resume from the one before, or choose another --out")
        models.load_state(model, ckpt["state_dict"], str(done[-1]))
        try:
            opt.load_state_dict(ckpt["optimizer"])
            meta = dict(ckpt["meta"])
            start_epoch, step = int(meta["epoch"]), int(meta["step"])
        except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as err:
            raise UserError(f"{done[-1]} holds an optimizer state or epoch record this run cannot resume from "
                            f"({type(err).__name__}: {str(err)[:120]}); delete it (and later epochs) to resume from the "
                            "one before, or choose another --out") from None
        if progress and start_epoch:
            print(f"resuming {out} after epoch {start_epoch}")
    else:
        models.save_checkpoint(out / "epoch_000.pt", name, model, meta, extra={"optimizer": opt.state_dict()},
                               model_args=cfg.model_args)
    n = len(trainset)
    steps = math.ceil(n / cfg.batch)
    prober, log, every = None, None, 0
    if probe is not None:
        every = probe.every
        prober, log = _setup_probe(probe, cfg, model, task, out, step, dev)
    else:
        truncate_metrics(out / "metrics.csv", step)
    has_bn = models.has_batchnorm(model)
    try:
        for epoch in range(start_epoch, cfg.epochs):
            model.train()
            order = epoch_order(n, cfg.seed, epoch, dev)
            bar = Progress(steps, f"epoch {epoch + 1}/{cfg.epochs}", progress)
            loss_sum, correct, seen, t0, probe_s = 0.0, 0, 0, time.perf_counter(), 0.0
            for b in range(steps):
                idx = order[b * cfg.batch : (b + 1) * cfg.batch]
                if idx.numel() < 2 and has_bn:
                    continue  # a batch of one cannot be batch-normalized
                x, y = trainset.take(idx)
                opt.zero_grad(set_to_none=True)
                outputs = model(x)
                loss = task.batch_loss(outputs, y)
                loss.backward()
                loss_value = float(loss.detach())
                if not math.isfinite(loss_value):
                    kept = [f"the checkpoints of epochs 1-{epoch}"] if epoch else []
                    kept += [f"{log.rows} probe rows in metrics.csv"] if log is not None else []
                    raise UserError(f"training diverged at epoch {epoch + 1}, step {step}: loss is {loss_value}; "
                                    f"{' and '.join(kept) or 'the config'} kept in {out}; try a smaller --lr")
                hits = int((outputs.detach().argmax(-1) == y).sum()) if task.accuracy else 0
                if prober is not None and log is not None and step % every == 0:
                    tp = time.perf_counter()
                    result = prober(model, x, y, from_grad=True, loss=loss.detach())  # g: this step's own .grad
                    probe_s += time.perf_counter() - tp
                    log.write(probes.metric_row(epoch + 1, step, loss_value, 100.0 * hits / len(idx), result))
                    if "chosen" not in log.meta:
                        log.meta |= {"chosen": prober.chosen, "timings_s": prober.timings,
                                     "device": device_mod.describe(dev)}
                        log.write_meta()
                opt.step()
                step += 1
                loss_sum += loss_value * len(idx)
                seen += len(idx)
                correct += hits
                bar.update(loss_value)
                if cfg.save_every and step % cfg.save_every == 0:
                    models.save_checkpoint(out / f"step_{step:07d}.pt", name, model,
                                           meta_base | {"epoch": epoch + (b + 1) / steps, "step": step},
                                           model_args=cfg.model_args)
            bar.close()
            meta = meta_base | {"epoch": epoch + 1, "step": step, "train_loss": loss_sum / max(seen, 1),
                                "train_acc": 100.0 * correct / max(seen, 1) if task.accuracy else float("nan"),
                                "epoch_seconds": time.perf_counter() - t0, "probe_seconds": probe_s}
            models.save_checkpoint(out / f"epoch_{epoch + 1:03d}.pt", name, model, meta,
                                   extra={"optimizer": opt.state_dict()}, model_args=cfg.model_args)
            if progress:
                probed = f" (probes {probe_s:.1f}s, {prober.chosen})" if prober is not None else ""
                acc = f", acc {meta['train_acc']:.1f}%" if task.accuracy else ""
                print(f"epoch {epoch + 1}/{cfg.epochs}: loss {meta['train_loss']:.4f}{acc}, "
                      f"{meta['epoch_seconds']:.1f}s{probed}", flush=True)
    finally:
        if log is not None:
            log.close()
    models.save_checkpoint(final, name, model, meta, model_args=cfg.model_args)
    return final


def run_size(cfg: TrainConfig, model: nn.Module, steps: int, start_epoch: int, probe: ProbeConfig | None) -> int:
    """Bytes the rest of a run writes: per epoch a checkpoint with the optimizer's state (Adam keeps
    two tensors per parameter, SGD with momentum one), ``final.pt``, the ``--save-every`` step files
    and the probe rows of ``metrics.csv``."""
    overhead = 1 << 16  # torch's zip container, names, meta
    state = sum(t.numel() * t.element_size() for t in model.state_dict().values()) + overhead
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    slots = 2 if cfg.optimizer == "adam" else int(cfg.momentum > 0)
    epochs = max(0, cfg.epochs - start_epoch)
    size = epochs * (state + slots * params) + state
    if cfg.save_every:
        size += epochs * steps // cfg.save_every * state
    if probe is not None:
        k = len(probe.etas) if probe.etas is not None else probe.count
        size += epochs * steps // probe.every * (len(probes.BASE_COLUMNS) + 2 * k) * 24  # ~24 characters a value
    return size


def _init_sha(model: nn.Module) -> str:
    """sha256 of the initial weights: a resumed run must start from the same ones."""
    return api.state_sha256(model)


# --- command line -----------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The ``python -m fastland.train`` options; hyper-parameters default to the preset's."""
    d, s = TrainConfig(), PRESETS["seed"]
    p = ArgumentParser(prog="python -m fastland.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("what to train")
    which = g.add_mutually_exclusive_group()
    which.add_argument("--model", default=None,
                       help=f"a built-in model ({', '.join(models.MODELS)}; default {d.model}) or a model of yours as "
                            "package.module:factory (a class or function returning an nn.Module, on PYTHONPATH)")
    which.add_argument("--compare", nargs="+", metavar="MODEL", default=None,
                       help="train several models with the same settings, e.g. '--compare lenet lenet_bn', into "
                            "OUT/MODEL side by side, and overlay their probes in OUT/smoothness.png")
    g.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="an argument for the model factory (repeat it); values are Python literals or strings")
    g.add_argument("--data", default=d.data,
                   help="cifar10, synthetic, auto (CIFAR-10 if present or downloadable, else synthetic; default), or "
                        "imagefolder:PATH (a torchvision ImageFolder tree with train/ and test/, or a .tar.gz of one)")
    g.add_argument("--loss", default="auto", choices=("auto", *losses.NAMED),
                   help="the training loss: auto (cross-entropy for integer targets, MSE for float ones; default)")
    g.add_argument("--samples", default=d.samples,
                   help="training samples: a number (a seeded subset) or 'all' (default all)")
    g.add_argument("--seed", type=int, default=d.seed,
                   help="seed of the initialization, the data subset and the per-epoch sample order (default 0)")
    g.add_argument("--device", default=d.device, help="auto, cpu, cuda or cuda:N (default auto)")
    g.add_argument("--out", default=None,
                   help="run directory (default runs/MODEL-SOURCE); with --compare the parent folder "
                        "(default runs/compare-MODEL1-MODEL2-SOURCE)")
    g.add_argument("--save-every", type=int, default=0, metavar="STEPS",
                   help="also save the weights every STEPS steps (step_XXXXXXX.pt), for finer trajectories "
                        "(python -m fastland.trajectory); default 0: after each epoch only")

    h = p.add_argument_group("hyper-parameters (defaults come from --preset; any option given overrides it)")
    h.add_argument("--preset", default="seed", choices=tuple(PRESETS),
                   help="seed: Adam, lr 0.01, batch 128, 20 epochs (default); santurkar: plain SGD, lr 0.1, batch 128, "
                        "20 epochs. Both: cross-entropy, no augmentation, no weight decay")
    h.add_argument("--optimizer", default=None, help=f"adam or sgd (seed: {s['optimizer']})")
    h.add_argument("--lr", type=float, default=None, help=f"learning rate (seed: {s['lr']}, santurkar: 0.1)")
    h.add_argument("--batch", type=int, default=None, help=f"minibatch size (seed: {s['batch']})")
    h.add_argument("--epochs", type=int, default=None, help=f"number of epochs (seed: {s['epochs']})")
    h.add_argument("--momentum", type=float, default=None, help="SGD momentum (0)")
    h.add_argument("--weight-decay", type=float, default=None, help="L2 weight decay (0)")

    q = p.add_argument_group("smoothness probes (Santurkar et al.; on by default, at every step)")
    q.add_argument("--probe-every", type=int, default=1, metavar="K",
                   help="probe every K-th training step (default 1: every step, as the paper)")
    q.add_argument("--probe-steps", default=None, metavar="LIST",
                   help="the step lengths η of H, an explicit list such as 0.005,0.01,0.02 (default: --probe-count "
                        "values spaced linearly from 0.5·lr to 4·lr, i.e. {0.5, 1.0, ..., 4.0}·lr, which contains lr)")
    q.add_argument("--probe-count", type=int, default=probes.ETA_COUNT, metavar="N",
                   help="how many step lengths the default grid has (default 8)")
    q.add_argument("--probe-mode", default="auto", choices=probes.MODES,
                   help="layered: the perturbed gradients layer by layer, for a flat Sequential of conv, linear, BN, "
                        "ReLU, max-pool and flatten layers (LeNet, VGG), bit for bit the sequential path's numbers in "
                        "about 2/3 of its time on the CPU; batched: all in one vmap(grad) call; sequential: one "
                        "torch.func.grad after another, any model; auto (default): layered on the CPU where the model "
                        "fits, else sequential; batched on CUDA")
    q.add_argument("--no-probe", action="store_true", help="train without probes (no metrics.csv)")
    return p


def config_from_args(args: argparse.Namespace, model: str) -> TrainConfig:
    """The ``TrainConfig`` of ``model``: preset values, overridden by the options given."""
    preset = PRESETS[args.preset]
    values = {k: getattr(args, k) if getattr(args, k) is not None else preset[k]
              for k in ("optimizer", "lr", "batch", "epochs", "momentum", "weight_decay")}
    return TrainConfig(model=model, data=args.data, samples=args.samples, seed=args.seed, device=args.device,
                       loss=args.loss, save_every=args.save_every, model_args=models.parse_model_args(args.model_arg),
                       **values)


def probe_from_args(args: argparse.Namespace) -> ProbeConfig | None:
    """The probe settings the options ask for (None with ``--no-probe``)."""
    if args.no_probe:
        return None
    etas = probes.parse_etas(args.probe_steps) if args.probe_steps is not None else None
    probe = ProbeConfig(every=args.probe_every, etas=etas, count=args.probe_count, mode=args.probe_mode)
    probe.check()
    return probe


def _run(cfg: TrainConfig, out: Path, probe: ProbeConfig | None, trainset: data_mod.EvalSet) -> Path:
    """Train one run and plot its probes; a diverged run gets its plot too, then the error."""
    title = f"{cfg.model} ({cfg.optimizer}, lr {cfg.lr})"
    try:
        final = train(cfg, out, probe, trainset=trainset)
    except BaseException:
        if probe is not None and (out / "metrics.csv").exists():
            _plot_after_failure({cfg.model: out}, out / "smoothness.png", title)
        raise
    if probe is not None and (out / "metrics.csv").exists():
        from fastland import trainplots  # matplotlib is only needed here

        trainplots.plot_runs({cfg.model: out}, out / "smoothness.png", title=title)
    meta = models.read_checkpoint(final)["meta"]
    note = f", probes -> {out / 'metrics.csv'}" if probe is not None else ""
    print(f"{cfg.model}: final train loss {meta.get('train_loss', float('nan')):.4f}, "
          f"acc {meta.get('train_acc', float('nan')):.1f}% -> {final}{note}")
    return final


def _plot_after_failure(runs: dict[str, Path], path: Path, title: str) -> None:
    """Plot what a failed run recorded; a failure to plot (the same full disk...) must not hide why the run stopped."""
    try:
        from fastland import trainplots

        trainplots.plot_runs(runs, path, title=title)
    except Exception:  # noqa: BLE001, S110 - the run's own error is the one to report
        pass


@cli_entry
def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m fastland.train``."""
    args = build_parser().parse_args(argv)
    names = args.compare or [args.model or TrainConfig().model]
    if args.compare is not None and len(set(names)) < 2:
        raise UserError("--compare needs at least two different models, e.g. --compare lenet lenet_bn")
    data_mod.check_spec(args.data)
    cfgs = [config_from_args(args, name) for name in names]
    for cfg in cfgs:
        check_config(cfg)
        models.create(cfg.model, **cfg.model_args)  # a bad model spec fails now, not after loading the data
    probe = probe_from_args(args)
    dev = device_mod.resolve(cfgs[0].device)
    files.check_output_dir(args.out or "runs")  # before the data are loaded (a download, a folder decoded)
    trainset = data_mod.load(cfgs[0].data, "train", cfgs[0].samples, seed=cfgs[0].seed, device=dev)
    t0 = time.perf_counter()
    if args.compare is None:
        out = Path(args.out) if args.out else default_run_dir(cfgs[0].model, trainset.source)
        _run(cfgs[0], out, probe, trainset)
    else:
        from fastland import trainplots

        parent = Path(args.out) if args.out else Path("runs") / f"compare-{'-'.join(names)}-{trainset.source}"
        runs = {cfg.model: parent / slug(cfg.model) for cfg in cfgs}
        title = f"{' vs '.join(names)} ({cfgs[0].optimizer}, lr {cfgs[0].lr})"
        try:
            for cfg in cfgs:
                _run(cfg, runs[cfg.model], probe, trainset)
        except BaseException:
            have = {m: d for m, d in runs.items() if (d / "metrics.csv").exists()}
            if probe is not None and have:
                _plot_after_failure(have, parent / "smoothness.png", title)
            raise
        have = {m: d for m, d in runs.items() if (d / "metrics.csv").exists()}
        if probe is not None and have:
            trainplots.plot_runs(have, parent / "smoothness.png", title=title)
        if probe is not None:
            print(f"comparison plot -> {parent / 'smoothness.png'}")
    print(f"done in {time.perf_counter() - t0:.1f}s")


make_callable(__name__, api.train)

if __name__ == "__main__":
    main()
