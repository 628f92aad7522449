"""Matplotlib pictures of loss surfaces: the top-down contour map, 1-D line plots, curvature maps, Hessian spectra.

Figures are made with ``matplotlib.figure.Figure`` rather than pyplot, so writing them needs
no GUI backend and leaves the caller's pyplot state alone. They need no PyVista, so they work
on every machine fastland runs on (the GPU machines included). They share
``fastland.viz.prepare`` with the 3-D renderer, so clipping, log scale, NaN, inf and
unevaluated points are handled, and described on the image, the same way.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

from fastland.errors import UserError
from fastland.surfacefile import Surface

from .outputs import check_size, replacing
from .prepare import Scaled, has_accuracy, scaled, spans_decades, ticks, title, warning

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


def _figure(inches: tuple[float, float], size: tuple[int, int] | None) -> Figure:
    """A figure of ``inches`` at 150 dpi, or exactly ``size`` pixels (same height in inches, so text keeps its layout)."""
    if size is None:
        return Figure(figsize=inches, dpi=150, layout="constrained")
    check_size(size)
    dpi = size[1] / inches[1]
    return Figure(figsize=(size[0] / dpi, inches[1]), dpi=dpi, layout="constrained")


def _save(fig: Figure, path: str | Path, notes: list[str]) -> Path:
    """Write the image (its type from the suffix), with room under the axes for the notes; whole or not at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if notes:
        fig.get_layout_engine().set(rect=(0, 0.025 * len(notes) + 0.01, 1, 1 - 0.025 * len(notes) - 0.01))
    with replacing(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".").lower() or "png")
    return path


def _round_levels(lo: float, hi: float, log: bool, n: int = 12) -> np.ndarray:
    """About ``n`` contour levels at round values (1, 2, 5 per decade on a log scale), so labels read easily."""
    if n <= 0:
        return np.array([])
    if log:
        per_decade = n / max(hi - lo, 1e-9)
        steps = [1] if per_decade < 1.5 else [1, 3] if per_decade < 2.5 else [1, 2, 5] if per_decade < 4.5 else [
            1, 1.5, 2, 3, 5, 7]
        decades = np.arange(np.floor(lo), np.ceil(hi) + 1)
        levels = np.log10(np.outer(10**decades, steps).ravel())
    else:
        levels = MaxNLocator(n).tick_values(lo, hi)
    return np.sort(levels[(levels > lo) & (levels < hi)])


def contour_png(surface: Surface, path: str | Path, log: bool | None = None, quantity: str = "loss", cmap: str = CMAP,
                contours: int = 12, size: tuple[int, int] | None = None) -> Path:
    """Write a top-down map of the loss (or accuracy): filled contours, ``contours`` lines and the best point.

    ``log=None`` chooses a log colour scale when the loss spans two decades or more, which is
    usual far from a trained minimum. ``size`` (pixels) defaults to 1200x1050.
    """
    fig = _figure((8, 7), size)
    ax = fig.subplots()
    _, notes = draw_map(fig, ax, surface, log, quantity, cmap, contours)
    if ax.get_legend_handles_labels()[0]:  # under the axes, so it never covers a marked point
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.08), ncols=2, fontsize=8, frameon=False)
    ax.set_xlabel("α")
    ax.set_ylabel("β")
    _header(fig, ax, surface, notes)
    return _save(fig, path, notes)


def draw_map(fig: Figure, ax: Axes, surface: Surface, log: bool | None = None, quantity: str = "loss",
             cmap: str = CMAP, contours: int = 12, colorbar: bool = True) -> tuple[Scaled, list[str]]:
    """Draw the top-down map of ``surface`` into ``ax`` (equal aspect), with its colour bar; return what was
    drawn and the notes the picture must print. ``contour_png`` and the trajectory pictures use it."""
    if surface.dim != 2:
        raise UserError(f"{surface.path} is a 1-D surface; a contour map needs a 2-D one")
    log = quantity == "loss" and (spans_decades(surface) if log is None else log)
    s = scaled(surface, quantity, log)
    lo, hi = s.clim
    notes = s.describe(hi, above="shown light grey", diverged=f"marked × in {DIVERGED_COLOR}", missing="hatched")
    x, y = np.meshgrid(surface.x, surface.y)
    z = np.ma.masked_invalid(s.z)
    colours = matplotlib.colormaps[cmap].with_extremes(over=CLIPPED_COLOR)
    filled = ax.contourf(x, y, z, levels=np.linspace(lo, hi, 41), cmap=colours, extend="max" if s.above(hi) else "neither")
    levels = _round_levels(lo, hi, log, contours)
    if len(levels):
        lines = ax.contour(x, y, z, levels=levels, colors="black", linewidths=0.6, alpha=0.6, linestyles="solid")
        ax.clabel(lines, lines.levels[::2], fmt=lambda v: f"{10**v:.3g}" if log else f"{v:.3g}", fontsize=7)
    # Unevaluated points show the hatched background through the masked contours.
    ax.set_facecolor("white")
    ax.fill_between(surface.x, surface.y[0], surface.y[-1], hatch="///", facecolor="none", edgecolor="lightgray",
                    linewidth=0, zorder=-1)
    if s.diverged.any():
        ax.scatter(x[s.diverged], y[s.diverged], marker="x", color=DIVERGED_COLOR, s=25, clip_on=False,
                   label="diverged (NaN/inf)")
    best = s.best(quantity)
    if best is not None:
        j, i = best
        word = "max" if quantity == "acc" else "min"
        ax.plot(surface.x[i], surface.y[j], marker="*", markersize=16, color="red", markeredgecolor="white",
                label=f"{word} {s.raw[j, i]:.4g} at α={surface.x[i]:.3g}, β={surface.y[j]:.3g}", linestyle="none")
    ax.set_aspect("equal")
    if colorbar:
        bar = fig.colorbar(filled, ax=ax, shrink=0.85, label=s.label)
        marks = ticks(lo, hi, log)
        bar.set_ticks([v for v, _ in marks], labels=[text for _, text in marks])
    return s, notes


def line_png(surface: Surface, path: str | Path, log: bool = False, size: tuple[int, int] | None = None) -> Path:
    """Write a 1-D surface as loss (left axis) and accuracy (right axis, if recorded) along α.

    On a log scale, losses <= 0 are drawn at the smallest positive loss; diverged points (NaN or
    inf) are marked at the top of the axes; unevaluated points leave gaps. The image says which.
    ``size`` (pixels) defaults to 1200x750.
    """
    if surface.dim != 1:
        raise UserError(f"{surface.path} is a 2-D surface; a line plot needs a 1-D one")
    s = scaled(surface, "loss", log, robust=False)
    notes = s.describe(s.clim[1], above="", diverged=f"marked × in {DIVERGED_COLOR} at the top", missing="left as gaps")

    fig = _figure((8, 5), size)
    ax = fig.subplots()
    loss = 10**s.z if log else s.z
    ax.plot(surface.x, loss, color="tab:blue", linewidth=1.8, label=s.label)
    if log:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel("α")
    ax.set_ylabel(s.label, color="tab:blue")
    ax.tick_params(axis="y", colors="tab:blue")
    twin = None
    if has_accuracy(surface):
        acc = scaled(surface, "acc")
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
    more = twin.get_legend_handles_labels() if twin is not None else ([], [])
    ax.legend(handles[0] + more[0], handles[1] + more[1], loc="upper center", bbox_to_anchor=(0.5, -0.12), ncols=4,
              fontsize=8, frameon=False)
    ax.grid(alpha=0.3)
    _header(fig, ax, surface, notes)
    return _save(fig, path, notes)


def line_outputs(surface: Surface, prefix: str, size: tuple[int, int] | None = None) -> Iterator[Path]:
    """The outputs of a 1-D surface, ``PREFIX_1d.png`` and ``PREFIX_1d_log.png``, yielded as each is written."""
    yield line_png(surface, prefix + "_1d.png", size=size)
    yield line_png(surface, prefix + "_1d_log.png", log=True, size=size)


# --- curvature (fastland.curvature) ----------------------------------------------------------
CURVATURE_NAMES = ("lambda_max", "lambda_min", "curvature_ratio")


def has_curvature(surface: Surface) -> bool:
    """Whether the surface holds a curvature map (``fastland.curvature``) with at least one computed point."""
    done = surface.extras.get("curvature_done")
    return done is not None and f"{surface.split}_curvature_ratio" in surface.extras and bool((done != 0).any())


def curvature_grid(surface: Surface) -> tuple[np.ndarray, np.ndarray | None, dict[str, np.ndarray], np.ndarray]:
    """The map's own grid (every ``curvature_stride``-th point), its three maps (NaN where not computed) and the
    done mask there (0 not computed, 1 converged, 2 stopped at max_iter)."""
    s = max(1, int(surface.attrs.get("curvature_stride", 1)))
    sub = (slice(None, None, s),) * surface.loss.ndim
    done = surface.extras["curvature_done"][sub]
    maps = {n: np.where(done != 0, surface.extras[f"{surface.split}_{n}"][sub], np.nan) for n in CURVATURE_NAMES}
    return surface.x[::s], None if surface.y is None else surface.y[::s], maps, done


def _curvature_notes(surface: Surface, done: np.ndarray) -> list[str]:
    a = surface.attrs
    notes = [f"Hessian in bn_mode {a.get('curvature_bn_mode', '?')} on {a.get('curvature_samples', '?')} samples; "
             f"‖Hv − λv‖ ≤ {a.get('curvature_tol', '?')}·‖H‖ at every point (Lanczos, both ends); stride "
             f"{a.get('curvature_stride', 1)}"]
    if (done == 0).any():
        notes.append(f"{int((done == 0).sum())} of {done.size} points not computed yet (blank)")
    if (done == 2).any():
        notes.append(f"{int((done == 2).sum())} points stopped at max_iter before converging (their estimates shown)")
    return notes


def curvature_png(surface: Surface, path: str | Path, size: tuple[int, int] | None = None) -> Path:
    """Li et al.'s curvature maps (Sec. 6): λmax, λmin and |λmin/λmax| over the grid, with the loss's contour
    lines on each panel; a 1-D surface gives λmax and λmin along α with the ratio on a second axis."""
    if not has_curvature(surface):
        raise UserError(f"{surface.path} holds no curvature map; compute one with --curvature (python -m fastland.surface) "
                        "or python -m fastland.hessian --map")
    x, y, maps, done = curvature_grid(surface)
    notes = _curvature_notes(surface, done)
    if y is None:
        fig = _figure((8, 5), size)
        ax = fig.subplots()
        ax.plot(x, maps["lambda_max"], "o-", color="tab:red", label="λmax")
        ax.plot(x, maps["lambda_min"], "o-", color="tab:blue", label="λmin")
        ax.axhline(0, color="gray", linewidth=0.6)
        ax.set_xlabel("α")
        ax.set_ylabel("eigenvalue")
        twin = ax.twinx()
        twin.plot(x, maps["curvature_ratio"], "s--", color="tab:purple", label="|λmin/λmax|")
        twin.set_ylabel("|λmin/λmax|", color="tab:purple")
        handles = [a + b for a, b in zip(ax.get_legend_handles_labels(), twin.get_legend_handles_labels(), strict=True)]
        ax.legend(*handles, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncols=3, fontsize=8, frameon=False)
        ax.grid(alpha=0.3)
        _header(fig, ax, surface, notes)
        return _save(fig, path, notes)
    fig = _figure((18, 6), size)
    axes = fig.subplots(1, 3)
    log = spans_decades(surface)
    lz = scaled(surface, "loss", log).z
    panels = (("lambda_max", "λmax", "viridis"), ("lambda_min", "λmin", "coolwarm"),
              ("curvature_ratio", "|λmin / λmax|", "magma"))
    for ax, (key, label, cmap) in zip(axes, panels, strict=True):
        z = np.ma.masked_invalid(maps[key])
        kw: dict = {}
        if key == "lambda_min" and np.nanmin(maps[key]) < 0 < np.nanmax(maps[key]):
            kw["norm"] = matplotlib.colors.TwoSlopeNorm(vcenter=0.0)  # blue below 0, red above
        elif key == "lambda_min":
            cmap = "Blues_r" if np.nanmax(maps[key]) <= 0 else "Reds"  # one sign: darker is farther from 0
        elif key == "curvature_ratio":
            kw["vmin"] = 0.0
        mesh = ax.pcolormesh(x, y, z, cmap=cmap, shading="nearest", **kw)
        fig.colorbar(mesh, ax=ax, shrink=0.85, label=label)
        if np.isfinite(lz).sum() > 3:
            levels = _round_levels(float(np.nanmin(lz)), float(np.nanmax(lz)), log, 10)
            if len(levels):
                ink = "black" if key == "lambda_min" else "white"  # the λmin maps are light near 0
                lines = ax.contour(surface.x, surface.y, np.ma.masked_invalid(lz), levels=levels, colors=ink,
                                   linewidths=0.6, alpha=0.8)
                ax.clabel(lines, lines.levels[::2], fmt=lambda v: f"{10**v:.3g}" if log else f"{v:.3g}", fontsize=6)
        ax.plot(0, 0, marker="+", color="red", markersize=12)
        ax.set_aspect("equal")
        ax.set_xlabel("α")
        ax.set_ylabel("β")
        ax.set_title(label, fontsize=10)
    fig.suptitle(title(surface) + "  —  contour lines: the loss", fontsize=10)
    if warning(surface):
        notes.insert(0, warning(surface))
    fig.text(0.01, 0.005, "\n".join(notes), fontsize=7.5, color="dimgray", va="bottom", wrap=True)
    return _save(fig, path, notes)


def density_png(curves: list[tuple[str, np.ndarray, np.ndarray]], path: str | Path, heading: str,
                marks: dict[str, list[float]] | None = None, size: tuple[int, int] | None = None) -> Path:
    """The Hessian's spectral density (stochastic Lanczos quadrature, ``fastland.hessian.density``) on a log scale,
    one curve per ``(label, grid, density)``, with dashed lines at the eigenvalues in ``marks`` (per label)."""
    fig = _figure((8, 5), size)
    ax = fig.subplots()
    colours = matplotlib.colormaps["tab10"]
    for k, (label, grid, rho) in enumerate(curves):
        floor = max(float(np.max(rho)) * 1e-7, 1e-300)
        ax.semilogy(grid, np.maximum(rho, floor), color=colours(k), linewidth=1.4, label=label)
        for v in (marks or {}).get(label, []):
            ax.axvline(v, color=colours(k), linestyle="--", linewidth=0.8, alpha=0.7)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density (integrates to 1)")
    ax.set_title(heading, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    notes = ["dashed: the top eigenvalues from Lanczos"] if marks else []
    if notes:
        fig.text(0.01, 0.005, "\n".join(notes), fontsize=7.5, color="dimgray", va="bottom")
    return _save(fig, path, notes)
