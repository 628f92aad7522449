"""Output files of the renderers: checked before any rendering, then written whole or not at all.

A render can take minutes and an image is worthless half-written, so every output path is
checked first (a supported image type, a folder that exists or can be made, a file system
that accepts files), and every file is written to a temporary name beside it that replaces
the real name only once complete. A full disk then leaves the files finished before it, and
any earlier version of the file being written, as they were. VTK's own writers report a
failed write only in its log, so the renderers hand their bytes to ``replacing`` instead.

This module imports neither PyVista nor VTK (``fastland.trainplots`` uses it too).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from fastland.errors import UserError
from fastland.files import check_writable, replacing, write_bytes  # noqa: F401 (the renderers' way in)

# What PIL writes from a VTK screenshot (PyVista's list), and PIL's name for each.
SCREENSHOT_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF"}
SCREENSHOT_TYPES = tuple(SCREENSHOT_FORMATS)
# Pictures' largest side. OpenGL draws at most 16384 pixels on a side on most GPUs and in Mesa, and
# VTK's anti-aliasing pass (SSAA) draws at sqrt(5) times the picture's size: past 7327, the picture
# comes back blank; far past it, VTK aborts allocating it.
MAX_SIDE = 7000


def check_size(size: tuple[int, int]) -> None:
    """Refuse a picture outside 64 to ``MAX_SIDE`` pixels on a side (too large: it would come back blank, or abort)."""
    width, height = size
    if min(size) < 64:
        raise UserError(f"size {width}x{height} is too small (at least 64x64)")
    if max(size) > MAX_SIDE:
        raise UserError(f"size {width}x{height} is too large: at most {MAX_SIDE} pixels on a side (OpenGL draws at "
                        "most 16384, and anti-aliasing renders at 2.24 times the size)")


def figure_types() -> tuple[str, ...]:
    """The file types matplotlib writes (png, pdf, svg, jpg, ...), as suffixes."""
    from matplotlib.figure import Figure

    return tuple(f".{t}" for t in sorted(Figure().canvas.get_supported_filetypes()))


def image_path(path: str | Path, option: str, types: Sequence[str], default_name: str) -> Path:
    """Where an image given as ``option PATH`` goes, checked for writing.

    A folder (existing, or written with a trailing slash) gets ``default_name`` inside it; a
    name without a suffix gets ``.png``; a suffix outside ``types`` is refused.
    """
    text = str(path)
    out = Path(text).expanduser()
    if text.endswith(("/", os.sep)) or out.is_dir():
        out = out / default_name
    elif not out.suffix:
        out = out.with_suffix(".png")
    if out.suffix.lower() not in types:
        raise UserError(f"{option} {text}: cannot write {out.suffix} files; use one of {', '.join(types)}")
    check_writable(out, option)
    return out


def prefix_path(prefix: str | Path, option: str, default_name: str) -> str:
    """Where outputs named ``PREFIX_3d.png``, ``PREFIX.html``... go, checked for writing.

    An existing folder (or one written with a trailing slash) gets outputs named ``default_name``.
    """
    text = str(prefix)
    out = Path(text).expanduser()
    if text.endswith(("/", os.sep)) or out.is_dir():
        out = out / default_name
    check_writable(out.with_name(out.name + "_3d.png"), option, shown=text)
    return str(out)
