"""fastland: a fast, trustworthy loss-landscape engine for PyTorch."""

__version__ = "0.1.0"
