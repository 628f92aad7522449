"""Training-step benchmarks: what the smoothness probes cost, as multiples of a plain training step.

Two ways to run it:

- ``python benchmarks/bench_train.py [--models ...] [--rounds N]``: the comparison the issue asks
  for (issue 15 item 3, target: the probes at every step cost at most 4 plain steps on the CPU,
  LeNet and LeNet-BN). Per model the candidates take turns in one process (round-robin, so a busy
  neighbour on this shared CPU slows all alike) and each keeps its best round: a plain step; a step
  with today's probe (the sequential path, g recomputed, what ``auto`` ran on the CPU before the
  layered path); a step with the layered path recomputing g; and a step as ``fastland.train`` now
  runs it (``auto``: layered on the CPU, g and L(θ_t) taken from the step). Wall time and this
  process's CPU time (one thread: the CPU time leaves out the time other processes held the core).
  Writes ``benchmarks/results/train-DEVICE-DATE.json`` and ``.md``.
- ``pytest benchmarks/bench_train.py --benchmark-only``: one pytest-benchmark case per model and
  probe mode (``none``, ``layered``, ``batched``, ``sequential``, ``auto``; the GPU runner's table
  reads these), and ``test_probe_cost`` with the interleaved comparison above for LeNet-BN.

One case is one full training step (zero_grad, forward, backward, probe, Adam step) on one minibatch,
with H = the default 8 step lengths. A probe's *cost* is (probed step − plain step) ÷ plain step.

Device: CUDA when present, else CPU (``FASTLAND_BENCH_DEVICE=cpu|cuda`` overrides;
``FASTLAND_BENCH_THREADS=N`` or ``--threads`` sets torch's CPU threads). Sizes: LeNet ± BN at the study's
batch of 128; VGG-16 ± BN at batch 8 with few rounds, unless ``--gpu-sizes`` (an option from
benchmarks/conftest.py) or a CUDA device asks for the full batch of 128; ``--tiny`` (the GPU runner's dry
run) makes every model's batch 8.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from fastland import device as device_mod
from fastland import models, probes

ROOT = Path(__file__).resolve().parents[1]
if os.environ.get("FASTLAND_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["FASTLAND_BENCH_THREADS"]))
DEVICE = torch.device(os.environ.get("FASTLAND_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))
CUDA = DEVICE.type == "cuda"
MODELS = ["lenet", "lenet_bn", "vgg16", "vgg16_bn"]
MODES = ["none", "layered", "batched", "sequential", "auto"]
LR = 0.01
TARGET = 4.0  # issue 15: the probes at every step cost at most 4 plain steps (CPU, LeNet and LeNet-BN)
CANDIDATES = {  # name: (probe mode, g taken from the training step)
    "plain step": (None, False),
    "today's probe (sequential, g recomputed)": ("sequential", False),
    "layered, g recomputed": ("layered", False),
    "auto as fastland.train runs it (g from the step)": ("auto", True),
}


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


class Step:
    """One training step of ``name`` (Adam, lr 0.01) on a fixed random minibatch, probed with ``mode`` (None:
    not probed); ``from_grad``: the probe takes g and L(θ_t) from the step, as ``fastland.train`` does."""

    def __init__(self, name: str, batch: int, mode: str | None, from_grad: bool = True) -> None:
        torch.manual_seed(0)
        self.model = models.create(name).to(DEVICE).train()
        self.opt = torch.optim.Adam(self.model.parameters(), lr=LR)
        gen = torch.Generator().manual_seed(1)
        self.x = torch.randn(batch, 3, 32, 32, generator=gen).to(DEVICE)
        self.y = torch.randint(0, 10, (batch,), generator=gen).to(DEVICE)
        self.prober = None if mode is None else probes.SmoothnessProbe(self.model, probes.default_etas(LR), mode)
        self.from_grad = from_grad

    def __call__(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(self.model(self.x), self.y)
        loss.backward()
        if self.prober is not None:
            self.prober(self.model, self.x, self.y, from_grad=self.from_grad, loss=loss.detach())
        self.opt.step()
        _sync()


def interleaved(cands: dict[str, Callable[[], None]], rounds: int) -> dict[str, dict[str, list[float]]]:
    """Seconds per call of each candidate, wall and CPU time, over ``rounds`` round-robin rounds (one warm-up
    call each first: it also fixes ``auto``'s choice and the layered path's kept buffers)."""
    for fn in cands.values():
        fn()
    out: dict[str, dict[str, list[float]]] = {k: {"wall": [], "cpu": []} for k in cands}
    for _ in range(rounds):
        for k, fn in cands.items():
            _sync()
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            out[k]["cpu"].append(time.process_time() - c0)
            out[k]["wall"].append(time.perf_counter() - w0)
    return out


class ConvClock:
    """CPU time spent inside the convolution kernels of a layered probe (forward, backward and the stacked
    first-layer gradient), per probe: the part of its cost that identical results leave as it is."""

    def __init__(self, prober: probes.SmoothnessProbe | None) -> None:
        self.seconds: list[float] = []
        self._now = 0.0
        layered = prober.layered if prober is not None and prober.chosen in (None, "layered") else None
        if layered is None or CUDA:
            return
        for layer in layered.layers:
            if isinstance(layer, probes._Conv):
                layer.forward, layer.backward = self._timed(layer.forward), self._timed(layer.backward)
        layered._first_layer = self._timed(layered._first_layer)

    def _timed(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def run(*a: Any, **k: Any) -> Any:
            t0 = time.thread_time()
            try:
                return fn(*a, **k)
            finally:
                self._now += time.thread_time() - t0
        return run

    def lap(self) -> None:
        if self._now:
            self.seconds.append(self._now)
        self._now = 0.0


def compare(name: str, batch: int, rounds: int) -> dict[str, Any]:
    """The interleaved comparison of ``CANDIDATES`` for one model; costs relative to the plain step."""
    steps = {k: Step(name, batch, mode, grad) for k, (mode, grad) in CANDIDATES.items()}
    auto_step = steps["auto as fastland.train runs it (g from the step)"]
    clock = ConvClock(auto_step.prober)
    timed = {k: (lambda f=f, last=(f is auto_step): (f(), clock.lap() if last else None)) for k, f in steps.items()}
    loadavg = [round(v, 2) for v in os.getloadavg()]
    times = interleaved(timed, rounds)
    auto = auto_step.prober
    best = {k: {c: min(v[c]) for c in ("wall", "cpu")} for k, v in times.items()}
    plain = best["plain step"]
    cost = {k: {c: (b[c] - plain[c]) / plain[c] for c in ("wall", "cpu")} for k, b in best.items() if k != "plain step"}
    conv = min(clock.seconds[1:]) if len(clock.seconds) > 1 else None  # the first lap is the warm-up
    return {"model": name, "batch": batch, "rounds": rounds, "etas": len(probes.default_etas(LR)),
            "parameters": sum(p.numel() for p in steps["plain step"].model.parameters()),
            "auto_chose": auto.chosen if auto is not None else None, "loadavg_before": loadavg,
            "loadavg_after": [round(v, 2) for v in os.getloadavg()], "seconds": times, "best": best,
            "median": {k: {c: statistics.median(v[c]) for c in ("wall", "cpu")} for k, v in times.items()},
            "cost": cost, "conv_kernels_cpu_s": conv,
            "conv_kernels_in_plain_steps": conv / plain["cpu"] if conv is not None else None}


# --- pytest-benchmark cases ------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", MODELS)
def test_train_step(benchmark: pytest.FixtureRequest, request: pytest.FixtureRequest, name: str, mode: str) -> None:
    batch, rounds = _sizes(name, _option(request, "--gpu-sizes"), _option(request, "--tiny"))
    step = Step(name, batch, None if mode == "none" else mode)
    benchmark.pedantic(step, rounds=rounds, warmup_rounds=1, iterations=1)
    benchmark.extra_info.update({"model": name, "mode": mode, "batch": batch, "etas": len(probes.default_etas(LR)),
                                 "device": str(DEVICE), "torch": torch.__version__, "threads": torch.get_num_threads()})
    if step.prober is not None:
        benchmark.extra_info.update({"chosen": step.prober.chosen, "from_grad": True,
                                     "measured_ms": {k: 1e3 * v for k, v in step.prober.timings.items()}})
        assert step.prober.chosen in ("layered", "batched", "sequential")
        if mode == "auto":
            assert step.prober.chosen == ("batched" if CUDA else "layered")


def test_probe_cost(benchmark: pytest.FixtureRequest, request: pytest.FixtureRequest) -> None:
    """LeNet-BN: the candidates interleaved (one pytest-benchmark round; the numbers are in extra_info)."""
    name = "lenet_bn"
    batch, _ = _sizes(name, _option(request, "--gpu-sizes"), _option(request, "--tiny"))
    holder: dict[str, Any] = {}
    benchmark.pedantic(lambda: holder.update(compare(name, batch, 2 if _option(request, "--tiny") else 5)),
                       rounds=1, iterations=1, warmup_rounds=0)
    benchmark.extra_info.update({"model": name, "mode": "interleaved", "batch": batch, "device": str(DEVICE),
                                 "best_ms": {k: {c: round(1e3 * v, 3) for c, v in b.items()} for k, b in holder["best"].items()},
                                 "cost": holder["cost"], "auto_chose": holder["auto_chose"]})
    assert holder["auto_chose"] == ("batched" if CUDA else "layered")


# --- the report ------------------------------------------------------------------------------------
def render(result: dict[str, Any], command: str) -> str:
    lines = [f"# Training step with and without smoothness probes — {result['device']}, {result['date']}", "",
             f"- device: {result['device']}, {result['threads']} torch thread(s); torch {result['torch']}, "
             f"python {result['python']}; commit {result['commit']}",
             f"- load average (1, 5, 15 min) at the start {result['loadavg_start']}, at the end {result['loadavg_end']} "
             "(2 cores shared with other agents' jobs)",
             f"- command: `{command}`",
             "- one case = one full Adam training step (zero_grad, forward, backward, probe, step) on one random "
             f"minibatch; H = the default {result['models'][0]['etas']} step lengths; the candidates take turns "
             "(round-robin) and each keeps its best round; wall time, and this process's CPU time (one thread, so "
             "the time other processes held the core is left out)",
             f"- **cost** = (probed step − plain step) ÷ plain step, from the best rounds; target ≤ {TARGET:g} "
             "(issue 15, LeNet and LeNet-BN)", ""]
    head = ["model", "batch", "rounds", "plain step ms (wall / cpu)"]
    cands = [k for k in CANDIDATES if k != "plain step"]
    lines += ["| " + " | ".join(head + [f"{c}: ms, cost (wall / cpu)" for c in cands] + ["auto ÷ target"]) + " |",
              "|" + "---|" * (len(head) + len(cands) + 1)]
    for r in result["models"]:
        b, cost = r["best"], r["cost"]
        row = [r["model"], str(r["batch"]), str(r["rounds"]),
               f"{1e3 * b['plain step']['wall']:.1f} / {1e3 * b['plain step']['cpu']:.1f}"]
        for c in cands:
            row.append(f"{1e3 * b[c]['wall']:.1f} / {1e3 * b[c]['cpu']:.1f}; **{cost[c]['wall']:.2f}× / "
                       f"{cost[c]['cpu']:.2f}×**")
        auto = cost[cands[-1]]
        row.append(f"{auto['wall'] / TARGET:.2f} / {auto['cpu'] / TARGET:.2f}")
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Load average around each model's rounds (before → after): " + "; ".join(
        f"{r['model']} {r['loadavg_before'][0]} → {r['loadavg_after'][0]}" for r in result["models"]) + ".", "",
        "The floor that identical results leave: CPU time inside the convolution kernels of auto's probe (the same "
        "kernels the plain step runs, once per step length, and the stacked first-layer gradient), best round, in "
        "plain steps (CPU time): " + "; ".join(
            f"{r['model']} {r['conv_kernels_in_plain_steps']:.2f}" for r in result["models"]
            if r.get("conv_kernels_in_plain_steps") is not None) + ".", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated models (default: %(default)s)")
    ap.add_argument("--rounds", type=int, default=9, help="interleaved rounds for LeNet ± BN (default: %(default)s)")
    ap.add_argument("--vgg-rounds", type=int, default=3, help="interleaved rounds for VGG-16 ± BN (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: %(default)s)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="folder for the json and md files")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    where = device_mod.describe(DEVICE) if CUDA else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    result: dict[str, Any] = {"date": dt.date.today().isoformat(), "device": where, "threads": torch.get_num_threads(),
                              "torch": torch.__version__, "python": platform.python_version(),
                              "commit": os.popen(f"git -C {ROOT} rev-parse --short HEAD").read().strip(),
                              "loadavg_start": [round(v, 2) for v in os.getloadavg()], "target": TARGET, "models": []}
    for name in args.models.split(","):
        batch, _ = _sizes(name, full=False)
        rounds = args.vgg_rounds if name.startswith("vgg") else args.rounds
        result["models"].append(compare(name, batch, rounds))
        r = result["models"][-1]
        print(f"{name}: " + ", ".join(f"{k} {v['wall']:.2f}x/{v['cpu']:.2f}x" for k, v in r["cost"].items()), flush=True)
    result["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    stem = args.out / f"train-{DEVICE.type}-{result['date']}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    command = "python benchmarks/bench_train.py " + " ".join(argv if argv is not None else sys.argv[1:])
    stem.with_suffix(".md").write_text(render(result, command.strip()))
    print(f"wrote {stem}.json and .md")


if __name__ == "__main__":
    main()
