"""``python -m fastland.surface``: a loss surface over filter-normalized random directions.

It evaluates ``L(θ* + α·δ + β·η)`` on a grid (Li et al. 2018) for a built-in model or one of
yours (``--model package.module:factory``), writes the HDF5 surface file chunk by chunk (an
interrupted run resumes where it stopped), then plots it and prints a one-screen summary.
With ``--to`` it evaluates the straight line between two checkpoints instead.

This module is a thin layer over ``fastland.surface(model, data, ...)`` (``fastland.api``);
calling it from Python calls that function.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fastland import api, distributed, files, losses, models, surfacefile
from fastland import data as data_mod
from fastland import directions as dir_mod
from fastland._callable import make_callable
from fastland.engine import PRECISIONS
from fastland.engine import strategy as strategies
from fastland.errors import ArgumentParser, UserError, cli_entry
from fastland.reference import BN_MODES
from fastland.train import TrainConfig, default_run_dir, slug, train

DEFAULT_MODEL = "lenet_bn"
DEFAULT_CPU_SAMPLES = 256  # finishes a 201x201 LeNet grid in minutes on a 2-core laptop CPU
DEFAULT_CUDA_SAMPLES = 10_000  # the size of the performance targets


# --- argument handling ----------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m fastland.surface", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    g = add_model_args(p)
    g.add_argument("--to", default=None, metavar="CHECKPOINT",
                   help="evaluate the straight line from --checkpoint to this checkpoint (Goodfellow et al.) instead "
                        "of random directions; the range then defaults to -0.5 1.5")
    g.add_argument("--bn-stats", default="auto", choices=api.BN_STATS,
                   help="with --to: interpolate moves BN's running statistics along the line too, so α=1 is exactly "
                        "the --to model (Li et al.'s 'states'); start keeps --checkpoint's statistics at every α "
                        "(the line then does not end at the --to model); auto (default): interpolate whenever BN "
                        "uses running statistics (--bn-mode eval)")
    add_data_args(p)
    g = add_grid_args(p, "XMIN XMAX [YMIN YMAX]; default -1 1 (-0.5 1.5 with --to); y defaults to x's range")
    g.add_argument("--dim", type=int, default=2, choices=(1, 2), help="1-D line or 2-D surface (default 2)")
    g = p.add_argument_group("directions")
    g.add_argument("--norm", default="filter", choices=dir_mod.NORMS,
                   help="direction normalization: filter (Li et al., default), layer or none")
    g.add_argument("--ignore", default="biasbn", choices=dir_mod.IGNORES,
                   help="biasbn (default): zero direction on biases and BN parameters; none: use θ there (official code)")
    g.add_argument("--seed", type=int, default=0, help="direction seed: the same directions on every device (default 0)")
    g.add_argument("--directions", default="random", choices=("random", "hessian"),
                   help="random (default): seeded Gaussian directions, normalized by --norm; hessian: the top two Hessian "
                        "eigenvectors at the weights (in --bn-mode), each scaled to the length a random direction has "
                        "(--norm none: unit length); the eigenvalues are recorded in the file")
    g = p.add_argument_group("curvature (Li et al., Sec. 6)")
    g.add_argument("--curvature", action="store_true",
                   help="after the loss, map the Hessian's largest and smallest eigenvalues and |λmin/λmax| over the grid "
                        "into the same file (train_lambda_max, train_lambda_min, train_curvature_ratio; resumable) and "
                        "draw them; one Lanczos run per point, each tens of Hessian-vector products over the samples")
    g.add_argument("--curvature-stride", type=int, default=1, metavar="S",
                   help="with --curvature: every S-th grid point per axis (default 1: all of them)")
    g.add_argument("--curvature-tol", type=float, default=1e-3, metavar="TOL",
                   help="with --curvature: ‖Hv − λv‖ ≤ TOL·‖H‖ for λmax and λmin at every point (default 1e-3: the ratio "
                        "within about 0.001)")
    add_evaluation_args(p)
    add_output_args(p, "surface file (default surfaces/MODEL-DATA-SPLITN-GRID.h5); refused if it holds a surface with "
                       "other settings")
    distributed.add_args(p)
    return p


# The option groups the trajectory and Hessian CLIs (python -m fastland.trajectory, fastland.hessian) share with this one.
def add_model_args(p: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The model options: --model, --model-arg, --checkpoint (see ``resolve_model``); returns the group."""
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None,
                   help=f"a built-in model ({', '.join(models.MODELS)}) or yours as package.module:factory (a class or "
                        f"function returning an nn.Module, importable from PYTHONPATH). Default: the model the "
                        f"--checkpoint names, else {DEFAULT_MODEL}")
    g.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="an argument for the model factory (repeat it); values are Python literals or strings")
    g.add_argument("--checkpoint", default=None,
                   help="trained weights: a fastland checkpoint (it names its model) or a plain state_dict file "
                        "(with --model). When omitted: reuse runs/MODEL-DATA/final.pt or train one with the trainer's "
                        "defaults")
    return g


def check_model_args(args: argparse.Namespace) -> None:
    """Check ``add_model_args``' options before any work, and parse ``--model-arg`` into ``args.model_args``."""
    args.model_args = models.parse_model_args(args.model_arg)
    if args.model is not None and args.model not in models.MODELS and ":" not in args.model:
        raise UserError(f"unknown --model {args.model!r}; choose one of {', '.join(models.MODELS)}, or give "
                        "package.module:factory")


def add_data_args(p: argparse.ArgumentParser, data_default: str | None = "auto", data_help: str | None = None) -> None:
    """The data options: --data, --split, --samples, --sample-seed, --loss."""
    g = p.add_argument_group("data")
    g.add_argument("--data", default=data_default,
                   help=data_help or "cifar10, synthetic, auto (CIFAR-10 if present or downloadable, else synthetic with a "
                        "warning; default), or imagefolder:PATH (an ImageFolder tree with train/ and test/, or a .tar.gz "
                        "of one; normalized with its training split's statistics)")
    g.add_argument("--split", default="train", choices=data_mod.SPLITS, help="evaluation split (Li et al.: train)")
    g.add_argument("--samples", default=None,
                   help=f"evaluation samples: a number (a fixed seeded subset) or 'all'; default "
                        f"{DEFAULT_CUDA_SAMPLES} on CUDA, {DEFAULT_CPU_SAMPLES} on CPU")
    g.add_argument("--sample-seed", type=int, default=0, help="seed of the evaluation subset (default 0)")
    g.add_argument("--loss", default="auto", choices=("auto", *losses.NAMED),
                   help="auto (default): cross-entropy for integer targets, MSE for float ones")


def add_grid_args(p: argparse.ArgumentParser, range_help: str) -> argparse._ArgumentGroup:
    """The grid options: --res, --xres, --yres, --range (``range_help`` says its default); returns the group."""
    g = p.add_argument_group("grid")
    g.add_argument("--res", type=int, default=51, help="points per axis (default 51, as Li et al.)")
    g.add_argument("--xres", type=int, default=None, help="points along x (overrides --res)")
    g.add_argument("--yres", type=int, default=None, help="points along y (overrides --res)")
    g.add_argument("--range", type=float, nargs="+", default=None, metavar="V", help=range_help)
    return g


def add_evaluation_args(p: argparse.ArgumentParser) -> None:
    """How the grid is evaluated: --bn-mode, --batch-size, --engine, --strategy, --precision, --chunk, --device."""
    g = p.add_argument_group("evaluation")
    g.add_argument("--bn-mode", default="eval", choices=BN_MODES,
                   help="eval (default): BN uses stored running statistics (Li et al.); batch: per-batch statistics, "
                        "running statistics untouched")
    g.add_argument("--batch-size", type=int, default=128,
                   help="evaluation batch (default 128); with --bn-mode batch it is also the BN normalization batch")
    g.add_argument("--engine", default="batched", choices=api.ENGINES,
                   help="batched (default): the torch.func engine; reference: one point at a time (the oracle)")
    g.add_argument("--strategy", default="auto", choices=strategies.CHOICES,
                   help="how the batched engine runs the model: auto (default; loop on the CPU, vmap on CUDA, falling "
                        "back to loop for models vmap cannot run; deterministic), tune (time each, keep the fastest), "
                        "or loop, vmap, im2col. A resumed file keeps its strategy")
    g.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="compute precision (auto: fp32 on CPU, tf32 on CUDA); losses accumulate in fp32/fp64")
    g.add_argument("--chunk", type=int, default=None, help="grid points per saved chunk (default: about 2 s of work)")
    g.add_argument("--device", default="auto", help="auto (default: CUDA if present), cpu, cuda or cuda:N")


def add_output_args(p: argparse.ArgumentParser, out_help: str) -> argparse._ArgumentGroup:
    """The output options: --out (``out_help``), --overwrite, --no-render; returns the group."""
    g = p.add_argument_group("output")
    g.add_argument("--out", default=None, help=out_help)
    g.add_argument("--overwrite", action="store_true", help="replace an existing file whose settings differ")
    g.add_argument("--no-render", action="store_true", help="skip the plots and 3-D renders after the run")
    return g


def check_evaluation_args(args: argparse.Namespace) -> None:
    """The evaluation options' own checks (see ``add_evaluation_args``), as one-line UserErrors."""
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.bn_mode == "batch" and args.batch_size < 2:
        raise UserError("--bn-mode batch needs --batch-size of at least 2")
    if args.chunk is not None and args.chunk < 1:
        raise UserError(f"--chunk must be at least 1, got {args.chunk}")
    if args.engine == "reference" and args.precision not in ("auto", "fp32"):
        raise UserError(f"--engine reference computes in fp32 only; drop --precision {args.precision} or use the "
                        "batched engine")


def check_args(args: argparse.Namespace) -> None:
    """Reject bad input with one clear line before any work (raised as UserError)."""
    if args.to is not None:
        args.dim = 1
    nx = args.xres if args.xres is not None else args.res
    ny = args.yres if args.yres is not None else args.res
    for name, n in (("--res/--xres", nx), ("--res/--yres", ny)):
        if n < 2:
            raise UserError(f"{name} must be at least 2, got {n}")
    args.nx, args.ny = nx, (ny if args.dim == 2 else 1)
    rng = args.range if args.range is not None else ([-0.5, 1.5] if args.to else [-1.0, 1.0])
    if len(rng) not in (2, 4):
        raise UserError(f"--range takes XMIN XMAX or XMIN XMAX YMIN YMAX, got {len(rng)} numbers")
    if not all(math.isfinite(v) for v in rng):
        raise UserError(f"--range values must be finite numbers, got {' '.join(str(v) for v in rng)}")
    api._grid(args.dim, (nx, ny), rng)  # increasing, non-empty
    args.grid_range = rng
    if args.to and (args.curvature or args.directions == "hessian"):
        raise UserError(f"--{'curvature' if args.curvature else 'directions hessian'} is for a surface around one "
                        "model; drop --to")
    if args.curvature_stride < 1:
        raise UserError(f"--curvature-stride must be at least 1, got {args.curvature_stride}")
    if not (math.isfinite(args.curvature_tol) and args.curvature_tol > 0):
        raise UserError(f"--curvature-tol must be a positive number, got {args.curvature_tol}")
    check_evaluation_args(args)
    data_mod.check_spec(args.data)
    data_mod.parse_samples(args.samples)
    check_model_args(args)
    files.check_memory(nx * ny * 41, f"a {nx}x{ny} grid", "use a smaller --res")


def default_out(args: argparse.Namespace, model: str, source: str, samples: int) -> Path:
    grid = f"interp-{args.nx}" if args.to else (f"1d-{args.nx}" if args.dim == 1 else f"2d-{args.nx}x{args.ny}")
    return Path("surfaces") / f"{slug(model)}-{slug(source)}-{args.split}{samples}-{grid}.h5"


def resolve_model(args: argparse.Namespace, source: str, dev: torch.device) -> tuple[nn.Module, str, Path, dict]:
    """The model to evaluate: from --checkpoint (which names its model), else a cached or freshly trained one."""
    ckpt = Path(args.checkpoint) if args.checkpoint else None
    if ckpt is None:
        spec = args.model or DEFAULT_MODEL
        run = default_run_dir(spec, source)
        ckpt = run / "final.pt"
        if ckpt.exists():
            print(f"no --checkpoint given: reusing {ckpt}")
        else:
            cfg = TrainConfig(model=spec, data=args.data if args.data != "auto" else source, device=str(dev),
                              model_args=args.model_args)
            print(f"no --checkpoint given and none cached: training {spec} on {source} data with the defaults "
                  f"({cfg.optimizer}, lr {cfg.lr}, batch {cfg.batch}, {cfg.epochs} epochs) into {run}/")
            ckpt = train(cfg, run)
    model, spec, meta = models.load_checkpoint(ckpt, dev, spec=args.model, model_args=args.model_args)
    return model, spec, ckpt, meta


# --- the run --------------------------------------------------------------------------
def run(args: argparse.Namespace) -> Path:
    """The whole command: data, model, the surface (through ``fastland.api``), pictures, summary."""
    check_args(args)
    ctx = distributed.init_from_args(args)  # under torchrun: meet the other ranks (one line on each if one cannot)
    writer = ctx is None or ctx.rank == 0  # rank 0 alone writes files and reports
    dev = api.resolve_device(args.device)
    samples = args.samples if args.samples is not None else (
        DEFAULT_CUDA_SAMPLES if dev.type == "cuda" else DEFAULT_CPU_SAMPLES)
    if args.out and writer:
        files.check_output_file(args.out)  # before the data are loaded (a download, an image folder decoded)
    # On many ranks the set is loaded on the host, so that a rank puts only its shard on the device.
    evalset = data_mod.load(args.data, args.split, samples, seed=args.sample_seed, device=dev if ctx is None else "cpu")
    out = Path(args.out) if args.out else default_out(args, args.model or DEFAULT_MODEL, evalset.source, len(evalset))
    if writer:
        files.check_output_file(out)  # before any training or evaluation
    with distributed.rank_zero_first():  # a missing checkpoint is trained once, by rank 0
        model, spec, ckpt, meta = resolve_model(args, evalset.source, dev)
    if args.out is None and args.model is None and spec != DEFAULT_MODEL:
        out = default_out(args, spec, evalset.source, len(evalset))
        if writer:
            files.check_output_file(out)
    attrs: dict[str, Any] = {"model": spec, "checkpoint": str(ckpt), "checkpoint_sha256": models.sha256(ckpt),
                             "checkpoint_epoch": float(meta.get("epoch", -1))}
    common = dict(loss_fn=None if args.loss == "auto" else args.loss, bn_mode=args.bn_mode, out=out, device=dev,
                  precision=args.precision, batch_size=args.batch_size, engine=args.engine, strategy=args.strategy,
                  overwrite=args.overwrite)
    if args.to:
        target, _, _ = models.load_checkpoint(args.to, dev, spec=spec, model_args=args.model_args)
        attrs |= {"interpolation_target": str(args.to)}
        surface = api.interpolate(model, target, evalset, res=args.nx, range=args.grid_range, bn_stats=args.bn_stats,
                                  attrs=attrs, shard=distributed.SHARD_CHOICES[args.shard], **common)
    else:
        surface = api.surface(model, evalset, dim=args.dim, res=(args.nx, args.ny), range=args.grid_range,
                              norm=args.norm, ignore=args.ignore, seed=args.seed, chunk=args.chunk, attrs=attrs,
                              shard=distributed.SHARD_CHOICES[args.shard],
                              directions="hessian" if args.directions == "hessian" else None, **common)
    cmap = None
    if args.curvature:  # the maps go into the same file, beside the loss
        from fastland import curvature

        cmap = curvature.curvature_map(model, evalset, out, loss_fn=common["loss_fn"], stride=args.curvature_stride,
                                       bn_mode=args.bn_mode, tol=args.curvature_tol, batch_size=args.batch_size,
                                       overwrite=args.overwrite)
        surface = surfacefile.read(out, directions=True)
    if not writer:
        return out
    outputs = [] if args.no_render else render(surface, out)
    summary(surface, out, outputs)
    if cmap is not None:
        print("\n".join(curvature.summary_lines(cmap)))
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
        outputs = [plots.line_png(surface, Path(f"{prefix}_1d.png")) if surface.dim == 1
                   else plots.contour_png(surface, Path(f"{prefix}_map.png"))]
        if plots.has_curvature(surface):
            outputs.append(plots.curvature_png(surface, Path(f"{prefix}_curvature.png")))
        return outputs
    return viz_render.render_outputs(path, str(prefix))


def summary(s: surfacefile.Surface, path: Path, outputs: list[Path]) -> None:
    """A one-screen report of the run."""
    loss = np.where(s.done == 1, s.loss, np.nan)
    finite = np.isfinite(loss)
    bad = int(((s.done == 1) & ~np.isfinite(s.loss)).sum())
    a = s.attrs
    lines = ["", f"surface  {path}  ({a['model']}, {a.get('data_name', a['data_source'])} {s.split}, "
                 f"{a['samples']} samples, loss {a.get('loss', '?')}, bn_mode {a['bn_mode']}, {a['engine']} "
                 f"{a.get('strategy', '')})"]
    if a.get("data_warning"):
        lines.append(f"note     {a['data_warning']}")
    if finite.any():
        j = int(np.nanargmin(np.where(finite, loss, np.inf)))
        if s.dim == 2:
            jj, ii = divmod(j, len(s.x))
            where = f"at (α, β) = ({s.x[ii]:+.3f}, {s.y[jj]:+.3f})"
            origin = loss[int(np.argmin(np.abs(s.y))), int(np.argmin(np.abs(s.x)))]
        else:
            where = f"at α = {s.x[j]:+.3f}"
            origin = loss[int(np.argmin(np.abs(s.x)))]
        acc = f" (accuracy {np.where(s.done == 1, s.acc, np.nan).reshape(-1)[j]:.2f}%)" if s.acc is not None else ""
        lines.append(f"minimum  loss {loss.reshape(-1)[j]:.5g} {where}{acc}")
        lines.append(f"origin   loss {origin:.5g};  max finite loss {np.nanmax(np.where(finite, loss, np.nan)):.5g}")
    lines.append(f"points   {int(s.done.sum()):,}/{s.done.size:,} done; {bad} non-finite (recorded as such)")
    elapsed, evaluated = float(a.get("last_run_seconds", 0.0)), int(a.get("last_run_points", 0))
    rate = evaluated / elapsed if elapsed > 0 else float("nan")
    lines.append(f"time     {api.fmt_time(elapsed)} this run ({rate:,.1f} points/s); "
                 f"{api.fmt_time(float(a.get('wall_time', elapsed)))} in total")
    if (ranks := distributed.rank_summary(a)) is not None:
        lines.append(ranks)
    for p in outputs:
        lines.append(f"wrote    {p}")
    print("\n".join(lines))


@cli_entry
def main(argv: list[str] | None = None) -> None:
    run(build_parser().parse_args(argv))


make_callable(__name__, api.surface)

if __name__ == "__main__":
    main()
