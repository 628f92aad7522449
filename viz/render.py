"""PyVista pictures of loss surfaces: 3-D screenshots, side-by-side comparisons and exports.

Every 3-D picture is built by ``add_landscape``: the surface raised by the loss and coloured by
it, contour lines lifted just above the surface and projected onto a floor, the minimum
marked, axes labelled α, β and loss, a scalar bar, and printed notes (from
``fastland.viz.prepare``) that say how clipping, NaN, inf and holes were drawn.

The same scene is also exported for the web browser (``export_scene``). vtk.js, which draws
it there, has no log colour scale, no 2-D text and no Greek fonts in VTK's sense, so the web
scene is built apart (``web=True``): coloured by log10 of the loss on a log scale, its axes a
cube-axes actor labelled in loss values, and its title, data warning and notes written into
the page as HTML.

Every file is written whole or not at all (``fastland.viz.outputs``). This module imports
PyVista; ``fastland.viz`` itself never imports it.
"""

from __future__ import annotations

import errno
import html
import json
import shutil
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import matplotlib
import numpy as np
import pyvista as pv
from matplotlib.ticker import MaxNLocator
from PIL import Image

from fastland.errors import UserError
from fastland.surfacefile import Surface, read

from .headless import ensure_offscreen
from .outputs import SCREENSHOT_FORMATS, SCREENSHOT_TYPES, check_size, replacing, write_bytes
from .prepare import Scaled, View, check_memory, scaled, shared_clim, spans_decades, ticks, title, warning
from .trajectory import RunTrace

# VTK's built-in fonts have no Greek letters; matplotlib ships DejaVu Sans, which does.
FONT = str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf")
SIZE = (1920, 1080)
ASPECT = 0.5  # height of the box / width of the α-β square, at exaggeration 1
FLOOR_GAP = 0.3  # the floor lies this fraction of the box height below it
DIVERGED_COLOR = "magenta"
CLIPPED_COLOR = "lightgray"


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

    @classmethod
    def around(cls, surface: Surface, view: View, lo: float, hi: float) -> _Box:
        """The box of a 2-D surface whose drawn values run from ``lo`` to ``hi``."""
        x0, x1, y0, y1 = surface.x[0], surface.x[-1], surface.y[0], surface.y[-1]
        height = ASPECT * max(x1 - x0, y1 - y0)  # of the box at exaggeration 1
        return cls(x0, x1, y0, y1, lo, hi, top=view.exaggeration * height, floor=-FLOOR_GAP * height)


def add_landscape(plotter: pv.Plotter, surface: Surface, view: View, clim: tuple[float, float] | None = None,
                  scalar_bar: bool = True, panel: int = 0, web: bool = False,
                  axis_names: tuple[str, str] = ("α", "β")) -> Scaled:
    """Draw ``surface`` into the active renderer of ``plotter``; return what was drawn.

    ``clim`` fixes the colour and height range (shared across compared panels); by default it
    is the surface's own, robustly clipped range. ``panel`` keeps the actor names of compared
    panels apart (PyVista replaces actors, and merges scalar bars, by name). ``web`` builds the
    scene for vtk.js (see the module's docstring): no 2-D text, which the page carries instead.
    ``axis_names`` label the two grid axes (a trajectory's: its principal components).
    """
    check_memory([surface])
    s = scaled(surface, view.quantity, view.log)
    lo, hi = clim or s.clim
    box = _Box.around(surface, view, lo, hi)
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
    # vtk.js has no log colour scale: the web scene is coloured by log10 of the loss (its page
    # then labels the colour bar in losses; see _TICKS_JS).
    bar_title = web_name(s) if web else s.label + "\n" + " " * panel
    if web:
        grid[bar_title] = s.z.ravel(order="F")
    mesh = grid.threshold(0.5, scalars="evaluated", all_scalars=True) if s.missing.any() else grid
    mesh = mesh.extract_surface(algorithm=None)  # holes where the run has not been yet

    log_colours = s.log and not web
    actor = plotter.add_mesh(
        mesh, scalars=bar_title if web else s.label, cmap=view.cmap, clim=(10**lo, 10**hi) if log_colours else (lo, hi),
        log_scale=log_colours,
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
    _add_best(plotter, surface, s, box, view, px, panel, label=not web)
    if web:
        plotter.show_bounds(bounds=[box.x0, box.x1, box.y0, box.y1, 0.0, box.top], xtitle="α", ytitle="β",
                            ztitle="height", color="black")  # its ticks and titles are set by the page
    else:
        _add_axes(plotter, box, s, px, panel, axis_names)
        _add_text(plotter, surface, s, hi, panel)
    return s


def web_name(s: Scaled) -> str:
    """The colour bar's title in the web scene as exported, whose numbers are log10 values on a log scale."""
    return f"log₁₀ {s.name}" if s.log else s.name


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
              panel: int, label: bool = True) -> None:
    """Mark the minimum loss (or maximum accuracy) with a sphere, a drop line and (with ``label``) its value."""
    best = s.best(view.quantity)
    if best is None:
        return
    j, i = best
    point = np.array([surface.x[i], surface.y[j], box.height(np.clip(s.z[j, i], box.lo, box.hi))])
    plotter.add_mesh(pv.Sphere(radius=0.02 * box.span, center=point), color="red", name=f"best{panel}")
    plotter.add_mesh(pv.Line(point, (point[0], point[1], box.floor)), color="red", line_width=2 * px,
                     name=f"drop{panel}")
    if not label:
        return
    plotter.add_point_labels(
        [point], [best_text(surface, s, view.quantity)], font_size=font_size(plotter, 18),
        font_file=FONT, text_color="black", shape_color="white", shape_opacity=0.8,
        show_points=False, always_visible=True, name=f"best_label{panel}",
    )


def best_text(surface: Surface, s: Scaled, quantity: str) -> str:
    """``min 0.031 at α=0, β=0``: the best point's value and place ('' when nothing can be drawn)."""
    best = s.best(quantity)
    if best is None:
        return ""
    j, i = best
    word = "max" if quantity == "acc" else "min"
    return f"{word} {s.raw[j, i]:.4g} at α={surface.x[i]:.3g}, β={surface.y[j]:.3g}"


def _add_axes(plotter: pv.Plotter, box: _Box, s: Scaled, px: float, panel: int,
              axis_names: tuple[str, str] = ("α", "β")) -> None:
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
        [((x0 + x1) / 2, y0 - pad, 0.0), (x0 - pad, (y0 + y1) / 2, 0.0)], list(axis_names),
        font_size=font_size(plotter, 26 if max(map(len, axis_names)) <= 2 else 18),
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
    text, size = title(surface), font_size(plotter, 20)
    plotter.add_text(text, position="upper_left", font_size=size, color="black", font_file=FONT, name=f"title{panel}")
    if warning(surface):
        # Just under the title: a line of VTK text is about 2.1 pixels per point of font size, and
        # small pictures keep a legible minimum size, so a fixed place would overlap the title.
        small = font_size(plotter, 17)
        below = (2.1 * (size * (text.count("\n") + 1) + small) + 0.01 * plotter.window_size[1]) / plotter.window_size[1]
        plotter.add_text(warning(surface), position=(0.01, 1 - below), viewport=True, font_size=small,
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
    """Anti-alias, write the image (PNG, JPEG, BMP or TIFF by its suffix) whole or not at all, and free the window."""
    if path.suffix.lower() not in SCREENSHOT_FORMATS:
        plotter.close()
        raise UserError(f"cannot write {path}: use one of {', '.join(SCREENSHOT_TYPES)}")
    try:
        plotter.enable_anti_aliasing("ssaa")
        image = plotter.screenshot(return_img=True)
    finally:
        plotter.close()
    if (image == image[0, 0]).all():  # an oversized window, or a broken driver, gives a blank picture
        raise UserError(f"the renderer returned a blank {image.shape[1]}x{image.shape[0]} picture for {path}; "
                        "try a smaller --size")
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as tmp:
        Image.fromarray(image).save(tmp, format=SCREENSHOT_FORMATS[path.suffix.lower()])
    return path


def screenshot(surface: Surface | str | Path, path: str | Path, view: View | None = None,
               size: tuple[int, int] | None = None) -> Path:
    """Write an anti-aliased picture of the 3-D surface; a 1-D surface becomes a matplotlib line plot.

    ``size`` defaults to 1920x1080 (the line plot: 1200x750).
    """
    surface, view = _surface(surface), view or View()
    if surface.dim == 1:
        from .plots import line_png

        return line_png(surface, path, log=view.log, size=size)
    size = size or SIZE
    check_size(size)
    return _save(landscape_plotter(surface, view, size), Path(path))


def compare(surfaces: list[Surface | str | Path], path: str | Path, shared: bool = True, view: View | None = None,
            size: tuple[int, int] | None = None) -> Path:
    """Write surfaces side by side with linked cameras, on one shared or a per-panel scale.

    A shared scale (the default) gives every panel the same colour and height range, so a
    flatter landscape looks flatter, as in the seed's figure of LeNet with and without BN.
    """
    size = size or SIZE
    check_size(size)
    plotter = comparison_plotter([_surface(s) for s in surfaces], shared, view or View(), size)
    return _save(plotter, Path(path))


def export_vts(surface: Surface | str | Path, path: str | Path) -> Path:
    """Write a ParaView structured grid: the flat α-β grid with the loss, acc (if recorded) and done arrays.

    Values are written as recorded (NaN where not evaluated or diverged), with the surface
    file's attributes as field data; in ParaView, "Warp By Scalar" on ``loss`` raises it.
    """
    from vtkmodules.vtkIOXML import vtkXMLStructuredGridWriter

    surface, path = _surface(surface), Path(path)
    y = surface.y if surface.y is not None else np.zeros(1)
    x, y = np.meshgrid(surface.x, y)
    grid = pv.StructuredGrid(x, y, np.zeros_like(x))
    arrays = [("loss", surface.loss), ("acc", surface.acc), ("done", surface.done)]
    for name, values in arrays:
        if values is not None:
            grid[name] = np.asarray(values).reshape(x.shape).ravel(order="F")
    for key, value in surface.attrs.items():
        grid.field_data[key] = np.array([str(value)])
    # VTK's file writer reports a full disk only in its log: write to a string, and the file from Python.
    writer = vtkXMLStructuredGridWriter()
    writer.SetInputData(grid)
    writer.SetDataModeToBinary()  # base64 inline: the string is plain text
    writer.SetCompressorTypeToZLib()
    writer.WriteToOutputStringOn()
    writer.Write()
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_bytes(path, writer.GetOutputString())


def scene_plotter(surface: Surface, view: View) -> tuple[pv.Plotter, Scaled]:
    """The web scene of one surface (see the module's docstring), from the default camera."""
    plotter = new_plotter(SIZE, off_screen=True)
    s = add_landscape(plotter, surface, view, web=True)
    default_camera(plotter)
    return plotter, s


def scene_view(surface: Surface, view: View | None) -> View:
    """The view of the exported scene: a log scale when asked for, or when the loss spans decades."""
    view = view or View()
    return replace(view, log=view.quantity == "loss" and (view.log or spans_decades(surface)))


# vtk.js labels the cube axes and the colour bar with its own linear ticks of the scene's numbers:
# scene heights (0 to 1) and, on a log scale, log10 of the loss. Once the scene is loaded, give
# both fastland's ticks instead, the same as the PNG's (losses; decades on a log scale), and note
# on the title that this was done (tests read it back from the page).
_TICKS_JS = """<script>
(function () {
  const want = %s;
  let tries = 0;
  const timer = setInterval(function () {
    const rw = window.global && window.global.renderWindow;
    const props = rw ? rw.getRenderers().flatMap(function (r) { return r.getViewProps(); }) : [];
    const axes = props.find(function (p) { return p.isA("vtkCubeAxesActor"); });
    const bar = props.find(function (p) { return p.isA("vtkScalarBarActor"); });
    if ((axes && bar) || ++tries > 600) clearInterval(timer);
    if (!axes || !bar) return;
    axes.setAxisLabels(want.titles);
    axes.setGenerateTicks(function () { return {ticks: want.ticks, tickStrings: want.labels}; });
    const bounds = axes.getDataBounds().slice();  /* new bounds make it ask for ticks again */
    axes.setDataBounds(bounds.map(function (v) { return v + 1e-9; }));
    axes.update();
    axes.setDataBounds(bounds);
    axes.update();
    bar.setAxisLabel(want.bar_title);
    bar.setGenerateTicks(function (helper) { helper.setTicks(want.bar); helper.setTickStrings(want.bar_labels); });
    rw.render();
    document.getElementById("fastland-title").dataset.ticks = want.labels[2].join(" ") + " | " + want.bar_labels.join(" ");
  }, 100);
})();
</script>
"""


def _ticks_js(surface: Surface, s: Scaled, view: View) -> str:
    """The page script that labels the web scene's axes and colour bar (see ``_TICKS_JS``)."""
    box = _Box.around(surface, view, *s.clim)
    marks = ticks(*s.clim, s.log)
    axes = [[(float(v), f"{v:.3g}") for v in MaxNLocator(4).tick_values(a, b) if a - 1e-9 <= v <= b + 1e-9]
            for a, b in ((box.x0, box.x1), (box.y0, box.y1))]
    axes.append([(float(box.height(v)), text) for v, text in marks])
    want = dict(titles=["α", "β", s.label], ticks=[[v for v, _ in a] for a in axes],
                labels=[[t for _, t in a] for a in axes], bar_title=s.label, bar=[v for v, _ in marks],
                bar_labels=[t for _, t in marks])
    return _TICKS_JS % json.dumps(want)


def _overlay(surface: Surface, s: Scaled, quantity: str) -> str:
    """The page's 2-D text, which vtk.js cannot draw: title, data warning, how awkward values were drawn, controls."""
    hi = s.clim[1]
    notes = s.describe(hi, above="drawn flat at the top in light grey", diverged=f"drawn at the top in {DIVERGED_COLOR}",
                       missing="left as holes")
    best = best_text(surface, s, quantity)
    lines = [*notes, *([f"red sphere: {best}"] if best else []),
             "drag: rotate · shift-drag: pan · scroll: zoom"]
    head = "<br>".join(html.escape(line) for line in title(surface).split("\n"))
    warn = ""
    if warning(surface):
        warn = f'<div style="color:darkred;font-size:20px;margin-top:6px">{html.escape(warning(surface))}</div>'
    foot = "<br>".join(html.escape(line) for line in lines)
    box = "position:absolute;left:14px;z-index:10;pointer-events:none;font-family:DejaVu Sans,sans-serif"
    # vtk.js draws into the first element of class "content" (else into the body, emptying it first).
    return ('<div class="content" style="position:absolute;top:0;left:0;width:100%;height:100%"></div>\n'
            f'<div id="fastland-title" style="{box};top:10px;font-size:18px;color:black">{head}{warn}</div>\n'
            f'<div id="fastland-notes" style="{box};bottom:10px;font-size:14px;color:dimgray">{foot}</div>\n')


def _page(plotter: pv.Plotter, surface: Surface, s: Scaled, view: View) -> str:
    """The web scene in ``plotter`` as a self-contained interactive page, with its title, warning, notes and ticks."""
    # trame-pyvista exports through a local trame server, which also starts trame-vtklocal; that
    # downloads VTK's WebAssembly build in the background, failing noisily offline. The vtk.js
    # page written here does not use it, so keep the module out (an absent module is optional
    # to trame-pyvista).
    sys.modules.setdefault("trame.widgets.vtklocal", None)
    page = plotter.trame.export_html(None).read()
    first = title(surface).split("\n")[0]
    page = page.replace("<title>VTK.js | Example - OfflineLocalView</title>", f"<title>{html.escape(first)}</title>", 1)
    at = page.find("<body>") + len("<body>")
    if at < len("<body>"):
        raise RuntimeError("trame's page has no <body> tag: fastland.viz.render._page needs updating")
    return page[:at] + "\n" + _overlay(surface, s, view.quantity) + _ticks_js(surface, s, view) + page[at:]


def _write_gltf(plotter: pv.Plotter, path: Path) -> Path:
    """Write the scene as glTF (data inlined); checked, because VTK reports a failed write only in its log."""
    with replacing(path) as tmp:
        plotter.export_gltf(str(tmp))
        try:
            json.loads(tmp.read_bytes())
        except ValueError:
            full = shutil.disk_usage(tmp.parent).free < 2**20
            raise OSError(errno.ENOSPC if full else errno.EIO, "VTK wrote an incomplete file") from None
    return path


def _scene_outputs(surface: Surface, prefix: str, view: View | None) -> Iterator[Path]:
    """Write ``PREFIX.html`` and ``PREFIX.gltf`` from one web scene, yielding each once complete."""
    view = scene_view(surface, view)
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    plotter, s = scene_plotter(surface, view)
    try:
        yield write_bytes(prefix + ".html", _page(plotter, surface, s, view))
        yield _write_gltf(plotter, Path(prefix + ".gltf"))
    finally:
        plotter.close()


def export_scene(surface: Surface | str | Path, prefix: str | Path, view: View | None = None) -> list[Path]:
    """Write the 3-D scene as a self-contained interactive ``.html`` (vtk.js) and a ``.gltf`` (glTF, data inlined).

    Both keep the geometry, colours, contour lines and markers. The page also carries the
    title, data warning, notes and labelled axes; glTF has no text. The view is the given one,
    on a log scale when the loss spans decades.
    """
    return list(_scene_outputs(_surface(surface), str(prefix), view))


def iter_outputs(surface: Surface | str | Path, out_prefix: str | Path, view: View | None = None,
                 size: tuple[int, int] | None = None) -> Iterator[Path]:
    """Write every offscreen output of one surface, yielding each path once its file is complete.

    2-D loss: ``_3d.png`` (linear), ``_3d_log.png``, ``_map.png`` (matplotlib), ``.vts``,
    ``.html`` and ``.gltf``; accuracy (``view.quantity == "acc"``): the same without
    ``_3d_log.png``; with a curvature map also ``_curvature.png`` (matplotlib) and ``_curvature_3d.png``
    (the surface coloured by |λmin/λmax|). 1-D: ``_1d.png`` and ``_1d_log.png`` line plots. Names are ``out_prefix``
    plus these suffixes. ``view`` sets the colour map, contour lines and height of all of them.
    """
    from .plots import contour_png, curvature_png, has_curvature, line_outputs

    surface, prefix, view = _surface(surface), str(out_prefix), view or View()
    if surface.dim == 1:
        yield from line_outputs(surface, prefix, size)
        if has_curvature(surface):
            yield curvature_png(surface, prefix + "_curvature.png", size=size)
        return
    if size:
        check_size(size)
    if view.quantity == "acc":
        yield screenshot(surface, prefix + "_3d.png", view, size)
    else:
        yield screenshot(surface, prefix + "_3d.png", replace(view, log=False), size)
        yield screenshot(surface, prefix + "_3d_log.png", replace(view, log=True), size)
    yield contour_png(surface, prefix + "_map.png", log=True if view.log else None, quantity=view.quantity,
                      cmap=view.cmap, contours=view.contours, size=size)
    yield export_vts(surface, prefix + ".vts")
    yield from _scene_outputs(surface, prefix, view)
    if has_curvature(surface):  # fastland.curvature's maps, stored beside the loss
        yield curvature_png(surface, prefix + "_curvature.png", size=size)
        yield curvature_screenshot(surface, prefix + "_curvature_3d.png", size=size)


def render_outputs(surface_path: str | Path, out_prefix: str | Path, size: tuple[int, int] | None = None,
                   view: View | None = None) -> list[Path]:
    """Write every offscreen output of one surface file (see ``iter_outputs``); return the paths written."""
    return list(iter_outputs(surface_path, out_prefix, view, size))


# --- curvature -------------------------------------------------------------------------
def _interpolate(xs: np.ndarray, ys: np.ndarray, z: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``z`` given on the grid ``(ys, xs)``, bilinear on the grid ``(y, x)`` (NaN spreads to its neighbours)."""
    rows = np.stack([np.interp(x, xs, z[j]) for j in range(len(ys))])
    return np.stack([np.interp(y, ys, rows[:, i]) for i in range(len(x))], axis=1)


def curvature_plotter(surface: Surface, view: View, size: tuple[int, int] = SIZE, off_screen: bool = True) -> pv.Plotter:
    """The 3-D loss surface (heights, contours, minimum, axes as ``add_landscape`` draws them) coloured by Li et al.'s
    |λmin/λmax| instead of the loss: dark where it is locally convex, bright where it is strongly non-convex. A map
    computed on every s-th point is interpolated bilinearly onto the loss's grid; points without one are grey."""
    from .plots import curvature_grid

    plotter = new_plotter(size, off_screen)
    s = add_landscape(plotter, surface, view, scalar_bar=False)
    xs, ys, maps, _ = curvature_grid(surface)
    ratio = maps["curvature_ratio"]
    if len(xs) > 1 and len(ys) > 1:
        ratio = _interpolate(xs, ys, ratio, surface.x, surface.y)
    lo, hi = s.clim
    box = _Box.around(surface, view, lo, hi)
    x, y = np.meshgrid(surface.x, surface.y)
    grid = pv.StructuredGrid(x, y, np.where(s.missing, 0.0, box.height(np.clip(np.where(s.diverged, hi, s.z), lo, hi))))
    name = "∣λmin/λmax∣"  # U+2223: VTK's text drops the ASCII bar
    grid[name] = ratio.ravel(order="F")
    grid["evaluated"] = (~s.missing).ravel(order="F").astype(np.uint8)
    mesh = grid.threshold(0.5, scalars="evaluated", all_scalars=True) if s.missing.any() else grid
    top = float(np.nanmax(ratio)) if np.isfinite(ratio).any() else 1.0
    plotter.add_mesh(
        mesh.extract_surface(algorithm=None), scalars=name, cmap="magma", clim=(0.0, max(top, 1e-12)), nan_color="lightgray",
        smooth_shading=True, specular=0.2, name="surface0",  # replaces the loss-coloured surface
        scalar_bar_args=dict(title=name + "\n", vertical=True, position_x=0.90, position_y=0.22, width=0.04, height=0.56,
                             fmt="%.3g", n_labels=6, title_font_size=font_size(plotter, 20),
                             label_font_size=font_size(plotter, 17), color="black"))
    bar = plotter.scalar_bars[name + "\n"]
    _fonts(bar.GetTitleTextProperty(), bar.GetLabelTextProperty())
    plotter.add_text(f"height: the loss · colour: {name} (Li et al., Sec. 6)", position=(0.99, 0.03), viewport=True,
                     font_size=font_size(plotter, 16), color="dimgray", font_file=FONT,
                     name="curvature_key").GetTextProperty().SetJustificationToRight()
    default_camera(plotter)
    return plotter


def curvature_screenshot(surface: Surface | str | Path, path: str | Path, view: View | None = None,
                         size: tuple[int, int] | None = None) -> Path:
    """Write the 3-D surface coloured by |λmin/λmax| (``curvature_plotter``); the view defaults to a log scale
    when the loss spans two decades."""
    surface = _surface(surface)
    if surface.dim != 2:
        raise UserError(f"{surface.path} is a 1-D surface; the 3-D curvature picture needs a 2-D one")
    view = view or View(log=spans_decades(surface))
    size = size or SIZE
    check_size(size)
    return _save(curvature_plotter(surface, view, size), Path(path))


# --- trajectories ------------------------------------------------------------------------
PATH_SUBDIVISIONS = 16  # points per segment when a path is draped over the surface


def add_path(plotter: pv.Plotter, surface: Surface, s: Scaled, view: View, trace: RunTrace, color: str,
             run: int = 0) -> None:
    """Drape one run's path over the 3-D surface drawn by ``add_landscape`` (``s``): a tube that
    follows the surface between the projected checkpoints, a sphere at each epoch's end and a cone
    pointing down at the start."""
    from .trajectory import values_at

    box = _Box.around(surface, view, *s.clim)
    lo, hi = s.clim
    z = np.where(np.isfinite(s.z), s.z, hi)  # diverged and missing points are drawn at the top

    def lifted(points: np.ndarray, lift: float) -> np.ndarray:
        height = box.height(np.clip(values_at(surface.x, surface.y, z, points), lo, hi))
        return np.c_[points, height + lift * box.top]

    pts = trace.coords
    t = np.linspace(0.0, 1.0, PATH_SUBDIVISIONS + 1)[1:]
    dense = np.vstack([pts[:1], *(a + (b - a) * t[:, None] for a, b in zip(pts[:-1], pts[1:], strict=True))])
    radius = 0.006 * box.span
    plotter.add_mesh(pv.lines_from_points(lifted(dense, 0.012)).tube(radius=radius, n_sides=16), color=color,
                     smooth_shading=True, specular=0.3, name=f"path{run}")
    ends = pts[trace.epoch_end]
    if len(ends):
        balls = pv.PolyData(lifted(ends, 0.012)).glyph(geom=pv.Sphere(radius=2.2 * radius), scale=False, orient=False)
        plotter.add_mesh(balls, color=color, smooth_shading=True, name=f"path_epochs{run}")
    tip = lifted(pts[:1], 0.012)[0]
    cone = pv.Cone(center=tip + (0, 0, 0.06 * box.top), direction=(0, 0, -1), height=0.12 * box.top,
                   radius=4 * radius, resolution=24)
    plotter.add_mesh(cone, color=color, smooth_shading=True, name=f"path_start{run}")


def path_plotter(surface: Surface, view: View | None = None, size: tuple[int, int] = SIZE,
                 off_screen: bool = True) -> pv.Plotter:
    """A plotter with a trajectory surface and every run's path on it (see ``add_path``), axes
    labelled with the explained variance, a legend of the runs, from the default camera."""
    from .trajectory import COLORS_3D, axis_labels, traces

    runs = traces(surface)
    view = view or View(log=spans_decades(surface))
    plotter = new_plotter(size, off_screen)
    x_name, y_name = axis_labels(surface)
    s = add_landscape(plotter, surface, view, axis_names=(x_name.replace(": ", " "), y_name.replace(": ", " ")))
    for k, trace in enumerate(runs):
        add_path(plotter, surface, s, view, trace, COLORS_3D[k % len(COLORS_3D)], k)
    # The key, lower right: one line per run in its colour (VTK's legend actor scales its text to its
    # box and clips long labels), then what the markers mean.
    size = font_size(plotter, 17)
    step = 2.1 * size / plotter.window_size[1]
    keys = [(f"━━ {trace.label}", COLORS_3D[k % len(COLORS_3D)]) for k, trace in enumerate(runs)]
    keys.append(("cone: start · spheres: ends of epochs", "dimgray"))
    for k, (text, color) in enumerate(reversed(keys)):
        actor = plotter.add_text(text, position=(0.99, 0.03 + k * step), viewport=True, font_size=size, color=color,
                                 font_file=FONT, name=f"path_key{k}")
        actor.GetTextProperty().SetJustificationToRight()  # its right end at the position
    # Higher than the usual view, so that ridges in front hide less of the paths.
    default_camera(plotter, elevation=55.0)
    return plotter


def path_screenshot(surface: Surface | str | Path, path: str | Path, view: View | None = None,
                    size: tuple[int, int] | None = None) -> Path:
    """Write the 3-D picture of a trajectory surface with every run's path as a tube on it (``path_plotter``).

    ``size`` defaults to 1920x1080; the view to a log scale when the loss spans two decades.
    """
    surface = _surface(surface)
    size = size or SIZE
    check_size(size)
    return _save(path_plotter(surface, view, size), Path(path))
