"""PyVista pictures of loss surfaces: 3-D screenshots, side-by-side comparisons and exports.

Every 3-D picture is built by ``add_landscape``: the surface raised by the loss and coloured by
it, contour lines lifted just above the surface and projected onto a floor, the minimum
marked, axes labelled α, β and loss, a scalar bar, and printed notes (from
``fastland.viz.prepare``) that say how clipping, NaN, inf and holes were drawn.

This module imports PyVista; ``fastland.viz`` itself never imports it.
"""

from __future__ import annotations

import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import pyvista as pv

from fastland.errors import UserError
from fastland.surfacefile import Surface, read

from .headless import ensure_offscreen
from .prepare import Scaled, scaled, shared_clim, spans_decades, ticks, title, warning

# VTK's built-in fonts have no Greek letters; matplotlib ships DejaVu Sans, which does.
FONT = str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf")
SIZE = (1920, 1080)
ASPECT = 0.5  # height of the box / width of the α-β square, at exaggeration 1
FLOOR_GAP = 0.3  # the floor lies this fraction of the box height below it
DIVERGED_COLOR = "magenta"
CLIPPED_COLOR = "lightgray"


@dataclass
class View:
    """What a picture shows; the interactive viewer's controls change these fields."""

    quantity: str = "loss"  # "loss" or "acc"
    log: bool = False
    exaggeration: float = 1.0
    contours: int = 12
    cmap: str = "viridis"


@dataclass
class _Box:
    """Where the surface sits: values ``lo..hi`` map to heights ``0..top`` over the α-β square."""

    x0: float
    x1: float
    y0: float
    y1: float
    lo: float
    hi: float
    top: float
    floor: float

    @property
    def span(self) -> float:
        return max(self.x1 - self.x0, self.y1 - self.y0)

    def height(self, value: np.ndarray | float) -> np.ndarray | float:
        return (value - self.lo) / (self.hi - self.lo) * self.top


def add_landscape(plotter: pv.Plotter, surface: Surface, view: View, clim: tuple[float, float] | None = None,
                  scalar_bar: bool = True, panel: int = 0) -> Scaled:
    """Draw ``surface`` into the active renderer of ``plotter``; return what was drawn.

    ``clim`` fixes the colour and height range (shared across compared panels); by default it
    is the surface's own, robustly clipped range. ``panel`` keeps the actor names of compared
    panels apart (PyVista replaces actors, and merges scalar bars, by name).
    """
    s = scaled(surface, view.quantity, view.log)
    lo, hi = clim or s.clim
    x0, x1, y0, y1 = surface.x[0], surface.x[-1], surface.y[0], surface.y[-1]
    height = ASPECT * max(x1 - x0, y1 - y0)  # of the box at exaggeration 1
    box = _Box(x0, x1, y0, y1, lo, hi, top=view.exaggeration * height, floor=-FLOOR_GAP * height)
    px = plotter.window_size[1] / 1080  # line widths below are for a 1080-pixel-high picture

    # Diverged points are raised to the top and coloured apart; clipped ones sit flat at the top.
    value = np.clip(np.where(s.diverged, hi, s.z), lo, hi)
    x, y = np.meshgrid(surface.x, surface.y)
    grid = pv.StructuredGrid(x, y, np.where(s.missing, 0.0, box.height(value)))
    grid["value"] = value.ravel(order="F")
    # On a log scale the colours are mapped through a log lookup table, so that the scalar bar
    # reads in losses rather than in their logarithms.
    grid[s.label] = (10**s.z if s.log else s.z).ravel(order="F")
    grid["evaluated"] = (~s.missing).ravel(order="F").astype(np.uint8)
    mesh = grid.threshold(0.5, scalars="evaluated", all_scalars=True) if s.missing.any() else grid
    mesh = mesh.extract_surface(algorithm=None)  # holes where the run has not been yet

    bar_title = s.label + "\n" + " " * panel
    actor = plotter.add_mesh(
        mesh, scalars=s.label, cmap=view.cmap, clim=(10**lo, 10**hi) if s.log else (lo, hi), log_scale=s.log,
        nan_color=DIVERGED_COLOR, above_color=CLIPPED_COLOR if s.above(hi) else None,
        smooth_shading=True, specular=0.2, show_scalar_bar=scalar_bar, name=f"surface{panel}",
        scalar_bar_args=dict(
            title=bar_title, vertical=True, position_x=0.90, position_y=0.22, width=0.04, height=0.56,
            fmt="%.3g", n_labels=6, title_font_size=font_size(plotter, 20), label_font_size=font_size(plotter, 17), color="black",
        ),
    )
    actor.prop.color = "white"  # glTF multiplies the colour map by this base colour
    if s.diverged.any():  # a few NaN points on a fine grid would be invisible as a colour alone
        jj, ii = np.nonzero(s.diverged)
        points = np.c_[surface.x[ii], surface.y[jj], np.full(len(ii), box.top)]
        plotter.add_points(points, color=DIVERGED_COLOR, point_size=14 * px, render_points_as_spheres=True,
                           name=f"diverged{panel}")
    if scalar_bar:
        bar = plotter.scalar_bars[bar_title]
        _fonts(bar.GetTitleTextProperty(), bar.GetLabelTextProperty())

    _add_contours(plotter, mesh, box, view, px, panel)
    _add_best(plotter, surface, s, box, view, px, panel)
    _add_axes(plotter, box, s, px, panel)
    _add_text(plotter, surface, s, hi, panel)
    return s


def _add_contours(plotter: pv.Plotter, mesh: pv.PolyData, box: _Box, view: View, px: float, panel: int) -> None:
    """Contour lines on the surface and their projection onto a floor below it."""
    floor = pv.Plane(center=((box.x0 + box.x1) / 2, (box.y0 + box.y1) / 2, box.floor),
                     i_size=box.x1 - box.x0, j_size=box.y1 - box.y0)
    plotter.add_mesh(floor, color="#f0f0f0", lighting=False, name=f"floor{panel}")
    levels = np.linspace(box.lo, box.hi, view.contours + 2)[1:-1]
    lines = mesh.contour(isosurfaces=levels, scalars="value")
    if not lines.n_points:
        return
    # Each line is black or white, whichever stands out against the surface colour at its level.
    under = matplotlib.colormaps[view.cmap]((lines["value"] - box.lo) / (box.hi - box.lo))
    dark = under[:, :3] @ [0.299, 0.587, 0.114] < 0.5
    lines["ink"] = np.where(dark[:, None], 255, 0).repeat(3, axis=1).astype(np.uint8)
    lines.points[:, 2] += 0.006 * box.top  # exactly on the surface, half of each line would vanish
    plotter.add_mesh(lines, scalars="ink", rgb=True, line_width=2.0 * px, opacity=0.7, name=f"contours{panel}")
    shadow = lines.copy()
    shadow.points[:, 2] = box.floor + 0.002 * box.top
    plotter.add_mesh(shadow, scalars="value", cmap=view.cmap, clim=(box.lo, box.hi), line_width=2.5 * px,
                     show_scalar_bar=False, name=f"floor_contours{panel}")


def _add_best(plotter: pv.Plotter, surface: Surface, s: Scaled, box: _Box, view: View, px: float,
              panel: int) -> None:
    """Mark the minimum loss (or maximum accuracy) with a sphere, a drop line and its value."""
    best = s.best(view.quantity)
    if best is None:
        return
    j, i = best
    point = np.array([surface.x[i], surface.y[j], box.height(np.clip(s.z[j, i], box.lo, box.hi))])
    plotter.add_mesh(pv.Sphere(radius=0.02 * box.span, center=point), color="red", name=f"best{panel}")
    plotter.add_mesh(pv.Line(point, (point[0], point[1], box.floor)), color="red", line_width=2 * px,
                     name=f"drop{panel}")
    word = "max" if view.quantity == "acc" else "min"
    plotter.add_point_labels(
        [point], [f"{word} {s.raw[j, i]:.4g} at α={point[0]:.3g}, β={point[1]:.3g}"], font_size=font_size(plotter, 18),
        font_file=FONT, text_color="black", shape_color="white", shape_opacity=0.8,
        show_points=False, always_visible=True, name=f"best_label{panel}",
    )


def _add_axes(plotter: pv.Plotter, box: _Box, s: Scaled, px: float, panel: int) -> None:
    """The box, α and β ticks along the front edges, and the loss axis on the left edge.

    VTK's axis actor picks its edges by itself and has no Greek letters or log axes, so only its
    α and β tick labels are used; the rest is drawn here and never moves.
    """
    bounds = [box.x0, box.x1, box.y0, box.y1, 0.0, box.top]
    plotter.show_bounds(
        bounds=bounds, xtitle=" ", ytitle=" ", ztitle=" ", color="black", font_size=font_size(plotter, 16), fmt="%.3g",
        n_xlabels=5, n_ylabels=5, location="origin", show_zaxis=False, show_zlabels=False,
    )
    marks = ticks(box.lo, box.hi, s.log)
    # The box outline, and lines on the two back walls at each loss tick.
    x0, x1, y0, y1 = bounds[:4]
    walls = [pv.Box(bounds).outline()]
    for v, _ in marks:
        z = box.height(v)
        walls.append(pv.MultipleLines([(x0, y1, z), (x1, y1, z), (x1, y0, z)]))
    plotter.add_mesh(pv.merge(walls), color="gray", line_width=1.0 * px, opacity=0.5, name=f"walls{panel}")

    label = dict(font_file=FONT, text_color="black", shape=None, show_points=False, always_visible=True, bold=False)
    pad = 0.16 * box.span
    plotter.add_point_labels(
        [((x0 + x1) / 2, y0 - pad, 0.0), (x0 - pad, (y0 + y1) / 2, 0.0)], ["α", "β"], font_size=font_size(plotter, 26),
        name=f"axis_titles{panel}", **label,
    )
    out = np.array([-0.04 * box.span, 0.04 * box.span, 0.0])  # just outside the left edge
    plotter.add_point_labels(
        [np.array([x0, y1, box.height(v)]) + out for v, _ in marks], [text for _, text in marks],
        font_size=font_size(plotter, 16), justification_horizontal="right", justification_vertical="center",
        name=f"z_ticks{panel}", **label,
    )
    plotter.add_point_labels(
        [np.array([x0, y1, box.top * 1.08]) + out], [s.label], font_size=font_size(plotter, 18),
        justification_horizontal="right", justification_vertical="bottom", name=f"z_title{panel}", **label,
    )


def _add_text(plotter: pv.Plotter, surface: Surface, s: Scaled, hi: float, panel: int) -> None:
    """Title, data warning, and the notes on how awkward values were drawn."""
    plotter.add_text(title(surface), position="upper_left", font_size=font_size(plotter, 20), color="black",
                     font_file=FONT, name=f"title{panel}")
    if warning(surface):
        plotter.add_text(warning(surface), position=(0.01, 0.87), viewport=True, font_size=font_size(plotter, 17),
                         color="darkred", font_file=FONT, name=f"warning{panel}")
    notes = s.describe(hi, above="drawn flat at the top in light grey",
                       diverged=f"drawn at the top in {DIVERGED_COLOR}", missing="left as holes")
    if notes:
        size = font_size(plotter, 15)
        plotter.add_text(_wrap(notes, plotter, size), position="lower_left", font_size=size, color="dimgray",
                         font_file=FONT, name=f"notes{panel}")


def font_size(plotter: pv.Plotter, points: float) -> int:
    """Font sizes are chosen for a 1080-pixel-high picture; scale them, but keep them legible."""
    return max(9, round(points * plotter.window_size[1] / 1080))


def _fonts(*props: object) -> None:
    """Switch VTK text properties to the font that has α and β."""
    for prop in props:
        prop.SetFontFamily(pv._vtk.VTK_FONT_FILE)
        prop.SetFontFile(FONT)


def _wrap(lines: list[str], plotter: pv.Plotter, font_size: int) -> str:
    """Wrap lines of text to the width of the active panel (DejaVu Sans: about 0.6 em per character)."""
    vp = plotter.renderer.GetViewport()
    chars = max(20, int((vp[2] - vp[0]) * plotter.window_size[0] / (0.62 * font_size)))
    return "\n".join(textwrap.fill(line, chars, subsequent_indent="  ") for line in lines)


def default_camera(plotter: pv.Plotter, azimuth: float = -125.0, elevation: float = 35.0) -> None:
    """Look at the whole box from the front-left, from above, as Li et al.'s figures do."""
    plotter.reset_camera()
    cam = plotter.camera
    focus = np.array(cam.focal_point)
    distance = np.linalg.norm(np.array(cam.position) - focus)
    az, el = np.radians(azimuth), np.radians(elevation)
    cam.position = focus + distance * np.array([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)])
    cam.up = (0.0, 0.0, 1.0)
    cam.view_angle = 20.0  # a long lens: less perspective distortion, closer to a printed figure
    plotter.reset_camera()


def _surface(surface: Surface | str | Path) -> Surface:
    return surface if isinstance(surface, Surface) else read(surface)


def new_plotter(size: tuple[int, int], off_screen: bool, **kwargs: object) -> pv.Plotter:
    """A white plotter; without a display, VTK is first told to render through EGL."""
    ensure_offscreen()
    plotter = pv.Plotter(window_size=list(size), off_screen=off_screen, **kwargs)
    plotter.background_color = "white"
    return plotter


def landscape_plotter(surface: Surface, view: View, size: tuple[int, int] = SIZE,
                      off_screen: bool = True) -> pv.Plotter:
    """A plotter showing one surface from the default camera, ready to save or show."""
    plotter = new_plotter(size, off_screen)
    add_landscape(plotter, surface, view)
    default_camera(plotter)
    return plotter


def comparison_plotter(surfaces: list[Surface], shared: bool, view: View, size: tuple[int, int] = SIZE,
                       off_screen: bool = True) -> pv.Plotter:
    """One panel per surface, cameras linked; one shared colour and height scale or one per panel."""
    if any(s.dim != 2 for s in surfaces):
        raise UserError("compare needs 2-D surfaces; plot 1-D surfaces one at a time")
    clim = shared_clim([scaled(s, view.quantity, view.log) for s in surfaces]) if shared else None
    plotter = new_plotter(size, off_screen, shape=(1, len(surfaces)), border=False)
    for k, surface in enumerate(surfaces):
        plotter.subplot(0, k)
        add_landscape(plotter, surface, view, clim=clim, scalar_bar=not shared or k == len(surfaces) - 1, panel=k)
    plotter.link_views()
    plotter.subplot(0, 0)
    default_camera(plotter)  # every panel's box has the same size, so one camera frames them all
    plotter.camera.zoom(0.8)  # narrow panels: leave room for the loss axis and the scalar bar
    plotter.subplot(0, len(surfaces) - 1)
    note = "one colour and height scale for all panels" if shared else "each panel on its own colour and height scale"
    plotter.add_text(note, position="lower_right", font_size=font_size(plotter, 15),
                     color="dimgray", font_file=FONT, name="scale_note")
    return plotter


def _save(plotter: pv.Plotter, path: Path) -> Path:
    """Anti-alias, write the PNG, and free the window."""
    path.parent.mkdir(parents=True, exist_ok=True)
    plotter.enable_anti_aliasing("ssaa")
    plotter.screenshot(path)
    plotter.close()
    return path


def screenshot(surface: Surface | str | Path, path: str | Path, view: View | None = None,
               size: tuple[int, int] = SIZE) -> Path:
    """Write an anti-aliased PNG of the 3-D surface; a 1-D surface becomes a matplotlib line plot."""
    surface, view = _surface(surface), view or View()
    if surface.dim == 1:
        from .plots import line_png

        return line_png(surface, path, log=view.log)
    return _save(landscape_plotter(surface, view, size), Path(path))


def compare(surfaces: list[Surface | str | Path], path: str | Path, shared: bool = True, view: View | None = None,
            size: tuple[int, int] = SIZE) -> Path:
    """Write surfaces side by side with linked cameras, on one shared or a per-panel scale.

    A shared scale (the default) gives every panel the same colour and height range, so a
    flatter landscape looks flatter, as in the seed's figure of LeNet with and without BN.
    """
    plotter = comparison_plotter([_surface(s) for s in surfaces], shared, view or View(), size)
    return _save(plotter, Path(path))


def export_vts(surface: Surface | str | Path, path: str | Path) -> Path:
    """Write a ParaView structured grid: the flat α-β grid with the loss, acc and done arrays.

    Values are written as recorded (NaN where not evaluated or diverged), with the surface
    file's attributes as field data; in ParaView, "Warp By Scalar" on ``loss`` raises it.
    """
    surface, path = _surface(surface), Path(path)
    y = surface.y if surface.y is not None else np.zeros(1)
    x, y = np.meshgrid(surface.x, y)
    grid = pv.StructuredGrid(x, y, np.zeros_like(x))
    for name, values in (("loss", surface.loss), ("acc", surface.acc), ("done", surface.done)):
        grid[name] = np.asarray(values).reshape(x.shape).ravel(order="F")
    for key, value in surface.attrs.items():
        grid.field_data[key] = np.array([str(value)])
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def export_scene(surface: Surface | str | Path, prefix: str | Path, view: View | None = None) -> list[Path]:
    """Write the 3-D scene as a self-contained interactive ``.html`` (vtk.js) and a ``.gltf`` (glTF, data inlined).

    Both keep the geometry, colours, contour lines and markers; the on-image text (title,
    notes, tick labels) is 2-D overlay that neither format carries.
    """
    surface, prefix = _surface(surface), str(prefix)
    html, gltf = Path(prefix + ".html"), Path(prefix + ".gltf")
    html.parent.mkdir(parents=True, exist_ok=True)
    plotter = landscape_plotter(surface, view or View(log=spans_decades(surface)))
    # trame-pyvista exports through a local trame server, which also starts trame-vtklocal; that
    # downloads VTK's WebAssembly build in the background, failing noisily offline. The vtk.js
    # page written here does not use it, so keep the module out (an absent module is optional
    # to trame-pyvista).
    sys.modules.setdefault("trame.widgets.vtklocal", None)
    plotter.trame.export_html(html)
    plotter.export_gltf(str(gltf))
    plotter.close()
    return [html, gltf]


def render_outputs(surface_path: str | Path, out_prefix: str | Path, size: tuple[int, int] = SIZE) -> list[Path]:
    """Write every offscreen output of one surface file; return the paths written.

    2-D: ``_3d.png`` (linear), ``_3d_log.png``, ``_map.png`` (matplotlib), ``.vts``, ``.html``
    and ``.gltf``. 1-D: ``_1d.png`` and ``_1d_log.png`` line plots. Names are ``out_prefix`` plus
    these suffixes.
    """
    from .plots import contour_png, line_png

    surface, prefix = read(surface_path), str(out_prefix)
    if surface.dim == 1:
        return [line_png(surface, prefix + "_1d.png"), line_png(surface, prefix + "_1d_log.png", log=True)]
    return [
        screenshot(surface, prefix + "_3d.png", View(), size),
        screenshot(surface, prefix + "_3d_log.png", View(log=True), size),
        contour_png(surface, prefix + "_map.png"),
        export_vts(surface, prefix + ".vts"),
        *export_scene(surface, prefix),
    ]
