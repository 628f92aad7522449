"""Triton kernels for fastland (installed as ``fastland.kernels``).

Call them through ``fastland.kernels.dispatch`` (``normalize``, ``segment_scales``,
``perturb``, ``perturb_scaled``): it picks the Triton kernels for CUDA tensors and the
plain-torch references in ``fastland.directions`` otherwise. The kernel modules
(``normalize.py``, ``perturb.py``, ``segments.py``) are imported lazily, so importing this
package neither needs Triton nor freezes the ``TRITON_INTERPRET`` choice.
"""
