"""Figure-1-style plots of the smoothness probes recorded in ``metrics.csv`` (matplotlib only).

Three panels over the training steps, as in Santurkar et al.'s Fig. 4 and the seed's Fig. 1:
(a) the loss variation band [min_H L(θ'), max_H L(θ')] with the training loss,
(b) the gradient predictiveness band [min_H, max_H] of ‖g − ∇L(θ')‖,
(c) the effective β-smoothness. Runs with BatchNorm are blue, without red, overlaid.

``python -m fastland.trainplots RUN_DIR [RUN_DIR ...] --out FIG.png`` re-plots saved runs. The
output is checked before anything is read, and written whole or not at all.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure  # no pyplot: files only, no display, no global state

from fastland.errors import ArgumentParser, UserError, cli_entry
from fastland.probes import read_metrics
from fastland.viz.outputs import figure_types, image_path, replacing

_NAMES = {"lenet": "LeNet", "lenet_bn": "LeNet + BatchNorm", "vgg16": "VGG-16", "vgg16_bn": "VGG-16 + BatchNorm"}
_NO_BN, _BN, _OTHER = ("#d62728", "#ff9896"), ("#1f77b4", "#aec7e8"), ("#2ca02c", "#98df8a")
COLUMNS = ("step", "loss", "loss_min", "loss_max", "gradpred_min", "gradpred_max", "beta_smooth")


def _finite(a: np.ndarray) -> np.ndarray:
    """Non-finite values become gaps in the plot (they stay as they are in metrics.csv)."""
    return np.where(np.isfinite(a), a, np.nan)


def _colors(label: str, used: set[str]) -> tuple[str, str]:
    base = _BN if label.endswith("_bn") else _NO_BN
    return _OTHER if base[0] in used else base


def _bad_row(path: Path) -> str:
    """Why ``read_metrics`` could not read ``path``: the first row that is not a full row of numbers."""
    with open(path, newline="", encoding="utf-8") as f:
        text = f.read()
    try:
        rows = list(csv.reader(text.splitlines()))
    except csv.Error as err:
        return f"it is not CSV text ({err})"
    width = len(rows[0]) if rows else 0
    for n, row in enumerate(rows[1:], start=2):
        try:
            [float(v) for v in row]
        except ValueError:
            return f"line {n} is not all numbers ({','.join(row)[:60]!r})"
        if len(row) != width:
            partial = n == len(rows) and not text.endswith("\n")
            return f"line {n} has {len(row)} values, not {width}" + (
                " (the run may still be writing it; try again in a moment)" if partial else "")
    return "it is not a table of numbers"


def load_run(run: str | Path) -> dict[str, np.ndarray]:
    """A run directory's (or a ``metrics.csv`` file's) probe table, with a one-line error if it is absent or unreadable."""
    path = Path(run)
    path = path / "metrics.csv" if path.is_dir() else path
    if not path.is_file():
        raise UserError(f"{path} does not exist; train with probes on (without --no-probe) first")
    what = "is not a metrics.csv written by fastland.train"
    try:
        table = read_metrics(path)
    except UnicodeDecodeError:
        raise UserError(f"{path} {what}: it is not UTF-8 text") from None
    except (ValueError, csv.Error):
        raise UserError(f"{path} {what}: {_bad_row(path)}") from None
    missing = [c for c in COLUMNS if c not in table]
    if table and missing:
        raise UserError(f"{path} {what}: it has no {', '.join(missing)} column{'s' if len(missing) > 1 else ''}")
    if not table or len(table["step"]) == 0:
        raise UserError(f"{path} has no probe rows yet")
    return table


def plot_runs(runs: dict[str, str | Path], out: str | Path, title: str | None = None) -> Path:
    """Plot the probes of one or more runs (``{label: run_dir}``) into one figure; returns its path.

    A label that is a model name (``lenet_bn``...) gets the paper's legend and colors. The
    image type follows the suffix of ``out`` (png, pdf, svg...).
    """
    tables = {label: load_run(run) for label, run in runs.items()}  # every run read before anything is drawn
    fig = Figure(figsize=(15, 4.2), layout="constrained")
    axes = fig.subplots(1, 3)
    used: set[str] = set()
    for label, m in tables.items():
        line, band = _colors(label, used)
        used.add(line)
        name = _NAMES.get(label, label)
        step = m["step"]
        ax = axes[0]
        ax.fill_between(step, _finite(m["loss_min"]), _finite(m["loss_max"]), color=band, alpha=0.6, lw=0,
                        label=f"{name}: L(θ − ηg), η ∈ H")
        ax.plot(step, _finite(m["loss"]), color=line, lw=0.6, label=f"{name}: training loss")
        ax = axes[1]
        ax.fill_between(step, _finite(m["gradpred_min"]), _finite(m["gradpred_max"]), color=band, alpha=0.6, lw=0,
                        label=name)
        ax.plot(step, _finite(m["gradpred_max"]), color=line, lw=0.4)
        axes[2].plot(step, _finite(m["beta_smooth"]), color=line, lw=0.7, label=name)
    axes[0].set(title="(a) loss landscape: loss variation", xlabel="step", ylabel="loss")
    axes[1].set(title="(b) gradient predictiveness", xlabel="step", ylabel="‖∇L(θ) − ∇L(θ − ηg)‖₂", yscale="log")
    axes[2].set(title="(c) effective β-smoothness", xlabel="step", ylabel="max_η ‖∇L(θ) − ∇L(θ − ηg)‖ / ‖ηg‖",
                yscale="log")
    for ax, key in zip(axes, ("loss_max", "gradpred_max", "beta_smooth"), strict=True):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        if not any(np.isfinite(m[key]).any() for m in tables.values()):
            ax.text(0.5, 0.5, "no finite values recorded", transform=ax.transAxes, ha="center", color="dimgray")
    if title:
        fig.suptitle(title)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with replacing(out) as tmp:
        fig.savefig(tmp, dpi=130, format=out.suffix.lstrip(".").lower() or "png")
    return out


@cli_entry
def main(argv: list[str] | None = None) -> None:
    """Re-plot saved runs: ``python -m fastland.trainplots RUN_DIR [RUN_DIR ...] --out FIG.png``."""
    p = ArgumentParser(prog="python -m fastland.trainplots", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run directories (or metrics.csv files); a directory named after a "
                                           "model (lenet, lenet_bn, ...) gets the paper's colors")
    p.add_argument("--out", default="smoothness.png",
                   help="figure file: png, pdf, svg or another type matplotlib writes (a folder gets smoothness.png)")
    p.add_argument("--title", default=None, help="figure title")
    args = p.parse_args(argv)
    out = image_path(args.out, "--out", figure_types(), "smoothness.png")  # before any run is read
    runs = {}
    for r in args.runs:
        path = Path(r)
        label = (path.parent if path.is_file() else path).name
        runs[label if label not in runs else str(path)] = path
    print(plot_runs(runs, out, args.title))


if __name__ == "__main__":
    main()
