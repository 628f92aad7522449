"""Offscreen rendering without a display: VTK draws through EGL (Mesa llvmpipe on a CPU).

VTK picks its window class when it creates a render window. Without an X server the default
(X11) attempt fails, so ``ensure_offscreen`` must run before PyVista makes a plotter;
``fastland.viz.render.new_plotter`` calls it every time. A ``DISPLAY`` with no X server
behind it (a closed ssh -X session, a stopped Xvfb) counts as no display: ``has_display``
asks the server itself. This module imports neither VTK nor PyVista.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import importlib.util
import os
import sys
import threading

from fastland.errors import UserError

EGL_PACKAGES = "libegl1 libegl-mesa0 libgl1-mesa-dri"
# An X server on a dead network address can make XOpenDisplay wait for a TCP timeout.
X_TIMEOUT_S = 3.0


@functools.cache
def x_server_answers(display: str) -> bool:
    """Whether an X server accepts a connection at ``display`` (asked through libX11, as VTK would)."""
    name = ctypes.util.find_library("X11")
    if name is None:
        return False  # VTK could not open an X window either
    x11 = ctypes.CDLL(name)
    x11.XOpenDisplay.argtypes, x11.XOpenDisplay.restype = [ctypes.c_char_p], ctypes.c_void_p
    x11.XCloseDisplay.argtypes = [ctypes.c_void_p]
    answer: list[bool] = []

    def ask() -> None:
        connection = x11.XOpenDisplay(display.encode())
        answer.append(bool(connection))
        if connection:
            x11.XCloseDisplay(connection)

    thread = threading.Thread(target=ask, daemon=True)
    thread.start()
    thread.join(X_TIMEOUT_S)
    return bool(answer and answer[0])


def has_display() -> bool:
    """Whether an interactive window can open: always on macOS and Windows; on Linux, when the X server
    named by ``DISPLAY`` answers (VTK's windows are X windows; Wayland sessions provide one through XWayland)."""
    if not sys.platform.startswith("linux"):
        return True
    display = os.environ.get("DISPLAY", "")
    return bool(display) and x_server_answers(display)


def why_no_display() -> str:
    """Why ``has_display`` is False, for the one line that says the offscreen outputs are written instead."""
    display = os.environ.get("DISPLAY", "")
    if not display:
        return "no display (DISPLAY is not set)"
    return f"no display (no X server answers at DISPLAY={display})"


def load_triton_first() -> None:
    """Import Triton (when installed) before the first render: Mesa's llvmpipe loads its own LLVM, and
    Triton's LLVM loaded after it crashes the process (a segfault in ``import triton``, which torch's
    optimizers trigger too), so a session that renders and then trains would die. The other order is safe."""
    if "triton" not in sys.modules and importlib.util.find_spec("triton") is not None:
        try:
            import triton  # noqa: F401
        except Exception:  # noqa: BLE001 - a broken Triton is the kernels' problem, not the renderer's
            pass


def ensure_offscreen() -> None:
    """Without a display, make VTK render offscreen through EGL, or say which packages are missing."""
    load_triton_first()
    if has_display():
        return
    if ctypes.util.find_library("EGL") is None:
        raise UserError(f"no display and no EGL library for offscreen rendering; install it: apt-get install {EGL_PACKAGES}")
    os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")
