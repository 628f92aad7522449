"""User-facing errors: one clear line and a non-zero exit, never a traceback.

This is the single place that decides what counts as a user error and how it prints:

- ``UserError``: a mistake the user can fix; ``error: <message>``, exit 2.
- ``OSError`` from the file system (disk full, read-only, permission denied, quota), and
  HDF5's ``RuntimeError`` for a failed write, which carries the errno in its text: the user's
  to fix too; one line naming the file, exit 2 (``write_error`` for callers that know the file).
- Ctrl-C: one line saying that progress is saved, exit 130.
- Anything else is a bug: one line with the exception, and the full traceback saved to a
  file whose path the line gives; exit 1.

Every CLI's ``main`` is wrapped in ``cli_entry``; every CLI parser is ``ArgumentParser``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import errno
import functools
import gc
import os
import re
import sys
import tempfile
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

F = TypeVar("F", bound=Callable[..., object])

EXIT_USER_ERROR = 2
EXIT_BUG = 1
EXIT_INTERRUPTED = 130

# File-system conditions a user fixes (free space, permissions), not bugs.
_FS_ERRNOS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOENT: "no such file or folder",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "it is a folder, not a file",
    errno.EEXIST: "it already exists",
}


class UserError(Exception):
    """A mistake the user can fix: the message says what was wrong and what to do."""


def one_line(text: object) -> str:
    """``text`` with its lines joined, so an error never spans several lines."""
    return " ".join(str(text).split())


def describe_os_error(err: OSError, what: str | None = None) -> str:
    """One line for a file-system error: which file, what happened, what to do."""
    name = what or err.filename or "a file"
    reason = _FS_ERRNOS.get(err.errno or -1, one_line(err.strerror or err))
    advice = {errno.ENOSPC: "free some space and run the same command again (finished work is kept)",
              errno.EDQUOT: "free some space and run the same command again (finished work is kept)",
              errno.EROFS: "choose a writable --out", errno.EACCES: "choose a writable --out",
              errno.EPERM: "choose a writable --out"}.get(err.errno or -1, "check the path")
    return f"cannot write or read {name}: {reason}; {advice}"


def os_error(err: OSError, what: str | None = None) -> UserError:
    """A ``UserError`` for a file-system error (see ``describe_os_error``)."""
    return UserError(describe_os_error(err, what))


# HDF5 reports a failed write(2) as a RuntimeError whose text (over two lines: it embeds a ctime)
# holds "filename = '...', ... errno = 28, error message = '...'".
_HDF5_ERRNO = re.compile(r"errno = (\d+)")
_HDF5_FILE = re.compile(r"filename = '([^']*)'")


def file_system_error(err: BaseException) -> OSError | None:
    """``err`` as an ``OSError`` with its errno when it is a file-system failure (an HDF5 write
    error included); None otherwise."""
    if isinstance(err, OSError) and err.errno in _FS_ERRNOS:
        return err
    if isinstance(err, OSError | RuntimeError) and (m := _HDF5_ERRNO.search(str(err))):
        code = int(m.group(1))
        if code in _FS_ERRNOS:
            name = _HDF5_FILE.search(str(err))
            return OSError(code, os.strerror(code), name.group(1) if name else None)
    return None


def write_error(err: BaseException, path: object) -> UserError | None:
    """One line for a failure to write ``path`` (a full disk...), or None if ``err`` is not a file-system error."""
    fs = file_system_error(err)
    return os_error(fs, str(path)) if fs is not None else None


def _from_h5py(obj: object, tb: object) -> bool:
    return "h5py" in repr(obj) or "h5py" in "".join(traceback.format_tb(tb))  # type: ignore[arg-type]


def _quiet_unraisable(info: sys.UnraisableHookArgs) -> None:
    """h5py objects freed after a failed write complain from ``__dealloc__`` (a traceback on stderr,
    through ``sys.excepthook`` and then ``sys.unraisablehook``, that no one can act on); the failure
    itself is reported in one line."""
    if not _from_h5py(info.object, info.exc_traceback):
        sys.__unraisablehook__(info)


def _quiet_excepthook(kind: type[BaseException], value: BaseException, tb: object) -> None:
    if not _from_h5py(value, tb):
        sys.__excepthook__(kind, value, tb)  # type: ignore[arg-type]


@contextlib.contextmanager
def quiet_h5py_dealloc() -> Iterator[None]:
    """Mute h5py's ``__dealloc__`` tracebacks while a failing HDF5 file is written and freed (see
    ``_quiet_unraisable``); every CLI has them muted (``cli_entry``)."""
    hooks = sys.unraisablehook, sys.excepthook
    sys.unraisablehook, sys.excepthook = _quiet_unraisable, _quiet_excepthook
    try:
        yield
        gc.collect()  # free the failed file's objects now, while muted
    finally:
        sys.unraisablehook, sys.excepthook = hooks


def say(text: str) -> None:
    """Print ``text`` and its newline to stderr in one ``write``: under torchrun every rank shares the
    stream, and ``print``'s separate write of the newline lets two ranks' lines run together."""
    try:
        sys.stderr.write(text + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):  # a closed or broken stderr: nothing more can be said
        pass


def _one_line_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                      file: object = None, line: str | None = None) -> None:
    """Warnings in a CLI read ``warning: ...``, without a source path and line."""
    say(f"warning: {one_line(message)}")


def save_traceback(exc: BaseException) -> Path | None:
    """Write the full traceback of ``exc`` to a file and return its path (None if nothing is writable)."""
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    text = f"fastland {' '.join(sys.argv)}\n{text}"
    for folder in (Path(os.environ.get("FASTLAND_CRASH_DIR", tempfile.gettempdir())), Path.cwd()):
        try:
            path = folder / f"fastland-crash-{stamp}-{os.getpid()}.txt"
            path.write_text(text)
            return path
        except OSError:
            continue
    return None


def report(exc: BaseException) -> int:
    """Print one line for ``exc`` and return the exit code (see the module docstring)."""
    if isinstance(exc, UserError):
        say(f"error: {one_line(exc)}")
        return EXIT_USER_ERROR
    if isinstance(exc, KeyboardInterrupt):
        say("\ninterrupted: progress so far is saved; run the same command again to resume")
        return EXIT_INTERRUPTED
    if (fs := file_system_error(exc)) is not None:
        say(f"error: {describe_os_error(fs)}")
        return EXIT_USER_ERROR
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":  # the host's, or torch's on a GPU
        where = "" if isinstance(exc, MemoryError) else " on the GPU"
        say(f"error: out of memory{where}; use fewer --samples, a smaller --res or a smaller --batch-size")
        return EXIT_USER_ERROR
    saved = save_traceback(exc)
    where = f"full traceback in {saved}" if saved else "no traceback file could be written"
    say(f"error: unexpected {type(exc).__name__}: {one_line(exc)[:300]} ({where}; please report it)")
    return EXIT_BUG


def cli_entry(main: F) -> F:
    """Wrap a CLI ``main`` so that every failure ends as one line and an exit code (see ``report``)."""

    @functools.wraps(main)
    def wrapper(*args: object, **kwargs: object) -> object:
        warnings.showwarning = _one_line_warning
        sys.unraisablehook, sys.excepthook = _quiet_unraisable, _quiet_excepthook
        try:
            return main(*args, **kwargs)
        except SystemExit:
            raise
        except BaseException as exc:  # noqa: BLE001 - the one place that turns failures into one line
            code = report(exc)
            sys.stderr.flush()
            sys.exit(code)

    return wrapper  # type: ignore[return-value]


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: ``error: ... (see --help)`` and exit 2, no usage dump.

    It also reads ``-1e-3`` and ``-inf`` as negative numbers rather than options.
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|infinity|nan)$",
                                                   re.IGNORECASE)

    def error(self, message: str) -> None:  # type: ignore[override]
        say(f"error: {one_line(message)} (see {self.prog} --help)")
        sys.exit(EXIT_USER_ERROR)
