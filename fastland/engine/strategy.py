"""How the engine runs a model: which strategy, how many points per block, and out-of-memory back-off.

Strategies: ``loop`` (one point at a time through the rewritten body; runs any model),
``vmap`` (all points of a block in one ``vmap``: grouped convolutions) and ``im2col`` (vmap over
unfold + matmul convolutions: batched matmuls).

``auto`` is deterministic, so the same command gives the same file bit for bit: it takes the
first strategy of the device's preference list (CPU: loop, measured fastest on the 2-core
CPU for every built-in model; CUDA: vmap) that can run the model, and says in one line when it
falls back (a model with data-dependent control flow cannot run under ``vmap``). ``tune`` times
the runnable strategies on a small probe (interleaved rounds, best of each) and keeps the
fastest; its choice is recorded in the surface file and kept on resume.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from fastland.errors import UserError, one_line

STRATEGIES = ("loop", "vmap", "im2col")
CHOICES = ("auto", "tune", *STRATEGIES)
PREFERENCE = {"cpu": ("loop", "vmap", "im2col"), "cuda": ("vmap", "im2col", "loop")}
CHUNK_SECONDS = 2.0  # target wall time of one chunk handed to evaluate(): a few seconds at most
MEMORY_FRACTION = 0.5  # of free device memory, for one block's weights and activations
MAPS_CACHE_FRACTION = 0.2  # of free device memory, for the cached first-layer maps


def is_oom(err: BaseException) -> bool:
    """Whether ``err`` is an allocation failure (CUDA or host) that a smaller block can avoid."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    msg = str(err)
    return isinstance(err, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg)


def run_with_backoff(fn: Callable[[int, int], object], block: int, batch: int, batch_fixed: bool,
                     on_backoff: Callable[[int, int], None] | None = None) -> tuple[object, int, int]:
    """Call ``fn(block, batch)``; on out-of-memory halve the block (then the batch, unless it is
    fixed by BN batch statistics) and call again. Returns ``(result, block, batch)`` that worked."""
    while True:
        try:
            return fn(block, batch), block, batch
        except (RuntimeError, torch.OutOfMemoryError) as err:
            if not is_oom(err):
                raise
            if block > 1:
                block //= 2
            elif not batch_fixed and batch > 1:
                batch //= 2
            else:
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if on_backoff is not None:
                on_backoff(block, batch)


def block_size(device: torch.device, free: int, numel: int, batch: int, activation_floats: int) -> int:
    """Points per block that fit in ``MEMORY_FRACTION`` of free memory: each point holds its weights
    (three copies: perturbed, folded, cast) and ``activation_floats`` per sample of the batch, with
    a factor 3 of slack. At most 256 on the CPU (where a block only bounds the weights held at
    once), 1024 on CUDA."""
    per_point = numel * 4 * 3 + batch * activation_floats * 4 * 3
    cap = 256 if device.type == "cpu" else 1024
    return max(1, min(cap, int(MEMORY_FRACTION * free) // per_point))


def choose(strategy: str, device: torch.device, probe: Callable[[str], Callable[[], float]],
           say: Callable[[str], None], rounds: int = 4) -> tuple[str, dict[str, float]]:
    """The strategy to use and the probe timings (seconds per point-image; empty unless tuned).

    ``probe(s)`` builds a timed run of strategy ``s`` on a small probe; it raises when ``s``
    cannot run the model.
    """
    if strategy in STRATEGIES:
        return strategy, {}
    if strategy not in ("auto", "tune"):
        raise UserError(f"unknown strategy {strategy!r}; use {', '.join(CHOICES)}")
    runnable: dict[str, Callable[[], float]] = {}
    why: dict[str, str] = {}
    for s in PREFERENCE.get(device.type, PREFERENCE["cpu"]):
        try:
            run = probe(s)
            run()  # one run: can it run at all? (also the warm-up for tuning)
            runnable[s] = run
        except Exception as err:  # noqa: BLE001 - any failure rules the candidate out; the loop is the fallback
            why[s] = "out of memory" if is_oom(err) else f"{type(err).__name__}: {one_line(err)[:120]}"
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if strategy == "auto" and runnable:
            break
    if not runnable:
        raise UserError("the engine cannot run this model with any strategy ("
                        + "; ".join(f"{s}: {w}" for s, w in why.items()) + ")")
    if strategy == "auto":
        chosen = next(iter(runnable))
        for s, w in why.items():
            say(f"engine: the {s} strategy cannot run this model ({w}); using {chosen}")
        return chosen, {}
    timings = {s: math.inf for s in runnable}
    alive = list(runnable)
    for _ in range(rounds):
        for s in alive:
            timings[s] = min(timings[s], runnable[s]())
        best = min(timings[s] for s in alive)
        alive = [s for s in alive if timings[s] <= 3 * best]  # a 3x-slower candidate is dropped early
    return min(timings, key=timings.get), timings
