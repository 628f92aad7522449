"""``python -m fastland.study``: the seed's BatchNorm study, and the questions after it, in one command.

For each model it

1. trains with Santurkar et al.'s smoothness probes (``fastland.train``; ``MODEL/train/``),
2. evaluates the final weights on both splits (``fastland.evaluate``; ``MODEL/evaluation.json``),
3. computes a filter-normalized 2-D surface around them (``fastland.surface``; ``MODEL/surface.h5``),
4. takes the Hessian's top eigenvalue and trace there (``fastland.hessian``; ``MODEL/hessian.json``),
   with BN in eval mode (running statistics, as the surfaces) and, for BN models, also in batch
   mode (batch statistics, the Hessian Santurkar et al. reason about),
5. draws the optimizer's path on the PCA plane of its checkpoints (``fastland.trajectory.figure``,
   Li et al.'s Figure 9; ``MODEL/trajectory.h5``).

Then it draws Figure 1 (the probes, with against without BN) and Figure 2 (the surfaces side by
side, linear and log) and writes ``report.md`` and ``report.html``. Every number in the report is
read back from the files above and collected in ``results.json``. Every stage is resumable: a
finished stage is reused, an interrupted one continues where it stopped. A folder holding a study
made with other settings is refused; ``--overwrite`` starts it again.
"""

from __future__ import annotations

import argparse
import dataclasses
import html
import json
import math
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import fastland
from fastland import data as data_mod
from fastland import device as device_mod
from fastland import files, hessian, models, probes, surfacefile, trajectory
from fastland.errors import ArgumentParser, UserError, cli_entry
from fastland.train import PRESETS as TRAIN_PRESETS
from fastland.train import slug

# The seed's experiment (../seed, Sec. 3), which the report compares each preset with.
SEED = {"models": ["lenet", "lenet_bn", "vgg16", "vgg16_bn"], "epochs": 20, "train_samples": "all", "probe_every": 1}

PRESETS: dict[str, dict[str, Any]] = {
    # LeNet with and without BN in 6.7 minutes on one thread of the 2-core CPU (docs/study/README.md), well
    # inside the 20-minute target: all 50,000 training images but 6 epochs, a probe every 4th step (a probe
    # costs ~6 plain steps on the CPU, benchmarks/results/train-cpu-2026-11-25.md: the probes are still about
    # half of training), the surfaces, trajectories and Hessians on 1,024 training images.
    "quick": {"models": ["lenet", "lenet_bn"], "epochs": 6, "train_samples": "all", "probe_every": 4, "res": 51,
              "samples": "1024", "eval_samples": "10000", "hessian_samples": "1024", "hessian_hvps": 100,
              "trajectory_res": 31},
    # The seed's experiment: four models, 20 epochs of Adam (lr 0.01, batch 128) on all data, probes at
    # every step; surfaces on the surface command's default sample count (10,000 on CUDA). For a GPU.
    "seed": {"models": SEED["models"], "epochs": 20, "train_samples": "all", "probe_every": 1, "res": 51,
             "samples": None, "eval_samples": "10000", "hessian_samples": "2048", "hessian_hvps": 100,
             "trajectory_res": 31},
    # Li et al.'s Figure 5 question with BN added: ResNet-20 with and without skip connections, each with
    # and without BN (on CUDA ResNet-56 and bigger sizes: CUDA_PRESETS). About an hour of one CPU core,
    # estimated from measured unit costs (single thread: a ResNet-20 step on 128 images 0.45 s, a probe
    # 4 s, a grid point on 256 images 0.23 s, an HVP on 128 images ~1.5 s): 25 min training, 7 min
    # surfaces, ~12 min Hessians, 4 min trajectories.
    # Adam at lr 0.001, not the seed's 0.01: at 0.01 ResNet-20 without BN stays at chance (measured: 10.4%
    # training accuracy after 3 epochs on 5,000 images), which would leave no like-for-like comparison.
    "resnet": {"models": ["resnet20", "resnet20_bn", "resnet20_noskip", "resnet20_noskip_bn"], "epochs": 5, "lr": 0.001,
               "train_samples": "10000", "probe_every": 10, "res": 21, "samples": "256", "eval_samples": "2000",
               "hessian_samples": "128", "hessian_hvps": 60, "trajectory_res": 15},
}
# What a preset becomes on a CUDA device.
CUDA_PRESETS: dict[str, dict[str, Any]] = {
    "resnet": {"models": ["resnet56", "resnet56_bn", "resnet56_noskip", "resnet56_noskip_bn"], "epochs": 20, "lr": 0.001,
               "train_samples": "all", "probe_every": 2, "res": 51, "samples": "5000", "eval_samples": "10000",
               "hessian_samples": "2048", "hessian_hvps": 100, "trajectory_res": 31},
}
RADII = (0.25, 0.5, 1.0)
EIG_TOL = 1e-3  # relative residual of the top Hessian eigenpair (fastland.hessian.top_eigenvalues)
TRACE_TOL = 0.05  # the trace estimate stops at a standard error of 5% of |trace|
TRACE_MIN_HVPS = 34  # Hutch++ spends 2 x 16 HVPs on its sketch, then needs 2 samples at least
TRAJECTORY_POINTS = 24  # checkpoints along each path when the epochs alone give too few
SIMILAR = 1.1  # two numbers within 10% of each other are called about equal in the findings
STATS_MISFIT = 1.25  # eval-mode loss above 1.25x the batch-statistics loss: the running statistics do not fit
OVERRIDES = ("models", "epochs", "train_samples", "probe_every", "res", "samples", "eval_samples", "hessian_samples",
             "hessian_hvps", "trajectory_res")


# --- numbers read back from the files the stages wrote ---------------------------------------------
def probe_stats(metrics_csv: Path) -> dict[str, float]:
    """Median and 90th percentile of β-smoothness, gradient predictiveness and loss-variation band width."""
    m = probes.read_metrics(metrics_csv)
    out: dict[str, float] = {"probes": float(len(m.get("step", [])))}
    for key, values in (("beta", m["beta_smooth"]), ("band", m["loss_max"] - m["loss_min"]),
                        ("gradpred", m["gradpred_max"])):
        v = values[np.isfinite(values)]
        out[f"{key}_median"] = float(np.median(v)) if v.size else float("nan")
        out[f"{key}_p90"] = float(np.percentile(v, 90)) if v.size else float("nan")
    return out


def flatness(s: surfacefile.Surface) -> dict[str, float]:
    """The loss range over the grid (max − min), and the mean and max rise of the loss above the grid
    minimum at distance r from it.

    The ring at radius r holds the grid points whose distance from the minimum lies within half a
    grid step of r; points outside the grid do not count. Non-finite losses are kept as they are.
    """
    loss = np.where(s.done == 1, s.loss, np.nan)
    xx, yy = np.meshgrid(s.x, s.y)
    j = int(np.nanargmin(np.where(np.isfinite(loss), loss, np.inf)))
    x0, y0, lmin = xx.reshape(-1)[j], yy.reshape(-1)[j], loss.reshape(-1)[j]
    dist = np.hypot(xx - x0, yy - y0)
    half = 0.5 * max(s.x[1] - s.x[0], s.y[1] - s.y[0])
    out = {"min_loss": float(lmin), "min_alpha": float(x0), "min_beta": float(y0),
           "loss_range": float(np.max(loss[s.done == 1]) - lmin)}  # inf/NaN shown as is
    for r in RADII:
        ring = (np.abs(dist - r) < half) & (dist > 0)
        rise = loss[ring] - lmin
        finite = rise[np.isfinite(rise)]
        out[f"rise_mean_{r}"] = float(finite.mean()) if finite.size else float("nan")
        out[f"rise_max_{r}"] = float(rise.max()) if rise.size else float("nan")  # inf/NaN shown as is
    return out


def hessian_numbers(path: Path) -> dict[str, Any]:
    """λmax and trace per BN mode from ``hessian.json``, with whether each estimate converged."""
    rec = json.loads(path.read_text())
    out: dict[str, Any] = {"hessian_samples": rec["settings"]["samples"]}
    for mode, m in rec["modes"].items():
        eig, tr = m["top_eigenvalue"], m["trace"]
        out |= {f"lambda_max_{mode}": float(eig["values"][0]), f"lambda_max_{mode}_converged": bool(eig["converged"]),
                f"trace_{mode}": float(tr["trace"]), f"trace_{mode}_stderr": float(tr["stderr"]),
                f"trace_{mode}_converged": bool(tr["converged"]), f"hessian_{mode}_hvps": eig["hvps"] + tr["hvps"]}
    return out


def trajectory_numbers(s: surfacefile.Surface) -> dict[str, float]:
    """From a trajectory surface: the variance on the two PCA axes (%) and the distance from the initial
    weights to the final ones (the first checkpoint's in-plane coordinates and its residual off the plane;
    the parameters that take part: biases and BN parameters are left out, as in Li et al.)."""
    ex = s.extras
    ratio = np.asarray(ex["explained_variance_ratio_"], dtype=np.float64)
    c = np.array([ex["proj_xcoord"][0], ex["proj_ycoord"][0]], dtype=np.float64)
    res0 = float(ex["proj_residual"][0]) if "proj_residual" in ex else 0.0
    return {"pc1_variance": 100 * float(ratio[0]), "pc2_variance": 100 * float(ratio[1]),
            "init_distance": float(math.sqrt(float(c @ c) + res0**2)), "trajectory_points": int(len(ex["proj_xcoord"]))}


def collect(out: Path, name: str) -> dict[str, Any]:
    """Every number of one model, read from the files its stages wrote."""
    d = out / name
    ev = json.loads((d / "evaluation.json").read_text())
    r: dict[str, Any] = {"train_loss": ev["train"]["loss"], "train_acc": ev["train"]["accuracy"],
                         "test_loss": ev["test"]["loss"], "test_acc": ev["test"]["accuracy"]}
    if ev.get("train_batch_stats"):
        r |= {"train_loss_batch": ev["train_batch_stats"]["loss"], "train_acc_batch": ev["train_batch_stats"]["accuracy"]}
    elif "train_batch_stats" in ev:
        r["train_loss_batch"] = None  # no BN
    r |= probe_stats(d / "train" / "metrics.csv")
    r |= flatness(surfacefile.read(d / "surface.h5"))
    r |= hessian_numbers(d / "hessian.json")
    if (d / "trajectory.h5").exists():
        r |= trajectory_numbers(surfacefile.read(d / "trajectory.h5"))
    return r


# --- the stages ----------------------------------------------------------------------------------
@dataclass
class Stages:
    """Wall and CPU times of the finished stages, kept in ``stages.json`` (wall) and ``stages_cpu.json``
    (user + system seconds of this process, all threads) so a re-run can reuse them. On a shared
    machine the CPU time says what a stage costs; the wall time, what it took."""

    path: Path
    done: dict[str, float] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> Stages:
        cpu = path.with_name("stages_cpu.json")
        return cls(path, _read_json(path), _read_json(cpu))

    def run(self, key: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run a stage (each stage function is itself resumable), timing it unless reused."""
        reused = key in self.done
        print(f"\n== {key}{' (finished before: checking)' if reused else ''}", flush=True)
        t0, c0 = time.perf_counter(), time.process_time()
        result = fn(*args, **kwargs)
        if not reused:
            self.record(key, time.perf_counter() - t0, time.process_time() - c0)
        return result

    def record(self, key: str, seconds: float, cpu_seconds: float) -> None:
        self.done[key], self.cpu[key] = seconds, cpu_seconds
        files.write_text_atomic(self.path, json.dumps(self.done, indent=2) + "\n")
        files.write_text_atomic(self.path.with_name("stages_cpu.json"), json.dumps(self.cpu, indent=2) + "\n")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return rec if isinstance(rec, dict) else {}


def evaluate_stage(final: Path, sets: dict[str, data_mod.EvalSet], path: Path, dev: torch.device,
                   batch_size: int = 128) -> None:
    """Loss and accuracy of the final weights on each split (eval mode), into ``evaluation.json``; for a BN
    model also on the training split with each batch's statistics (batches of the training size,
    ``train_batch_stats``), which says whether the running statistics fit the weights; kept when that file
    already holds all of it for this checkpoint and these samples."""
    sha = models.sha256(final)
    old = _read_json(path)
    if old.get("checkpoint_sha256") == sha and "train_batch_stats" in old and all(
            old.get(s, {}).get("data_sha256") == ev.fingerprint for s, ev in sets.items()):
        print(f"kept {path}")
        return
    model, _, _ = models.load_checkpoint(final, dev)
    rec: dict[str, Any] = {"checkpoint": str(final), "checkpoint_sha256": sha, "bn_mode": "eval"}
    for split, ev in sets.items():
        r = fastland.evaluate(model, ev, device=dev)
        rec[split] = {"loss": r["loss"], "accuracy": r.get("accuracy", float("nan")), "samples": len(ev),
                      "data": ev.name or ev.source, "data_sha256": ev.fingerprint}
        print(f"{split}: loss {r['loss']:.4f}, accuracy {r.get('accuracy', float('nan')):.2f}% on {len(ev):,} images")
    rec["train_batch_stats"] = None  # no BN: the two modes are the same
    if models.has_batchnorm(model) and "train" in sets:
        r = fastland.evaluate(model, sets["train"], bn_mode="batch", batch_size=batch_size, device=dev)
        rec["train_batch_stats"] = {"loss": r["loss"], "accuracy": r.get("accuracy", float("nan")),
                                    "batch_size": batch_size}
        print(f"train, BN with batch statistics (batches of {batch_size}): loss {r['loss']:.4f}, accuracy "
              f"{r.get('accuracy', float('nan')):.2f}%")
    files.write_text_atomic(path, json.dumps(rec, indent=2) + "\n")


def hessian_stage(final: Path, hset: data_mod.EvalSet, path: Path, cfg: dict[str, Any], dev: torch.device) -> None:
    """The Hessian's top eigenvalue (Lanczos) and trace (Hutch++) at the final weights on ``hset``,
    with BN in eval mode and, for BN models, in batch mode (batches of the training batch size);
    each mode is written to ``hessian.json`` as soon as it is done, and kept on a re-run."""
    model, _, _ = models.load_checkpoint(final, dev)
    batch = int(cfg["batch"])
    settings = {"checkpoint_sha256": models.sha256(final), "data": hset.name or hset.source,
                "data_sha256": hset.fingerprint, "samples": len(hset), "batch_size": batch,
                "max_hvps": int(cfg["hessian_hvps"]), "eigenvalue_tol": EIG_TOL, "trace_tol": TRACE_TOL,
                "trace_method": "hutch++"}
    old = _read_json(path)
    rec = {"settings": settings, "modes": old.get("modes", {}) if old.get("settings") == settings else {}}
    x, y = hset.batch(0, len(hset))
    for mode in ("eval", "batch") if models.has_batchnorm(model) else ("eval",):
        if mode in rec["modes"]:
            m = rec["modes"][mode]
            print(f"BN {mode}: kept (λmax {m['top_eigenvalue']['values'][0]:.5g}, trace {m['trace']['trace']:.5g})")
            continue
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            eig = hessian.top_eigenvalues(model, (x, y), k=1, bn_mode=mode, tol=EIG_TOL, max_iter=int(cfg["hessian_hvps"]),
                                          batch_size=batch, progress=True)
            tr = hessian.trace(model, (x, y), bn_mode=mode, tol=TRACE_TOL, max_iter=int(cfg["hessian_hvps"]),
                               batch_size=batch, progress=True)
        for w in caught:  # not converged within --hessian-hvps: said once, and recorded in the file
            print(f"note: {w.message}")
        rec["modes"][mode] = {"top_eigenvalue": eig.record(), "trace": tr.record()}
        print(f"BN {mode}: λmax {float(eig.values[0]):.5g} ({eig.hvps} HVPs), trace {float(tr):.5g} ± {tr.stderr:.2g} "
              f"({tr.hvps} HVPs) on {len(hset):,} images")
        files.write_text_atomic(path, json.dumps(rec, indent=2) + "\n")


# --- settings ----------------------------------------------------------------------------------------
def _presets_say(key: str) -> str:
    """What each preset sets ``key`` to, for --help: 'quick 6, seed 20, resnet 5 (CUDA 20)'."""
    def show(v: Any) -> str:
        return "256 on a CPU, 10000 on CUDA (the surface command's default)" if v is None else str(v)

    parts = []
    for name, p in PRESETS.items():
        cuda = CUDA_PRESETS.get(name, {}).get(key)
        parts.append(f"{name} {show(p[key])}" + (f" (CUDA {show(cuda)})" if cuda is not None and cuda != p[key] else ""))
    return "presets: " + ", ".join(parts)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m fastland.study", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="quick", choices=tuple(PRESETS),
                   help="quick (default): LeNet with and without BN, 6 epochs on all 50,000 training images, a probe "
                        "every 4th step, 51x51 surfaces on 1,024 images (6.7 minutes on one CPU thread, measured); seed: the "
                        "seed's experiment, LeNet and VGG-16 with and without BN, 20 epochs, a probe every step (a "
                        "GPU); resnet: ResNet-20 (ResNet-56 on CUDA) with and without skip connections, each with "
                        "and without BN (48 minutes on one thread of a 2-core CPU, measured; 20 epochs on all data on CUDA)")
    p.add_argument("--models", nargs="+", default=None, choices=models.MODELS, metavar="MODEL",
                   help=f"override the preset's models: any of {', '.join(models.MODELS)}")
    p.add_argument("--train-preset", default="seed", choices=tuple(TRAIN_PRESETS),
                   help="optimizer settings: seed (Adam, lr 0.01, batch 128; default) or santurkar (SGD, lr 0.1, "
                        "batch 128)")
    p.add_argument("--lr", type=float, default=None,
                   help="the learning rate (default: the training preset's, 0.01 for seed and 0.1 for santurkar; the "
                        "resnet preset uses 0.001 with the seed's Adam)")
    p.add_argument("--epochs", type=int, default=None, help=f"training epochs ({_presets_say('epochs')})")
    p.add_argument("--train-samples", default=None,
                   help=f"training images: a number (a seeded subset) or 'all' ({_presets_say('train_samples')})")
    p.add_argument("--probe-every", type=int, default=None, metavar="K",
                   help="probe every K-th training step (1: every step, as the seed; a probe costs about 6 plain steps "
                        f"for LeNet on a CPU, more for VGG; {_presets_say('probe_every')})")
    p.add_argument("--res", type=int, default=None, help=f"surface points per axis ({_presets_say('res')})")
    p.add_argument("--samples", default=None,
                   help="training images the surfaces and trajectories are evaluated on, the first of the training "
                        f"subset: a number or 'all' ({_presets_say('samples')})")
    p.add_argument("--eval-samples", default=None,
                   help=f"images of each split for the final loss and accuracy ({_presets_say('eval_samples')})")
    p.add_argument("--hessian-samples", default=None,
                   help="training images the Hessian is taken on, the first of the surface's images "
                        f"({_presets_say('hessian_samples')})")
    p.add_argument("--hessian-hvps", type=int, default=None, metavar="N",
                   help=f"at most N Hessian-vector products for each estimate (top eigenvalue, trace), at least "
                        f"{TRACE_MIN_HVPS}; an estimate that has not converged by then is recorded as such "
                        f"({_presets_say('hessian_hvps')})")
    p.add_argument("--trajectory-res", type=int, default=None,
                   help=f"points per axis of the trajectory's PCA surface ({_presets_say('trajectory_res')})")
    p.add_argument("--bn-mode", default="eval", choices=("eval", "batch"),
                   help="BN mode of the surfaces and trajectories (eval: running statistics, as Li et al.)")
    p.add_argument("--data", default="auto",
                   help="cifar10, synthetic, auto (CIFAR-10 if present, else synthetic; default) or imagefolder:PATH "
                        "(an ImageFolder tree with train/ and test/, or a .tar.gz of one, such as "
                        "../shared/data/cifar10-jpeg.tar.gz)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int, default=0, help="seed of training, of the image subsets and of the surface directions")
    p.add_argument("--out", default=None, help="study folder (default study/PRESET-DATA)")
    p.add_argument("--overwrite", action="store_true",
                   help="start again in a folder that holds a study made with other settings (its models' folders, "
                        "figures and report are deleted first); without it such a folder is refused")
    return p


def settings(args: argparse.Namespace, dev: torch.device) -> dict[str, Any]:
    """The preset (its CUDA form on a GPU), overridden by the options given, checked."""
    s = dict(PRESETS[args.preset]) | (CUDA_PRESETS.get(args.preset, {}) if dev.type == "cuda" else {})
    for key in OVERRIDES:
        if getattr(args, key) is not None:
            s[key] = getattr(args, key)
    opt = TRAIN_PRESETS[args.train_preset]
    preset_lr = s.pop("lr", None)  # a preset's learning rate for the seed's Adam (resnet: see PRESETS)
    lr = args.lr if args.lr is not None else preset_lr if preset_lr is not None and args.train_preset == "seed" else opt["lr"]
    s |= {"optimizer": opt["optimizer"], "lr": lr, "batch": opt["batch"],
          "momentum": opt["momentum"], "bn_mode": args.bn_mode, "seed": args.seed}
    for key, option, low in (("epochs", "--epochs", 1), ("probe_every", "--probe-every", 1), ("res", "--res", 2),
                             ("trajectory_res", "--trajectory-res", 2), ("hessian_hvps", "--hessian-hvps", TRACE_MIN_HVPS)):
        if s[key] < low:
            raise UserError(f"{option} must be at least {low}, got {s[key]}")
    if not (s["lr"] > 0 and math.isfinite(s["lr"])):
        raise UserError(f"--lr must be a positive number, got {s['lr']}")
    if s["samples"] is None:  # the surface command's default
        s["samples"] = fastland.surface.DEFAULT_CUDA_SAMPLES if dev.type == "cuda" else fastland.surface.DEFAULT_CPU_SAMPLES
    for key, option in (("train_samples", "--train-samples"), ("samples", "--samples"), ("eval_samples", "--eval-samples"),
                        ("hessian_samples", "--hessian-samples")):
        if s[key] is not None:
            data_mod.parse_samples(s[key], option)
            s[key] = str(s[key])
    return s


def default_out(preset: str, source: str) -> Path:
    """``study/PRESET-DATA``: the data's file-name-safe name (``cifar10-jpeg`` for the shared archive)."""
    name = slug(source.split(":", 1)[-1])
    for ext in (".tar.gz", ".tgz", ".tar"):
        name = name.removesuffix(ext)
    return Path("study") / f"{preset}-{name}"


def check_folder(out: Path, record: dict[str, Any], overwrite: bool) -> dict[str, Any]:
    """Refuse a folder that holds a study made with other settings; with ``overwrite`` delete what an
    earlier study wrote there instead. Returns what ``study.json`` is to hold once the data are read
    (models added to a study keep the others')."""
    path = out / "study.json"
    old = _read_json(path)
    before = old.get("settings", {}) if isinstance(old.get("settings"), dict) else {}
    diff = sorted(k for k in set(before) | set(record["settings"]) if before.get(k) != record["settings"].get(k))
    if old and diff and not overwrite:
        k = diff[0]
        raise UserError(f"{out} holds a study made with other settings ({k}: {before.get(k)!r} there, "
                        f"{record['settings'].get(k)!r} now); pass --overwrite to start it again, or choose another --out")
    names = list(record["models"])
    if overwrite:
        gone = [out / n for n in sorted(set(old.get("models", [])) | set(names))]
        gone = [d for d in gone if d.is_dir() and ((d / "train").is_dir() or (d / "surface.h5").exists())]  # a study's
        for d in gone:
            shutil.rmtree(d)
        shutil.rmtree(out / "figures", ignore_errors=True)
        for f in ("stages.json", "stages_cpu.json", "results.json", "report.md", "report.html"):
            (out / f).unlink(missing_ok=True)
        if old or gone:
            print(f"--overwrite: starting the study in {out} again")
    elif old:
        names = list(dict.fromkeys([*old.get("models", []), *names]))
    return record | {"models": names}


def steps_per_epoch(n: int, batch: int, bn: bool) -> int:
    """Optimizer steps in one epoch of ``fastland.train`` (a last batch of one is skipped for BN models)."""
    return math.ceil(n / batch) - (1 if bn and n % batch == 1 and n > 1 else 0)


def save_every(cfg: dict[str, Any], n: int) -> int:
    """Step checkpoints for the trajectory when the epochs alone give fewer than half of ``TRAJECTORY_POINTS``."""
    if cfg["epochs"] >= TRAJECTORY_POINTS // 2:
        return 0
    return max(1, cfg["epochs"] * steps_per_epoch(n, cfg["batch"], False) // TRAJECTORY_POINTS)


# --- the study -------------------------------------------------------------------------------------
def run_study(args: argparse.Namespace) -> Path:
    """The whole study (see the module docstring); returns the path of ``report.md``."""
    data_mod.check_spec(args.data)
    dev = device_mod.resolve(args.device)
    cfg = settings(args, dev)
    spec = args.data
    if spec.startswith("imagefolder:"):  # the same folder however it is spelled
        spec = "imagefolder:" + str(Path(spec.split(":", 1)[1]).expanduser().resolve())
    record = {"settings": {k: v for k, v in cfg.items() if k != "models"} | {"data": spec}, "models": list(cfg["models"])}
    trainset = None
    if args.out is None and args.data == "auto":  # the default folder is named after what 'auto' resolves to
        trainset = _load_training(args, cfg, dev)
    out = Path(args.out) if args.out else default_out(args.preset, trainset.source if trainset is not None else spec)
    files.check_output_dir(out, option="--out")
    with files.WriteLock(out, "study folder"):
        record = check_folder(out, record, args.overwrite)  # before the data are read: a refusal costs nothing
        if trainset is None:
            trainset = _load_training(args, cfg, dev)
        files.write_text_atomic(out / "study.json", json.dumps(record, indent=2) + "\n")  # data that can be read
        return _run_locked(args, cfg, dev, trainset, out)


def _load_training(args: argparse.Namespace, cfg: dict[str, Any], dev: torch.device) -> data_mod.EvalSet:
    return data_mod.load(args.data, "train", cfg["train_samples"], seed=args.seed, device=dev,
                         samples_option="--train-samples")


def _prefix_of_training(args: argparse.Namespace, cfg: dict[str, Any], trainset: data_mod.EvalSet, key: str,
                        option: str, dev: torch.device) -> data_mod.EvalSet:
    """The first N images of the training subset, in a seeded random order: the same permutation that
    picked the training subset, so its prefix (Li et al. evaluate surfaces on training images). What
    the surfaces, trajectories, Hessians and final training numbers are measured on."""
    n = data_mod.parse_samples(cfg[key], option)
    if n is None or n >= len(trainset):
        if cfg["train_samples"] != "all":
            return trainset  # already a seeded random subset
        n = len(trainset)  # all of them, in a random order (the folder's order is sorted by class)
    return data_mod.load(args.data, "train", n, seed=args.seed, device=dev, samples_option=option)


def _run_locked(args: argparse.Namespace, cfg: dict[str, Any], dev: torch.device, trainset: data_mod.EvalSet,
                out: Path) -> Path:
    names = list(cfg["models"])
    n_train = len(trainset)
    cfg["save_every"] = save_every(cfg, n_train)
    stages = Stages.load(out / "stages.json")
    surf_set = _prefix_of_training(args, cfg, trainset, "samples", "--samples", dev)
    n_h = min(len(surf_set), data_mod.parse_samples(cfg["hessian_samples"], "--hessian-samples") or len(surf_set))
    if n_h % cfg["batch"] == 1 and n_h > 1:
        n_h -= 1  # batch-mode BN cannot normalize a last batch of one image
    hset = dataclasses.replace(surf_set, inputs=surf_set.inputs[:n_h], targets=surf_set.targets[:n_h])
    eval_sets = {"train": _prefix_of_training(args, cfg, trainset, "eval_samples", "--eval-samples", dev),
                 "test": data_mod.load(args.data, "test", cfg["eval_samples"], seed=1, device=dev,
                                       samples_option="--eval-samples")}
    total_steps = {n: cfg["epochs"] * steps_per_epoch(n_train, cfg["batch"], n.endswith("_bn")) for n in names}
    print(f"study: {', '.join(names)} on {trainset.name or trainset.source} ({n_train:,} training images, "
          f"{cfg['epochs']} epochs of {cfg['optimizer']} at lr {cfg['lr']:g}, probes {every(cfg['probe_every'])}); "
          f"surfaces {cfg['res']}x{cfg['res']} on {len(surf_set):,} images; Hessian on {n_h:,}; out {out}",
          flush=True)
    for name in names:
        run_dir = out / name / "train"
        final = stages.run(f"{name}: train with probes", fastland.train, name, trainset, out=run_dir,
                           epochs=int(cfg["epochs"]), lr=float(cfg["lr"]), batch=int(cfg["batch"]),
                           optimizer=cfg["optimizer"], momentum=float(cfg["momentum"]), seed=args.seed,
                           probe_every=int(cfg["probe_every"]), save_every=int(cfg["save_every"]),
                           samples=cfg["train_samples"], device=dev)
        stages.run(f"{name}: evaluate", evaluate_stage, final, eval_sets, out / name / "evaluation.json", dev,
                   batch_size=int(cfg["batch"]))
        model, _, meta = models.load_checkpoint(final, dev)
        attrs = {"model": name, "checkpoint": str(final), "checkpoint_sha256": models.sha256(final),
                 "checkpoint_epoch": float(meta.get("epoch", -1))}
        stages.run(f"{name}: surface", fastland.surface, model, surf_set, res=int(cfg["res"]), seed=args.seed,
                   bn_mode=args.bn_mode, out=out / name / "surface.h5", device=dev, attrs=attrs)
        stages.run(f"{name}: hessian", hessian_stage, final, hset, out / name / "hessian.json", cfg, dev)
        if total_steps[name] >= 2:
            (out / "figures").mkdir(exist_ok=True)
            stages.run(f"{name}: trajectory", trajectory.figure, run_dir, out / "figures" / f"trajectory_{name}.png",
                       data=surf_set, res=int(cfg["trajectory_res"]), surface_out=out / name / "trajectory.h5",
                       device=dev, bn_mode=args.bn_mode)
        else:
            print(f"\n== {name}: trajectory skipped: {total_steps[name]} training step(s) give fewer than the 3 "
                  "checkpoints a path needs")
    results = {n: collect(out, n) for n in names}
    figures = draw_figures(stages, out, names, trainset.warning)
    for n in names:
        results[n]["times"] = {k.split(": ", 1)[1]: v for k, v in stages.done.items() if k.startswith(f"{n}: ")}
        results[n]["cpu_times"] = {k.split(": ", 1)[1]: v for k, v in stages.cpu.items() if k.startswith(f"{n}: ")}
    return write_report(out, args, cfg, trainset, len(surf_set), n_h, results, figures, stages)


# --- figures -----------------------------------------------------------------------------------------
def _bn_pairs(names: list[str]) -> list[tuple[str, list[str]]]:
    """Models grouped by architecture without the BN suffix: [('lenet', ['lenet', 'lenet_bn']), ...]."""
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault(n.removesuffix("_bn"), []).append(n)
    return list(groups.items())


def _families(names: list[str]) -> list[tuple[str, list[str]]]:
    """Models grouped by architecture without BN and skip suffixes: the ResNets with and without skips together."""
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault(n.removesuffix("_bn").removesuffix("_noskip"), []).append(n)
    return list(groups.items())


def draw_figures(stages: Stages, out: Path, names: list[str], data_warning: str | None = None) -> list[tuple[str, Path]]:
    """Figure 1 per BN pair, Figure 2 per architecture family, then the trajectories (always redrawn: cheap)."""
    from fastland import trainplots
    from fastland.viz import plots

    figs: list[tuple[str, Path]] = []
    fdir = out / "figures"
    fdir.mkdir(exist_ok=True)
    t0, c0 = time.perf_counter(), time.process_time()
    print("\n== figures", flush=True)
    try:
        from fastland.viz import render
    except ImportError:
        render = None  # type: ignore[assignment]
        print("PyVista is not installed: Figure 2 falls back to matplotlib contour maps")
    warn = f"  —  WARNING: {data_warning}" if data_warning else ""
    for arch, group in _bn_pairs(names):
        runs = {n: out / n / "train" for n in group}
        figs.append((f"Figure 1 ({arch}): loss variation, gradient predictiveness and effective β-smoothness over "
                     f"training, {' vs '.join(group)}",
                     compact_png(trainplots.plot_runs(runs, fdir / f"fig1_{arch}.png",
                                                      title=f"{arch}: with vs without BatchNorm{warn}"))))
    for arch, group in _families(names):
        surfs = [out / n / "surface.h5" for n in group]
        for log in (False, True):
            scale = "log" if log else "linear"
            caption = f"Figure 2 ({arch}, {scale} scale): filter-normalized 2-D loss surfaces, {' | '.join(group)}"
            if render is not None:
                path = render.compare(surfs, fdir / f"fig2_{arch}_{scale}.png", shared=True, view=render.View(log=log),
                                      size=(650 * len(group) + 200, 650))
                figs.append((caption + " (one colour and height scale for all panels)", path))
            else:
                for n, sp in zip(group, surfs, strict=True):
                    figs.append((f"{caption}: {n}", compact_png(plots.contour_png(
                        surfacefile.read(sp), fdir / f"fig2_{n}_{scale}.png", log=log))))
    for n in names:
        path = fdir / f"trajectory_{n}.png"
        if path.exists():
            compact_png(path)
            figs.append((f"Figure 9 of Li et al. ({n}): the optimizer's path on the PCA plane of its checkpoints, over "
                         "the loss there", path))
    stages.record("figures", time.perf_counter() - t0, time.process_time() - c0)
    return figs


def compact_png(path: Path) -> Path:
    """Re-save a matplotlib picture with 256 colours: line plots and filled contours have fewer, so nothing
    visible changes and the file shrinks to a third or less (a report with its figures stays small). Not
    for the 3-D renders, whose shading needs more colours."""
    from PIL import Image

    with Image.open(path) as im:
        small = im.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    with files.replacing(path) as tmp:
        small.save(tmp, format="PNG", optimize=True)
    return path


# --- the report ---------------------------------------------------------------------------------------
def _f(v: Any, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "n/a"
    if isinstance(v, float) and np.isinf(v):
        return "inf" if v > 0 else "-inf"
    return f"{v:.{digits}g}"


def _hess(r: dict[str, Any], what: str, mode: str) -> str:
    key = f"{what}_{mode}"
    if key not in r:
        return "= eval (no BN)" if mode == "batch" and "lambda_max_eval" in r else "n/a"
    text = _f(r[key])
    if what == "trace":
        text += f" ± {_f(r[f'trace_{mode}_stderr'], 2)}"
    return text + ("" if r.get(f"{key}_converged", True) else " (not converged)")


def table(names: list[str], results: dict[str, dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """The report's table: one column per model."""
    def row(label: str, fn: Any) -> list[str]:
        return [label, *(fn(results[n]) for n in names)]

    rows = [
        row("final train loss", lambda r: _f(r["train_loss"])),
        row("final train accuracy (%)", lambda r: _f(r["train_acc"], 3)),
        row("final train loss / accuracy (%), BN batch statistics",
            lambda r: "= eval (no BN)" if r.get("train_loss_batch", 0) is None else
            f"{_f(r['train_loss_batch'])} / {_f(r['train_acc_batch'], 3)}" if "train_loss_batch" in r else "n/a"),
        row("final test loss", lambda r: _f(r["test_loss"])),
        row("final test accuracy (%)", lambda r: _f(r["test_acc"], 3)),
        row("probes recorded", lambda r: str(int(r["probes"]))),
        row("effective β-smoothness, median", lambda r: _f(r["beta_median"])),
        row("effective β-smoothness, 90th pct", lambda r: _f(r["beta_p90"])),
        row("Hessian λmax at the minimum, BN eval mode", lambda r: _hess(r, "lambda_max", "eval")),
        row("Hessian λmax at the minimum, BN batch mode", lambda r: _hess(r, "lambda_max", "batch")),
        row("Hessian trace at the minimum, BN eval mode", lambda r: _hess(r, "trace", "eval")),
        row("Hessian trace at the minimum, BN batch mode", lambda r: _hess(r, "trace", "batch")),
        row("gradient predictiveness (max over η), median", lambda r: _f(r["gradpred_median"])),
        row("loss-variation band width, median", lambda r: _f(r["band_median"])),
        row("loss-variation band width, 90th pct", lambda r: _f(r["band_p90"])),
        row("surface: minimum loss", lambda r: _f(r["min_loss"])),
        row("surface: loss range over the grid", lambda r: _f(r["loss_range"])),
        *[row(f"surface: loss rise at r={rad}, mean / max",
              lambda r, rad=rad: f"{_f(r[f'rise_mean_{rad}'])} / {_f(r[f'rise_max_{rad}'])}") for rad in RADII],
        row("trajectory: variance on PC1 / PC2 (%)",
            lambda r: f"{r['pc1_variance']:.1f} / {r['pc2_variance']:.1f}" if "pc1_variance" in r else "n/a"),
        row("trajectory: ‖θ₀ − θ_final‖ (weights, no biases or BN)", lambda r: _f(r["init_distance"]) if "init_distance" in r else "n/a"),
        *[row(f"time: {stage} (wall / CPU)", lambda r, stage=stage: f"{r['times'][stage]:.0f}s / {r['cpu_times'][stage]:.0f}s"
              if stage in r["times"] and stage in r.get("cpu_times", {}) else "n/a")
          for stage in ("train with probes", "evaluate", "surface", "hessian", "trajectory")],
    ]
    return ["", *names], rows


CHANCE_ACC = 100.0 / data_mod.NUM_CLASSES


def learned(r: dict[str, Any]) -> bool:
    """Whether a run learned anything: final train accuracy well above chance (10%)."""
    return bool(r["train_acc"] > 1.5 * CHANCE_ACC)


def _compare(x: float, y: float, label: str) -> str:
    """How ``x`` compares with ``y``: '2.5× lower with BN', '1.3× higher with BN' or 'about equal' (within 10%)."""
    if not (math.isfinite(x) and math.isfinite(y)) or x <= 0 or y <= 0:
        return f"{'lower' if x < y else 'higher'} {label}"
    ratio = max(x, y) / min(x, y)
    if ratio < SIMILAR:
        return "about equal"
    return f"{ratio:.1f}× {'lower' if x < y else 'higher'} {label}"


def _verdict(comparisons: list[str]) -> str:
    """A seed claim ('X is lower with BN') against the comparisons that test it."""
    lower = [c.endswith("lower with BN") for c in comparisons]
    higher = [c.endswith("higher with BN") for c in comparisons]
    if all(lower):
        return "agrees"
    if all(higher):
        return "disagrees"
    if not any(lower) and not any(higher):
        return "no difference"
    return "mixed"


# The seed's claims (Sec. 3 and its figure captions), each with the numbers that test it: (key, what).
CLAIMS = (
    ("BN makes the loss surface flatter (a smaller loss range)",
     (("rise_mean_0.5", "the mean loss rise at distance 0.5 from the surface's minimum"),
      ("loss_range", "the loss range over the whole grid"))),
    ("BN makes the loss variation along the gradient smaller",
     (("band_median", "the median width of the loss-variation band"),)),
    ("BN lowers the effective β-smoothness (a more predictive gradient)",
     (("beta_median", "the median effective β-smoothness"), ("beta_p90", "its 90th percentile"))),
)


def findings(names: list[str], results: dict[str, dict[str, Any]]) -> list[str]:
    """Plain sentences from the table's numbers: each BN pair against the seed's three claims and on the
    Hessian at the minimum, skip connections against none, the caveats, and a tally.

    A run that stayed at chance is called out: its flat surface and small β-smoothness are those of
    a network whose output no longer depends on its input, not evidence of smoothness.
    """
    out = []
    for n in names:
        if not learned(results[n]):
            out.append(f"**{n} did not learn** (final train accuracy {results[n]['train_acc']:.1f}%, chance is "
                       f"{CHANCE_ACC:.0f}%): its flat surface and small β-smoothness describe a collapsed network, so its "
                       "numbers are not evidence that its landscape is smooth.")
    for n in names:
        r = results[n]
        if r.get("train_loss_batch") and r["train_loss"] > STATS_MISFIT * r["train_loss_batch"]:
            out.append(f"**{n}'s BN running statistics do not fit its weights**: on the training images its loss is "
                       f"{_f(r['train_loss'])} with them (eval mode) and {_f(r['train_loss_batch'])} with each batch's "
                       f"statistics (accuracy {r['train_acc']:.1f}% against {r['train_acc_batch']:.1f}%), so its eval-mode "
                       "surface and Hessian describe a network that training did not produce; compare the study with "
                       "`--bn-mode batch` and the Hessian's batch-mode rows.")
    verdicts: list[str] = []
    caveats: list[str] = []
    for arch, group in _bn_pairs(names):
        if arch not in group or f"{arch}_bn" not in group:
            continue
        bn = f"{arch}_bn"
        a, b = results[arch], results[bn]
        if not (learned(a) and learned(b)):
            out.append(f"**{arch} vs {bn}**: no like-for-like comparison, because one of them did not learn; that "
                       "BatchNorm kept training alive at this learning rate is itself the finding.")
            continue
        for k, (claim, tests) in enumerate(CLAIMS, start=1):
            comps = [_compare(b[key], a[key], "with BN") for key, _ in tests]
            verdict = _verdict(comps)
            verdicts.append(verdict)
            said = "; ".join(f"{what} is {_f(b[key])} with BN and {_f(a[key])} without ({c})"
                             for (key, what), c in zip(tests, comps, strict=True))
            out.append(f"**{arch} vs {bn}, the seed's claim {k}, “{claim}”: {verdict}.** {said[0].upper()}{said[1:]}.")
        lam, tr = _compare(b["lambda_max_eval"], a["lambda_max_eval"], "with BN"), \
            _compare(b["trace_eval"], a["trace_eval"], "with BN")
        batch = (f" (in batch mode, as Santurkar et al. reason: {_f(b['lambda_max_batch'])} and {_f(b['trace_batch'])})"
                 if "lambda_max_batch" in b else "")
        out.append(f"**{arch} vs {bn}, curvature at the minimum** (beyond the seed): the Hessian's top eigenvalue is "
                   f"{_f(b['lambda_max_eval'])} with BN and {_f(a['lambda_max_eval'])} without ({lam}), its trace "
                   f"{_f(b['trace_eval'])} and {_f(a['trace_eval'])} ({tr}), BN in eval mode{batch}. "
                   + ("A sharper minimum with BN, against the seed's picture of a smoother landscape."
                      if lam.endswith("higher with BN") else
                      "A flatter minimum with BN, in line with the seed's picture." if lam.endswith("lower with BN")
                      else ""))
        if "pc1_variance" in a and "pc1_variance" in b:
            va, vb = a["pc1_variance"] + a["pc2_variance"], b["pc1_variance"] + b["pc2_variance"]
            out.append(f"**{arch} vs {bn}, trajectories** (Li et al.'s Figure 9): the first two principal components "
                       f"hold {va:.1f}% of the path's variance without BN and {vb:.1f}% with BN"
                       + (", so both paths lie close to a plane, as Li et al. found" if min(va, vb) >= 60 else "")
                       + f"; the final weights lie {_f(a['init_distance'])} from the initial ones without BN and "
                       f"{_f(b['init_distance'])} with BN (biases and BN parameters left out).")
        caveats.append("the Hessian is not normalized as the surfaces are: in a BN network the loss (in batch mode) does "
                       "not change when the weights feeding a BN layer are scaled, and the curvature along them falls as "
                       "the square of that scale, so λmax and the trace compare networks with and without BN only up to "
                       "their weight scales (filter normalization removes this effect from the surfaces, not from the "
                       "Hessian)")
        if a["train_loss"] > SIMILAR * b["train_loss"] or b["train_loss"] > SIMILAR * a["train_loss"]:
            lo, hi = (bn, arch) if b["train_loss"] < a["train_loss"] else (arch, bn)
            caveats.append(f"{lo} ended at a lower training loss than {hi} ({_f(results[lo]['train_loss'])} against "
                           f"{_f(results[hi]['train_loss'])}), so the surfaces and Hessians compare minima of different "
                           "depth, and the probes' medians span different stretches of training")
    for n in names:
        skip = n.replace("_noskip", "")
        if "_noskip" not in n or skip not in results or not (learned(results[n]) and learned(results[skip])):
            continue
        a, b = results[n], results[skip]
        out.append(f"**Skip connections, {skip} vs {n}**: the mean loss rise at distance 0.5 is {_f(b['rise_mean_0.5'])} "
                   f"with skips and {_f(a['rise_mean_0.5'])} without ({_compare(b['rise_mean_0.5'], a['rise_mean_0.5'], 'with skips')}"
                   f"); the Hessian's top eigenvalue (BN eval mode) {_f(b['lambda_max_eval'])} and {_f(a['lambda_max_eval'])} "
                   f"({_compare(b['lambda_max_eval'], a['lambda_max_eval'], 'with skips')}); the median effective "
                   f"β-smoothness {_f(b['beta_median'])} and {_f(a['beta_median'])} "
                   f"({_compare(b['beta_median'], a['beta_median'], 'with skips')}); test accuracy {b['test_acc']:.1f}% "
                   f"and {a['test_acc']:.1f}%.")
    if verdicts:
        words = {"agrees": "held", "disagrees": "failed", "mixed": "gave mixed results", "no difference": "found no difference"}
        tally = ", ".join(f"{verdicts.count(v)} {w}" for v, w in words.items() if verdicts.count(v))
        caveats.insert(0, "one run per model (seed 0): the spread across seeds was not measured, so differences of a "
                          "few tens of percent may be noise")
        out.append(f"**In all**, the seed's claims were put to {len(verdicts)} tests here: {tally}. Caveats: "
                   + "; ".join(caveats) + ".")
    if not out:
        out.append("No model here has its counterpart with (or without) BN or skip connections, so nothing is compared; "
                   "the table has each model's numbers.")
    return out


def every(k: int) -> str:
    """'at every step', 'every 2nd step', 'every 4th step'..."""
    if k == 1:
        return "at every step"
    suffix = "th" if 10 <= k % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(k % 10, "th")
    return f"every {k}{suffix} step"


def shortened(cfg: dict[str, Any], n_train: int, n_surface: int) -> str:
    """What this run left out or cut, compared with the seed's experiment and Li et al.'s surfaces."""
    cuts = []
    missing = [m for m in SEED["models"] if m not in cfg["models"]]
    if missing and any(m in SEED["models"] for m in cfg["models"]):
        cuts.append(f"{', '.join(missing)} left out")
    if cfg["epochs"] < SEED["epochs"]:
        cuts.append(f"{cfg['epochs']} epochs instead of {SEED['epochs']}")
    if n_train < data_mod.SPLIT_SIZE["train"]:
        cuts.append(f"{n_train:,} training images instead of all 50,000")
    if cfg["probe_every"] > 1:
        cuts.append(f"probes {every(cfg['probe_every'])} instead of at every step")
    if n_surface < data_mod.SPLIT_SIZE["train"]:
        cuts.append(f"surfaces on {n_surface:,} training images instead of the whole training set (Li et al.)")
    return ("Shortened from the seed's experiment: " + "; ".join(cuts) + ".") if cuts else \
        "The seed's experiment at full length."


def write_report(out: Path, args: argparse.Namespace, cfg: dict[str, Any], trainset: data_mod.EvalSet, n_surface: int,
                 n_hessian: int, results: dict[str, dict[str, Any]], figures: list[tuple[str, Path]],
                 stages: Stages) -> Path:
    names = cfg["models"]
    header, rows = table(names, results)
    data_name = trainset.name or trainset.source
    ev = json.loads((out / names[0] / "evaluation.json").read_text())
    optimizer = {"adam": "Adam", "sgd": "plain SGD"}.get(cfg["optimizer"], cfg["optimizer"])
    intro = [
        f"Preset `{args.preset}`: {', '.join(names)}, on **{data_name}**. Training: {cfg['epochs']} epochs of "
        f"{optimizer} (lr {cfg['lr']:g}, batch {cfg['batch']}) on {len(trainset):,} training images, cross-entropy, "
        f"no augmentation; the smoothness probes (Santurkar et al.) {every(cfg['probe_every'])} over 8 step lengths "
        f"η from 0.5·lr to 4·lr. Surfaces: {cfg['res']}×{cfg['res']} filter-normalized, α, β in [−1, 1], BN in "
        f"{args.bn_mode} mode (Li et al.), on {n_surface:,} training images. Hessian at the final weights: top "
        f"eigenvalue (Lanczos, relative residual {EIG_TOL:g}) and trace (Hutch++, shown ± its standard error, which "
        f"it brings to {TRACE_TOL:.0%} of |trace|), at most {cfg['hessian_hvps']} Hessian-vector products each, on "
        f"{n_hessian:,} of those images; BN in eval mode, and for BN models also in batch mode (batches of {cfg['batch']}). "
        f"Trajectories: {cfg['trajectory_res']}×{cfg['trajectory_res']} on the PCA plane of each run's "
        "checkpoints (Li et al., Sec. 7).",
        shortened(cfg, len(trainset), n_surface),
        ("**The data were synthetic**: a deterministic CIFAR-shaped stand-in was used. The numbers show how the method "
         "behaves, not what CIFAR-10 gives." if trainset.source == "synthetic" else
         f"Data: {data_name}, read with `--data {args.data}`."),
        f"Final losses and accuracies are in eval mode on {ev['train']['samples']:,} training and "
        f"{ev['test']['samples']:,} test images. The rise at radius r is the loss above the surface's minimum over the "
        "grid points at distance r from it (mean / max). Every number below is read from the files in this folder "
        "(`MODEL/evaluation.json`, `MODEL/train/metrics.csv`, `MODEL/surface.h5`, `MODEL/hessian.json`, "
        f"`MODEL/trajectory.h5`; collected in `results.json`). Total time: {sum(stages.done.values()):.0f}s wall, "
        f"{sum(stages.cpu.values()):.0f}s CPU (user + system, all threads), stages that ran before included.",
    ]
    found = findings(names, results)
    md = _markdown(intro, found, header, rows, figures, out)
    files.write_text_atomic(out / "report.md", md)
    files.write_text_atomic(out / "report.html", _html(intro, found, header, rows, figures, out))
    files.write_text_atomic(out / "results.json", json.dumps(results, indent=2, default=str) + "\n")
    print(f"\nreport: {out / 'report.md'} and {out / 'report.html'}")
    print(_markdown_table(header, rows))
    for f in found:
        print(f"\n{f}")
    return out / "report.md"


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


TITLE = "How BatchNorm changes the loss landscape: fastland study"


def _markdown(intro: list[str], found: list[str], header: list[str], rows: list[list[str]],
              figures: list[tuple[str, Path]], out: Path) -> str:
    parts = [f"# {TITLE}", "", *[p + "\n" for p in intro], "## What the numbers show", "",
             *[f"- {f}" for f in found], "", "## Numbers", "", _markdown_table(header, rows), "", "## Figures", ""]
    for caption, path in figures:
        parts += [f"**{caption}**", "", f"![{caption}]({path.relative_to(out)})", ""]
    return "\n".join(parts)


def _html(intro: list[str], found: list[str], header: list[str], rows: list[list[str]],
          figures: list[tuple[str, Path]], out: Path) -> str:
    def inline(text: str) -> str:
        t = html.escape(text)
        while "**" in t:
            t = t.replace("**", "<strong>", 1).replace("**", "</strong>", 1)
        while "`" in t:
            t = t.replace("`", "<code>", 1).replace("`", "</code>", 1)
        return t

    table_html = "<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"
    table_html += "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows) + "</table>"
    figs = "".join(f"<figure><img src='{html.escape(str(p.relative_to(out)))}' style='max-width:100%'>"
                   f"<figcaption>{html.escape(c)}</figcaption></figure>" for c, p in figures)
    style = ("body{font-family:sans-serif;max-width:1400px;margin:auto;padding:1em}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td:first-child{text-align:left}"
             "figcaption{font-weight:bold;margin:0.3em 0 1.5em}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>fastland study</title><style>{style}</style>"
            f"</head><body><h1>{TITLE}</h1>{''.join(f'<p>{inline(p)}</p>' for p in intro)}"
            f"<h2>What the numbers show</h2><ul>{''.join(f'<li>{inline(f)}</li>' for f in found)}</ul>"
            f"<h2>Numbers</h2>{table_html}<h2>Figures</h2>{figs}</body></html>\n")


@cli_entry
def main(argv: list[str] | None = None) -> None:
    run_study(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
