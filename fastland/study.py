"""``python -m fastland.study``: the seed's BatchNorm study, end to end, in one command.

For each model it trains with the Santurkar smoothness probes, evaluates the final model,
and computes a filter-normalized 2-D surface around it. Then it draws the two comparison
figures (Figure 1: probes with against without BN; Figure 2: the surfaces side by side,
linear and log) and writes ``report.md`` and ``report.html`` with a table of numbers.
Every stage is resumable: a finished stage is reused, an interrupted one continues.
"""

from __future__ import annotations

import argparse
import html
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastland import api, models, probes, surface, surfacefile
from fastland import data as data_mod
from fastland import device as device_mod
from fastland.errors import ArgumentParser, UserError, cli_entry
from fastland.train import PRESETS as TRAIN_PRESETS
from fastland.train import TrainConfig, train

PRESETS: dict[str, dict[str, Any]] = {
    # The LeNet pair on a laptop CPU in minutes: fewer samples and epochs, a probe every other step.
    "quick": {"models": ["lenet", "lenet_bn"], "epochs": 6, "train_samples": "20000", "probe_every": 1,
              "res": 51, "samples": "512", "eval_samples": "5000"},
    # The seed's experiment: four models, 20 epochs of Adam (lr 0.01, batch 128), probes at every step.
    "seed": {"models": ["lenet", "lenet_bn", "vgg16", "vgg16_bn"], "epochs": 20, "train_samples": "all",
             "probe_every": 1, "res": 51, "samples": None, "eval_samples": "10000"},
}
RADII = (0.25, 0.5, 1.0)


# --- numbers ---------------------------------------------------------------------------
def evaluate_model(model: torch.nn.Module, evalset: data_mod.EvalSet) -> tuple[float, float]:
    """Mean loss and accuracy of a model in eval mode (``fastland.api.evaluate``)."""
    r = api.evaluate(model, evalset, device=evalset.device)
    return r["loss"], r.get("accuracy", float("nan"))


def probe_stats(metrics_csv: Path) -> dict[str, float]:
    """Median and 90th percentile of β-smoothness and of the loss-variation band width."""
    m = probes.read_metrics(metrics_csv)
    out: dict[str, float] = {"probes": float(len(m.get("step", [])))}
    for key, values in (("beta", m["beta_smooth"]), ("band", m["loss_max"] - m["loss_min"])):
        v = values[np.isfinite(values)]
        out[f"{key}_median"] = float(np.median(v)) if v.size else float("nan")
        out[f"{key}_p90"] = float(np.percentile(v, 90)) if v.size else float("nan")
    return out


def flatness(s: surfacefile.Surface) -> dict[str, float]:
    """Mean and max rise of the loss above the grid minimum at distance r from it.

    The ring at radius r holds the grid points whose distance from the minimum lies
    within half a grid step of r; points outside the grid do not count.
    """
    loss = np.where(s.done == 1, s.loss, np.nan)
    xx, yy = np.meshgrid(s.x, s.y)
    j = int(np.nanargmin(np.where(np.isfinite(loss), loss, np.inf)))
    x0, y0, lmin = xx.reshape(-1)[j], yy.reshape(-1)[j], loss.reshape(-1)[j]
    dist = np.hypot(xx - x0, yy - y0)
    half = 0.5 * max(s.x[1] - s.x[0], s.y[1] - s.y[0])
    out = {"min_loss": float(lmin), "min_alpha": float(x0), "min_beta": float(y0)}
    for r in RADII:
        ring = (np.abs(dist - r) < half) & (dist > 0)
        rise = loss[ring] - lmin
        finite = rise[np.isfinite(rise)]
        out[f"rise_mean_{r}"] = float(finite.mean()) if finite.size else float("nan")
        out[f"rise_max_{r}"] = float(rise.max()) if rise.size else float("nan")  # inf/NaN shown as is
    return out


# --- the stages ------------------------------------------------------------------------
@dataclass
class Stages:
    """Wall times of the finished stages, kept in ``stages.json`` so a re-run can reuse them."""

    path: Path
    done: dict[str, float] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> Stages:
        return cls(path, json.loads(path.read_text()) if path.exists() else {})

    def run(self, key: str, fn: Any, *args: Any) -> Any:
        """Run a stage (each stage function is itself resumable), timing it unless reused."""
        reused = key in self.done
        print(f"\n== {key}{' (finished before: checking)' if reused else ''}")
        t0 = time.perf_counter()
        result = fn(*args)
        if not reused:
            self.done[key] = time.perf_counter() - t0
            self.path.write_text(json.dumps(self.done, indent=2) + "\n")
        return result


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m fastland.study", description=__doc__,
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="quick", choices=tuple(PRESETS),
                   help="quick: LeNet with and without BN, 6 epochs on 20,000 samples, 51x51 surfaces (minutes on a "
                        "CPU); seed: LeNet and VGG-16 each with and without BN, 20 epochs on all data, 51x51")
    p.add_argument("--models", nargs="+", default=None, choices=models.MODELS, help="override the preset's models")
    p.add_argument("--train-preset", default="seed", choices=tuple(TRAIN_PRESETS),
                   help="optimizer settings: seed (Adam, lr 0.01, batch 128) or santurkar (SGD, lr 0.1, batch 128)")
    p.add_argument("--lr", type=float, default=None, help="override the training preset's learning rate")
    p.add_argument("--epochs", type=int, default=None, help="override the preset's epochs")
    p.add_argument("--train-samples", default=None, help="training samples: a number or 'all'")
    p.add_argument("--probe-every", type=int, default=None, help="probe every K-th step")
    p.add_argument("--res", type=int, default=None, help="surface points per axis")
    p.add_argument("--samples", default=None,
                   help="surface evaluation samples: a number or 'all' (default: the surface command's default)")
    p.add_argument("--eval-samples", default=None, help="samples for the final train/test loss and accuracy")
    p.add_argument("--bn-mode", default="eval", choices=("eval", "batch"), help="BN mode of the surfaces")
    p.add_argument("--data", default="auto",
                   help="cifar10, synthetic, auto (CIFAR-10 if present, else synthetic) or imagefolder:PATH (an "
                        "ImageFolder tree with train/ and test/, or a .tar.gz of one)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int, default=0, help="seed of training and of the surface directions")
    p.add_argument("--out", default=None, help="study folder (default study/PRESET-SOURCE)")
    return p


def settings(args: argparse.Namespace) -> dict[str, Any]:
    s = dict(PRESETS[args.preset])
    for key in ("models", "epochs", "train_samples", "probe_every", "res", "samples", "eval_samples"):
        if getattr(args, key) is not None:
            s[key] = getattr(args, key)
    if s["epochs"] < 1 or s["probe_every"] < 1 or s["res"] < 2:
        raise UserError("--epochs and --probe-every must be at least 1, --res at least 2")
    return s


def run_study(args: argparse.Namespace) -> Path:
    cfg = settings(args)
    dev = device_mod.resolve(args.device)
    trainset = data_mod.load(args.data, "train", cfg["train_samples"], seed=args.seed, device=dev,
                             samples_option="--train-samples")
    source = trainset.source
    out = Path(args.out) if args.out else Path("study") / f"{args.preset}-{source}"
    out.mkdir(parents=True, exist_ok=True)
    stages = Stages.load(out / "stages.json")
    print(f"study: {', '.join(cfg['models'])} on {source} data ({len(trainset):,} training samples, "
          f"{cfg['epochs']} epochs, probes every {cfg['probe_every']} step(s)); surfaces {cfg['res']}x{cfg['res']}; "
          f"out {out}")
    eval_train = data_mod.load(source, "train", cfg["eval_samples"], seed=1, device=dev, samples_option="--eval-samples")
    eval_test = data_mod.load(source, "test", cfg["eval_samples"], seed=1, device=dev, samples_option="--eval-samples")
    results: dict[str, dict[str, Any]] = {}
    for name in cfg["models"]:
        run_dir = out / name / "train"
        opt = TRAIN_PRESETS[args.train_preset]
        cfg["optimizer"], cfg["lr"] = opt["optimizer"], args.lr if args.lr is not None else opt["lr"]
        tcfg = TrainConfig(model=name, data=source, samples=str(cfg["train_samples"]), epochs=int(cfg["epochs"]),
                           seed=args.seed, device=str(dev), optimizer=opt["optimizer"], batch=opt["batch"],
                           lr=args.lr if args.lr is not None else opt["lr"], momentum=opt["momentum"])
        probe = probes.ProbeConfig(every=int(cfg["probe_every"]))
        final = stages.run(f"{name}: train with probes", train, tcfg, run_dir, probe, True, trainset)
        r = results[name] = {}

        def evaluate(final: Path = final, r: dict[str, Any] = r) -> None:
            model, _, _ = models.load_checkpoint(final, dev)
            r["train_loss"], r["train_acc"] = evaluate_model(model, eval_train)
            r["test_loss"], r["test_acc"] = evaluate_model(model, eval_test)

        stages.run(f"{name}: evaluate", evaluate)
        r.update(probe_stats(run_dir / "metrics.csv"))
        surf = out / name / "surface.h5"
        # The user's --data, not the resolved source, so an 'auto' fallback keeps its warning in the file.
        argv = ["--model", name, "--checkpoint", str(final), "--data", args.data, "--res", str(cfg["res"]),
                "--bn-mode", args.bn_mode, "--device", str(dev), "--seed", str(args.seed), "--out", str(surf),
                "--no-render"]
        if cfg["samples"] is not None:
            argv += ["--samples", str(cfg["samples"])]
        stages.run(f"{name}: surface", _surface, surface.build_parser().parse_args(argv))
        r.update(flatness(surfacefile.read(surf)))
        r["surface"] = surf
    figures = stages_figures(stages, out, cfg["models"], results, trainset.warning)
    for name in cfg["models"]:
        results[name]["times"] = {k.split(": ", 1)[1]: v for k, v in stages.done.items() if k.startswith(f"{name}: ")}
    return write_report(out, args, cfg, trainset, results, figures, stages)


def _surface(args: argparse.Namespace) -> Path:
    """The surface stage; the study has no --overwrite, so a surface file it cannot resume is advised away."""
    try:
        return surface.run(args)
    except UserError as err:
        text = str(err).replace("pass --overwrite to replace it or choose another --out",
                                "delete it, or choose another study --out")
        raise UserError(text) from None


def _pairs(names: list[str]) -> list[tuple[str, list[str]]]:
    """Group models by architecture: [('lenet', ['lenet', 'lenet_bn']), ...]."""
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault(n.removesuffix("_bn"), []).append(n)
    return list(groups.items())


def stages_figures(stages: Stages, out: Path, names: list[str], results: dict[str, dict[str, Any]],
                   data_warning: str | None = None) -> list[tuple[str, Path]]:
    """Figure 1 and Figure 2 for every architecture (always redrawn: cheap, and data may have grown)."""
    from fastland import trainplots
    from fastland.viz import plots

    figs: list[tuple[str, Path]] = []
    fdir = out / "figures"
    fdir.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    print("\n== figures")
    try:
        from fastland.viz import render
    except ImportError:
        render = None  # type: ignore[assignment]
        print("PyVista is not installed: Figure 2 falls back to matplotlib contour maps")
    for arch, group in _pairs(names):
        runs = {n: out / n / "train" for n in group}
        figs.append((f"Figure 1 ({arch}): loss variation, gradient predictiveness and effective β-smoothness "
                     f"over training, {' vs '.join(group)}",
                     trainplots.plot_runs(runs, fdir / f"fig1_{arch}.png", title=f"{arch}: with vs without BatchNorm"
                                     + (f"  —  WARNING: {data_warning}" if data_warning else ""))))
        surfs = [results[n]["surface"] for n in group]
        for log in (False, True):
            scale = "log" if log else "linear"
            caption = f"Figure 2 ({arch}, {scale} scale): filter-normalized 2-D loss surfaces, {' | '.join(group)}"
            if render is not None:
                path = render.compare(surfs, fdir / f"fig2_{arch}_{scale}.png", shared=True,
                                      view=render.View(log=log), size=(1600 * len(group) // 2 + 800, 900))
                figs.append((caption + " (shared colour and height scale)", path))
            else:
                for n, sp in zip(group, surfs, strict=True):
                    figs.append((f"{caption}: {n}", plots.contour_png(surfacefile.read(sp),
                                                                      fdir / f"fig2_{n}_{scale}.png", log=log)))
    stages.done["figures"] = time.perf_counter() - t0
    stages.path.write_text(json.dumps(stages.done, indent=2) + "\n")
    return figs


# --- the report ------------------------------------------------------------------------
def _f(v: float, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "n/a"
    if isinstance(v, float) and np.isinf(v):
        return "inf"
    return f"{v:.{digits}g}"


def write_report(out: Path, args: argparse.Namespace, cfg: dict[str, Any], trainset: data_mod.EvalSet,
                 results: dict[str, dict[str, Any]], figures: list[tuple[str, Path]], stages: Stages) -> Path:
    names = cfg["models"]
    header = ["", *names]
    rows = [
        ["final train loss", *(_f(results[n]["train_loss"]) for n in names)],
        ["final train accuracy (%)", *(_f(results[n]["train_acc"], 3) for n in names)],
        ["final test loss", *(_f(results[n]["test_loss"]) for n in names)],
        ["final test accuracy (%)", *(_f(results[n]["test_acc"], 3) for n in names)],
        ["probes recorded", *(str(int(results[n]["probes"])) for n in names)],
        ["effective β-smoothness, median", *(_f(results[n]["beta_median"]) for n in names)],
        ["effective β-smoothness, 90th pct", *(_f(results[n]["beta_p90"]) for n in names)],
        ["loss-variation band width, median", *(_f(results[n]["band_median"]) for n in names)],
        ["loss-variation band width, 90th pct", *(_f(results[n]["band_p90"]) for n in names)],
        ["surface minimum loss", *(_f(results[n]["min_loss"]) for n in names)],
        *[[f"loss rise at r={r}: mean / max", *(f"{_f(results[n][f'rise_mean_{r}'])} / {_f(results[n][f'rise_max_{r}'])}"
                                                 for n in names)] for r in RADII],
        *[[f"wall time: {stage}", *(f"{results[n]['times'].get(stage, float('nan')):.1f}s" for n in names)]
          for stage in ("train with probes", "evaluate", "surface")],
    ]
    synthetic = trainset.source == "synthetic"
    intro = [
        f"Preset `{args.preset}`: {', '.join(names)}; {cfg['epochs']} epochs of {cfg['optimizer']} (lr {cfg['lr']}, batch "
        f"128) on "
        f"{len(trainset):,} training samples; the smoothness probes every {cfg['probe_every']} step(s) over 8 step "
        f"lengths η from 0.5·lr to 4·lr (Santurkar et al.); {cfg['res']}×{cfg['res']} filter-normalized surfaces in "
        f"[−1, 1]², BN in {args.bn_mode} mode (Li et al.).",
        ("**The data were synthetic**: CIFAR-10 was not available, so a deterministic CIFAR-shaped stand-in was used. "
         "The numbers show how the method behaves, not what CIFAR-10 gives." if synthetic else
         "Data: CIFAR-10."),
        f"Final losses and accuracies are measured in eval mode on {cfg['eval_samples']} samples of each split. "
        "The rise at radius r is the loss above the surface's minimum, over the grid points at distance r from it "
        "(mean / max). Total wall time: " + f"{sum(stages.done.values()):.0f}s.",
    ]
    intro += findings(names, results)
    (out / "report.md").write_text(_markdown(intro, header, rows, figures, out))
    (out / "report.html").write_text(_html(intro, header, rows, figures, out))
    (out / "results.json").write_text(json.dumps({n: {k: v for k, v in r.items() if k != "surface"}
                                                  for n, r in results.items()}, indent=2, default=str) + "\n")
    print(f"\nreport: {out / 'report.md'} and {out / 'report.html'}")
    print(_markdown_table(header, rows))
    return out / "report.md"


CHANCE_ACC = 100.0 / data_mod.NUM_CLASSES


def learned(r: dict[str, Any]) -> bool:
    """Whether a run learned anything: final train accuracy well above chance (10%)."""
    return bool(r["train_acc"] > 1.5 * CHANCE_ACC)


def findings(names: list[str], results: dict[str, dict[str, Any]]) -> list[str]:
    """Plain sentences comparing each architecture with and without BN, from the table's numbers.

    A run that stayed at chance is called out: its flat surface and small β-smoothness are
    those of a network whose output no longer depends on its input, not evidence of smoothness.
    """
    out = []
    for n in names:
        if not learned(results[n]):
            out.append(f"**{n} did not learn** (final train accuracy {results[n]['train_acc']:.1f}%, chance is "
                       f"{CHANCE_ACC:.0f}%): its flat surface and small β-smoothness describe a collapsed network, "
                       "so its numbers are not evidence that its landscape is smooth.")
    for arch, group in _pairs(names):
        if arch not in group or f"{arch}_bn" not in group:
            continue
        a, b = results[arch], results[f"{arch}_bn"]
        if not (learned(a) and learned(b)):
            out.append(f"{arch} vs {arch}_bn: no like-for-like comparison of smoothness, because one of them did not "
                       "learn; that BatchNorm kept training alive at this learning rate is itself the finding.")
            continue

        def cmp(key: str, what: str, a: dict[str, Any] = a, b: dict[str, Any] = b) -> str:
            lo = "with" if b[key] < a[key] else "without"
            return f"{what} is lower {lo} BN ({_f(b[key])} with, {_f(a[key])} without)"

        out.append(f"{arch} vs {arch}_bn: " + "; ".join([
            cmp("beta_median", "the median effective β-smoothness"),
            cmp("band_median", "the median loss-variation band"),
            cmp("rise_mean_0.5", "the mean loss rise at radius 0.5 on the surface"),
        ]) + ".")
    return out


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _markdown(intro: list[str], header: list[str], rows: list[list[str]], figures: list[tuple[str, Path]],
              out: Path) -> str:
    parts = ["# How BatchNorm changes the loss landscape: fastland study", "", *[p + "\n" for p in intro],
             "## Numbers", "", _markdown_table(header, rows), "", "## Figures", ""]
    for caption, path in figures:
        parts += [f"**{caption}**", "", f"![{caption}]({path.relative_to(out)})", ""]
    return "\n".join(parts)


def _html(intro: list[str], header: list[str], rows: list[list[str]], figures: list[tuple[str, Path]],
          out: Path) -> str:
    def para(text: str) -> str:
        t = html.escape(text)
        while "**" in t:
            t = t.replace("**", "<strong>", 1).replace("**", "</strong>", 1)
        while "`" in t:
            t = t.replace("`", "<code>", 1).replace("`", "</code>", 1)
        return f"<p>{t}</p>"

    table = "<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"
    table += "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows) + "</table>"
    figs = "".join(f"<figure><img src='{html.escape(str(p.relative_to(out)))}' style='max-width:100%'>"
                   f"<figcaption>{html.escape(c)}</figcaption></figure>" for c, p in figures)
    style = ("body{font-family:sans-serif;max-width:1400px;margin:auto;padding:1em}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td:first-child{text-align:left}"
             "figcaption{font-weight:bold;margin:0.3em 0 1.5em}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>fastland study</title><style>{style}</style>"
            f"</head><body><h1>How BatchNorm changes the loss landscape: fastland study</h1>"
            f"{''.join(para(p) for p in intro)}<h2>Numbers</h2>{table}<h2>Figures</h2>{figs}</body></html>\n")


@cli_entry
def main(argv: list[str] | None = None) -> None:
    run_study(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
