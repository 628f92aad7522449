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

import errno
import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from fastland.errors import UserError, os_error

# What PIL writes from a VTK screenshot (PyVista's list), and PIL's name for each.
SCREENSHOT_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF"}
SCREENSHOT_TYPES = tuple(SCREENSHOT_FORMATS)
# Pictures' largest side. OpenGL draws at most 16384 pixels on a side on most GPUs and in Mesa, and
# VTK's anti-aliasing pass (SSAA) draws at sqrt(5) times the picture's size: past 7327, the picture
# comes back blank; far past it, VTK aborts allocating it.
MAX_SIDE = 7000
# The folder checks below say this for a path the kernel refuses without a clearer errno.
_WHY = {errno.ENOENT: "this folder does not accept new files", errno.ENOTDIR: "a part of the path is a file, not a folder"}


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


def check_writable(path: Path, option: str, shown: str | None = None) -> None:
    """Fail now, in one line, if ``path`` could not be written later (``shown``: how the user wrote it).

    Creates the missing folders above it (the render would create them anyway) and a probe
    file in its folder, so a read-only or special file system (``/proc``) is found out too.
    """
    shown = shown or str(path)
    if path.is_dir():
        raise UserError(f"{option} {shown} is a folder; give a file name")
    if path.exists() and not path.is_file():
        raise UserError(f"{option} {shown} exists and is not a regular file; choose another path")
    folder = path.parent
    above = folder
    while not above.exists() and above != above.parent:
        above = above.parent
    if not above.is_dir():
        raise UserError(f"{option} {shown}: {above} is a file, not a folder; choose another path")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".fastland-write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        why = _WHY.get(err.errno or -1, (err.strerror or str(err)).lower())
        raise UserError(f"{option} {shown} cannot be written: {why}; choose another path") from None


@contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """A temporary file beside ``path`` that replaces it when the block succeeds.

    On any failure the temporary file is removed and ``path`` is left as it was; a
    file-system error (a full disk...) becomes one line naming ``path``.
    """
    path = Path(os.path.realpath(path))  # through a link, replace the file it points to, not the link
    if path.exists() and not path.is_file():  # never swap a device, pipe or folder for a picture
        raise UserError(f"{path} exists and is not a regular file; choose another path")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as err:
        raise os_error(err, str(path)) from None
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path: str | Path, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` whole or not at all (see ``replacing``)."""
    with replacing(path) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)
    return Path(path)
