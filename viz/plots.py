"""Matplotlib pictures of loss surfaces: the top-down contour map and 1-D line plots.

Figures are made with ``matplotlib.figure.Figure`` rather than pyplot, so writing them needs
no GUI backend and leaves the caller's pyplot state alone. They need no PyVista, so they work
on every machine fastland runs on (the GPU machines included). They share
``fastland.viz.prepare`` with the 3-D renderer, so clipping, log scale, NaN, inf and
unevaluated points are handled, and described on the image, the same way.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

from fastland.errors import UserError
from fastland.surfacefile import Surface

from .prepare import scaled, spans_decades, ticks, title, warning

CMAP = "viridis"
DIVERGED_COLOR = "magenta"
CLIPPED_COLOR = "lightgray"


def _header(fig: Figure, ax: Axes, surface: Surface, notes: list[str]) -> None:
    """Title on the axes; the data warning in red above it; notes in grey under the figure."""
    ax.set_title(title(surface), fontsize=10)
    if warning(surface):
        fig.suptitle(warning(surface), color="darkred", fontsize=10)
    if notes:
        fig.text(0.01, 0.005, "\n".join(notes), fontsize=7.5, color="dimgray", va="bottom", wrap=True)


def _save(fig: Figure, path: str | Path, notes: list[str]) -> Path:
    """Write the PNG, with room under the axes for the notes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if notes:
        fig.get_layout_engine().set(rect=(0, 0.025 * len(notes) + 0.01, 1, 1 - 0.025 * len(notes) - 0.01))
    fig.savefig(path)
    return path


def _round_levels(lo: float, hi: float, log: bool) -> np.ndarray:
    """About a dozen contour levels at round values (1, 2, 5 per decade on a log scale), so labels read easily."""
    if log:
        decades = np.arange(np.floor(lo), np.ceil(hi) + 1)
        levels = np.log10(np.outer(10**decades, [1, 2, 5]).ravel())
    else:
        levels = MaxNLocator(12).tick_values(lo, hi)
    return np.sort(levels[(levels > lo) & (levels < hi)])


def contour_png(surface: Surface, path: str | Path, log: bool | None = None) -> Path:
    """Write a top-down map of the loss: filled contours, contour lines and the minimum.

    ``log=None`` chooses a log colour scale when the loss spans two decades or more, which is
    usual far from a trained minimum.
    """
    if surface.dim != 2:
        raise UserError(f"{surface.path} is a 1-D surface; a contour map needs a 2-D one")
    log = spans_decades(surface) if log is None else log
    s = scaled(surface, "loss", log)
    lo, hi = s.clim
    notes = s.describe(hi, above="shown light grey", diverged=f"marked × in {DIVERGED_COLOR}", missing="hatched")

    fig = Figure(figsize=(8, 7), dpi=150, layout="constrained")
    ax = fig.subplots()
    x, y = np.meshgrid(surface.x, surface.y)
    z = np.ma.masked_invalid(s.z)
    cmap = matplotlib.colormaps[CMAP].with_extremes(over=CLIPPED_COLOR)
    filled = ax.contourf(x, y, z, levels=np.linspace(lo, hi, 41), cmap=cmap, extend="max" if s.above(hi) else "neither")
    lines = ax.contour(x, y, z, levels=_round_levels(lo, hi, log), colors="black", linewidths=0.6, alpha=0.6,
                       linestyles="solid")
    ax.clabel(lines, lines.levels[::2], fmt=lambda v: f"{10**v:.3g}" if log else f"{v:.3g}", fontsize=7)
    # Unevaluated points show the hatched background through the masked contours.
    ax.set_facecolor("white")
    ax.fill_between(surface.x, surface.y[0], surface.y[-1], hatch="///", facecolor="none", edgecolor="lightgray",
                    linewidth=0, zorder=-1)
    if s.diverged.any():
        ax.scatter(x[s.diverged], y[s.diverged], marker="x", color=DIVERGED_COLOR, s=25, clip_on=False,
                   label="diverged (NaN/inf)")
    best = s.best("loss")
    if best is not None:
        j, i = best
        ax.plot(surface.x[i], surface.y[j], marker="*", markersize=16, color="red", markeredgecolor="white",
                label=f"min {s.raw[j, i]:.4g} at α={surface.x[i]:.3g}, β={surface.y[j]:.3g}", linestyle="none")
    if ax.get_legend_handles_labels()[0]:  # under the axes, so it never covers a marked point
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.08), ncols=2, fontsize=8, frameon=False)
    ax.set_xlabel("α")
    ax.set_ylabel("β")
    ax.set_aspect("equal")

    bar = fig.colorbar(filled, ax=ax, shrink=0.85, label=s.label)
    marks = ticks(lo, hi, log)
    bar.set_ticks([v for v, _ in marks], labels=[text for _, text in marks])
    _header(fig, ax, surface, notes)
    return _save(fig, path, notes)


def line_png(surface: Surface, path: str | Path, log: bool = False) -> Path:
    """Write a 1-D surface as loss (left axis) and accuracy (right axis) along α.

    On a log scale, losses <= 0 are drawn at the smallest positive loss; diverged points (NaN or
    inf) are marked at the top of the axes; unevaluated points leave gaps. The image says which.
    """
    if surface.dim != 1:
        raise UserError(f"{surface.path} is a 2-D surface; a line plot needs a 1-D one")
    s = scaled(surface, "loss", log, robust=False)
    acc = scaled(surface, "acc")
    notes = s.describe(s.clim[1], above="", diverged=f"marked × in {DIVERGED_COLOR} at the top", missing="left as gaps")

    fig = Figure(figsize=(8, 5), dpi=150, layout="constrained")
    ax = fig.subplots()
    loss = 10**s.z if log else s.z
    ax.plot(surface.x, loss, color="tab:blue", linewidth=1.8, label=s.label)
    if log:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel("α")
    ax.set_ylabel(s.label, color="tab:blue")
    ax.tick_params(axis="y", colors="tab:blue")
    twin = ax.twinx()
    twin.plot(surface.x, acc.z, color="tab:orange", linewidth=1.4, linestyle="--", label=acc.label)
    twin.set_ylabel(acc.label, color="tab:orange")
    twin.tick_params(axis="y", colors="tab:orange")
    if s.diverged.any():
        # Blended transform: x in data units, y at the top of the axes.
        ax.plot(surface.x[s.diverged], np.full(int(s.diverged.sum()), 0.97), "x", color=DIVERGED_COLOR,
                transform=ax.get_xaxis_transform(), label="diverged (NaN/inf)")
    best = s.best("loss")
    if best is not None:
        (i,) = best
        ax.plot(surface.x[i], loss[i], "*", markersize=14, color="red", markeredgecolor="white",
                label=f"min {s.raw[i]:.4g} at α={surface.x[i]:.3g}")
    handles = ax.get_legend_handles_labels()
    more = twin.get_legend_handles_labels()
    ax.legend(handles[0] + more[0], handles[1] + more[1], loc="upper center", bbox_to_anchor=(0.5, -0.12), ncols=4,
              fontsize=8, frameon=False)
    ax.grid(alpha=0.3)
    _header(fig, ax, surface, notes)
    return _save(fig, path, notes)
