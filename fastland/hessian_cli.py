"""``python -m fastland.hessian``: the Hessian's top eigenvalues, trace and spectral density, or a curvature map.

At the weights of a checkpoint (a built-in model, or yours as ``--model package.module:factory``), on a
data set as ``python -m fastland.surface`` takes it, it computes the top ``--k`` eigenpairs (Lanczos),
with ``--trace`` the trace (Hutch++) and with ``--density`` the spectral density (stochastic Lanczos
quadrature), for the whole model, for ``--params`` groups, or layer by layer (``--per-layer``), in one
or both BN modes (``--bn-mode eval|batch|both``). It prints a one-screen summary and writes
``OUT.json`` (the numbers and settings), ``OUT.h5`` (eigenvalues, eigenvectors, density) and, with
``--density``, ``OUT_density.png``.

With ``--map SURFACE.h5`` it computes Li et al.'s curvature map (λmax, λmin, |λmin/λmax|) over the
grid of a surface file instead, stores it in that file beside the loss (resumable) and draws it: the
model and data are the file's unless ``--checkpoint``/``--data`` say otherwise.

This module is a thin layer over ``fastland.hessian`` and ``fastland.curvature``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import warnings
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch import nn

import fastland
from fastland import api, curvature, files, hessian, losses, models, surfacefile
from fastland import data as data_mod
from fastland import device as device_mod
from fastland import surface as surface_cli
from fastland.errors import ArgumentParser, UserError, cli_entry
from fastland.train import slug

BN_CHOICES = ("eval", "batch", "both")


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m fastland.hessian", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    surface_cli.add_model_args(p)
    surface_cli.add_data_args(p, data_default=None, data_help=(
        "cifar10, synthetic, auto (CIFAR-10 if present or downloadable, else synthetic with a warning; the default), or "
        "imagefolder:PATH; with --map: the surface file's data unless given"))
    g = p.add_argument_group("spectrum")
    g.add_argument("--k", type=int, default=1, help="how many of the largest eigenvalues (and eigenvectors) to compute "
                                                    "(default 1)")
    g.add_argument("--tol", type=float, default=1e-3,
                   help="Lanczos stops when every eigenpair has ‖Hv − λv‖ ≤ TOL·|λ| (default 1e-3); with --map: "
                        "‖Hv − λv‖ ≤ TOL·‖H‖ for λmax and λmin at every point (the ratio within about TOL)")
    g.add_argument("--max-iter", type=int, default=None,
                   help="Hessian-vector products at most per Lanczos run (default max(100, 20k); with --map 300 per point)")
    g.add_argument("--trace", action="store_true", help="also estimate the trace (Hutch++, Rademacher vectors)")
    g.add_argument("--trace-tol", type=float, default=1e-2,
                   help="the trace stops when its standard error is at most TOL·|trace| (default 1e-2)")
    g.add_argument("--trace-max-iter", type=int, default=500, help="products at most for the trace (default 500)")
    g.add_argument("--density", action="store_true",
                   help="also the spectral density (stochastic Lanczos quadrature, Gaussian broadening) and its plot")
    g.add_argument("--density-runs", type=int, default=4, help="SLQ runs (random start vectors; default 4)")
    g.add_argument("--density-steps", type=int, default=80, help="Lanczos steps per SLQ run (default 80)")
    g.add_argument("--params", nargs="+", default=None, metavar="GROUP",
                   help="the Hessian of these parameter groups only (module names such as features.0, or full parameter "
                        "names); the others stay constant. Default: every parameter that requires grad")
    g.add_argument("--per-layer", action="store_true",
                   help="also the top eigenvalues (and, with --trace, the trace) of each layer's own Hessian block, one "
                        "module's parameters at a time")
    g.add_argument("--seed", type=int, default=0, help="seed of the random start and probe vectors (default 0)")
    g = p.add_argument_group("curvature map (Li et al., Sec. 6)")
    g.add_argument("--map", default=None, metavar="SURFACE.h5",
                   help="compute λmax, λmin and |λmin/λmax| at the grid points of this surface file and store them in it "
                        "(train_lambda_max, train_lambda_min, train_curvature_ratio, curvature_done; resumable), then draw "
                        "them (SURFACE_curvature.png, SURFACE_curvature_3d.png with PyVista)")
    g.add_argument("--stride", type=int, default=1, help="with --map: every S-th grid point per axis (default 1)")
    g.add_argument("--points", default="auto",
                   help="with --map: grid points whose products run together through one vmap (auto: 1 on the CPU, where "
                        "it does not pay, 8 on a GPU)")
    g = p.add_argument_group("evaluation")
    g.add_argument("--bn-mode", default=None, choices=BN_CHOICES,
                   help="eval (default): BN with its running statistics (constants); batch: each batch normalized with "
                        "its own statistics, which depend on the weights (Santurkar et al.'s Hessian); both: one after "
                        "the other. With --map: the surface's mode unless given")
    g.add_argument("--batch-size", type=int, default=None,
                   help=f"samples per batch of each product (default {hessian.DEFAULT_BATCH_SIZE}; with --bn-mode batch it "
                        "is BN's normalization batch, and with --map the surface's)")
    g.add_argument("--device", default="auto", help="auto (default: CUDA if present), cpu, cuda or cuda:N")
    g = p.add_argument_group("output")
    g.add_argument("--out", default=None, metavar="PREFIX",
                   help="writes PREFIX.json, PREFIX.h5 and PREFIX_density.png (default hessian/MODEL-DATA-SPLITN); "
                        "with --map the pictures go beside the surface file")
    g.add_argument("--overwrite", action="store_true", help="with --map: compute a map again whose settings differ")
    g.add_argument("--no-plot", action="store_true", help="skip the pictures")
    return p


# --- checks ----------------------------------------------------------------------------------------
def _positive(value: float, option: str) -> None:
    if not (math.isfinite(value) and value > 0):
        raise UserError(f"{option} must be a positive number, got {value}")


def check_args(args: argparse.Namespace) -> None:
    """One line for bad options, before any data are loaded or any model is run."""
    if args.k < 1:
        raise UserError(f"--k must be at least 1, got {args.k}")
    _positive(args.tol, "--tol")
    _positive(args.trace_tol, "--trace-tol")
    if args.max_iter is not None and args.max_iter < 2:
        raise UserError(f"--max-iter must be at least 2, got {args.max_iter}")
    if args.trace_max_iter < 4:
        raise UserError(f"--trace-max-iter must be at least 4, got {args.trace_max_iter}")
    if args.density_runs < 1 or args.density_steps < 2:
        raise UserError("--density-runs must be at least 1 and --density-steps at least 2, got "
                        f"{args.density_runs} and {args.density_steps}")
    if args.batch_size is not None and args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.stride < 1:
        raise UserError(f"--stride must be at least 1, got {args.stride}")
    if args.points != "auto":
        try:
            args.points = int(args.points)
        except ValueError:
            raise UserError(f"--points must be a positive integer or auto, got {args.points!r}") from None
        if args.points < 1:
            raise UserError(f"--points must be at least 1, got {args.points}")
    if args.data is not None:
        data_mod.check_spec(args.data)
    data_mod.parse_samples(args.samples)
    surface_cli.check_model_args(args)
    if args.map is not None:
        if args.trace or args.density or args.per_layer or args.params:
            raise UserError("--map computes a curvature map only; drop --trace, --density, --per-layer and --params, or "
                            "run them without --map")
        if not Path(args.map).is_file():
            raise UserError(f"--map {args.map}: no such surface file")


def layer_groups(model: nn.Module, names: tuple[str, ...]) -> list[str]:
    """The modules that own parameters among ``names``, in order (a parameter of the model itself: its own name)."""
    out: dict[str, None] = {}
    for n in names:
        out.setdefault(n.rsplit(".", 1)[0] if "." in n else n)
    return list(out)


# --- the spectrum ---------------------------------------------------------------------------------
def analyse(model: nn.Module, evalset: data_mod.EvalSet, args: argparse.Namespace, loss: str | None, bn_mode: str
            ) -> dict[str, Any]:
    """Everything asked for in one BN mode: the operator once, then Lanczos, trace, density and the layers."""
    op = hessian.operator(model, evalset, loss, bn_mode, args.params, args.batch_size)
    hessian._check_eig_args(args.k, args.tol, "largest", op.numel)
    print(f"BN {bn_mode}: the Hessian of {op.numel:,} parameters on {op.num_samples:,} samples in {len(op.batches)} "
          f"batch(es){'; graphs kept between products' if op.keep_graph else ''}"
          f"{'; channels-last inputs' if op.channels_last else ''}", flush=True)
    rec: dict[str, Any] = {"loss": op.loss(), "loss_fn": op.loss_name, "parameters": op.numel,
                           "keep_graph": op.keep_graph, "channels_last": op.channels_last, "hvp_ad": op.ad}
    out: dict[str, Any] = {"record": rec}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        eig = hessian.lanczos(op, k=args.k, tol=args.tol, max_iter=args.max_iter, seed=args.seed, progress=True)
        rec["top_eigenvalues"] = eig.record()
        out["eig"] = eig
        if args.trace:
            tr = hessian.estimate_trace(op, tol=args.trace_tol, max_iter=args.trace_max_iter, seed=args.seed, progress=True)
            rec["trace"] = tr.record()
            out["trace"] = tr
        if args.density:
            den = hessian.spectral_density(op, runs=args.density_runs, steps=args.density_steps, seed=args.seed,
                                           progress=True)
            rec["density"] = {k: v for k, v in den.record().items() if k not in ("grid", "density", "nodes", "weights")}
            rec["density"] |= {"min": float(den.nodes.min()), "max": float(den.nodes.max()), "runs": args.density_runs,
                               "steps": int(den.nodes.shape[1])}
            out["density"] = den
        if args.per_layer:
            rec["per_layer"] = []
            for group in layer_groups(model, op.group.names):
                sub = hessian.operator(model, evalset, loss, bn_mode, group, args.batch_size)
                k = min(args.k, sub.numel)
                e = hessian.lanczos(sub, k=k, tol=args.tol, max_iter=args.max_iter, seed=args.seed, progress=True)
                row: dict[str, Any] = {"group": group, "params": list(sub.group.names), "parameters": sub.numel,
                                       "top_eigenvalues": e.record()}
                if args.trace:
                    row["trace"] = hessian.estimate_trace(sub, tol=args.trace_tol, max_iter=args.trace_max_iter,
                                                          seed=args.seed, progress=True).record()
                rec["per_layer"].append(row)
    rec["notes"] = [str(w.message) for w in caught]
    for note in rec["notes"]:
        print(f"note: {note}")
    return out


def write_h5(path: Path, results: dict[str, dict[str, Any]], attrs: dict[str, Any]) -> Path:
    """Eigenvalues, eigenvectors (packed in the order of ``params``) and densities per BN mode, whole or not at all."""
    with files.replacing(path) as tmp, h5py.File(tmp, "w") as f:
        for k, v in attrs.items():
            f.attrs[k] = surfacefile._plain(v)
        for mode, r in results.items():
            g = f.create_group(mode)
            eig = r["eig"]
            g.create_dataset("eigenvalues", data=np.asarray(eig.values, dtype=np.float64))
            g.create_dataset("residuals", data=np.asarray(eig.residuals, dtype=np.float64))
            vec = g.create_dataset("eigenvectors", data=eig.flat.detach().float().cpu().numpy())
            vec.attrs["params"] = json.dumps(list(eig.params))
            vec.attrs["sizes"] = np.asarray(eig.group.sizes, dtype=np.int64)
            if "density" in r:
                d = g.create_group("density")
                den = r["density"]
                for name in ("grid", "density", "nodes", "weights"):
                    d.create_dataset(name, data=getattr(den, name))
                d.attrs["sigma"] = den.sigma
            if "trace" in r:
                g.attrs["trace"] = float(r["trace"])
                g.attrs["trace_stderr"] = float(r["trace"].stderr)
            for row in r["record"].get("per_layer", []):
                g.create_dataset(f"per_layer/{row['group']}/eigenvalues", data=row["top_eigenvalues"]["values"])
    return path


def summary(results: dict[str, dict[str, Any]], head: str, written: list[Path], seconds: float) -> None:
    lines = ["", head]
    for mode, r in results.items():
        rec, eig = r["record"], r["eig"]
        vals = "  ".join(f"{v:.5g}" for v in eig.values)
        conv = "" if eig.converged else "  (not converged: raise --max-iter or --tol)"
        lines.append(f"BN {mode:6s} λ top-{len(eig.values)}  {vals}   (residual ≤ {max(eig.residuals):.1e}, "
                     f"{eig.hvps} products, {api.fmt_time(eig.seconds)}){conv}")
        if "trace" in r:
            t = r["trace"]
            lines.append(f"          trace     {float(t):.5g} ± {t.stderr:.2g} ({t.method}, {t.hvps} products)"
                         f"{'' if t.converged else '  (not converged)'}")
        if "density" in r:
            d = rec["density"]
            lines.append(f"          density   eigenvalues in [{d['min']:.4g}, {d['max']:.4g}], σ {d['sigma']:.3g} "
                         f"({d['hvps']} products)")
        lines.append(f"          loss      {rec['loss']:.5g} at these weights")
        if rec.get("per_layer"):
            lines.append(f"          {'layer':24s} {'params':>10s} {'λmax':>11s}" + (f" {'trace':>11s}" if "trace" in r else ""))
            for row in rec["per_layer"]:
                tr = f" {row['trace']['trace']:11.4g}" if "trace" in row else ""
                lines.append(f"          {row['group'][:24]:24s} {row['parameters']:10,d} "
                             f"{row['top_eigenvalues']['values'][0]:11.4g}{tr}")
    lines.append(f"time      {api.fmt_time(seconds)}")
    lines += [f"wrote     {p}" for p in written]
    print("\n".join(lines))


def run_spectrum(args: argparse.Namespace) -> Path:
    dev = api.resolve_device(args.device)
    samples = args.samples if args.samples is not None else (
        surface_cli.DEFAULT_CUDA_SAMPLES if dev.type == "cuda" else surface_cli.DEFAULT_CPU_SAMPLES)
    if args.out:
        files.check_output_file(Path(f"{args.out}.json"))
    source = args.data or "auto"
    evalset = data_mod.load(source, args.split, samples, seed=args.sample_seed, device=dev)
    args.data = source
    model, spec, ckpt, meta = surface_cli.resolve_model(args, evalset.source, dev)
    prefix = Path(args.out) if args.out else Path("hessian") / f"{slug(spec)}-{slug(evalset.source)}-{args.split}{len(evalset)}"
    for suffix in (".json", ".h5", "_density.png"):
        files.check_output_file(Path(f"{prefix}{suffix}"))
    loss = None if args.loss == "auto" else args.loss
    modes = ("eval", "batch") if args.bn_mode == "both" else (args.bn_mode or "eval",)
    if "batch" in modes and not models.has_batchnorm(model):
        print(f"note: {spec} has no BatchNorm: bn_mode batch is the same Hessian as eval")
    started = dt.datetime.now(dt.timezone.utc)
    results = {mode: analyse(model, evalset, args, loss, mode) for mode in modes}
    seconds = (dt.datetime.now(dt.timezone.utc) - started).total_seconds()
    attrs = {"fastland_version": fastland.__version__, "created": started.isoformat(timespec="seconds"), "model": spec,
             "checkpoint": str(ckpt), "checkpoint_sha256": models.sha256(ckpt), "checkpoint_epoch": float(meta.get("epoch", -1)),
             "model_sha256": api.state_sha256(model), **evalset.attrs(), "loss": args.loss,
             "batch_size": args.batch_size or hessian.DEFAULT_BATCH_SIZE, "params": args.params or "all", "k": args.k,
             "tol": args.tol, "seed": args.seed, "device": device_mod.describe(dev), "torch_version": str(torch.__version__),
             "seconds": seconds}
    record = {**attrs, "modes": {m: r["record"] for m, r in results.items()}}
    written = []
    files.write_text_atomic(Path(f"{prefix}.json"), json.dumps(record, indent=1) + "\n")
    written.append(Path(f"{prefix}.json"))
    written.append(write_h5(Path(f"{prefix}.h5"), results, attrs))
    if args.density and not args.no_plot:
        from fastland.viz import plots

        curves = [(f"BN {m}", r["density"].grid, r["density"].density) for m, r in results.items()]
        marks = {f"BN {m}": [float(v) for v in r["eig"].values] for m, r in results.items()}
        heading = (f"Hessian spectral density: {spec}, {evalset.name or evalset.source} {args.split} {len(evalset):,} "
                   f"samples, {results[modes[0]]['record']['parameters']:,} parameters")
        written.append(plots.density_png(curves, Path(f"{prefix}_density.png"), heading, marks))
    head = (f"hessian   {spec} ({ckpt}); {evalset.describe()}; loss {results[modes[0]]['record']['loss_fn']}; batches of "
            f"{args.batch_size or hessian.DEFAULT_BATCH_SIZE}")
    if evalset.warning:
        head += f"\nnote      {evalset.warning}"
    summary(results, head, written, seconds)
    return Path(f"{prefix}.json")


# --- the curvature map ----------------------------------------------------------------------------
def run_map(args: argparse.Namespace) -> Path:
    path = Path(args.map)
    a = surfacefile.settings_of(path)
    if int(a.get("dim", 2)) not in (1, 2) or "xcoordinates" not in _datasets(path):
        raise UserError(f"{path} is not a fastland surface file")
    dev = api.resolve_device(args.device)
    if args.data is not None:
        samples = args.samples if args.samples is not None else a.get("samples")
        evalset = data_mod.load(args.data, args.split, samples, seed=args.sample_seed, device=dev)
    else:
        source = str(a.get("data_source", ""))
        if source in ("tensors", "dataset", "dataloader", ""):
            raise UserError(f"{path} was made from data given in Python ({source or 'unknown'}); pass --data (and "
                            "--split, --samples) or use fastland.hessian.curvature_map")
        evalset = data_mod.load(source, str(a.get("split", "train")), a.get("samples"), seed=int(a.get("sample_seed", 0)),
                                device=dev)
        if a.get("data_sha256") and evalset.fingerprint != a["data_sha256"]:
            raise UserError(f"the data {source} loaded now differ from the data {path} was computed on (data_sha256); "
                            "restore them or pass --data")
    ckpt = args.checkpoint or a.get("checkpoint")
    if not ckpt:
        raise UserError(f"{path} names no checkpoint (made in Python); pass --checkpoint (and --model)")
    spec = args.model or (a.get("model") if a.get("model") in models.MODELS or ":" in str(a.get("model")) else None)
    model, spec, _ = models.load_checkpoint(ckpt, dev, spec=spec, model_args=args.model_args)
    loss = a.get("loss") if args.loss == "auto" else args.loss
    if loss not in (*losses.NAMED, None):
        raise UserError(f"{path} was made with the loss {loss}; the command line knows only {', '.join(losses.NAMED)}: "
                        "use fastland.hessian.curvature_map from Python")
    bn_mode = args.bn_mode or a.get("bn_mode", "eval")
    if bn_mode == "both":
        raise UserError("--map takes --bn-mode eval or batch (one map per file)")
    batch = args.batch_size or int(a.get("bn_batch", 0) or 0) or None
    cmap = curvature.curvature_map(model, evalset, path, loss_fn=loss, stride=args.stride, bn_mode=bn_mode,
                                   tol=args.tol,
                                   max_iter=args.max_iter or curvature.DEFAULT_MAX_ITER, batch_size=batch,
                                   points=args.points, seed=args.seed, overwrite=args.overwrite)
    written = [] if args.no_plot else draw_map(path, Path(args.out) if args.out else path.with_suffix(""))
    print("\n" + f"map       {path} ({spec}, {evalset.describe()})")
    print("\n".join(curvature.summary_lines(cmap)))
    for p in written:
        print(f"wrote     {p}")
    return path


def _datasets(path: Path) -> set[str]:
    with surfacefile._open(path) as f:
        return set(f)


def draw_map(path: Path, prefix: Path) -> list[Path]:
    """The curvature pictures of a surface file: the matplotlib maps, and the 3-D surface coloured by the ratio
    (PyVista; skipped with a note where it is not installed)."""
    from fastland.viz import plots

    surf = surfacefile.read(path)
    out = [plots.curvature_png(surf, Path(f"{prefix}_curvature.png"))]
    if surf.dim == 2:
        try:
            from fastland.viz import render
        except ImportError:
            print("PyVista is not installed: the 3-D curvature picture is skipped (pip install -e .[viz])")
        else:
            out.append(render.curvature_screenshot(surf, Path(f"{prefix}_curvature_3d.png")))
    return out


@cli_entry
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    check_args(args)
    if args.map is not None:
        run_map(args)
    else:
        run_spectrum(args)
