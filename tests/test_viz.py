"""Rendering: real renders of synthetic surface files, read back and checked by numbers.

PyVista renders offscreen (EGL without a display) at 640x360. Tests that need PyVista are
skipped where it is not installed (the GPU machines); the matplotlib ones run everywhere. The
command line's bad input, full disks and missing displays run through a real interpreter
(``run_cli``); the web page is opened in headless Chromium where it is installed.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import h5py
import matplotlib.image
import numpy as np
import pytest
from conftest import mounted_tmpfs, one_error_line, run_cli

from fastland import surfacefile
from fastland.errors import UserError
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
        # A DISPLAY with no X server behind it is no display either.
        monkeypatch.setenv("DISPLAY", f":{free_display()}")
        monkeypatch.delenv("VTK_DEFAULT_OPENGL_WINDOW")
        assert not headless.has_display()
        headless.ensure_offscreen()
        assert os.environ["VTK_DEFAULT_OPENGL_WINDOW"] == "vtkEGLRenderWindow"


@pytest.mark.skipif(shutil.which("Xvfb") is None, reason="needs Xvfb (apt-get install xvfb) for a real X server")
def test_has_display_with_a_real_x_server(tmp_path: Path) -> None:
    number = free_display()
    server = subprocess.Popen(["Xvfb", f":{number}", "-screen", "0", "640x480x24", "-nolisten", "tcp"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 20
        while not Path(f"/tmp/.X11-unix/X{number}").exists() and time.time() < deadline:
            time.sleep(0.1)
        code = "from fastland.viz.headless import has_display; print(has_display())"
        env = {**os.environ, "DISPLAY": f":{number}"}
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
        assert done.stdout.strip() == "True", done.stderr
    finally:
        server.terminate()
        server.wait(timeout=20)


# --- the command line through a real interpreter: bad input is one line, nothing is lost ------

def free_display() -> int:
    """An X display number with no server behind it."""
    return next(n for n in range(90, 200) if not Path(f"/tmp/.X11-unix/X{n}").exists()
                and not Path(f"/tmp/.X{n}-lock").exists())


def written(done: subprocess.CompletedProcess, cwd: Path) -> list[Path]:
    """The files a run said it wrote (``wrote PATH`` lines)."""
    return [cwd / line.removeprefix("wrote ") for line in done.stdout.splitlines() if line.startswith("wrote ")]


def no_pyvista(tmp_path: Path) -> dict[str, str]:
    """An environment in which importing PyVista or VTK fails, as on the GPU machines."""
    shim = tmp_path / "no_pyvista"
    for name in ("pyvista", "vtk", "vtkmodules"):
        (shim / name).mkdir(parents=True, exist_ok=True)
        (shim / name / "__init__.py").write_text(f"raise ModuleNotFoundError('No module named {name}', name='{name}')\n")
    return {"PYTHONPATH": os.pathsep.join([str(shim), os.environ.get("PYTHONPATH", "")])}


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB disk (see ``mounted_tmpfs``)."""
    with mounted_tmpfs(tmp_path / "disk") as disk:
        yield disk


def test_cli_without_pyvista_is_one_line_and_matplotlib_outputs_still_work(bowl: Path, tmp_path: Path) -> None:
    """The GPU machines have no PyVista: 3-D pictures say so in one line; the map and line plots work."""
    env = no_pyvista(tmp_path)
    done = run_cli("fastland.viz", [str(bowl), "--screenshot", "x.png"], tmp_path, env)
    one_error_line(done, "3-D pictures need PyVista")
    assert "--map" in done.stderr and not (tmp_path / "x.png").exists()
    one = write_surface(tmp_path / "one.h5", dim=1)
    for args, colours in (([str(bowl), "--map", "map.png"], 200), ([str(one), "--screenshot", "line.png", "--log"], 50)):
        done = run_cli("fastland.viz", args, tmp_path, env)
        assert done.returncode == 0 and not done.stderr, done.stderr
        assert n_colours(image(tmp_path / args[2])) > colours


BAD_OPTIONS = [  # the audit's cases run through a real interpreter; the rest in-process (faster)
    (["--exaggeration", "nan"], "--exaggeration must be a number from 0.01 to 100, not nan", True),
    (["--exaggeration", "inf"], "not inf", True),
    (["--size", "100000x100000"], "at most 7000 pixels on a side", True),
    (["--screenshot", "x.xyz"], "cannot write .xyz files; use one of .png, .jpg", True),
    (["--screenshot", "/proc/x.png"], "/proc/x.png cannot be written", True),
    (["--out-prefix", "a_file/x"], "a_file is a file, not a folder", True),
    (["--exaggeration", "-inf"], "not -inf", False),
    (["--exaggeration", "0"], "from 0.01 to 100", False),
    (["--contours", "100000"], "--contours must be from 0 to 100", False),
    (["--cmap", "nope"], "unknown colour map", False),
    (["--log", "--accuracy"], "--log applies to the loss only", False),
    (["--per-panel-scale"], "use them with --compare", False),
    (["--map", "x.xyz"], "cannot write .xyz files; use one of .avif", False),
    (["--out-prefix", "/proc/fastland/x"], "--out-prefix /proc/fastland/x cannot be written", False),
    (["--screenshot", "a_file/x.png"], "a_file is a file, not a folder", False),
    (["--map", "a_file/sub/x.png"], "a_file is a file, not a folder", False),
    (["--screenshot", "x.png", "--out-prefix", "y"], "not allowed with argument", False),
    (["--screenshot", "pipe.png"], "--screenshot pipe.png exists and is not a regular file", False),
]


@pytest.mark.parametrize("args, needle, shell", BAD_OPTIONS)
def test_cli_bad_options_are_one_line_before_any_rendering(args: list[str], needle: str, shell: bool, bowl: Path,
                                                           tmp_path: Path, capsys, monkeypatch) -> None:
    if "/proc" in " ".join(args) and not Path("/proc/self").exists():
        pytest.skip("no /proc here")
    (tmp_path / "a_file").write_text("I am a file")
    os.mkfifo(tmp_path / "pipe.png")  # not a file to replace with a picture (as root, neither is /dev/null)
    before = sorted(tmp_path.rglob("*"))
    if shell:
        one_error_line(run_cli("fastland.viz", [str(bowl), *args], tmp_path), needle)
    else:
        monkeypatch.chdir(tmp_path)
        with pytest.raises(SystemExit) as exit_:
            main([str(bowl), *args])
        err = capsys.readouterr().err.strip()
        assert exit_.value.code == 2 and err.startswith("error: ") and needle in err and "\n" not in err, err
    assert sorted(tmp_path.rglob("*")) == before  # nothing rendered, nothing written


def test_cli_out_prefix_honours_the_view_options(render, tmp_path: Path) -> None:
    surface = write_surface(tmp_path / "s.h5", n=21, warning="synthetic data")
    size = ["--size", "320x200"]
    runs = {"plain": [], "styled": ["--cmap", "plasma", "--contours", "3", "--exaggeration", "2.5"],
            "acc": ["--accuracy"]}
    for name, args in runs.items():
        done = run_cli("fastland.viz", [str(surface), "--out-prefix", f"{name}/", *size, *args], tmp_path)
        assert done.returncode == 0 and not done.stderr, done.stderr
    for suffix in ("_3d.png", "_3d_log.png", "_map.png"):
        plain, styled = image(tmp_path / "plain" / f"s{suffix}"), image(tmp_path / "styled" / f"s{suffix}")
        assert plain.shape == styled.shape == (200, 320, 3)
        assert np.abs(plain.astype(int) - styled).mean() > 5, suffix  # each option changed the picture
    # The web scene follows them too: a box 2.5 times as high.
    heights = {name: cube_axes(scene_json(tmp_path / name / "s.html"))["dataBounds"][5] for name in ("plain", "styled")}
    assert heights["styled"] == pytest.approx(2.5 * heights["plain"])
    assert sorted(p.name for p in (tmp_path / "acc").iterdir()) == ["s.gltf", "s.html", "s.vts", "s_3d.png", "s_map.png"]
    assert np.abs(image(tmp_path / "acc" / "s_3d.png").astype(int) - image(tmp_path / "plain" / "s_3d.png")).mean() > 5


def test_cli_display_without_an_x_server_writes_the_offscreen_outputs(render, tmp_path: Path) -> None:
    surface = write_surface(tmp_path / "s.h5", n=21)
    display = f":{free_display()}"
    done = run_cli("fastland.viz", [str(surface), "--size", "320x200"], tmp_path, {"DISPLAY": display})
    assert done.returncode == 0
    assert done.stderr.strip() == f"no display (no X server answers at DISPLAY={display}): writing the offscreen " \
                                  "outputs instead"
    assert sorted(p.name for p in written(done, tmp_path)) == sorted(
        ["s_3d.png", "s_3d_log.png", "s_map.png", "s.vts", "s.html", "s.gltf"])
    assert n_colours(image(tmp_path / "s_3d.png")) > 500


def test_cli_screenshot_into_a_folder_or_without_a_suffix_says_the_real_path(render, bowl: Path, tmp_path: Path) -> None:
    (tmp_path / "vz").mkdir()
    for target, real in (("vz", "vz/bowl_3d.png"), ("shot", "shot.png")):
        done = run_cli("fastland.viz", [str(bowl), "--screenshot", target, "--size", "200x120"], tmp_path)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == f"wrote {real}"
        assert image(tmp_path / real).shape == (120, 200, 3)
    assert not (tmp_path / "vz.png").exists()


def test_a_surface_too_large_for_the_memory_is_refused_before_drawing(bowl: Path, tmp_path: Path, monkeypatch,
                                                                      capsys) -> None:
    monkeypatch.setattr(prepare, "BYTES_PER_POINT", 10**12)  # as if the grid had a billion times more points
    with pytest.raises(SystemExit) as exit_:
        main([str(bowl), "--map", str(tmp_path / "m.png")])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and "drawing 1,681 points needs about" in err and "\n" not in err, err
    assert not (tmp_path / "m.png").exists()


def test_outputs_never_replace_a_device_or_pipe(tmp_path: Path) -> None:
    from fastland.viz import outputs

    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(UserError, match="not a regular file"):
        outputs.write_bytes(tmp_path / "pipe", b"picture")
    assert (tmp_path / "pipe").is_fifo() and sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]


def test_blank_render_is_refused_not_saved(render, tmp_path: Path) -> None:
    plotter = render.new_plotter((64, 64), off_screen=True)  # nothing drawn: one flat colour, as an oversized window gives
    with pytest.raises(UserError, match="blank"):
        render._save(plotter, tmp_path / "blank.png")
    assert not (tmp_path / "blank.png").exists()


def complete(path: Path) -> bool:
    """Whether an output file is whole: an image that decodes, a page that ends, a glTF or VTS that parses."""
    if path.suffix == ".png":
        return n_colours(image(path)) > 10
    text = path.read_text()
    if path.suffix == ".gltf":
        return bool(json.loads(text)["meshes"])
    return text.rstrip().endswith("</html>" if path.suffix == ".html" else "</VTKFile>")


def test_full_disk_names_the_file_and_keeps_what_was_written(render, bowl: Path, tmp_path: Path, small_disk: Path) -> None:
    names = ["x_3d.png", "x_3d_log.png", "x_map.png", "x.vts", "x.html", "x.gltf"]
    for name in names:  # an earlier run's outputs: each must survive whole, old or new
        (small_disk / name).write_bytes(f"old {name}".encode())
    done = run_cli("fastland.viz", [str(bowl), "--out-prefix", str(small_disk / "x"), "--size", "200x120",
                                    "--contours", "0"], tmp_path)
    line = one_error_line(done, "the disk is full")
    new = {p.name for p in written(done, tmp_path)}
    failed = next(name for name in names if str(small_disk / name) in line)
    assert new and failed not in new
    for name in names:
        if name in new:
            assert complete(small_disk / name), name
        else:  # not reached, or failed part-way: the previous file, untouched
            assert (small_disk / name).read_bytes() == f"old {name}".encode()
    assert sorted(p.name for p in small_disk.iterdir()) == sorted(names)  # no temporary files left behind

    (small_disk / "x.png").write_bytes(b"old screenshot")
    done = run_cli("fastland.viz", [str(bowl), "--screenshot", str(small_disk / "x.png"), "--size", "640x480"], tmp_path)
    one_error_line(done, f"{small_disk / 'x.png'}: the disk is full")
    assert (small_disk / "x.png").read_bytes() == b"old screenshot"


def without_accuracy(surface: surfacefile.Surface) -> surfacefile.Surface:
    """The same surface as a regression loss gives it: no accuracy."""
    fields = {f.name for f in dataclasses.fields(surface)}
    return dataclasses.replace(surface, **({"metrics": {}} if "metrics" in fields else {"acc": None}))


def test_accuracy_is_optional(render, tmp_path: Path) -> None:
    """A regression loss records no accuracy (``Surface.acc`` is None): loss-only pictures, and a clear error for it."""
    two = without_accuracy(surfacefile.read(write_surface(tmp_path / "two.h5", n=21)))
    one = without_accuracy(surfacefile.read(write_surface(tmp_path / "one.h5", dim=1)))
    assert two.acc is None and one.acc is None
    with pytest.raises(UserError, match="records no accuracy"):
        prepare.scaled(two, "acc")
    with pytest.raises(UserError, match="records no accuracy"):
        render.screenshot(two, tmp_path / "acc.png", render.View(quantity="acc"), size=SMALL)
    assert n_colours(image(plots.line_png(one, tmp_path / "line.png"))) > 20
    written_ = render.render_outputs(two, tmp_path / "out" / "two", size=SMALL)
    assert len(written_) == 6 and all(p.stat().st_size > 1000 for p in written_)
    import pyvista as pv

    assert "acc" not in pv.read(tmp_path / "out" / "two.vts").point_data


def test_cli_accuracy_on_a_file_without_one_is_one_line(tmp_path: Path) -> None:
    path = write_surface(tmp_path / "reg.h5", n=11)
    with h5py.File(path, "r+") as f:
        del f["train_acc"]
    try:
        if surfacefile.read(path).acc is not None:
            pytest.skip("this surfacefile still records an accuracy for every surface")
    except UserError:
        pytest.skip("this surfacefile cannot read a surface without accuracy yet")
    one_error_line(run_cli("fastland.viz", [str(path), "--accuracy", "--map", "m.png"], tmp_path), "records no accuracy")
    assert not (tmp_path / "m.png").exists()


# --- the web page (vtk.js), read back and opened in a real browser ---------------------------

def scene_json(page: Path) -> dict:
    """The vtk.js scene inside an exported page: the zip in its base64 string, ``index.json``."""
    text = page.read_text()
    data = re.search(r'base64Str = "([A-Za-z0-9+/=]+)"', text).group(1)
    with zipfile.ZipFile(io.BytesIO(base64.b64decode(data))) as z:
        return json.loads(z.read("index.json"))


def scene_objects(obj: dict) -> Iterator[dict]:
    """Every object of a vtk.js scene, depth first."""
    yield obj
    for child in obj.get("dependencies", []):
        yield from scene_objects(child)


def cube_axes(scene: dict) -> dict:
    return next(o for o in scene_objects(scene["scene"]) if o.get("type") == "vtkCubeAxesActor")["properties"]


def page_ticks(page: Path) -> dict:
    """What the page's script tells vtk.js to label its axes and colour bar with."""
    return json.loads(re.search(r"const want = (\{.*?\});", page.read_text()).group(1))


@pytest.fixture(scope="module")
def web_page(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("pyvista")
    from fastland.viz import render

    out = tmp_path_factory.mktemp("web")
    surface = write_surface(out / "s.h5", warning="synthetic data, not CIFAR-10")
    return render.export_scene(surface, out / "s")[0]


def test_web_page_labels_losses_and_carries_the_title_and_warning(web_page: Path) -> None:
    surface = surfacefile.read(web_page.with_suffix(".h5"))
    s = prepare.scaled(surface, log=True)  # the loss spans decades: the page is on a log scale
    want = page_ticks(web_page)
    assert want["labels"][2] == [t for _, t in prepare.ticks(*s.clim, log=True)] == ["0.1", "1", "10", "100"]
    assert want["bar_labels"] == ["0.1", "1", "10", "100"] and want["bar"] == pytest.approx([-1, 0, 1, 2])
    assert want["titles"] == ["α", "β", "train loss (log scale)"] and want["bar_title"] == "train loss (log scale)"
    top = cube_axes(scene_json(web_page))["dataBounds"][5]  # heights run 0..top, labelled with the losses above
    assert want["ticks"][2][0] > 0 and want["ticks"][2][-1] < top
    text = web_page.read_text()
    assert "WARNING: synthetic data, not CIFAR-10" in text and "lenet  ·  train split  ·  41×41 grid" in text
    assert "3 points diverged (1 NaN, 2 inf)" in text and "<title>lenet" in text


def chromium() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


@pytest.mark.skipif(chromium() is None, reason="needs Chromium (apt-get install chromium)")
def test_web_page_in_a_real_browser_shows_the_surface_and_its_labels(web_page: Path, tmp_path: Path) -> None:
    flags = [chromium(), "--headless=new", "--no-sandbox", "--use-gl=swiftshader", "--enable-unsafe-swiftshader",
             "--window-size=1600,1000", "--virtual-time-budget=20000", f"--user-data-dir={tmp_path / 'profile'}"]
    shot = tmp_path / "page.png"
    done = subprocess.run([*flags, f"--screenshot={shot}", "--dump-dom", web_page.as_uri()], capture_output=True,
                          text=True, timeout=180)
    img = image(shot)
    h, w = img.shape[:2]
    assert n_colours(img) > 1000  # not blank
    assert coloured(img[h // 4: 3 * h // 4, w // 4: 3 * w // 4]).mean() > 0.3  # the surface fills the middle
    red = img[: h // 8, : w // 3].astype(int)
    assert ((red[..., 0] > 110) & (red[..., 1] < 40) & (red[..., 2] < 40)).sum() > 200  # the warning, in dark red
    # The page's script ran in the browser and relabelled vtk.js's axes and colour bar in losses.
    assert 'data-ticks="0.1 1 10 100 | 0.1 1 10 100"' in done.stdout
