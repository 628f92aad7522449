"""User-facing errors: one clear line and a non-zero exit, never a traceback.

This is the single place that decides what counts as a user error and how it prints:

- ``UserError``: a mistake the user can fix; ``error: <message>``, exit 2.
- ``OSError`` from the file system (disk full, read-only, permission denied, quota): the
  user's to fix too; one line naming the file, exit 2.
- Ctrl-C: one line saying that progress is saved, exit 130.
- Anything else is a bug: one line with the exception, and the full traceback saved to a
  file whose path the line gives; exit 1.

Every CLI's ``main`` is wrapped in ``cli_entry``; every CLI parser is ``ArgumentParser``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import errno
import functools
import os
import re
import sys
import tempfile
import traceback
import warnings
from collections.abc import Callable
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


def _one_line_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                      file: object = None, line: str | None = None) -> None:
    """Warnings in a CLI read ``warning: ...``, without a source path and line."""
    print(f"warning: {one_line(message)}", file=sys.stderr)


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
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return EXIT_USER_ERROR
    if isinstance(exc, KeyboardInterrupt):
        print("\ninterrupted: progress so far is saved; run the same command again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    if isinstance(exc, OSError) and (exc.errno in _FS_ERRNOS):
        print(f"error: {describe_os_error(exc)}", file=sys.stderr)
        return EXIT_USER_ERROR
    if isinstance(exc, MemoryError):
        print("error: out of memory; use fewer --samples, a smaller --res or a smaller --batch-size", file=sys.stderr)
        return EXIT_USER_ERROR
    saved = save_traceback(exc)
    where = f"full traceback in {saved}" if saved else "no traceback file could be written"
    print(f"error: unexpected {type(exc).__name__}: {one_line(exc)[:300]} ({where}; please report it)",
          file=sys.stderr)
    return EXIT_BUG


def cli_entry(main: F) -> F:
    """Wrap a CLI ``main`` so that every failure ends as one line and an exit code (see ``report``)."""

    @functools.wraps(main)
    def wrapper(*args: object, **kwargs: object) -> object:
        warnings.showwarning = _one_line_warning
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
        print(f"error: {one_line(message)} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
