"""Rendering for fastland (installed as ``fastland.viz``).

- ``prepare``: what to draw and what to say about it (clipping, log scale, NaN/inf, holes).
- ``plots``: matplotlib top-down contour map and 1-D line plots; no PyVista needed.
- ``render``: PyVista 3-D screenshots, comparisons, .vts/.html/.gltf, ``render_outputs``.
- ``viewer``: the interactive window; ``python -m fastland.viz`` is the command line.
- ``headless``: offscreen rendering through EGL when there is no display.

Importing this package (or ``plots``/``prepare``) never imports PyVista or VTK: the GPU
machines have neither. Only ``render`` and ``viewer`` do.
"""
