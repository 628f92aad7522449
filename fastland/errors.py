"""User-facing errors: one clear line and a non-zero exit, never a traceback."""

from __future__ import annotations

import argparse
import functools
import re
import sys
import warnings
from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable[..., object])

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A mistake the user can fix: the message says what was wrong and what to do."""


def _one_line_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                      file: object = None, line: str | None = None) -> None:
    """Warnings in a CLI read ``warning: ...``, without a source path and line."""
    print(f"warning: {message}", file=sys.stderr)


def cli_entry(main: F) -> F:
    """Wrap a CLI ``main``: a ``UserError`` prints ``error: ...`` and exits 2; Ctrl-C exits 130."""

    @functools.wraps(main)
    def wrapper(*args: object, **kwargs: object) -> object:
        warnings.showwarning = _one_line_warning
        try:
            return main(*args, **kwargs)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(EXIT_USER_ERROR)
        except KeyboardInterrupt:
            print("\ninterrupted: progress so far is saved; run the same command again to resume", file=sys.stderr)
            sys.exit(130)

    return wrapper  # type: ignore[return-value]


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: ``error: ... (see --help)`` and exit 2, no usage dump.

    It also reads ``-1e-3`` as a negative number rather than an option.
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
