"""What to draw and what to say about it, shared by the matplotlib and PyVista renderers.

A loss surface is awkward to draw honestly: losses far from the minimum grow by orders of
magnitude, diverged points are NaN or inf, and a surface still being computed has holes.
``scaled`` turns one quantity of a surface into display values plus a list of notes that the
image prints, so every renderer handles these cases the same way and says so.

This module must not import PyVista: the matplotlib plots use it on machines without it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from matplotlib.ticker import LogLocator, MaxNLocator

from fastland.errors import UserError
from fastland.surfacefile import Surface

# The colour (and height) range is clipped at this percentile when the few points above it
# would otherwise take more than half of the range (stretch it by more than CLIP_STRETCH times
# the rest). A quadratic bowl on a square grid stretches it by 0.34 and stays unclipped; the
# exploding corners of a Li et al.-style landscape stretch it several times over.
CLIP_PERCENTILE = 95.0
CLIP_STRETCH = 1.0
# Log scale is chosen automatically when the finite positive losses span this many decades.
AUTO_LOG_DECADES = 2.0
# Peak memory of drawing a surface (all six --out-prefix outputs), measured on the 2-core CPU
# machine: about 0.6 GB of libraries plus 650 bytes a grid point (1001x1001: 1.2 GB in all).
BYTES_PER_POINT = 700

QUANTITIES = ("loss", "acc")


@dataclass
class View:
    """What a picture shows; the CLI's options and the interactive viewer's controls set these fields."""

    quantity: str = "loss"  # "loss" or "acc"
    log: bool = False
    exaggeration: float = 1.0
    contours: int = 12
    cmap: str = "viridis"


@dataclass
class Scaled:
    """One quantity of a surface, ready to draw.

    ``raw`` holds the values as stored (NaN where not evaluated). ``z`` holds display values
    (log10 of the loss on a log scale), NaN where nothing can be drawn: points not yet
    evaluated (``missing``) and evaluated points whose value is NaN or inf (``diverged``).
    ``clim`` is the colour and height range; values above ``clim[1]`` exist only when the
    range was clipped. ``label`` names the quantity and its scale, ``name`` the quantity alone.
    ``describe`` writes the notes an image prints about all of these.
    """

    z: np.ndarray
    raw: np.ndarray
    clim: tuple[float, float]
    label: str
    name: str  # the quantity without the scale: "train loss", "accuracy (%)"
    log: bool
    missing: np.ndarray
    diverged: np.ndarray
    notes: list[str] = field(default_factory=list)

    def above(self, hi: float) -> int:
        """How many drawable points lie above ``hi``, the top of the colour range actually used."""
        return int(np.sum(self.z > hi))  # NaN compares False

    def describe(self, hi: float, above: str, diverged: str, missing: str) -> list[str]:
        """One line for each kind of awkward point: clipped, <= 0 on a log scale, diverged,
        unevaluated; each ends with how the renderer drew them (``above``, ``diverged``, ``missing``)."""
        out = []
        if n := self.above(hi):
            value = (lambda v: 10**v) if self.log else float
            out.append(f"colour scale clipped at loss {value(hi):.3g} so that a few extreme points do not squash "
                       f"the rest: {n} points above it (up to {value(np.nanmax(self.z)):.3g}) {above}")
        out += self.notes
        if self.diverged.any():
            n_nan = int(np.isnan(self.raw[self.diverged]).sum())
            n_inf = int(self.diverged.sum()) - n_nan
            out.append(f"{int(self.diverged.sum())} points diverged ({n_nan} NaN, {n_inf} inf): {diverged}")
        if self.missing.any():
            out.append(f"{int(self.missing.sum())} of {self.missing.size} points not evaluated yet: {missing}")
        return out

    def best(self, quantity: str) -> tuple[int, ...] | None:
        """Index of the minimum loss (maximum accuracy) among drawable points, or None."""
        if np.all(np.isnan(self.z)):
            return None
        flat = np.nanargmax(self.z) if quantity == "acc" else np.nanargmin(self.z)
        return tuple(int(i) for i in np.unravel_index(flat, self.z.shape))


def values_of(surface: Surface, quantity: str) -> np.ndarray:
    """The raw array of ``quantity`` ('loss' or 'acc') with unevaluated points set to NaN."""
    if quantity not in QUANTITIES:
        raise ValueError(f"quantity must be one of {QUANTITIES}, not {quantity!r}")
    if quantity == "acc" and not has_accuracy(surface):
        raise UserError(f"{surface.path} records no accuracy (its loss is not a classification loss); show its loss instead")
    values = np.asarray(surface.loss if quantity == "loss" else surface.acc, dtype=np.float64)
    return np.where(surface.done.astype(bool), values, np.nan)


def check_memory(surfaces: list[Surface]) -> None:
    """Refuse, before drawing, surfaces whose pictures would not fit in 80% of the free host memory."""
    import torch

    from fastland.device import free_memory

    points = sum(int(np.size(s.loss)) for s in surfaces)
    need, free = points * BYTES_PER_POINT, free_memory(torch.device("cpu"))
    if need > 0.8 * free:
        raise UserError(f"drawing {points:,} points needs about {need / 2**30:.1f} GiB of memory, but only "
                        f"{free / 2**30:.1f} GiB is free (the limit is 80% of that); draw it on a machine with more "
                        "memory, or compute a coarser surface")


def has_accuracy(surface: Surface) -> bool:
    """Whether the surface records an accuracy: a regression loss has none (``acc`` is None)."""
    return getattr(surface, "acc", None) is not None


def spans_decades(surface: Surface) -> bool:
    """True when the finite positive losses span enough decades that a linear scale hides the minimum."""
    v = values_of(surface, "loss")
    v = v[np.isfinite(v) & (v > 0)]
    return bool(v.size > 1 and np.log10(v.max() / v.min()) >= AUTO_LOG_DECADES)


def scaled(surface: Surface, quantity: str = "loss", log: bool = False, robust: bool = True) -> Scaled:
    """Display values, colour range and notes for one quantity of ``surface``.

    Log scale applies to the loss only. Values <= 0 cannot be shown on it; they are drawn at the
    smallest positive loss. With ``robust`` the loss range is clipped at a high percentile when
    a few extreme points (typically the corners of the grid) would squash the rest.
    """
    values = values_of(surface, quantity)
    missing = surface.done == 0
    if missing.all():
        raise UserError(f"{surface.path}: no point has been evaluated yet, so there is nothing to draw")
    diverged = ~missing & ~np.isfinite(values)
    notes: list[str] = []
    log = log and quantity == "loss"
    z = np.where(diverged, np.nan, values)

    if log:
        positive = z[np.isfinite(z) & (z > 0)]
        nonpositive = np.isfinite(z) & (z <= 0)
        if positive.size == 0:
            floor = 1e-12
            notes.append("no positive loss: log scale is empty")
        else:
            floor = float(positive.min())
        if nonpositive.any():
            notes.append(f"{int(nonpositive.sum())} losses <= 0 drawn at the smallest positive loss {floor:.3g}")
        with np.errstate(divide="ignore", invalid="ignore"):
            z = np.log10(np.where(nonpositive, floor, z))

    finite = z[np.isfinite(z)]
    if finite.size == 0:
        clim = (0.0, 1.0)
    else:
        clim = (float(finite.min()), float(finite.max()))
    if robust and quantity == "loss" and finite.size > 1:
        top = float(np.percentile(finite, CLIP_PERCENTILE))
        if clim[1] - top > CLIP_STRETCH * (top - clim[0]):
            clim = (clim[0], top)
    if clim[1] <= clim[0]:  # a flat surface still needs a non-empty range
        clim = (clim[0] - 0.5, clim[0] + 0.5)

    name = "accuracy (%)" if quantity == "acc" else f"{surface.split} loss"
    label = name + (" (log scale)" if log else "")
    return Scaled(z, values, clim, label, name, log, missing, diverged, notes)


def shared_clim(parts: list[Scaled]) -> tuple[float, float]:
    """One colour range covering every panel, for comparisons on a common scale."""
    return min(p.clim[0] for p in parts), max(p.clim[1] for p in parts)


def ticks(lo: float, hi: float, log: bool) -> list[tuple[float, str]]:
    """Tick positions (in display values) and labels for a loss axis; whole decades on a log scale."""
    if log:
        values = LogLocator().tick_values(10**lo, 10**hi)
        values = values[(values >= 10**lo * 0.999) & (values <= 10**hi * 1.001)]
        if len(values) < 2:
            values = np.geomspace(10**lo, 10**hi, 4)
        return [(float(np.log10(v)), f"{v:.3g}") for v in values]
    eps = 1e-9 * (hi - lo)
    return [(float(v), f"{v:.3g}") for v in MaxNLocator(5).tick_values(lo, hi) if lo - eps <= v <= hi + eps]


def title(surface: Surface) -> str:
    """Two lines that say what was run: model, split and grid; then BN mode, normalization, data."""
    a = surface.attrs
    n = f"{len(surface.x)} points" if surface.y is None else f"{len(surface.x)}×{len(surface.y)} grid"
    first = f"{a.get('model', surface.path.stem if surface.path else 'surface')}  ·  {surface.split} split  ·  {n}"
    second = "  ·  ".join(f"{key}={a[key]}" for key in ("bn_mode", "norm", "data_source") if a.get(key))
    return f"{first}\n{second}" if second else first


def warning(surface: Surface) -> str:
    """The data warning to print on every image ('' when the run used real CIFAR-10)."""
    w = str(surface.attrs.get("data_warning", "") or "")
    return f"WARNING: {w}" if w else ""
