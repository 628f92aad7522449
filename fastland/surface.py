"""``python -m fastland.surface``: a loss surface over filter-normalized random directions.

It evaluates ``L(θ* + α·δ + β·η)`` on a grid (Li et al. 2018), writes the HDF5 surface
file chunk by chunk (an interrupted run resumes where it stopped), then plots it and
prints a one-screen summary.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

import fastland
from fastland import data as data_mod
from fastland import device as device_mod
from fastland import directions, models, surfacefile
from fastland.errors import ArgumentParser, UserError, cli_entry
from fastland.params import FlatSpace
from fastland.reference import BN_MODES, ReferenceEvaluator
from fastland.train import TrainConfig, default_run_dir, train

PRECISIONS = ("auto", "fp32", "tf32", "bf16")
DEFAULT_CPU_SAMPLES = 256  # finishes a 201x201 LeNet grid in minutes on a 2-core laptop CPU
DEFAULT_CUDA_SAMPLES = 10_000  # the size of the performance targets


class Evaluator(Protocol):
    """What the surface loop needs from an evaluator (reference or batched engine)."""

    name: str
    precision: str
    chunk_size: int

    def evaluate(self, coords: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


def make_evaluator(engine: str, model: nn.Module, space: FlatSpace, theta: torch.Tensor, dirs: torch.Tensor,
                   evalset: data_mod.EvalSet, bn_mode: str, batch_size: int, precision: str) -> Evaluator:
    """Build the evaluator named by ``--engine``."""
    if engine == "reference":
        if precision not in ("auto", "fp32"):
            raise UserError(f"--engine reference computes in fp32 only; drop --precision {precision} or use the batched engine")
        return ReferenceEvaluator(model, space, theta, dirs, evalset, bn_mode=bn_mode, batch_size=batch_size)
    if engine == "batched":
        from fastland.engine import BatchedEvaluator

        return BatchedEvaluator(model, space, theta, dirs, evalset, bn_mode=bn_mode, batch_size=batch_size,
                                precision=precision)
    raise UserError(f"unknown --engine {engine!r}; use batched or reference")


# --- argument handling ----------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m fastland.surface", description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model", default="lenet_bn", choices=models.MODELS, help="architecture")
    g.add_argument("--checkpoint", default=None,
                   help="trained checkpoint; when omitted, reuse runs/MODEL-SOURCE/final.pt or train one with the "
                        "trainer's defaults")
    g.add_argument("--to", default=None, metavar="CHECKPOINT",
                   help="1-D interpolation from --checkpoint to this checkpoint (Goodfellow et al.) instead of "
                        "random directions; default range then -0.5 1.5")
    g = p.add_argument_group("data")
    g.add_argument("--data", default="auto", choices=data_mod.SOURCES,
                   help="cifar10, synthetic, or auto (CIFAR-10 if present or downloadable, else synthetic)")
    g.add_argument("--split", default="train", choices=data_mod.SPLITS, help="evaluation split (Li et al.: train)")
    g.add_argument("--samples", default=None,
                   help=f"evaluation samples: a number (fixed seeded subset) or 'all'; default "
                        f"{DEFAULT_CUDA_SAMPLES} on CUDA, {DEFAULT_CPU_SAMPLES} on CPU")
    g.add_argument("--sample-seed", type=int, default=0, help="seed of the evaluation subset")
    g = p.add_argument_group("grid")
    g.add_argument("--dim", type=int, default=2, choices=(1, 2), help="1-D line or 2-D surface")
    g.add_argument("--res", type=int, default=51, help="points per axis (Li et al. use 51)")
    g.add_argument("--xres", type=int, default=None, help="points along x (overrides --res)")
    g.add_argument("--yres", type=int, default=None, help="points along y (overrides --res)")
    g.add_argument("--range", type=float, nargs="+", default=None, metavar="V",
                   help="XMIN XMAX [YMIN YMAX]; default -1 1 (-0.5 1.5 with --to); y defaults to x's range")
    g = p.add_argument_group("directions")
    g.add_argument("--norm", default="filter", choices=directions.NORMS, help="direction normalization")
    g.add_argument("--ignore", default="biasbn", choices=directions.IGNORES,
                   help="biasbn: zero direction on biases and BN parameters; none: use θ there (official code)")
    g.add_argument("--seed", type=int, default=0, help="direction seed (same directions on every device)")
    g = p.add_argument_group("evaluation")
    g.add_argument("--bn-mode", default="eval", choices=BN_MODES,
                   help="eval: BN uses stored running statistics (Li et al.); batch: per-batch statistics, "
                        "running statistics untouched")
    g.add_argument("--batch-size", type=int, default=128,
                   help="evaluation batch; with --bn-mode batch it is also the BN normalization batch")
    g.add_argument("--engine", default="batched", choices=("batched", "reference"),
                   help="the batched torch.func engine, or the one-point-at-a-time reference evaluator (the oracle)")
    g.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="compute precision (auto: fp32 on CPU, tf32 on CUDA); losses accumulate in fp32")
    g.add_argument("--chunk", type=int, default=None, help="grid points per chunk (default: the engine's choice)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    g = p.add_argument_group("output")
    g.add_argument("--out", default=None, help="surface file (default surfaces/MODEL-SOURCE-SPLITN-GRID.h5)")
    g.add_argument("--overwrite", action="store_true", help="replace an existing file whose settings differ")
    g.add_argument("--no-render", action="store_true", help="skip the plots and 3-D renders after the run")
    return p


def check_args(args: argparse.Namespace) -> None:
    """Reject bad input with one clear line (raised as UserError)."""
    if args.to is not None and args.dim != 1:
        args.dim = 1
    nx = args.xres if args.xres is not None else args.res
    ny = args.yres if args.yres is not None else args.res
    for name, n in (("--res/--xres", nx), ("--res/--yres", ny)):
        if n < 2:
            raise UserError(f"{name} must be at least 2, got {n}")
    args.nx, args.ny = nx, (ny if args.dim == 2 else 1)
    default = [-0.5, 1.5] if args.to else [-1.0, 1.0]
    rng = args.range if args.range is not None else default
    if len(rng) not in (2, 4):
        raise UserError(f"--range takes XMIN XMAX or XMIN XMAX YMIN YMAX, got {len(rng)} numbers")
    if len(rng) == 2:
        rng = rng + rng
    if not all(math.isfinite(v) for v in rng):
        raise UserError("--range values must be finite numbers")
    if not rng[0] < rng[1] or (args.dim == 2 and not rng[2] < rng[3]):
        raise UserError(f"--range must be increasing and non-empty (min < max), got {rng[:2] if args.dim == 1 else rng}")
    args.xmin, args.xmax, args.ymin, args.ymax = rng
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.bn_mode == "batch" and args.batch_size < 2:
        raise UserError("--bn-mode batch needs --batch-size of at least 2")
    if args.chunk is not None and args.chunk < 1:
        raise UserError(f"--chunk must be at least 1, got {args.chunk}")


def default_out(args: argparse.Namespace, source: str, samples: int) -> Path:
    grid = f"interp-{args.nx}" if args.to else (f"1d-{args.nx}" if args.dim == 1 else f"2d-{args.nx}x{args.ny}")
    return Path("surfaces") / f"{args.model}-{source}-{args.split}{samples}-{grid}.h5"


def resolve_checkpoint(args: argparse.Namespace, source: str, dev: torch.device) -> Path:
    """The checkpoint to use: given, cached, or trained now with the trainer's defaults."""
    if args.checkpoint:
        return Path(args.checkpoint)
    run = default_run_dir(args.model, source)
    final = run / "final.pt"
    if final.exists():
        print(f"no --checkpoint given: reusing {final}")
        return final
    cfg = TrainConfig(model=args.model, data=source, device=str(dev))
    print(f"no --checkpoint given and none cached: training {args.model} on {source} data with the defaults "
          f"({cfg.optimizer}, lr {cfg.lr}, batch {cfg.batch}, {cfg.epochs} epochs) into {run}/")
    return train(cfg, run)


def prepare_file(path: Path, attrs: dict[str, Any], x: np.ndarray, y: np.ndarray | None,
                 dir_tensors: list[dict[str, np.ndarray]], overwrite: bool) -> str:
    """Create, resume or refuse the surface file. Returns 'new' or 'resume'."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create the output folder {path.parent}: {err.strerror}; choose another --out") from None
    if path.exists() and not overwrite:
        diff = surfacefile.mismatches(surfacefile.settings_of(path), attrs)
        if diff:
            raise UserError(f"{path} holds a surface with other settings ({diff[0]}"
                            f"{f' and {len(diff) - 1} more' if len(diff) > 1 else ''}); "
                            "pass --overwrite to replace it or choose another --out")
        return "resume"
    if not os.access(path.parent, os.W_OK):
        raise UserError(f"cannot write to {path.parent}; choose another --out")
    try:
        surfacefile.create(path, x, y, dir_tensors, attrs)
    except OSError as err:
        raise UserError(f"cannot write {path}: {err}; choose another --out") from None
    return "new"


def fmt_time(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.1f}s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


# --- the run --------------------------------------------------------------------------
def run(args: argparse.Namespace) -> Path:
    check_args(args)
    dev = device_mod.resolve(args.device)
    samples = args.samples if args.samples is not None else (
        DEFAULT_CUDA_SAMPLES if dev.type == "cuda" else DEFAULT_CPU_SAMPLES)
    evalset = data_mod.load(args.data, args.split, samples, seed=args.sample_seed, device=dev)
    ckpt_path = resolve_checkpoint(args, evalset.source, dev)
    model, name, meta = models.load_checkpoint(ckpt_path, dev, expect=args.model)
    space = FlatSpace(model)
    theta = space.flatten(model)
    if args.to:
        model2, _, _ = models.load_checkpoint(args.to, dev, expect=args.model)
        dirs = directions.interpolation(theta, space.flatten(model2)).unsqueeze(0)
        direction_kind, norm_used, ignore_used = "interpolation", "none", "none"
    else:
        dirs = directions.make(space, theta, args.dim, args.seed, args.norm, args.ignore)
        direction_kind, norm_used, ignore_used = "random", args.norm, args.ignore
    evaluator = make_evaluator(args.engine, model, space, theta, dirs, evalset, args.bn_mode, args.batch_size,
                               args.precision)
    x = np.linspace(args.xmin, args.xmax, args.nx)
    y = np.linspace(args.ymin, args.ymax, args.ny) if args.dim == 2 else None
    attrs: dict[str, Any] = {
        "fastland_version": fastland.__version__, "model": name, "checkpoint": str(ckpt_path),
        "checkpoint_sha256": models.sha256(ckpt_path), "checkpoint_epoch": int(meta.get("epoch", -1)),
        **evalset.attrs(), "dim": args.dim, "xmin": args.xmin, "xmax": args.xmax, "nx": args.nx,
        "ymin": args.ymin if args.dim == 2 else 0.0, "ymax": args.ymax if args.dim == 2 else 0.0, "ny": args.ny,
        "direction": direction_kind, "direction_seed": args.seed, "norm": norm_used, "ignore": ignore_used,
        "interpolation_target": str(args.to or ""), "bn_mode": args.bn_mode,
        "bn_batch": args.batch_size if args.bn_mode == "batch" else 0,
        "precision": evaluator.precision, "engine": evaluator.name, "device": device_mod.describe(dev),
        "torch_version": torch.__version__, "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "direction_cosine": directions.cosine(dirs[0], dirs[1]) if args.dim == 2 else 1.0,
    }
    out = Path(args.out) if args.out else default_out(args, evalset.source, len(evalset))
    dir_tensors = [{k: v.numpy() for k, v in space.unflatten_state(d).items()} for d in dirs]
    state = prepare_file(out, attrs, x, y, dir_tensors, args.overwrite)

    writer = surfacefile.Writer(out)
    pending = writer.pending()
    total = args.nx * args.ny
    chunk = args.chunk or evaluator.chunk_size
    grid_x = np.tile(x, args.ny)
    grid_y = np.repeat(y, args.nx) if y is not None else None
    print(f"plan: {total:,} points ({args.nx}x{args.ny}), {len(pending):,} to evaluate"
          f"{' (resuming)' if state == 'resume' else ''}; {len(evalset):,} {evalset.source} {args.split} samples; "
          f"model {name}; device {attrs['device']}; engine {evaluator.name} ({evaluator.precision}), "
          f"{chunk} points per chunk; bn_mode {args.bn_mode}; out {out}")

    t_start = time.perf_counter()
    try:
        bar = tqdm(total=len(pending), unit="pt", desc="surface", dynamic_ncols=True, file=sys.stderr)
        for k, start in enumerate(range(0, len(pending), chunk)):
            idx = pending[start : start + chunk]
            cols = [grid_x[idx]] if grid_y is None else [grid_x[idx], grid_y[idx]]
            coords = torch.tensor(np.stack(cols, axis=1), dtype=torch.float32)
            t0 = time.perf_counter()
            loss, acc = evaluator.evaluate(coords)
            writer.write(idx, loss.double().cpu().numpy(), acc.double().cpu().numpy())
            if k == 0 and len(pending) > len(idx):
                per_point = (time.perf_counter() - t0) / len(idx)
                bar.write(f"estimated time: {fmt_time(per_point * len(pending))} "
                          f"({1 / per_point:,.1f} points/s from the first chunk)")
            bar.update(len(idx))
        bar.close()
    finally:
        elapsed = time.perf_counter() - t_start
        prior = float(surfacefile.settings_of_open(writer.f).get("wall_time", 0.0))
        writer.finish({"wall_time": prior + elapsed,
                       "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")})
    surface = surfacefile.read(out)
    outputs = [] if args.no_render else render(surface, out)
    summary(surface, out, outputs, elapsed, len(pending))
    return out


def render(surface: surfacefile.Surface, path: Path) -> list[Path]:
    """The pictures after a run: PyVista's full set, or matplotlib's map/line plot without PyVista."""
    prefix = path.with_suffix("")
    try:
        from fastland.viz import render as viz_render
    except ImportError:
        from fastland.viz import plots

        print("PyVista is not installed: 3-D renders skipped, matplotlib plot only (install the viz extra: "
              "pip install -e .[viz])")
        if surface.dim == 1:
            return [plots.line_png(surface, Path(f"{prefix}_1d.png"))]
        return [plots.contour_png(surface, Path(f"{prefix}_map.png"))]
    return viz_render.render_outputs(path, str(prefix))


def summary(s: surfacefile.Surface, path: Path, outputs: list[Path], elapsed: float, evaluated: int) -> None:
    """A one-screen report of the run."""
    loss = np.where(s.done == 1, s.loss, np.nan)
    finite = np.isfinite(loss)
    bad = int(((s.done == 1) & ~np.isfinite(s.loss)).sum())
    lines = ["", f"surface  {path}  ({s.attrs['model']}, {s.attrs['data_source']} {s.split}, "
                 f"{s.attrs['samples']} samples, bn_mode {s.attrs['bn_mode']}, {s.attrs['engine']})"]
    if s.attrs.get("data_warning"):
        lines.append(f"note     {s.attrs['data_warning']}")
    if finite.any():
        j = int(np.nanargmin(np.where(finite, loss, np.inf)))
        if s.dim == 2:
            jj, ii = divmod(j, len(s.x))
            where = f"at (α, β) = ({s.x[ii]:+.3f}, {s.y[jj]:+.3f})"
            origin = loss[int(np.argmin(np.abs(s.y))), int(np.argmin(np.abs(s.x)))]
        else:
            where = f"at α = {s.x[j]:+.3f}"
            origin = loss[int(np.argmin(np.abs(s.x)))]
        acc = np.where(s.done == 1, s.acc, np.nan).reshape(-1)[j]
        lines.append(f"minimum  loss {loss.reshape(-1)[j]:.5g} {where} (accuracy {acc:.2f}%)")
        lines.append(f"origin   loss {origin:.5g};  max finite loss {np.nanmax(np.where(finite, loss, np.nan)):.5g}")
    lines.append(f"points   {int(s.done.sum()):,}/{s.done.size:,} done; {bad} non-finite (recorded as such)")
    rate = evaluated / elapsed if elapsed > 0 else float("nan")
    lines.append(f"time     {fmt_time(elapsed)} this run ({rate:,.1f} points/s); "
                 f"{fmt_time(float(s.attrs.get('wall_time', elapsed)))} in total")
    for p in outputs:
        lines.append(f"wrote    {p}")
    print("\n".join(lines))


@cli_entry
def main(argv: list[str] | None = None) -> None:
    run(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
