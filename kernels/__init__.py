"""Triton kernels for fastland (installed as ``fastland.kernels``)."""
