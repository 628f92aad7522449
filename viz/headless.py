"""Offscreen rendering without a display: VTK draws through EGL (Mesa llvmpipe on a CPU).

VTK picks its window class when it creates a render window. Without an X server the default
(X11) attempt fails, so ``ensure_offscreen`` must run before PyVista makes a plotter;
``fastland.viz.render.new_plotter`` calls it every time. This module imports neither VTK nor
PyVista.
"""

from __future__ import annotations

import ctypes.util
import os
import sys

from fastland.errors import UserError

EGL_PACKAGES = "libegl1 libegl-mesa0 libgl1-mesa-dri"


def has_display() -> bool:
    """Whether an interactive window can open: always on macOS and Windows, on Linux only with X or Wayland."""
    if not sys.platform.startswith("linux"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def ensure_offscreen() -> None:
    """Without a display, make VTK render offscreen through EGL, or say which packages are missing."""
    if has_display():
        return
    if ctypes.util.find_library("EGL") is None:
        raise UserError(f"no display and no EGL library for offscreen rendering; install it: apt-get install {EGL_PACKAGES}")
    os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")
