"""Pictures of optimizer paths on a PCA surface (Li et al. 2018, Sec. 7): the contour map with the
paths over it (their Figure 9) and an animation of training. matplotlib only, so they work
without PyVista; the 3-D picture with the path as a tube is ``fastland.viz.render.path_screenshot``.

Everything is read from the surface file that ``python -m fastland.trajectory`` (or
``fastland.trajectory.surface``) writes: the grid, and per run the projected checkpoints
(``proj_xcoord``, ``proj_ycoord``, ``run1_proj_xcoord``...), their steps and epochs, the loss
of each checkpoint, and the explained variance of the two axes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib import animation, patheffects
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from fastland.errors import UserError
from fastland.surfacefile import Surface

from .outputs import check_size, replacing
from .plots import _figure, _header, _save, draw_map

# Path colours that stand out on viridis (dark blue to yellow) and differ from the red of the grid's
# minimum; each line also gets a dark outline.
COLORS = ("#ff8c00", "#ffffff", "#ff4dd2", "#00e5ff", "#9dff00", "#b388ff")
# In 3-D the tubes are shaded and have no outline: the same colours, white made dark so that it shows.
COLORS_3D = ("#ff8c00", "#202020", "#ff4dd2", "#00e5ff", "#9dff00", "#b388ff")
OUTLINE = [patheffects.withStroke(linewidth=3.2, foreground="black")]
MAX_EPOCH_LABELS = 6  # epoch numbers written beside the markers, per run
MAX_FRAMES = 80  # animation frames (PillowWriter keeps every frame in memory: ~1.6 MB each)


@dataclass(frozen=True)
class RunTrace:
    """One run's path as the surface file holds it (see ``fastland.trajectory.Trajectory.h5_fields``)."""

    label: str
    coords: np.ndarray  # [n, 2] on the PCA axes, oldest first; the reference (final weights) at (0, 0)
    steps: np.ndarray  # [n] optimizer steps
    epochs: np.ndarray  # [n] (fractional for step checkpoints)
    epoch_end: np.ndarray  # [n] bool: the weights at the end of an epoch (the markers)
    loss: np.ndarray | None  # [n] each checkpoint's own loss
    plane_loss: np.ndarray | None  # [n] the loss at its projected point on the plane (what the surface shows)
    residual: np.ndarray | None  # [n] its distance from the plane


def traces(surface: Surface) -> list[RunTrace]:
    """The runs' paths stored in a trajectory surface; one line if it holds none."""
    ex = surface.extras
    if "proj_xcoord" not in ex or "proj_ycoord" not in ex:
        raise UserError(f"{surface.path or 'this surface'} holds no trajectory (no proj_xcoord); make one with "
                        "python -m fastland.trajectory RUN_DIR")
    try:
        labels = json.loads(str(surface.attrs.get("pca_labels", "[]")))
    except ValueError:
        labels = []
    split, out, k = surface.split, [], 0
    while f"{_prefix(k)}proj_xcoord" in ex:
        pre = _prefix(k)
        n = len(ex[f"{pre}proj_xcoord"])

        def get(name: str, pre: str = pre, n: int = n) -> np.ndarray | None:
            v = ex.get(pre + name)
            return None if v is None or len(v) != n else np.asarray(v)

        steps, epochs, ends = get("proj_step"), get("proj_epoch"), get("proj_epoch_end")
        out.append(RunTrace(
            label=labels[k] if k < len(labels) else f"run {k + 1}",
            coords=np.stack([np.asarray(ex[f"{pre}proj_xcoord"], float), np.asarray(ex[f"{pre}proj_ycoord"], float)], 1),
            steps=steps.astype(np.int64) if steps is not None else np.arange(n),
            epochs=epochs.astype(float) if epochs is not None else np.full(n, np.nan),
            epoch_end=ends.astype(bool) if ends is not None else np.ones(n, bool),
            loss=get(f"proj_{split}_loss"), plane_loss=get(f"proj_plane_{split}_loss"), residual=get("proj_residual")))
        k += 1
    return out


def _prefix(k: int) -> str:
    return "" if k == 0 else f"run{k}_"  # as fastland.trajectory.run_prefix (not imported: it pulls in torch)


def axis_labels(surface: Surface) -> tuple[str, str]:
    """``1st PC: 71.23 %`` and ``2nd PC: 12.05 %``, as Li et al. label the axes."""
    ratio = surface.extras.get("explained_variance_ratio_")
    if ratio is None or len(ratio) < 2:
        return "1st PC", "2nd PC"
    return f"1st PC: {100 * ratio[0]:.2f} %", f"2nd PC: {100 * ratio[1]:.2f} %"


def values_at(x: np.ndarray, y: np.ndarray, z: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Bilinear interpolation of the grid values ``z[j, i]`` at ``(x_i, y_j)`` at ``points`` [m, 2]
    (clamped to the grid); NaN where a neighbouring grid value is NaN."""
    px = np.clip(points[:, 0], x[0], x[-1])
    py = np.clip(points[:, 1], y[0], y[-1])
    i = np.clip(np.searchsorted(x, px) - 1, 0, len(x) - 2)
    j = np.clip(np.searchsorted(y, py) - 1, 0, len(y) - 2)
    tx = (px - x[i]) / (x[i + 1] - x[i])
    ty = (py - y[j]) / (y[j + 1] - y[j])
    return ((1 - tx) * (1 - ty) * z[j, i] + tx * (1 - ty) * z[j, i + 1] + (1 - tx) * ty * z[j + 1, i]
            + tx * ty * z[j + 1, i + 1])


def _epoch_labels(trace: RunTrace) -> list[int]:
    """Indices of the epoch markers to number: the first and last and about evenly between them."""
    idx = np.flatnonzero(trace.epoch_end & np.isfinite(trace.epochs))
    if len(idx) <= MAX_EPOCH_LABELS:
        return idx.tolist()
    keep = np.unique(np.round(np.linspace(0, len(idx) - 1, MAX_EPOCH_LABELS)).astype(int))
    return idx[keep].tolist()


class _PathArtists:
    """One run's line, epoch markers, start and current point, updated as the animation grows the path."""

    def __init__(self, ax: Axes, trace: RunTrace, color: str, numbers: bool) -> None:
        self.trace = trace
        kw = dict(color=color, path_effects=OUTLINE, zorder=5)
        (self.line,) = ax.plot([], [], linewidth=1.8, label=trace.label, **kw)
        (self.marks,) = ax.plot([], [], linestyle="none", marker="o", markersize=5, markeredgecolor="black",
                                markeredgewidth=0.8, color=color, zorder=6)
        start = trace.coords[0]
        ax.plot(*start, marker="^", markersize=11, color=color, markeredgecolor="black", zorder=7, linestyle="none")
        (self.head,) = ax.plot([], [], marker="o", markersize=9, color=color, markeredgecolor="black",
                               markeredgewidth=1.2, zorder=8, linestyle="none")
        self.numbers = []
        if numbers:
            for i in _epoch_labels(trace):
                t = ax.annotate(f"{trace.epochs[i]:g}", trace.coords[i], xytext=(5, 5), textcoords="offset points",
                                fontsize=7.5, color="black", zorder=9,
                                path_effects=[patheffects.withStroke(linewidth=2.5, foreground="white")])
                self.numbers.append((i, t))

    def show(self, upto: int | None) -> None:
        """Draw the points with step <= ``upto`` (None: all)."""
        tr = self.trace
        keep = np.ones(len(tr.steps), bool) if upto is None else tr.steps <= upto
        pts = tr.coords[keep]
        self.line.set_data(pts[:, 0], pts[:, 1])
        ends = tr.coords[keep & tr.epoch_end]
        self.marks.set_data(ends[:, 0], ends[:, 1])
        self.head.set_data(pts[-1:, 0], pts[-1:, 1])
        self.head.set_visible(upto is not None)
        for i, text in self.numbers:
            text.set_visible(bool(keep[i]))


def _legend_extra(color: str) -> list[tuple[Line2D, str]]:
    """The marker key shared by every run: start, epoch ends, the final weights at the origin."""
    def key(**kw: object) -> Line2D:
        return Line2D([], [], linestyle="none", markeredgecolor="black", color=color, **kw)

    return [(key(marker="^", markersize=9), "start (initial weights)"),
            (key(marker="o", markersize=5), "end of an epoch (numbered)"),
            (key(marker="P", markersize=10, markerfacecolor="white"), "final weights (0, 0): the plane's centre")]


def _draw(fig: Figure, ax: Axes, surface: Surface, runs: list[RunTrace], log: bool | None,
          numbers: bool = True) -> tuple[list[_PathArtists], list[str]]:
    """The map, the paths (drawn whole) and the axes' labels; returns the artists and the notes to print."""
    _, notes = draw_map(fig, ax, surface, log)
    artists = [_PathArtists(ax, tr, COLORS[k % len(COLORS)], numbers) for k, tr in enumerate(runs)]
    for a in artists:
        a.show(None)
    ax.plot(0, 0, marker="P", markersize=12, color="white", markeredgecolor="black", zorder=5.5, linestyle="none")
    xl, yl = axis_labels(surface)
    ax.set_xlabel(xl, fontsize=11)
    ax.set_ylabel(yl, fontsize=11)
    notes += _path_notes(surface, runs)
    return artists, notes


def _path_notes(surface: Surface, runs: list[RunTrace]) -> list[str]:
    """What the reader must know to read the paths right."""
    out = []
    off = [(tr, tr.residual.max()) for tr in runs if tr.residual is not None and len(tr.residual)]
    span = max(float(np.ptp(np.concatenate([tr.coords for tr in runs]), axis=0).max()), 1e-300)
    far = [f"{tr.label} up to {r:.3g}" for tr, r in off if r > 1e-3 * span]
    if far:
        out.append("points are the checkpoints projected onto the plane of the two principal components; distance "
                   f"off the plane: {'; '.join(far)}")
    if surface.attrs.get("pca_ignore") == "biasbn":
        out.append("biases and BN parameters take no part (ignore=biasbn): on the map they, and any BN running "
                   "statistics, are the final weights'")
    return out


def path_png(surface: Surface, path: str | Path, log: bool | None = None, size: tuple[int, int] | None = None) -> Path:
    """Write Li et al.'s Figure 9: every run's path over the contour map of the PCA surface, a marker
    (numbered) at each epoch's end, axes labelled with their explained variance. ``size`` (pixels)
    defaults to 1200x1125; ``log=None``: a log colour scale when the loss spans two decades."""
    runs = traces(surface)
    if surface.dim != 2:
        raise UserError(f"{surface.path} is a 1-D surface; a trajectory map needs a 2-D one")
    # The map keeps the path's true shape (equal aspect): the figure's height follows the grid's.
    aspect = (surface.y[-1] - surface.y[0]) / (surface.x[-1] - surface.x[0])
    fig = _figure((8.4, float(np.clip(6.6 * aspect, 2.5, 7.5)) + 2.6), size)
    ax = fig.subplots()
    _, notes = _draw(fig, ax, surface, runs, log)
    handles, labels = ax.get_legend_handles_labels()
    extra = _legend_extra("lightgray" if len(runs) > 1 else COLORS[0])
    ax.legend(handles + [h for h, _ in extra], labels + [t for _, t in extra], loc="upper center",
              bbox_to_anchor=(0.5, 0.0), borderaxespad=4.5, ncols=2, fontsize=8, frameon=False)  # under the label
    _header(fig, ax, surface, notes)
    ax.set_title(ax.get_title() + f"\ntrajectory: PCA of {surface.attrs.get('pca_rows', '?')} checkpoint differences",
                 fontsize=10)
    return _save(fig, path, notes)


def _frame_steps(runs: list[RunTrace], max_frames: int) -> np.ndarray:
    """The steps the frames show: every checkpoint's, at most ``max_frames`` of them (evenly), the last always."""
    steps = np.unique(np.concatenate([tr.steps for tr in runs]))
    if len(steps) > max_frames:
        steps = steps[np.unique(np.round(np.linspace(0, len(steps) - 1, max_frames)).astype(int))]
    return steps


def animate(surface: Surface, path: str | Path, fps: float = 6.0, max_frames: int = MAX_FRAMES, log: bool | None = None,
            size: tuple[int, int] | None = None, hold_s: float = 2.0) -> Path:
    """Write an animation of training: the paths growing over the contour map (left) and each
    checkpoint's loss against the step (right), one frame per checkpoint (at most ``max_frames``), the
    last held ``hold_s`` seconds. ``.gif`` through Pillow (matplotlib's ``PillowWriter``), ``.mp4``
    through ffmpeg (``FFMpegWriter``). ``size`` (pixels) defaults to 1300x560."""
    path = Path(path)
    kind = path.suffix.lower()
    if kind not in (".gif", ".mp4"):
        raise UserError(f"cannot write an animation as {path.suffix or 'a file without a suffix'}: use .gif or .mp4")
    if kind == ".mp4" and not animation.FFMpegWriter.isAvailable():
        raise UserError("an .mp4 animation needs ffmpeg, which is not installed; write a .gif, or install ffmpeg")
    runs = traces(surface)
    width, height = size or (1300, 560)
    check_size((width, height))
    width, height = width // 2 * 2, height // 2 * 2  # video encoders need even sides
    dpi = 100
    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi, layout="constrained")
    ax_map, ax_loss = fig.subplots(1, 2, width_ratios=(1.15, 1))
    artists, _ = _draw(fig, ax_map, surface, runs, log, numbers=False)
    ax_map.set_title("")
    losses = _loss_panel(ax_loss, surface, runs)
    steps = _frame_steps(runs, max_frames)
    stamp = fig.suptitle("", fontsize=12)
    writer = animation.PillowWriter(fps=fps) if kind == ".gif" else animation.FFMpegWriter(fps=fps)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as tmp:
        out = tmp.with_name(tmp.name + kind)  # the writers choose the format by the suffix
        try:
            with writer.saving(fig, str(out), dpi):
                for frame, t in enumerate(steps):
                    for a, curve in zip(artists, losses, strict=True):
                        a.show(int(t))
                        curve(int(t))
                    stamp.set_text(_stamp(runs, int(t)))
                    for _ in range(1 + (round(hold_s * fps) if frame == len(steps) - 1 else 0)):
                        writer.grab_frame()
            os.replace(out, tmp)
        finally:
            out.unlink(missing_ok=True)
    return path


def _stamp(runs: list[RunTrace], step: int) -> str:
    """The frame's title: its step and the epoch it falls in."""
    for tr in runs:
        hit = np.flatnonzero(tr.steps == step)
        if len(hit) and np.isfinite(tr.epochs[hit[0]]):
            return f"training step {step:,}  ·  epoch {tr.epochs[hit[0]]:.3g}"
    return f"training step {step:,}"


def _loss_panel(ax: Axes, surface: Surface, runs: list[RunTrace]) -> list:
    """The loss of each checkpoint against the step, drawn faint in full; returns per run a function
    that draws it solid up to a step, with a dot at the current checkpoint."""
    name = f"{surface.split} loss"
    updates = []
    values = [tr.loss if tr.loss is not None else tr.plane_loss for tr in runs]
    finite = np.concatenate([v[np.isfinite(v)] for v in values if v is not None] or [np.array([])])
    if finite.size and finite.min() > 0 and finite.max() / finite.min() >= 10:
        ax.set_yscale("log")
    for k, (tr, v) in enumerate(zip(runs, values, strict=True)):
        color = COLORS[k % len(COLORS)]
        edge = "black" if color == "#ffffff" else color  # a white line would vanish on the white panel
        if v is None:
            updates.append(lambda step: None)
            continue
        ax.plot(tr.steps, v, color=edge, alpha=0.25, linewidth=1.2)
        (solid,) = ax.plot([], [], color=edge, linewidth=2.0, label=tr.label,
                           linestyle="--" if color == "#ffffff" else "-")
        (dot,) = ax.plot([], [], marker="o", markersize=8, color=color, markeredgecolor="black", linestyle="none")

        def update(step: int, tr: RunTrace = tr, v: np.ndarray = v, solid: Line2D = solid, dot: Line2D = dot) -> None:
            keep = tr.steps <= step
            solid.set_data(tr.steps[keep], v[keep])
            dot.set_data(tr.steps[keep][-1:], v[keep][-1:])

        updates.append(update)
    which = "each checkpoint's own" if all(tr.loss is not None for tr in runs) else "on the plane at each checkpoint:"
    ax.set_title(f"{which} {name}", fontsize=10)
    ax.set_xlabel("training step")
    ax.set_ylabel(name)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    return updates
