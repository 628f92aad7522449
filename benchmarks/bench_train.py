"""Training-step benchmarks: no probe vs batched probes vs sequential probes (vs auto's pick).

Run: ``pytest benchmarks/bench_train.py --benchmark-only [--benchmark-json=FILE]``.

One case is one full training step (forward, backward, probe, Adam step) on one minibatch,
with H = the default 8 step lengths. ``none`` is the step without probes; ``batched`` and
``sequential`` force a probe path; ``auto`` times both on its first call (as training does)
and records in ``extra_info`` which it kept and what it measured, so the table shows that
where batched is chosen it is not slower than sequential.

Device: CUDA when present, else CPU (``FASTLAND_BENCH_DEVICE=cpu|cuda`` overrides;
``FASTLAND_BENCH_THREADS=N`` sets torch's CPU threads). Sizes: LeNet ± BN at the study's batch
of 128; VGG-16 ± BN at batch 8 with few rounds, unless ``--gpu-sizes`` (an option from
benchmarks/conftest.py, when present) or a CUDA device asks for the full batch of 128; ``--tiny``
(the GPU runner's dry run) makes every model's batch 8.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from fastland import models, probes

if os.environ.get("FASTLAND_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["FASTLAND_BENCH_THREADS"]))
DEVICE = torch.device(os.environ.get("FASTLAND_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))
CUDA = DEVICE.type == "cuda"
MODELS = ["lenet", "lenet_bn", "vgg16", "vgg16_bn"]
MODES = ["none", "batched", "sequential", "auto"]
LR = 0.01


def _option(request: pytest.FixtureRequest, name: str) -> bool:
    try:
        return bool(request.config.getoption(name, default=False))
    except ValueError:  # the option is not registered (no benchmarks/conftest.py)
        return False


def _sizes(name: str, full: bool, tiny: bool = False) -> tuple[int, int]:
    """(batch, rounds) for a model: VGG on the CPU gets a small batch and few rounds; ``--tiny`` (the GPU
    runner's dry run) a batch of 8 and 2 rounds for every model."""
    if tiny:
        return 8, 2
    if name.startswith("vgg") and not (full or CUDA):
        return 8, 3
    return 128, (10 if name.startswith("vgg") else 20)


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize(DEVICE)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", MODELS)
def test_train_step(benchmark: pytest.FixtureRequest, request: pytest.FixtureRequest, name: str, mode: str) -> None:
    batch, rounds = _sizes(name, _option(request, "--gpu-sizes"), _option(request, "--tiny"))
    torch.manual_seed(0)
    model = models.create(name).to(DEVICE).train()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, 32, 32, generator=gen).to(DEVICE)
    y = torch.randint(0, 10, (batch,), generator=gen).to(DEVICE)
    prober = None if mode == "none" else probes.SmoothnessProbe(model, probes.default_etas(LR), mode)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        if prober is not None:
            prober(model, x, y)
        opt.step()
        _sync()

    if prober is not None and mode == "auto":
        step()  # the one-off measurement happens here, outside the timed rounds
    benchmark.pedantic(step, rounds=rounds, warmup_rounds=1, iterations=1)
    benchmark.extra_info.update({"model": name, "mode": mode, "batch": batch, "etas": len(probes.default_etas(LR)),
                                 "device": str(DEVICE), "torch": torch.__version__, "threads": torch.get_num_threads()})
    if prober is not None and mode == "auto":
        benchmark.extra_info.update({"chosen": prober.chosen,
                                     "measured_ms": {k: 1e3 * v for k, v in prober.timings.items()}})
        assert prober.chosen is not None
        if prober.chosen == "batched":
            assert prober.timings["batched"] <= prober.timings["sequential"]
