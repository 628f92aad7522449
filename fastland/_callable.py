"""Modules that are also functions: ``fastland.surface(model, data)`` and ``python -m fastland.surface``.

``import fastland.surface`` binds the *module* to ``fastland.surface``, which would hide a
function of that name in the package. Giving the module a ``__call__`` (a ``ModuleType``
subclass) makes one object serve both: the CLI module, and the API function it wraps, with
that function's signature for ``inspect`` and IDEs.
"""

from __future__ import annotations

import inspect
import sys
import types
from collections.abc import Callable
from typing import Any


class CallableModule(types.ModuleType):
    """A module whose call is its ``__wrapped__`` function."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.__wrapped__(*args, **kwargs)


def make_callable(module_name: str, fn: Callable[..., Any]) -> None:
    """Make the module ``module_name`` callable as ``fn``."""
    mod = sys.modules[module_name]
    mod.__class__ = CallableModule
    mod.__wrapped__ = fn
    mod.__signature__ = inspect.signature(fn)  # type: ignore[attr-defined]
