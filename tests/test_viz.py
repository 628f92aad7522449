"""Rendering: real renders of synthetic surface files, read back and checked by numbers.

PyVista renders offscreen (EGL without a display) at 640x360. Tests that need PyVista are
skipped where it is not installed (the GPU machines); the matplotlib ones run everywhere.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

from fastland import surfacefile
from fastland.viz import plots, prepare
from fastland.viz.__main__ import main

SMALL = (640, 360)


def bowl_values(x: np.ndarray, y: np.ndarray | None, kind: str = "explode") -> tuple[np.ndarray, np.ndarray]:
    """Loss and accuracy of a bowl with ripples, tilted along α so that a transposed grid shows."""
    X, Y = (x, np.zeros_like(x)) if y is None else np.meshgrid(x, y)
    r2 = X**2 + Y**2
    if kind == "explode":  # grows by orders of magnitude towards the corners, like Li et al.'s surfaces
        loss = 0.03 + 0.4 * (np.exp(3.0 * r2) - 1) + 0.08 * (1 + np.sin(7 * X) * np.cos(5 * Y)) * r2 + 0.3 * X * r2
    else:  # a quadratic bowl
        loss = 0.2 + 0.8 * r2 + 0.05 * np.sin(6 * X) * np.cos(6 * Y) + 0.1 * X
    return loss, 90 * np.exp(-loss) + 10


def write_surface(path: Path, n: int = 41, dim: int = 2, kind: str = "explode", diverged: bool = True,
                  missing: int = 0, model: str = "lenet", warning: str = "") -> Path:
    """A surface file in the documented layout, written through fastland.surfacefile: NaN and inf
    results (done=1) in the last row when ``diverged``, and the last ``missing`` points left
    unevaluated (done=0)."""
    x = np.linspace(-1, 1, n)
    y = None if dim == 1 else np.linspace(-1, 1, n)
    loss, acc = bowl_values(x, y, kind)
    flat = loss.reshape(-1).copy()
    if diverged:
        flat[-missing - 1], flat[-missing - 2], flat[-missing - 3] = np.inf, np.nan, np.inf
    attrs = dict(model=model, split="train", bn_mode="eval", norm="filter", dim=dim,
                 data_source="synthetic" if warning else "cifar10", data_warning=warning)
    surfacefile.create(path, x, y, [{}] * dim, attrs)
    writer = surfacefile.Writer(path)
    keep = np.arange(flat.size - missing)
    writer.write(keep, flat[keep], acc.reshape(-1)[keep])
    writer.close()
    return path


@pytest.fixture
def bowl(tmp_path: Path) -> Path:
    return write_surface(tmp_path / "bowl.h5")


@pytest.fixture
def render():
    pytest.importorskip("pyvista")
    from fastland.viz import render

    return render


def image(path: Path) -> np.ndarray:
    """A PNG as uint8 RGB."""
    return (matplotlib.image.imread(path)[..., :3] * 255).round().astype(np.uint8)


def n_colours(img: np.ndarray) -> int:
    return len(np.unique(img.reshape(-1, 3), axis=0))


def coloured(img: np.ndarray) -> np.ndarray:
    """Saturated pixels: the coloured surface, not the white background or grey line work."""
    rgb = img.astype(int)
    return (rgb.max(axis=-1) - rgb.min(axis=-1)) > 40


# --- what to draw: no renderer needed ------------------------------------------------------

def test_scaled_shows_nan_inf_nonpositive_and_missing_points(tmp_path: Path) -> None:
    s = surfacefile.read(write_surface(tmp_path / "s.h5", missing=50))
    assert prepare.scaled(s).best("loss") == (20, 20) and s.x[20] == 0.0  # the bowl's minimum, at the origin
    s.loss[0, 0] = 0.0  # a value no log scale can show
    lin = prepare.scaled(s, "loss")
    log = prepare.scaled(s, "loss", log=True)
    assert lin.missing.sum() == 50 and log.diverged.sum() == 3
    assert np.isnan(log.z[log.diverged | log.missing]).all() and np.isfinite(log.z[~(log.diverged | log.missing)]).all()
    positive = s.loss[(s.done == 1) & np.isfinite(s.loss) & (s.loss > 0)]
    assert log.z[0, 0] == pytest.approx(np.log10(positive.min()))  # drawn at the smallest positive loss
    text = "\n".join(log.describe(log.clim[1], above="", diverged="drawn X", missing="left Y"))
    assert "1 losses <= 0" in text
    assert "3 points diverged (1 NaN, 2 inf): drawn X" in text
    assert "50 of 1681 points not evaluated yet: left Y" in text


def test_robust_clip_only_when_a_few_points_dominate(tmp_path: Path) -> None:
    exploding = prepare.scaled(surfacefile.read(write_surface(tmp_path / "e.h5")))
    quadratic = prepare.scaled(surfacefile.read(write_surface(tmp_path / "q.h5", kind="bowl")))
    hi = exploding.clim[1]
    assert hi == pytest.approx(np.nanpercentile(exploding.z, 95)) and hi < np.nanmax(exploding.z) / 3
    assert exploding.above(hi) == int(np.sum(exploding.z > hi)) > 0
    assert "colour scale clipped at loss" in exploding.describe(hi, above="grey", diverged="", missing="")[0]
    assert quadratic.clim[1] == np.nanmax(quadratic.z) and quadratic.above(quadratic.clim[1]) == 0
    log = prepare.scaled(surfacefile.read(tmp_path / "e.h5"), log=True)
    assert log.clim[1] == np.nanmax(log.z)  # a log scale needs no clipping


def test_log_ticks_are_decades() -> None:
    assert [t for _, t in prepare.ticks(np.log10(0.03), np.log10(162), log=True)] == ["0.1", "1", "10", "100"]
    assert [t for _, t in prepare.ticks(0.0, 1.0, log=False)][:2] == ["0", "0.2"]


def test_viz_package_and_plots_work_without_pyvista(tmp_path: Path) -> None:
    """The GPU machines have no PyVista: fastland.viz and its matplotlib plots must not need it."""
    two, one = write_surface(tmp_path / "two.h5"), write_surface(tmp_path / "one.h5", dim=1)
    code = f"""
import sys
for name in ("pyvista", "vtk", "vtkmodules"):
    sys.modules[name] = None  # importing any of them now raises ImportError
import fastland.viz, fastland.viz.plots as plots
from fastland.surfacefile import read
plots.contour_png(read({str(two)!r}), {str(tmp_path / "map.png")!r})
plots.line_png(read({str(one)!r}), {str(tmp_path / "line.png")!r}, log=True)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ})
    assert done.returncode == 0, done.stderr
    assert n_colours(image(tmp_path / "map.png")) > 200 and n_colours(image(tmp_path / "line.png")) > 50


# --- matplotlib ----------------------------------------------------------------------------

def test_contour_map_is_log_scaled_when_the_loss_spans_decades(bowl: Path, tmp_path: Path) -> None:
    s = surfacefile.read(bowl)
    assert prepare.spans_decades(s)
    auto, linear = plots.contour_png(s, tmp_path / "auto.png"), plots.contour_png(s, tmp_path / "lin.png", log=False)
    a, b = image(auto), image(linear)
    assert a.shape == b.shape and n_colours(a) > 500
    assert np.abs(a.astype(int) - b).mean() > 5  # the colour scale really changed


def test_line_plot_1d(tmp_path: Path) -> None:
    s = surfacefile.read(write_surface(tmp_path / "one.h5", dim=1, n=101, missing=5))
    lin, log = plots.line_png(s, tmp_path / "lin.png"), plots.line_png(s, tmp_path / "log.png", log=True)
    assert n_colours(image(lin)) > 50 and not np.array_equal(image(lin), image(log))
    with pytest.raises(Exception, match="1-D"):
        plots.contour_png(s, tmp_path / "map.png")


# --- PyVista -------------------------------------------------------------------------------

def test_screenshot_has_the_size_and_a_surface(render, bowl: Path, tmp_path: Path) -> None:
    img = image(render.screenshot(bowl, tmp_path / "s.png", size=SMALL))
    assert img.shape == (SMALL[1], SMALL[0], 3)
    assert n_colours(img) > 1000  # a shaded, anti-aliased surface, not a blank or flat image
    h, w = img.shape[:2]
    centre = coloured(img[h // 3: 2 * h // 3, w // 3: 2 * w // 3])
    assert centre.mean() > 0.5  # the surface fills the middle of the picture


def test_log_render_differs_from_linear(render, bowl: Path, tmp_path: Path) -> None:
    lin = image(render.screenshot(bowl, tmp_path / "lin.png", size=SMALL))
    log = image(render.screenshot(bowl, tmp_path / "log.png", render.View(log=True), size=SMALL))
    assert np.abs(lin.astype(int) - log).mean() > 10


def test_compare_places_two_surfaces_on_shared_or_own_scales(render, tmp_path: Path) -> None:
    steep = write_surface(tmp_path / "lenet.h5")
    flat = write_surface(tmp_path / "lenet_bn.h5", kind="bowl", diverged=False, model="lenet_bn")
    shared = image(render.compare([steep, flat], tmp_path / "shared.png", shared=True, size=SMALL))
    own = image(render.compare([steep, flat], tmp_path / "own.png", shared=False, size=SMALL))
    w = SMALL[0]
    for half in (own[:, : w // 2], own[:, w // 2:]):
        assert coloured(half).mean() > 0.08  # a surface in each panel (a blank half scores ~0)
    # On the shared scale the flat surface lies at the bottom of the steep one's range, so its
    # panel changes; the steep one keeps its own range either way.
    assert np.abs(shared[:, w // 2:].astype(int) - own[:, w // 2:]).mean() > 5
    assert np.abs(shared[:, : w // 2].astype(int) - own[:, : w // 2]).mean() < 3


def test_vts_reads_back_with_the_same_values(render, tmp_path: Path) -> None:
    import pyvista as pv

    path = write_surface(tmp_path / "s.h5", n=21, missing=7)
    s = surfacefile.read(path)
    grid = pv.read(render.export_vts(s, tmp_path / "s.vts"))
    assert grid.n_points == s.loss.size
    # Look each point up by its coordinates, so a transposed grid would fail.
    i = np.rint((grid.points[:, 0] - s.x[0]) / (s.x[1] - s.x[0])).astype(int)
    j = np.rint((grid.points[:, 1] - s.y[0]) / (s.y[1] - s.y[0])).astype(int)
    np.testing.assert_array_equal(grid["loss"], s.loss[j, i])  # NaN and inf included
    np.testing.assert_array_equal(grid["acc"], s.acc[j, i])
    np.testing.assert_array_equal(grid["done"], s.done[j, i])
    assert np.isinf(grid["loss"]).sum() == 2 and grid.field_data["model"][0] == "lenet"


def test_render_outputs_writes_every_file(render, bowl: Path, tmp_path: Path) -> None:
    written = render.render_outputs(bowl, tmp_path / "out" / "bowl", size=SMALL)
    names = sorted(p.name for p in written)
    assert names == sorted(["bowl_3d.png", "bowl_3d_log.png", "bowl_map.png", "bowl.vts", "bowl.html", "bowl.gltf"])
    assert all(p.is_file() and p.stat().st_size > 1000 for p in written)
    assert image(tmp_path / "out" / "bowl_3d.png").shape == (SMALL[1], SMALL[0], 3)

    html = (tmp_path / "out" / "bowl.html").read_text()
    assert html.lstrip().lower().startswith("<!doctype html>")
    # Self-contained: no script, style sheet or data loaded from elsewhere; the scene is inlined.
    assert "<script src" not in html.replace("'", '"') and 'src="http' not in html and 'href="http' not in html
    assert "base64Str" in html and len(html) > 200_000

    gltf = json.loads((tmp_path / "out" / "bowl.gltf").read_text())
    assert len(gltf["meshes"]) >= 3 and all(b["uri"].startswith("data:") for b in gltf["buffers"])


def test_flat_and_all_diverged_surfaces_still_render(render, tmp_path: Path) -> None:
    x = np.linspace(-1, 1, 11)
    for name, loss in (("flat", 1.0), ("nan", np.nan)):
        path = tmp_path / f"{name}.h5"
        surfacefile.create(path, x, x, [{}, {}], {"split": "test"})
        writer = surfacefile.Writer(path)
        writer.write(np.arange(121), np.full(121, loss), np.full(121, 50.0))
        writer.close()
        written = render.render_outputs(path, tmp_path / name, size=SMALL)
        assert len(written) == 6 and all(p.is_file() for p in written)
    img = image(tmp_path / "nan_3d.png").astype(int)
    magenta = (img[..., 0] > 180) & (img[..., 1] < 80) & (img[..., 2] > 180)
    assert magenta.mean() > 0.05  # every point diverged: the whole surface is drawn in the diverged colour


def test_render_outputs_1d_are_line_plots(render, tmp_path: Path) -> None:
    path = write_surface(tmp_path / "one.h5", dim=1, n=51)
    written = render.render_outputs(path, tmp_path / "one")
    assert [p.name for p in written] == ["one_1d.png", "one_1d_log.png"]


def test_viewer_controls_redraw_and_stay_on_screen(render, bowl: Path) -> None:
    from fastland.viz.viewer import Viewer

    start = render.View(cmap="inferno", exaggeration=5.0, contours=50)  # outside the sliders' usual ranges
    viewer = Viewer(surfacefile.read(bowl), start, size=SMALL, off_screen=True)
    assert viewer.view == start  # creating the widgets must not reset what was asked for
    pl = viewer.plotter
    before = pl.screenshot(return_img=True)
    viewer.update(log=True, contours=20, cmap="plasma")
    after = pl.screenshot(return_img=True)
    assert np.abs(before.astype(int) - after).mean() > 5
    # The sliders (top right) and check boxes (left) must survive the redraw.
    sliders, buttons = pl.widgets.slider_widgets, pl.widgets.button_widgets
    assert len(sliders) == 3 and all(w.GetEnabled() for w in sliders)
    assert len(buttons) == 2 and all(w.GetEnabled() for w in buttons)
    h, w = after.shape[:2]
    track = after[int(0.04 * h): int(0.1 * h), int(0.56 * w): int(0.68 * w)].astype(int)
    assert ((np.abs(track - 178) < 6).all(axis=-1)).mean() > 0.1  # the slider track's grey is drawn
    viewer.update(quantity="acc")
    assert [title.strip() for title in pl.scalar_bars.keys()] == ["accuracy (%)"]
    pl.close()


@pytest.mark.skipif(not os.environ.get("DISPLAY"), reason="needs a display to open a window (try xvfb-run)")
def test_interactive_window_responds_to_clicks_and_drags(render, bowl: Path) -> None:
    from fastland.viz.viewer import Viewer

    viewer = Viewer(surfacefile.read(bowl), size=(1280, 720))
    pl = viewer.plotter
    pl.show(auto_close=False, interactive_update=True)
    iren = pl.iren.interactor

    def mouse(x: int, y: int, *events: str) -> None:
        for event in events:
            iren.SetEventInformation(x, y)  # VTK counts y from the bottom
            iren.InvokeEvent(event)
        pl.update()

    x, y, size = viewer._box_place(0)  # the log-scale check box
    mouse(x + size // 2, y + size // 2, "MouseMoveEvent", "LeftButtonPressEvent", "LeftButtonReleaseEvent")
    assert viewer.view.log
    w, h = pl.window_size
    rep = pl.widgets.slider_widgets[1].GetRepresentation()  # contour lines, 0..40, starts at 12
    start, end = rep.GetPoint1Coordinate().GetValue()[0], rep.GetPoint2Coordinate().GetValue()[0]
    mouse(int((start + (end - start) * 12 / 40) * w), int(0.93 * h), "LeftButtonPressEvent")
    mouse(int(end * w) - 2, int(0.93 * h), "MouseMoveEvent", "LeftButtonReleaseEvent")
    assert viewer.view.contours == 40
    pl.close()


# --- the command line ----------------------------------------------------------------------

def test_cli_screenshot_and_compare(render, bowl: Path, tmp_path: Path) -> None:
    other = write_surface(tmp_path / "bn.h5", kind="bowl", model="lenet_bn", warning="synthetic data")
    main([str(bowl), "--screenshot", str(tmp_path / "one.png"), "--size", "320x200", "--log"])
    main([str(bowl), "--compare", str(other), "--per-panel-scale", "--screenshot", str(tmp_path / "two.png"),
          "--size", "400x200"])
    assert image(tmp_path / "one.png").shape == (200, 320, 3)
    assert image(tmp_path / "two.png").shape == (200, 400, 3)


def test_cli_without_display_writes_the_offscreen_outputs(render, bowl: Path, monkeypatch, capsys) -> None:
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    main([str(bowl), "--size", "320x200"])
    out, err = capsys.readouterr()
    assert "no display" in err
    assert (bowl.parent / "bowl_3d.png").is_file() and (bowl.parent / "bowl.html").is_file()


@pytest.mark.parametrize("args, message", [
    (["missing.h5"], "does not exist"),
    (["NOT_A_SURFACE"], "is not a fastland surface file"),
    ([], "give a surface file"),
    (["NOT_A_SURFACE", "--size", "12"], "size must look like"),
    (["EMPTY", "--screenshot", "x.png"], "nothing to draw"),
])
def test_cli_bad_input_is_one_error_line(args: list[str], message: str, tmp_path: Path, capsys) -> None:
    junk = tmp_path / "junk.h5"
    junk.write_text("not hdf5")
    empty = tmp_path / "empty.h5"  # created, not a single point evaluated yet
    surfacefile.create(empty, np.linspace(-1, 1, 5), np.linspace(-1, 1, 5), [{}, {}], {"split": "train"})
    named = {"NOT_A_SURFACE": str(junk), "EMPTY": str(empty)}
    args = [named.get(a, str(tmp_path / a) if a.endswith((".h5", ".png")) else a) for a in args]
    with pytest.raises(SystemExit) as exit_:
        main(args)
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and err.startswith("error: ") and message in err and "\n" not in err


def test_cli_help_explains_every_option(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    text = capsys.readouterr().out
    assert exit_.value.code == 0
    for option in ("--screenshot", "--compare", "--shared-scale", "--per-panel-scale", "--log", "--out-prefix",
                   "--accuracy", "--cmap", "--contours", "--exaggeration", "--size"):
        assert option in text


def test_headless_selects_egl_without_a_display(monkeypatch) -> None:
    from fastland.viz import headless

    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.delenv("VTK_DEFAULT_OPENGL_WINDOW", raising=False)
    if sys.platform.startswith("linux"):
        assert not headless.has_display()
        headless.ensure_offscreen()
        assert os.environ["VTK_DEFAULT_OPENGL_WINDOW"] == "vtkEGLRenderWindow"
        monkeypatch.setenv("DISPLAY", ":0")
        monkeypatch.delenv("VTK_DEFAULT_OPENGL_WINDOW")
        headless.ensure_offscreen()
        assert "VTK_DEFAULT_OPENGL_WINDOW" not in os.environ
