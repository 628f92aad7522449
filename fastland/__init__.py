"""fastland: a fast, trustworthy loss-landscape engine for PyTorch.

    import fastland
    surf = fastland.surface(model, (inputs, targets))        # any nn.Module, data and loss
    line = fastland.interpolate(model_a, model_b, data)      # the straight line between two models
    run = fastland.train(model, data, out="runs/x")          # training with the smoothness probes
    surf = fastland.load("surface.h5")

See ``fastland.api`` for every option. ``fastland.surface`` and ``fastland.train`` are also
the modules behind ``python -m fastland.surface`` and ``python -m fastland.train``; calling
them calls the API functions.
"""

__version__ = "0.2.0"

__all__ = ["Surface", "__version__", "evaluate", "interpolate", "load", "surface", "train"]

_API = {"interpolate": "fastland.api", "load": "fastland.api", "evaluate": "fastland.api",
        "Surface": "fastland.surfacefile"}


def __getattr__(name: str) -> object:
    """The API, imported on first use, so that ``import fastland`` (and every CLI's start) stays fast.

    ``fastland.surface`` and ``fastland.train`` are the callable CLI modules (importing them here
    would also make ``python -m fastland.surface`` run a module already imported).
    """
    import importlib

    if name in ("surface", "train"):
        return importlib.import_module(f"fastland.{name}")
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'fastland' has no attribute {name!r}")
