"""``python -m fastland.viz``: look at surface files, interactively or as files.

    python -m fastland.viz SURFACE.h5                      interactive 3-D viewer
    python -m fastland.viz SURFACE.h5 --screenshot out.png one 3-D PNG, no window
    python -m fastland.viz SURFACE.h5 --out-prefix out/x   every offscreen output (PNG, map, .vts, .html, .gltf)
    python -m fastland.viz A.h5 --compare B.h5             side by side, linked cameras, one colour scale

Without a display the viewer cannot open; it says so and writes the offscreen outputs instead.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fastland.errors import ArgumentParser, UserError, cli_entry
from fastland.surfacefile import Surface, read

from .headless import has_display


def _size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 1920x1080, not {text!r}") from None
    if width < 64 or height < 64:
        raise argparse.ArgumentTypeError(f"size {text} is too small (at least 64x64)")
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
    scale.add_argument("--shared-scale", dest="shared", action="store_true", default=True,
                       help="compare on one colour and height scale, so a flatter surface looks flatter (the default)")
    scale.add_argument("--per-panel-scale", dest="shared", action="store_false",
                       help="compare with each panel scaled to its own range, to see each one's shape")
    p.add_argument("--screenshot", metavar="PATH", type=Path,
                   help="write one anti-aliased 3-D PNG (the comparison with --compare; a line plot for a 1-D "
                        "surface) and exit, without a window")
    p.add_argument("--out-prefix", metavar="PREFIX",
                   help="write every offscreen output as PREFIX_3d.png, PREFIX_3d_log.png, PREFIX_map.png, "
                        "PREFIX.vts, PREFIX.html, PREFIX.gltf (1-D: PREFIX_1d.png, PREFIX_1d_log.png) and exit; "
                        "the default prefix, used without a display, is the surface path without .h5")
    p.add_argument("--log", action="store_true", help="log scale for the loss (in the viewer: the check box starts on)")
    p.add_argument("--accuracy", action="store_true", help="show accuracy instead of loss")
    p.add_argument("--cmap", default="viridis", help="matplotlib colour map name (default: viridis)")
    p.add_argument("--contours", type=int, default=12, help="number of contour lines (default: 12)")
    p.add_argument("--exaggeration", type=float, default=1.0, help="height exaggeration; at 1 the box is half as high as wide (default: 1)")
    p.add_argument("--size", type=_size, default=(1920, 1080), metavar="WxH", help="image size in pixels (default: 1920x1080)")
    return p


def _prefix(surface: Surface) -> str:
    return str(surface.path.with_suffix(""))


@cli_entry
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    paths = ([args.surface] if args.surface else []) + args.compare
    if not paths:
        raise UserError("give a surface file (python -m fastland.viz SURFACE.h5), or --compare A.h5 B.h5")
    if args.contours < 0 or args.exaggeration <= 0:
        raise UserError("--contours must be >= 0 and --exaggeration > 0")
    surfaces = [read(p) for p in paths]  # a clear error for a missing or foreign file, before any window

    import matplotlib

    if args.cmap not in matplotlib.colormaps:
        raise UserError(f"unknown colour map {args.cmap!r}; try viridis, plasma, cividis, magma or coolwarm")

    from . import render  # PyVista: imported only now, so --help and errors stay fast

    view = render.View(quantity="acc" if args.accuracy else "loss", log=args.log, exaggeration=args.exaggeration,
                       contours=args.contours, cmap=args.cmap)
    compare = len(surfaces) > 1
    if compare and any(s.dim != 2 for s in surfaces):
        raise UserError("--compare needs 2-D surfaces")

    if args.screenshot:
        if compare:
            out = render.compare(surfaces, args.screenshot, shared=args.shared, view=view, size=args.size)
        else:
            out = render.screenshot(surfaces[0], args.screenshot, view=view, size=args.size)
        print(f"wrote {out}")
        return

    if args.out_prefix is None and has_display() and surfaces[0].dim == 2:
        if compare:
            render.comparison_plotter(surfaces, args.shared, view, off_screen=False).show()
        else:
            from .viewer import Viewer

            Viewer(surfaces[0], view).show()
        return

    if args.out_prefix is None:
        why = "no display (DISPLAY is not set)" if not has_display() else "1-D surfaces have no 3-D viewer"
        print(f"{why}: writing the offscreen outputs instead", file=sys.stderr)
    prefix = args.out_prefix or _prefix(surfaces[0])
    if compare:
        written = [render.compare(surfaces, prefix + "_compare.png", shared=args.shared, view=view, size=args.size)]
    else:
        written = render.render_outputs(surfaces[0].path, prefix, size=args.size)
    for path in written:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
