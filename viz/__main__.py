"""``python -m fastland.viz``: look at surface files, interactively or as files.

    python -m fastland.viz SURFACE.h5                      interactive 3-D viewer
    python -m fastland.viz SURFACE.h5 --screenshot out.png one 3-D PNG, no window
    python -m fastland.viz SURFACE.h5 --out-prefix out/x   every offscreen output (PNG, map, .vts, .html, .gltf)
    python -m fastland.viz SURFACE.h5 --map map.png        the top-down contour map (matplotlib; no PyVista needed)
    python -m fastland.viz A.h5 --compare B.h5             side by side, linked cameras, one colour scale

Without a display the viewer cannot open; it says so and writes the offscreen outputs instead.
Every option is checked, and every output path tried, before anything is rendered.
"""

from __future__ import annotations

import argparse
import math
import sys
from types import ModuleType

from fastland.errors import ArgumentParser, UserError, cli_entry, one_line
from fastland.surfacefile import Surface, read

from .headless import has_display, why_no_display
from .outputs import MAX_SIDE, SCREENSHOT_TYPES, check_size, figure_types, image_path, prefix_path
from .prepare import View, check_memory, scaled

EXAGGERATION = (0.01, 100.0)
MAX_CONTOURS = 100
DEFAULTS = {"cmap": "viridis", "contours": 12, "exaggeration": 1.0}


def _size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
        check_size((width, height))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 1920x1080, not {text!r}") from None
    except UserError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return width, height


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m fastland.viz",
        description="Render loss-surface files written by `python -m fastland.surface`: an interactive 3-D "
                    "viewer, or PNG/VTS/HTML/glTF files. Without a display, the offscreen outputs are written.",
        epilog=__doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("surface", nargs="?", metavar="SURFACE.h5", help="the surface file to show")
    p.add_argument("--compare", nargs="+", metavar="FILE.h5", default=[],
                   help="show these surfaces side by side (after SURFACE.h5, if given) with linked cameras")
    scale = p.add_mutually_exclusive_group()
    scale.add_argument("--shared-scale", dest="shared", action="store_true", default=None,
                       help="compare on one colour and height scale, so a flatter surface looks flatter (the default)")
    scale.add_argument("--per-panel-scale", dest="shared", action="store_false",
                       help="compare with each panel scaled to its own range, to see each one's shape")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--screenshot", metavar="PATH",
                     help=f"write one anti-aliased 3-D picture ({', '.join(SCREENSHOT_TYPES)}; the comparison with "
                          "--compare; a matplotlib line plot for a 1-D surface) and exit, without a window; a folder "
                          "gets SURFACE_3d.png inside it")
    out.add_argument("--out-prefix", metavar="PREFIX",
                     help="write every offscreen output as PREFIX_3d.png, PREFIX_3d_log.png, PREFIX_map.png, "
                          "PREFIX.vts, PREFIX.html, PREFIX.gltf (with --accuracy, no _3d_log.png; 1-D: PREFIX_1d.png, "
                          "PREFIX_1d_log.png; with --compare: PREFIX_compare.png) and exit; a folder gets them named "
                          "after the surface; the default, used without a display, is the surface path without .h5")
    out.add_argument("--map", metavar="PATH",
                     help="write the top-down contour map of a 2-D surface (matplotlib: png, pdf, svg, ...; needs no "
                          "PyVista) and exit")
    p.add_argument("--log", action="store_true",
                   help="log scale for the loss (in the viewer: the check box starts on; --out-prefix writes both scales)")
    p.add_argument("--accuracy", action="store_true", help="show accuracy instead of loss (files that record one)")
    p.add_argument("--cmap", help="matplotlib colour map name (default: viridis)")
    p.add_argument("--contours", type=int,
                   help=f"number of contour lines, 0 to {MAX_CONTOURS} (default: 12)")
    p.add_argument("--exaggeration", type=float,
                   help=f"height exaggeration, {EXAGGERATION[0]:g} to {EXAGGERATION[1]:g}; at 1 the box is half as high "
                        "as wide (default: 1)")
    p.add_argument("--size", type=_size, metavar="WxH",
                   help=f"picture size in pixels, 64 to {MAX_SIDE} on a side (default: 1920x1080 in 3-D; the "
                        "matplotlib plots keep their own size unless this is given)")
    return p


def _render() -> ModuleType:
    """``fastland.viz.render``, or one line saying that PyVista is missing (the GPU machines have none)."""
    try:
        from . import render
    except ImportError as err:
        raise UserError(f"3-D pictures need PyVista, which cannot be imported here ({one_line(err)}); install it "
                        "(pip install 'fastland[viz]'), or write the 2-D contour map with --map PATH") from None
    return render


def check_options(args: argparse.Namespace) -> tuple[View, list[str]]:
    """Every option that needs no file, checked before anything is read: the view they ask for, and
    which of its options were given rather than left at their defaults."""
    given = {k for k in DEFAULTS if getattr(args, k) is not None}
    for key, value in DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    lo, hi = EXAGGERATION
    if not (math.isfinite(args.exaggeration) and lo <= args.exaggeration <= hi):
        raise UserError(f"--exaggeration must be a number from {lo:g} to {hi:g}, not {args.exaggeration:g}")
    if not 0 <= args.contours <= MAX_CONTOURS:
        raise UserError(f"--contours must be from 0 to {MAX_CONTOURS}, not {args.contours}")
    import matplotlib

    if args.cmap not in matplotlib.colormaps:
        raise UserError(f"unknown colour map {args.cmap!r}; try viridis, plasma, cividis, magma or coolwarm")
    if args.log and args.accuracy:
        raise UserError("--log applies to the loss only; drop it with --accuracy")
    view = View(quantity="acc" if args.accuracy else "loss", log=args.log, exaggeration=args.exaggeration,
                contours=args.contours, cmap=args.cmap)
    return view, sorted(given)


def check_surfaces(surfaces: list[Surface], view: View, args: argparse.Namespace, given: list[str]) -> None:
    """What the files allow: something to draw, an accuracy when asked for, 2-D where needed."""
    for s in surfaces:
        scaled(s, view.quantity, view.log)  # one line for an empty file, or for --accuracy on a file without one
    check_memory(surfaces)
    compare = len(surfaces) > 1
    if compare and any(s.dim != 2 for s in surfaces):
        raise UserError("--compare needs 2-D surfaces; plot 1-D surfaces one at a time")
    if args.shared is not None and not compare:
        raise UserError("--shared-scale and --per-panel-scale set how compared panels are scaled; use them with --compare")
    if args.map and (compare or surfaces[0].dim != 2):
        raise UserError("--map draws one 2-D surface; for a 1-D one, --screenshot writes its line plot")
    if surfaces[0].dim == 1 and given:
        flags = ", ".join(f"--{k}" for k in given)
        verb = "does" if len(given) == 1 else "do"
        print(f"warning: {flags} {verb} not apply to the line plot of a 1-D surface", file=sys.stderr)


def _stem(surface: Surface) -> str:
    return surface.path.with_suffix("").name


@cli_entry
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    paths = ([args.surface] if args.surface else []) + args.compare
    if not paths:
        raise UserError("give a surface file (python -m fastland.viz SURFACE.h5), or --compare A.h5 B.h5")
    view, given = check_options(args)
    surfaces = [read(p) for p in paths]  # a clear error for a missing or foreign file, before any window
    check_surfaces(surfaces, view, args, given)
    first, compare, shared = surfaces[0], len(surfaces) > 1, args.shared is not False
    one_d = first.dim == 1 and not compare

    if args.map:
        from .plots import contour_png

        out = image_path(args.map, "--map", figure_types(), f"{_stem(first)}_map.png")
        contour_png(first, out, log=True if view.log else None, quantity=view.quantity, cmap=view.cmap,
                    contours=view.contours, size=args.size)
        print(f"wrote {out}")
        return

    if args.screenshot:
        kind = "_compare" if compare else "_1d" if one_d else "_3d"
        out = image_path(args.screenshot, "--screenshot", figure_types() if one_d else SCREENSHOT_TYPES,
                         f"{_stem(first)}{kind}.png")
        if one_d:
            from .plots import line_png

            line_png(first, out, log=view.log, size=args.size)
        elif compare:
            _render().compare(surfaces, out, shared=shared, view=view, size=args.size)
        else:
            _render().screenshot(first, out, view=view, size=args.size)
        print(f"wrote {out}")
        return

    if args.out_prefix is None and not one_d:
        render = _render()
        if has_display():
            if compare:
                render.comparison_plotter(surfaces, shared, view, size=args.size or render.SIZE, off_screen=False).show()
            else:
                from .viewer import SIZE, Viewer

                Viewer(first, view, size=args.size or SIZE).show()
            return
    if args.out_prefix is None:
        why = "1-D surfaces have no 3-D viewer" if one_d else why_no_display()
        print(f"{why}: writing the offscreen outputs instead", file=sys.stderr)
    option = "--out-prefix" if args.out_prefix else "the default --out-prefix"
    prefix = prefix_path(args.out_prefix or str(first.path.with_suffix("")), option, _stem(first))
    if compare:
        out = image_path(prefix + "_compare.png", option, SCREENSHOT_TYPES, "")
        print(f"wrote {_render().compare(surfaces, out, shared=shared, view=view, size=args.size)}")
        return
    if one_d:
        from .plots import line_outputs

        written = line_outputs(first, prefix, args.size)
    else:
        written = _render().iter_outputs(first, prefix, view, args.size)
    for path in written:  # each line as its file is complete: after a failure, these files are kept
        print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()
