"""The GPU runner: every GPU check and measurement of fastland in a few 10-minute commands.

``bash benchmarks/gpu.sh STAGE OUTDIR`` runs one stage on a CUDA GPU with the machine's own
Python; ``bash benchmarks/gpu.sh --dry-run OUTDIR`` runs every stage at tiny sizes on the CPU,
each in its own process, and exits 0 only when all of them work (CI runs it). Stages:

- ``tests``: every ``cuda``-marked test, with the kernels compiled by Triton (no interpreter);
- ``kernels``: the Triton kernels against their torch references, then ``bench_kernels.py``
  (GB/s against a device copy of the same bytes, measured in the same run);
- ``engine``: the engine against the reference evaluator on a sample of points, then whole
  grids at the targets' sizes (``ENGINE_CASES``) and the per-point DataLoader baseline;
- ``probes``: batched and layered against sequential smoothness probes (same values), then ``bench_train.py``;
- ``hessian``: Hessian-vector products against autograd's double backward (both BN modes) and the top
  eigenpair's residual, then the top eigenvalue, top 5 and trace of ResNet-20-BN on 1,024 and 10,000
  images (PyHessian beside it where installed) and a 21×21 curvature map on 10,000 images;
- ``study``: ``python -m fastland.study`` on the carried CIFAR-10 JPEG copy
  (``benchmarks/carry_data.sh``), skipped with the reason where ``fastland.data`` has no
  ``imagefolder:`` source yet.

Every stage checks before it times: a failed check is named in the output and the files, its
timing is not taken, the stage goes on with what does not depend on it, and exits 1. After every
step the stage rewrites ``STAGE-DEVICE-DATE.json`` and ``.md`` in OUTDIR (device, versions,
date, checks, numbers), so a run killed at its time limit still leaves what it measured. Each
stage keeps to a time budget (``--budget``): what would not fit is left out and listed, and the
stage exits 3 ("incomplete"). It ends with a one-screen summary.

Exit codes: 0 ok (or skipped, with the reason), 1 a check failed or something broke, 2 bad
usage, 3 incomplete (the budget ran out).
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import hashlib
import io
import json
import math
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
if str(BENCH) not in sys.path:  # bench_engine, bench_kernels: their helpers are reused, not copied
    sys.path.insert(0, str(BENCH))

from fastland.errors import ArgumentParser, UserError, cli_entry  # noqa: E402 (after the path)

STAGES = ("tests", "kernels", "engine", "probes", "hessian", "study")
# Seconds per stage on the GPU: each stage runs as one device command of at most 600 s, which
# also pays for Python's start, fastland's install check and writing the results.
BUDGET = {"tests": 480, "kernels": 480, "engine": 510, "probes": 300, "hessian": 510, "study": 510}
DRY_BUDGET = 150
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INCOMPLETE = 0, 1, 2, 3
CIFAR_JPEG_SHA256 = "820394552d8cd6cf2834c7f34753d3e36624717e73e6a373a57a01edb25bc5f0"  # ../shared/data/README.md
CARRIED_ARCHIVE = ROOT / ".carry" / "cifar10-jpeg.tar.gz"
SHARED_ARCHIVE = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
OUT_OF_TIME = "not run: the stage's time budget was spent"


# --- what one stage checked and measured ------------------------------------------------------
class Record:
    """A stage's checks, numbers and notes, rewritten to OUTDIR as JSON and markdown after every step."""

    def __init__(self, stage: str, outdir: Path, dry_run: bool, budget: float, command: str) -> None:
        import torch

        self.stage, self.outdir, self.dry_run = stage, outdir, dry_run
        self.device = torch.device("cpu" if dry_run else "cuda")
        self.t0 = time.monotonic()
        self.deadline = self.t0 + budget
        env = environment(self.device)
        self.stem = f"{stage}-{'cpu-dryrun' if dry_run else device_slug(env['device'])}-{env['date'][:10]}"
        self.data: dict[str, Any] = {"stage": stage, "status": "running", "dry_run": dry_run, "command": command,
                                     "budget_s": budget, "seconds": 0.0, "environment": env, "checks": [],
                                     "left_out": [], "notes": [], "results": {}}
        self.sections: dict[str, tuple[str, list[str], list[list[str]], list[str]]] = {}
        self.skip_reason: str | None = None
        self.extra_files: list[Path] = []
        outdir.mkdir(parents=True, exist_ok=True)

    @property
    def results(self) -> dict[str, Any]:
        return self.data["results"]

    def left(self) -> float:
        """Seconds left of the stage's budget."""
        return self.deadline - time.monotonic()

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        """Record a check (printed at once); returns ``ok`` so callers can skip what depends on it."""
        self.data["checks"].append({"name": name, "ok": bool(ok), "detail": detail})
        print(f"  check {'ok    ' if ok else 'FAILED'} {name}{': ' + detail if detail else ''}", flush=True)
        self.write()
        return bool(ok)

    def failed_checks(self) -> list[str]:
        return [c["name"] for c in self.data["checks"] if not c["ok"]]

    def left_out(self, what: str) -> None:
        """Something the budget did not leave time for: the stage ends incomplete."""
        self.data["left_out"].append(what)
        print(f"  left out: {what}", flush=True)
        self.write()

    def note(self, text: str) -> None:
        self.data["notes"].append(text)
        print(f"  note: {text}", flush=True)

    def table(self, key: str, title: str, header: list[str], rows: list[list[str]], notes: list[str] | None = None
              ) -> None:
        """Set (or replace) one markdown table of the report."""
        self.sections[key] = (title, header, rows, notes or [])
        self.write()

    def skip(self, reason: str) -> None:
        """The stage cannot run here for a reason outside fastland's code (status 'skipped', exit 0)."""
        self.skip_reason = reason
        self.note(f"skipped: {reason}")

    def status(self) -> str:
        """failed (a check failed), incomplete (something was left out), skipped, or ok."""
        if self.failed_checks():
            return "failed"
        if self.data["left_out"]:
            return "incomplete"
        return "skipped" if self.skip_reason else "ok"

    def paths(self) -> tuple[Path, Path]:
        return self.outdir / f"{self.stem}.json", self.outdir / f"{self.stem}.md"

    def write(self) -> None:
        self.data["seconds"] = round(time.monotonic() - self.t0, 1)
        self.data["tables"] = {k: {"title": t, "header": h, "rows": r, "notes": n} for k, (t, h, r, n) in self.sections.items()}
        js, md = self.paths()
        js.write_text(json.dumps(self.data, indent=1, default=str) + "\n")
        md.write_text(self.markdown())

    def markdown(self) -> str:
        env, d = self.data["environment"], self.data
        title = f"# GPU runner, stage `{self.stage}`: {env['device']}, {env['date'][:10]}"
        lines = [title + (" (dry run: tiny sizes on the CPU; the numbers mean nothing)" if self.dry_run else ""), ""]
        lines += [f"- status: **{d['status']}**" + (f" ({self.skip_reason})" if self.skip_reason else ""),
                  f"- device: {env['device']}" + (f", {env['gpu_memory_gib']} GiB, {env['sm_count']} SMs, "
                                                 f"compute capability {env['capability']}" if env.get("sm_count") else ""),
                  f"- driver {env['driver']}, CUDA {env['cuda']}, cuDNN {env['cudnn']}; torch {env['torch']}, "
                  f"triton {env['triton']}, numpy {env['numpy']}, python {env['python']}",
                  f"- host: {env['cpu']} ({env['cpus']} CPUs, {env['torch_threads']} torch threads), load average "
                  f"{env['loadavg']} at the start; TRITON_INTERPRET={env['triton_interpret'] or 'unset'}",
                  f"- commit {env['commit']}; date {env['date']}",
                  f"- command: `{d['command']}`",
                  f"- wall time {d['seconds']:.0f} s of a {d['budget_s']:.0f} s budget", ""]
        if d["checks"]:
            lines += ["## Checks (before anything is timed)", "", "| check | result | detail |", "|---|---|---|"]
            lines += [f"| {c['name']} | {'ok' if c['ok'] else '**FAILED**'} | {c['detail']} |" for c in d["checks"]]
            lines.append("")
        for title, header, rows, notes in self.sections.values():
            lines += [f"## {title}", "", _md_table(header, rows)]
            lines += [""] + [f"- {n}" for n in notes] if notes else []
            lines.append("")
        if d["left_out"]:
            lines += ["## Left out (the budget ran out)", "", *[f"- {w}" for w in d["left_out"]], ""]
        if d["notes"]:
            lines += ["## Notes", "", *[f"- {n}" for n in d["notes"]], ""]
        return "\n".join(lines).rstrip() + "\n"

    def finish(self) -> int:
        """Final status, files and the one-screen summary; returns the exit code."""
        self.data["status"] = self.status()
        self.write()
        js, md = self.paths()
        status = self.data["status"]
        print(f"\n== {self.stage}: {status.upper()} in {self.data['seconds']:.0f} s "
              f"({self.data['environment']['device']}{', dry run' if self.dry_run else ''})")
        checks = self.data["checks"]
        print(f"checks: {sum(c['ok'] for c in checks)} ok, {len(checks) - sum(c['ok'] for c in checks)} failed"
              + "".join(f"\n  FAILED: {c['name']}: {c['detail']}" for c in checks if not c["ok"]))
        for title, header, rows, _ in self.sections.values():
            print(f"\n{title}\n{_md_table(header, rows[:14])}" + (f"\n... {len(rows) - 14} more rows in {md.name}"
                                                                if len(rows) > 14 else ""))
        for w in self.data["left_out"]:
            print(f"left out: {w}")
        if self.skip_reason:
            print(f"skipped: {self.skip_reason}")
        print("files: " + ", ".join(str(p) for p in (js, md, *self.extra_files)))
        return {"ok": EXIT_OK, "skipped": EXIT_OK, "incomplete": EXIT_INCOMPLETE}.get(status, EXIT_FAILED)


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(out + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def _fmt(v: float | None, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.{digits}g}"


# --- environment ------------------------------------------------------------------------------
def _run_text(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, cwd=ROOT)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _commit() -> str:
    if os.environ.get("FASTLAND_COMMIT"):  # the device machine's copy of the tree has no .git: the caller names it
        return os.environ["FASTLAND_COMMIT"]
    head = _run_text(["git", "rev-parse", "--short=12", "HEAD"])
    if head is None:
        return "unknown (no git checkout here; set FASTLAND_COMMIT)"
    dirty = _run_text(["git", "status", "--porcelain", "--untracked-files=no"])
    return head + (" (dirty)" if dirty else "")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def environment(device: Any) -> dict[str, Any]:
    """What the numbers depend on: device, driver, CUDA, torch, triton, numpy, host, commit, date."""
    from importlib.metadata import PackageNotFoundError, version

    import numpy as np
    import torch

    try:
        triton_version = version("triton")
    except PackageNotFoundError:
        triton_version = "not installed"
    env: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "host": platform.node(),
        "python": platform.python_version(), "torch": torch.__version__, "triton": triton_version,
        "numpy": np.__version__, "cuda": torch.version.cuda or "none", "cudnn": torch.backends.cudnn.version() or "none",
        "driver": "none", "cpu": _cpu_name(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "loadavg": [round(v, 2) for v in os.getloadavg()], "commit": _commit(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", ""),
        "device": f"cpu ({torch.get_num_threads()} threads)",
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   sm_count=props.multi_processor_count, capability=f"{props.major}.{props.minor}")
        env["driver"] = (_run_text(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]) or "?").split("\n")[0]
    return env


def device_slug(name: str) -> str:
    """A short file-name part for a device: 'NVIDIA H100 80GB HBM3' -> 'h100', 'cpu (2 threads)' -> 'cpu'."""
    tokens = re.findall(r"[a-z0-9]+", name.lower())
    if tokens and tokens[0] == "cpu":
        return "cpu"
    for t in tokens:
        if t not in ("nvidia", "geforce", "tesla", "rtx") and re.search(r"\d", t) and not t.endswith("gb"):
            return t
    return "gpu"


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def _timer() -> Iterator[list[float]]:
    """``with _timer() as t: ...`` then ``t[0]`` is the wall time in seconds (callers synchronize)."""
    box = [math.nan]
    t0 = time.perf_counter()
    yield box
    box[0] = time.perf_counter() - t0


# --- pytest in this process: outcomes as they come, and a deadline ------------------------------
class PytestLog:
    """A pytest plugin: records every test's outcome when it finishes and skips what is left once the
    deadline has passed, so a stage stays inside its budget and keeps what already ran."""

    def __init__(self, deadline: float, on_test: Callable[[], None] | None = None) -> None:
        self.deadline, self.on_test = deadline, on_test
        self.tests: dict[str, dict[str, Any]] = {}
        self.collect_errors: list[dict[str, str]] = []
        self.selected = 0
        self.out_of_time = 0

    def pytest_collection_finish(self, session: Any) -> None:
        self.selected = len(session.items)

    def pytest_collectreport(self, report: Any) -> None:
        if report.failed:
            self.collect_errors.append({"nodeid": report.nodeid, "message": _error_line(report.longreprtext)})

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item: Any) -> None:
        if time.monotonic() > self.deadline:
            self.out_of_time += 1
            pytest.skip(OUT_OF_TIME)

    def pytest_runtest_logreport(self, report: Any) -> None:
        t = self.tests.setdefault(report.nodeid, {"nodeid": report.nodeid, "outcome": "passed", "seconds": 0.0,
                                                   "message": ""})
        t["seconds"] = round(t["seconds"] + report.duration, 3)
        if report.failed:
            t["outcome"] = "failed" if report.when == "call" else "error"
            t["message"] = _error_line(report.longreprtext)
        elif report.skipped and t["outcome"] == "passed":
            t["outcome"] = "skipped"
            t["message"] = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if report.when == "teardown" and self.on_test is not None:
            self.on_test()

    def count(self, outcome: str) -> int:
        return sum(t["outcome"] == outcome for t in self.tests.values())


def _error_line(text: str) -> str:
    """The most telling line of a pytest failure: its first ``E`` line, else its last line."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    for ln in lines:
        if ln.startswith("E "):
            return ln[1:].strip()[:300]
    return (lines[-1] if lines else "").strip()[:300]


def run_pytest(args: list[str], log: PytestLog) -> int:
    """``pytest.main(args)`` in this process with ``log`` attached; returns pytest's exit code."""
    return int(pytest.main(["-p", "no:cacheprovider", *args], plugins=[log]))


def pytest_ok(code: int, log: PytestLog) -> tuple[bool, str]:
    """Whether a pytest run went through (nothing failed, no module failed to import, no internal or usage
    error), and what went wrong otherwise."""
    bad = [t for t in log.tests.values() if t["outcome"] in ("failed", "error")] + log.collect_errors
    detail = "; ".join(f"{t['nodeid']}: {t['message']}" for t in bad)
    if code in (2, 3, 4):
        detail = f"pytest exit code {code} (interrupted, internal error or usage error) {detail}".strip()
    return not bad and code not in (2, 3, 4), detail


# --- stage: tests ---------------------------------------------------------------------------------
def stage_tests(rec: Record, args: argparse.Namespace) -> None:
    """Every cuda-marked test. On the GPU the kernels are compiled (TRITON_INTERPRET is unset before
    anything imports Triton); in the dry run they are all skipped, which checks the marking."""
    def update() -> None:
        rec.results["tests"] = sorted(log.tests.values(), key=lambda t: t["nodeid"])
        rec.results["counts"] = {o: log.count(o) for o in ("passed", "failed", "error", "skipped")}
        rec.write()

    log = PytestLog(rec.deadline - 5, update)
    code = run_pytest(["-m", "cuda", "tests", "--continue-on-collection-errors", "-q", "-rfE"], log)
    update()
    counts = rec.results["counts"]
    rec.results["collection_errors"] = log.collect_errors
    rec.check("no test module fails to import", not log.collect_errors,
              "; ".join(f"{e['nodeid']}: {e['message']}" for e in log.collect_errors))
    rec.check("cuda-marked tests were collected", log.selected > 0, f"{log.selected} selected by -m cuda")
    bad = [t for t in log.tests.values() if t["outcome"] in ("failed", "error")]
    ok, detail = pytest_ok(code, log)
    rec.check("no cuda test failed", ok, detail or f"{counts['passed']} passed, {counts['skipped']} skipped")
    if rec.dry_run:
        ran = [t for t in log.tests.values() if t["outcome"] == "passed"]
        rec.check("without CUDA every cuda test skips", not ran, ", ".join(t["nodeid"] for t in ran))
    else:
        from fastland.kernels import dispatch

        rec.check("kernels compiled by Triton, not interpreted", not dispatch.interpreted()
                  and not os.environ.get("TRITON_INTERPRET"), f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')!r}")
        skipped = [t for t in log.tests.values() if t["outcome"] == "skipped" and t["message"] != OUT_OF_TIME]
        if skipped:
            rec.note(f"{len(skipped)} cuda tests skipped on the GPU: "
                     + "; ".join(f"{t['nodeid']} ({t['message']})" for t in skipped[:10]))
    if log.out_of_time:
        rec.left_out(f"{log.out_of_time} tests (the budget ran out)")
    slow = sorted(log.tests.values(), key=lambda t: -t["seconds"])[:10]
    rec.table("counts", "Outcomes", ["selected", "passed", "failed", "errors", "skipped"],
              [[str(log.selected), *(str(counts[o]) for o in ("passed", "failed", "error", "skipped"))]],
              ["Every test's outcome, time and message are in the JSON (`results.tests`)."])
    rec.table("slowest", "Slowest tests", ["test", "outcome", "seconds"],
              [[t["nodeid"], t["outcome"], f"{t['seconds']:.2f}"] for t in slow])
    if bad:
        rec.table("failures", "Failures", ["test", "message"], [[t["nodeid"], t["message"]] for t in bad])


# --- stage: kernels ---------------------------------------------------------------------------------
def _close(got: Any, want: Any, rtol: float, atol: Any = 0.0) -> tuple[bool, str]:
    """Elementwise ``|got - want| <= rtol·|want| + atol`` with every element written (outputs start as NaN)."""
    import torch

    if got.shape != want.shape or got.dtype != want.dtype:
        return False, f"shape/dtype {tuple(got.shape)} {got.dtype}, expected {tuple(want.shape)} {want.dtype}"
    unwritten = int(torch.isnan(got).sum())
    a, e = got.double(), want.double()
    err = (a - e).abs()
    bad = int((err > rtol * e.abs() + atol).sum())
    rel = float((err / e.abs().clamp_min(1e-30)).max()) if err.numel() else 0.0
    return unwritten == 0 and bad == 0, (f"{unwritten} unwritten, {bad}/{err.numel()} off; worst abs {float(err.max()):.2e}, "
                                         f"rel {rel:.2e} (rtol {rtol:g})")


def kernel_checks(rec: Record) -> None:
    """Each Triton kernel against its torch reference at the benchmarks' model sizes, on fresh random
    inputs (never zeros), outputs poisoned with NaN. The dry run goes through Triton's interpreter."""
    import torch

    if rec.dry_run and (problem := _interpreter_problem()):
        rec.note(f"the Triton kernels are not checked in this dry run: {problem}")
        return
    gen = torch.Generator().manual_seed(int(time.time()))  # fresh inputs every run
    for name, points in [("lenet_bn", 4)] if rec.dry_run else [("lenet_bn", 256), ("vgg16_bn", 32)]:
        _kernel_checks_for(rec, name, points, gen)


def _interpreter_problem() -> str | None:
    """Why Triton's CPU interpreter cannot run the kernels here (None: it can): the probe of
    tests/test_kernels.py, which runs one tiny kernel of the shape that breaks."""
    tests = str(ROOT / "tests")
    if tests not in sys.path:
        sys.path.append(tests)
    import test_kernels

    return test_kernels.interpreter_problem()


def _kernel_checks_for(rec: Record, name: str, points: int, gen: Any) -> None:
    import torch

    from fastland import directions, models
    from fastland.kernels import dispatch
    from fastland.params import FlatSpace

    dev = rec.device
    model = models.randomized(name)
    space = FlatSpace(model)
    n = space.numel
    theta = (space.flatten(model) + 0.05 * torch.randn(n, generator=gen)).to(dev)
    raw = torch.randn(2, n, generator=gen).to(dev)
    coords = torch.randn(points, 2, generator=gen).to(dev)
    seg = {norm: space.segments(norm) for norm in ("filter", "layer")}

    def nan(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.full(shape, float("nan"), dtype=dtype, device=dev)

    def attempt(label: str, fn: Callable[[], tuple[bool, str]]) -> bool:
        try:
            ok, detail = fn()
        except Exception as err:  # noqa: BLE001 - a kernel that raises fails its check, by name
            ok, detail = False, f"raised {type(err).__name__}: {' '.join(str(err).split())[:300]}"
        return rec.check(f"{label} [{name}, N={n:,}]", ok, detail)

    for norm in ("filter", "layer"):
        attempt(f"normalize {norm} = reference", lambda norm=norm: _close(
            dispatch.normalize(raw[0], theta, seg[norm], norm, "biasbn", backend="triton", out=nan(n)),
            directions.normalize_reference(raw[0], theta, seg[norm], norm, "biasbn"), 1e-5))
    attempt("segment scales = reference", lambda: _close(
        dispatch.segment_scales(raw[0], theta, seg["filter"], "filter", backend="triton"),
        directions.segment_scales(raw[0], theta, seg["filter"], "filter"), 1e-5))
    dirs = torch.stack([directions.normalize_reference(raw[k], theta, seg["filter"], "filter", "biasbn") for k in range(2)])
    # fp32 rounding where θ and α·d cancel: ~2 ulp of the largest term (as in tests/test_kernels.py)
    atol = 2.5e-7 * (theta.double().abs()[None] + coords.double().abs() @ dirs.double().abs())
    for dtype, rtol in ((torch.float32, 1e-6), (torch.bfloat16, 1e-2)):
        attempt(f"perturb {str(dtype).removeprefix('torch.')} P={points} = reference", lambda dtype=dtype, rtol=rtol: _close(
            dispatch.perturb(theta, dirs, coords, dtype, backend="triton", out=nan(points, n, dtype=dtype)),
            directions.perturb_reference(theta, dirs, coords, dtype), rtol, atol))
    scales = torch.stack([directions.segment_scales(raw[k], theta, seg["filter"], "filter") for k in range(2)])
    attempt(f"fused perturb (raw directions + scales) P={points} = reference", lambda: _close(
        dispatch.perturb_scaled(theta, raw, scales, seg["filter"], coords, "biasbn", torch.float32, backend="triton",
                                out=nan(points, n)),
        directions.perturb_reference(theta, dirs, coords), 1e-6, 2 * atol))


def copy_bandwidth(device: Any, nbytes: int) -> float:
    """GB/s of a device-to-device copy moving ``nbytes`` (read + write), best of 20 after warm-up."""
    import torch

    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)
    src.random_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    best = math.inf
    for _ in range(20):
        _sync(device)
        with _timer() as t:
            dst.copy_(src)
            _sync(device)
        best = min(best, t[0])
    return nbytes / best / 1e9


def _merge_benchmarks(paths: list[Path]) -> dict[str, Any] | None:
    """One pytest-benchmark document from several runs' JSON (machine and commit info of the first)."""
    docs = [json.loads(p.read_text()) for p in paths if p.exists()]
    if not docs:
        return None
    merged = docs[0]
    for d in docs[1:]:
        merged["benchmarks"] += d["benchmarks"]
    return merged


def _bench_passes(rec: Record, module: str, passes: list[tuple[str, list[str]]], workdir: Path) -> dict[str, Any] | None:
    """Run ``benchmarks/MODULE`` through pytest-benchmark in several passes (each a ``-k``/option list),
    as long as the budget lasts; returns the merged pytest-benchmark JSON."""
    paths = []
    for i, (label, extra) in enumerate(passes):
        if rec.left() < 30:
            rec.left_out(f"{module}: {label}")
            continue
        path = workdir / f"{module}-{i}.json"
        log = PytestLog(rec.deadline - 15)
        code = run_pytest([str(BENCH / module), "--benchmark-only", f"--benchmark-json={path}", "-q", "-rfE", *extra], log)
        paths.append(path)
        ok, detail = pytest_ok(code, log)
        rec.check(f"{module} {label}: every case ran", ok and log.selected > 0,
                  detail or f"{log.count('passed')} cases timed, {log.count('skipped')} skipped")
        if log.out_of_time:
            rec.left_out(f"{module} {label}: {log.out_of_time} cases (the budget ran out)")
    return _merge_benchmarks(paths)


def stage_kernels(rec: Record, args: argparse.Namespace) -> None:
    kernel_checks(rec)
    copy = copy_bandwidth(rec.device, 2 << 20 if rec.dry_run else 2 << 30)
    rec.results["copy_gbps_2gb" if not rec.dry_run else "copy_gbps_2mb"] = copy
    rec.note(f"device copy bandwidth {copy:,.0f} GB/s (bytes read + written, {'2 MB' if rec.dry_run else '2 GiB'}); "
             "each benchmark case also records a copy of its own size in the same run (`copy_gbps`)")
    with tempfile.TemporaryDirectory() as tmp:
        if rec.dry_run:  # the interpreter measures Python, not kernels: the torch cases at LeNet size only, in two
            lenet = "lenet and not P64 and not P256"  # passes as on the GPU
            passes = [("eager, LeNet (dry run)", ["-k", f"{lenet} and eager"]), ("copy, LeNet (dry run)", ["-k", f"{lenet} and copy"])]
        else:  # torch.compile compiles every case first: VGG-16 size (the target's) before LeNet's, as the budget allows
            passes = [("triton, eager, copy", ["-k", "not compile"]), ("torch.compile, VGG-16", ["-k", "compile and vgg16"]),
                      ("torch.compile, LeNet", ["-k", "compile and lenet"])]
        bench = _bench_passes(rec, "bench_kernels.py", passes, Path(tmp))
        if bench is None:
            return
        rec.results["benchmark"] = bench
        path = Path(tmp) / "merged.json"
        path.write_text(json.dumps(bench))
        import bench_kernels

        text = bench_kernels._markdown(str(path), rec.data["command"])
    table = text[text.index("| case"):].strip().splitlines()
    rows = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in table[2:]]
    rec.table("headline", "Perturbation at VGG-16 size: Triton against the copy ceiling (design target ≥ 80%)",
              *_kernel_headline(bench["benchmarks"]))
    rec.table("all", "Every case (median; GB/s = compulsory bytes / time)",
              [c.strip() for c in table[0].strip().strip("|").split("|")], rows)


def _kernel_headline(benches: list[dict[str, Any]]) -> tuple[list[str], list[list[str]], list[str]]:
    by: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for b in benches:
        e = b["extra_info"]
        case = f"{b['name'].split('[')[0].removeprefix('test_')}[{b['param'].removesuffix('-' + str(e.get('impl')))}]"
        by.setdefault((case, str(e.get("n"))), {})[str(e.get("impl"))] = e
    rows = []
    for (case, n), impls in sorted(by.items()):
        torch_best = max((impls[i]["gbps"] for i in ("eager", "compile") if i in impls), default=math.nan)
        for impl in ("triton", "triton_aligned"):
            tri = impls.get(impl)
            if tri is None or "vgg16" not in case:
                continue
            frac = tri.get("frac_of_copy", math.nan)
            rows.append([case, impl, n, _fmt(tri["gbps"]), _fmt(torch_best), _fmt(tri["gbps"] / torch_best),
                         _fmt(tri.get("copy_gbps")), f"{frac:.2f}" if frac == frac else "–",
                         ("met" if frac >= 0.8 else "NOT met") if frac == frac else "–"])
    notes = [] if rows else ["No Triton rows: the kernels run only on CUDA (the dry run times the torch cases)."]
    return (["case", "kernel", "N", "Triton GB/s", "best torch GB/s (eager, compile)", "Triton ÷ torch", "copy GB/s",
             "Triton ÷ copy", "≥ 0.8"], rows, notes)


# --- stage: engine ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EngineCase:
    """One engine measurement: a model's whole grid, after a check against the reference evaluator."""

    model: str  # a fastland.models name, or a user's ``package.module:factory`` (models.create)
    res: int  # grid points per axis, over [-1, 1]²
    images: int  # evaluation images: synthetic and CIFAR-shaped (the time does not depend on the pixels)
    target_s: float | None = None  # design.md's target for the whole grid on one H100, if there is one
    baseline_points: int = 8  # points the per-point DataLoader baseline is timed on (then per point)
    check_points: int = 6  # points compared with the reference evaluator before anything is timed
    strategy: str = "auto"


ENGINE_CASES = [
    EngineCase("lenet_bn", 201, 10_000, target_s=20.0, baseline_points=16),
    EngineCase("vgg16_bn", 51, 10_000, target_s=60.0, baseline_points=4),
    # --- user models (the library issue): add a line each once they exist, e.g.
    # EngineCase("resnet20_bn", 51, 10_000),
    # EngineCase("mypkg.nets:small_transformer", 51, 10_000),  # a models.create spec; data: bench_engine.problem
]
DRY_ENGINE_CASES = [
    EngineCase("lenet_bn", 5, 64, target_s=20.0, baseline_points=2, check_points=3, strategy="loop"),
    EngineCase("vgg16_bn", 2, 8, target_s=60.0, baseline_points=1, check_points=2, strategy="loop"),
]
BASELINE_TARGET = 500.0  # design.md: engine ≥ 500× the per-point DataLoader loop on the same GPU
ENGINE_RTOL = {"fp32": 1e-5, "tf32": 5e-3, "bf16": 3e-2}  # loss, relative, as tests/test_engine.py
ENGINE_ACC_TOL = {"fp32": 0.02, "tf32": 0.2, "bf16": 1.0}  # accuracy, percentage points (a near-tie may flip)


def matmul_flops(device: Any, precision: str, n: int) -> float:
    """FLOP/s of an ``n``×``n`` matmul in ``precision`` (fp32 true IEEE, tf32 or bf16), best of 10."""
    import torch

    from fastland.engine import precision_context

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    best = math.inf
    with precision_context(precision, device):
        for i in range(12):
            _sync(device)
            with _timer() as t:
                a @ b
                _sync(device)
            if i >= 2:
                best = min(best, t[0])
    return 2 * n**3 / best


def stage_engine(rec: Record, args: argparse.Namespace) -> None:
    cases = DRY_ENGINE_CASES if rec.dry_run else ENGINE_CASES
    n = 256 if rec.dry_run else 8192
    precisions = ("fp32", "bf16") if rec.dry_run else ("fp32", "tf32", "bf16")
    peaks = {p: matmul_flops(rec.device, p, n) for p in precisions}
    rec.results["matmul_peak_tflops"] = {p: v / 1e12 for p, v in peaks.items()}
    rec.note(f"measured matmul peak ({n}×{n}): " + ", ".join(f"{p} {v / 1e12:,.1f} TFLOP/s" for p, v in peaks.items()))
    rec.results["cases"] = []
    for i, case in enumerate(cases):
        if rec.left() < 20:
            rec.left_out(f"engine case {case.model} {case.res}x{case.res} (the budget ran out)")
            continue
        try:
            engine_case(rec, case, reserve=45.0 * (len(cases) - i - 1), peaks=peaks)
        except Exception as err:  # noqa: BLE001 - one broken case must not hide the others' numbers
            rec.check(f"engine case {case.model} ran", False, f"raised {type(err).__name__}: {' '.join(str(err).split())[:300]}")
            rec.data.setdefault("tracebacks", {})[case.model] = traceback.format_exc()[-4000:]
        _engine_table(rec)


def _macs(info: dict[str, Any]) -> float:
    """MACs per input with the factorized first layer, from ``bench_engine.engine_info`` (per image; per sample
    after the engine refactor)."""
    return float(info.get("macs_per_image_factorized", info.get("macs_per_sample_factorized", math.nan)))


def _max_diff(got: Any, want: Any, relative: bool) -> float:
    """Largest (relative) difference of two fp64 vectors; 0 when both are None (no accuracy for the task)."""
    if got is None and want is None:
        return 0.0
    d = (got - want).abs()
    return float((d / want.abs()).max() if relative else d.max())


def engine_case(rec: Record, case: EngineCase, reserve: float, peaks: dict[str, float]) -> None:
    """Build, check against the reference, time the whole grid (or an evenly spaced part of it when the
    budget is short, then extrapolate), then time the per-point DataLoader baseline on a few points.
    Problem, engine and reference come from bench_engine.py, so both measure the same thing."""
    import bench_engine
    import torch

    from fastland.engine import precision_context

    dev = rec.device
    key = f"{case.model} {case.res}x{case.res}, {case.images:,} images"
    print(f"\n-- engine: {key}", flush=True)
    row: dict[str, Any] = {"model": case.model, "res": case.res, "grid_points": case.res**2, "images": case.images,
                           "target_s": case.target_s}
    rec.results["cases"].append(row)
    model, space, theta, dirs, ev = bench_engine.problem(case.model, case.images)
    engine, build_s = bench_engine.engine(case.model, case.images, "eval", case.strategy)
    info = bench_engine.engine_info(engine, 0, case.images)
    row.update(strategy=info["strategy"], precision=info["precision"], block=info["block"], batch=info["batch"],
               build_s=build_s, engine=engine.describe(), macs_factorized=_macs(info))

    # 1. the check: the engine as it will be timed, against the reference in true fp32
    coords = bench_engine.grid(case.res)
    sample = bench_engine.subset(coords, case.check_points)
    with precision_context("fp32", dev):
        want_loss, want_acc = bench_engine.reference(case.model, case.images).evaluate(sample)
    got_loss, got_acc = engine.evaluate(sample)
    rel, dacc = _max_diff(got_loss, want_loss, True), _max_diff(got_acc, want_acc, False)
    rtol, acc_tol = ENGINE_RTOL[row["precision"]], ENGINE_ACC_TOL[row["precision"]]
    varies = float(want_loss.max() - want_loss.min()) > 1e-3 * float(want_loss.abs().max())
    row.update(check_max_rel_err=rel, check_max_acc_diff=dacc)
    ok = bool(torch.isfinite(got_loss).all()) and rel <= rtol and dacc <= acc_tol and varies
    if not rec.check(f"engine = reference [{key}, {row['precision']}, {len(sample)} points]", ok,
                     f"loss rel. err {rel:.2e} (tol {rtol:g}), accuracy diff {dacc:.3f} points (tol {acc_tol:g})"
                     + ("" if varies else "; the reference loss does not vary over the sample")):
        return

    # 2. the whole grid, or as much of it as the budget allows (evenly spaced, extrapolated)
    allowance = rec.left() - reserve - 30
    spp = engine.seconds_per_point
    points = case.res**2
    if spp * points > 0.7 * allowance:
        points = min(points, max(row["block"], int(0.5 * allowance / spp)))
    if allowance < 5:
        rec.left_out(f"{key}: the grid timing (the budget ran out)")
        return
    timed = bench_engine.subset(coords, points)
    with _timer() as t:
        engine.evaluate(timed)  # returns CPU tensors: the device is synchronized
    grid_s = t[0] * case.res**2 / len(timed)
    flop = 2 * row["macs_factorized"] * case.images * len(timed)
    row.update(timed_points=len(timed), extrapolated=len(timed) < case.res**2, timed_s=t[0], grid_s=grid_s,
               points_per_s=len(timed) / t[0], tflops_factorized=flop / t[0] / 1e12,
               frac_of_peak=flop / t[0] / peaks.get(row["precision"], math.nan))
    if row["extrapolated"]:
        rec.note(f"{key}: timed {len(timed):,} evenly spaced points of {case.res**2:,} (the budget allowed no more); "
                 "the grid time is extrapolated")
    _engine_table(rec)

    # 3. the per-point DataLoader baseline (the official loss-landscape code's loop): a point first, then as
    #    many of the rest as fit; its values must be the engine's (it runs in PyTorch's default precision)
    bpts = bench_engine.subset(coords, case.baseline_points)
    allowance = rec.left() - reserve - 15
    results, spent = [], 0.0
    for k in range(len(bpts)):
        if k and spent / k * (k + 1) > min(allowance, 90.0):
            break
        with _timer() as t:
            results += bench_engine.li_et_al_loop(model, space, theta, dirs, ev, bpts[k : k + 1])
        spent += t[0]
    base_loss = torch.tensor([r[0] for r in results], dtype=torch.float64)
    base_acc = torch.tensor([r[1] for r in results], dtype=torch.float64)
    eng_loss, eng_acc = engine.evaluate(bpts[: len(results)])
    brel = _max_diff(base_loss, eng_loss, True)
    bacc = 0.0 if eng_acc is None else _max_diff(base_acc, eng_acc, False)
    if not rec.check(f"baseline = engine [{key}, {len(results)} points]", brel <= 1e-2 and bacc <= 1.0,
                     f"loss rel. err {brel:.2e} (tol 0.01), accuracy diff {bacc:.3f} points (tol 1)"):
        return
    per_point = spent / len(results)
    row.update(baseline_points=len(results), baseline_s_per_point=per_point,
               speedup_vs_baseline=per_point / (row["timed_s"] / row["timed_points"]))


def _engine_table(rec: Record) -> None:
    rows = []
    for r in rec.results.get("cases", []):
        if "grid_s" not in r:
            rows.append([f"{r['model']}", f"{r['res']}×{r['res']}", f"{r['images']:,}", r.get("strategy", "–"),
                         *["–"] * 8])
            continue
        target = None if rec.dry_run else r.get("target_s")  # tiny dry-run grids meet every target: say nothing
        met = "–" if target is None else (f"≤ {target:g} s: " + ("met" if r["grid_s"] <= target else "NOT met"))
        speed = r.get("speedup_vs_baseline")
        rows.append([r["model"], f"{r['res']}×{r['res']}", f"{r['images']:,}", f"{r['strategy']}, {r['precision']}",
                     f"{r['grid_s']:.2f}" + (" (extrapolated)" if r["extrapolated"] else ""), met,
                     _fmt(r["points_per_s"]), f"{r['tflops_factorized']:.2f} ({100 * r['frac_of_peak']:.0f}%)",
                     _fmt(r.get("baseline_s_per_point", math.nan) * 1e3), _fmt(r["timed_s"] / r["timed_points"] * 1e3),
                     "–" if speed is None else f"{speed:,.0f}×",
                     "–" if speed is None or rec.dry_run else ("met" if speed >= BASELINE_TARGET else "NOT met")])
    rec.table("engine", "Whole grids (checked against the reference first)",
              ["model", "grid", "images", "strategy, precision", "grid time (s)", "target", "grid points/s",
               "TFLOP/s factorized (of matmul peak)", "baseline ms/point", "engine ms/point", "engine ÷ baseline",
               f"≥ {BASELINE_TARGET:g}×"], rows,
              ["Baseline: the official loss-landscape code's loop (weights set through `p.data`, a DataLoader, "
               "`loss.item()` per batch; `bench_engine.li_et_al_loop`), timed per point on a few evenly spaced points.",
               "TFLOP/s count the work the engine needs with its factorized first layer (design.md's cost model); the "
               "peak is this run's matmul in the same precision.",
               "Build time (strategy probe included) is in the JSON (`build_s`), not in the grid time."])


# --- stage: probes ----------------------------------------------------------------------------------
def probe_checks(rec: Record, names: list[str], batch: int) -> None:
    """The batched probe path (vmap over the K perturbed weight sets) gives the sequential path's
    losses and gradients, in full fp32, on a fresh random minibatch."""
    import torch

    from fastland import models, probes
    from fastland.engine import precision_context

    dev = rec.device
    gen = torch.Generator().manual_seed(int(time.time()))
    for name in names:
        try:
            torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
            model = models.create(name).to(dev).train()
            x = torch.randn(batch, 3, 32, 32, generator=gen).to(dev)
            y = torch.randint(0, 10, (batch,), generator=gen).to(dev)
            prober = probes.SmoothnessProbe(model, probes.default_etas(0.01), "batched")
            with precision_context("fp32", dev):
                _, _, _, weights = prober.line(model, x, y)
                lb, gb = prober.gradients_batched(weights, x, y)
                ls, gs = prober.gradients_sequential(weights, x, y)
                ll, gl = prober.gradients_layered(weights, x, y)
            llrel = float(((ll - ls).abs() / ls.abs()).max())
            glrel = float((torch.linalg.vector_norm(gl - gs, dim=1) / torch.linalg.vector_norm(gs, dim=1)).max())
            rec.check(f"layered probe = sequential [{name}, batch {batch}, {len(prober.etas)} step lengths]",
                      bool(torch.isfinite(ll).all() and torch.isfinite(gl).all()) and llrel <= 1e-5 and glrel <= 1e-3,
                      f"loss rel. err {llrel:.2e} (tol 1e-5), gradient rel. err {glrel:.2e} (tol 1e-3)")
            lrel = float(((lb - ls).abs() / ls.abs()).max())
            grel = float((torch.linalg.vector_norm(gb - gs, dim=1) / torch.linalg.vector_norm(gs, dim=1)).max())
            finite = bool(torch.isfinite(lb).all() and torch.isfinite(gb).all())
            rec.check(f"batched probe = sequential [{name}, batch {batch}, {len(prober.etas)} step lengths]",
                      finite and lrel <= 1e-5 and grel <= 1e-3,
                      f"loss rel. err {lrel:.2e} (tol 1e-5), gradient rel. err {grel:.2e} (tol 1e-3, a max-pool tie may "
                      "flip)")
        except Exception as err:  # noqa: BLE001 - a path that raises fails its check, by name
            rec.check(f"batched probe = sequential [{name}]", False, f"raised {type(err).__name__}: {err}"[:300])


def stage_probes(rec: Record, args: argparse.Namespace) -> None:
    names = ["lenet", "lenet_bn"] if rec.dry_run else ["lenet", "lenet_bn", "vgg16", "vgg16_bn"]
    probe_checks(rec, names, 8 if rec.dry_run else 128)
    if rec.failed_checks():
        rec.note("the probe timings are not taken: a check failed")
        return
    with tempfile.TemporaryDirectory() as tmp:
        passes = [("tiny (dry run)", ["--tiny", "-k", "lenet"])] if rec.dry_run else [("GPU sizes", ["--gpu-sizes"])]
        bench = _bench_passes(rec, "bench_train.py", passes, Path(tmp))
    if bench is None:
        return
    rec.results["benchmark"] = bench
    by: dict[str, dict[str, dict[str, Any]]] = {}
    for b in bench["benchmarks"]:
        by.setdefault(b["extra_info"]["model"], {})[b["extra_info"]["mode"]] = b
    rows = []
    for name, modes in by.items():
        ms = {m: b["stats"]["median"] * 1e3 for m, b in modes.items()}
        auto = modes.get("auto", {}).get("extra_info", {})
        measured = auto.get("measured_ms", {})
        rows.append([name, str(next(iter(modes.values()))["extra_info"]["batch"]), _fmt(ms.get("none")),
                     _fmt(ms.get("batched")), _fmt(ms.get("layered")), _fmt(ms.get("sequential")),
                     _fmt(ms.get("sequential", math.nan) / ms.get("batched", math.nan)),
                     f"{_fmt(ms.get('auto'))} ({auto.get('chosen', '?')})",
                     f"{_fmt(measured.get('batched'))} / {_fmt(measured.get('sequential'))}",
                     _fmt(ms.get("batched", math.nan) / ms.get("none", math.nan))])
    rec.table("steps", "One training step with smoothness probes (median ms; H = 8 step lengths)",
              ["model", "batch", "no probe", "batched", "layered", "sequential", "sequential ÷ batched", "auto (its pick)",
               "auto's one-off ms: batched / sequential", "batched ÷ no probe"], rows,
              ["A probed step computes 9 extra gradients (g again, and one per step length), so ~9× a plain step is "
               "the cost of the work itself; batched wins where vmap over the 8 weight sets beats 8 separate calls."])


# --- stage: hessian ---------------------------------------------------------------------------------
HESSIAN_MODELS = ("lenet_bn", "resnet20_bn")


def _hessian_problem(name: str, images: int, dev: Any, seed: int) -> tuple[Any, Any, Any]:
    """A randomized built-in model (no zero tensors, BN statistics set) and random images with labels, on ``dev``."""
    import torch

    from fastland import models

    model = models.randomized(name, seed).to(dev).eval()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(images, 3, 32, 32, generator=gen).to(dev)
    y = torch.randint(0, 10, (images,), generator=gen).to(dev)
    return model, x, y


def _autograd_hvp(model: Any, x: Any, y: Any, vecs: Any, bn_mode: str) -> Any:
    """H v by ``torch.autograd.grad`` twice on the mean cross-entropy of one batch (``hessian.reference_hvp``):
    the plain reference, independent of fastland's products."""
    from fastland import hessian

    return hessian.reference_hvp(model, [(x, y)], vecs, bn_mode)


def hessian_checks(rec: Record, images: int) -> None:
    """fastland's Hessian-vector products against autograd's double backward (fresh random vectors, both BN
    modes, one batch so that batch statistics are the same), and the top eigenpair's residual recomputed with
    autograd's product; all in full fp32 (no TF32)."""
    import torch

    from fastland import hessian
    from fastland.engine import precision_context

    dev = rec.device
    seed = int(time.time()) % 100_000
    for name in HESSIAN_MODELS:
        model, x, y = _hessian_problem(name, images, dev, seed)
        for bn_mode in ("eval", "batch"):
            label = f"HVP = autograd double backward [{name}, bn_mode={bn_mode}, {images} images]"
            try:
                op = hessian.operator(model, (x, y), None, bn_mode, batch_size=images)
                vecs = torch.randn(2, op.numel, generator=torch.Generator().manual_seed(seed + 1)).to(dev)
                got = op.hvp(vecs)
                with precision_context("fp32", dev):
                    want = _autograd_hvp(model, x, y, vecs, bn_mode)
                rel = float((torch.linalg.vector_norm(got - want, dim=1) / torch.linalg.vector_norm(want, dim=1)).max())
                rec.check(label, bool(torch.isfinite(got).all()) and rel <= 1e-5, f"relative error {rel:.2e} (tol 1e-5)")
            except Exception as err:  # noqa: BLE001 - a path that raises fails its check, by name
                rec.check(label, False, f"raised {type(err).__name__}: {err}"[:300])
        label = f"top eigenpair's residual by autograd's product [{name}, {images} images]"
        try:
            res = hessian.top_eigenvalues(model, (x, y), k=1, tol=1e-3, batch_size=images)
            v = res.flat[0] if res.flat.dim() == 2 else res.flat
            with precision_context("fp32", dev):
                hv = _autograd_hvp(model, x, y, v[None].to(dev), "eval")[0]
            lam = float(res.values[0])
            resid = float(torch.linalg.vector_norm(hv - lam * v.to(dev)) / abs(lam) / torch.linalg.vector_norm(v))
            rec.check(label, res.converged and resid <= 2e-3,
                      f"λ1 {lam:.6g} after {res.hvps} products, residual {resid:.1e} (Lanczos said "
                      f"{float(res.residuals[0]):.1e}; tol 1e-3, checked to 2e-3)")
        except Exception as err:  # noqa: BLE001
            rec.check(label, False, f"raised {type(err).__name__}: {err}"[:300])


def _timed(dev: Any, fn: Callable[[], Any]) -> tuple[Any, float]:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def stage_hessian(rec: Record, args: argparse.Namespace) -> None:
    """Issue 11's GPU numbers: the top eigenvalue (and top 5) of ResNet-20-BN on 1,024 and 10,000 images, PyHessian
    beside it where it is installed, and a 21×21 curvature map on 10,000 images (timed on a 3×3 subgrid first;
    the whole map only when the budget holds it, else extrapolated and listed as left out)."""
    import torch

    from fastland import directions, hessian
    from fastland.params import FlatSpace

    dry = rec.dry_run
    hessian_checks(rec, 16 if dry else 256)
    if rec.failed_checks():
        rec.note("the Hessian timings are not taken: a check failed")
        return
    dev = rec.device
    name = "lenet_bn" if dry else "resnet20_bn"
    sizes = (64,) if dry else (1024, 10_000)
    rows: list[list[str]] = []
    rec.results["timings"] = []

    def add(what: str, images: int, seconds: float, hvps: int | None, value: str, note: str = "") -> None:
        rec.results["timings"].append({"model": name, "what": what, "images": images, "seconds": seconds,
                                       "hvps": hvps, "value": value, "note": note})
        per = f"{seconds / hvps:.3g}" if hvps else "–"
        rows.append([name, f"{images:,}", what, _fmt(seconds), str(hvps or "–"), per, value, note])
        rec.table("hessian", f"Hessian of {name} (BN eval mode, cross-entropy, randomized weights, random images)",
                  ["model", "images", "what", "seconds", "HVPs", "s per HVP", "value", "note"], rows,
                  ["Weights: `fastland.models.randomized` (no training; a trained minimum needs other HVP counts). "
                   "Tolerances: Lanczos relative residual 1e-3; Hutch++ standard error 1e-2 of the trace. Every "
                   "product in full fp32 (no TF32)."])

    for images in sizes:
        model, x, y = _hessian_problem(name, images, dev, 0)
        if rec.left() < 60:
            rec.left_out(f"top eigenvalue on {images:,} images (the budget ran out)")
            continue
        res, sec = _timed(dev, lambda: hessian.top_eigenvalues(model, (x, y), k=1, tol=1e-3))  # noqa: B023
        add("top-1 eigenvalue (fastland)", images, sec, res.hvps, f"λ1 = {float(res.values[0]):.6g}")
        if images == sizes[0]:
            try:
                import pyhessian
            except ImportError:
                rec.note("PyHessian is not installed here: its side of the comparison is the CPU one "
                         "(benchmarks/results/hessian-cpu-*.md)")
            else:
                import copy

                import torch.nn.functional as F

                def theirs(model: Any = model, x: Any = x, y: Any = y) -> Any:
                    torch.manual_seed(0)
                    comp = pyhessian.hessian(copy.deepcopy(model), F.cross_entropy, data=(x, y), cuda=dev.type == "cuda")
                    return comp.eigenvalues(top_n=1, tol=1e-3)

                (vals, _), sec = _timed(dev, theirs)
                add("top-1 eigenvalue (PyHessian 0.1, power iteration)", images, sec, None, f"λ1 = {vals[0]:.6g}",
                    "its HVP count is not reported")
        if images == sizes[-1] and rec.left() > 90:
            res5, sec = _timed(dev, lambda: hessian.top_eigenvalues(model, (x, y), k=5, tol=1e-3))  # noqa: B023
            add("top-5 eigenvalues (fastland)", images, sec, res5.hvps,
                "λ = " + ", ".join(f"{v:.4g}" for v in res5.values))
            tr, sec = _timed(dev, lambda: hessian.trace(model, (x, y), tol=1e-2, max_iter=100))  # noqa: B023
            add("trace (Hutch++)", images, sec, tr.hvps, f"{float(tr):.6g} ± {tr.stderr:.2g}",
                "" if tr.converged else "standard error above 1e-2 after 100 products (random weights)")

    # The curvature map: 21×21 (5×5 in a dry run) on the largest set, random filter-normalized directions.
    res_map, images = (5, 32) if dry else (21, 10_000)
    if rec.left() < (20 if dry else 120):
        rec.left_out(f"the {res_map}×{res_map} curvature map on {images:,} images (the budget ran out)")
        return
    model, x, y = _hessian_problem(name, images, dev, 0)
    space = FlatSpace(model)
    dirs = list(directions.make(space, space.flatten(model), 2, seed=1))
    stride = res_map // 2
    pilot, sec = _timed(dev, lambda: hessian.curvature_map(model, (x, y), dirs, res=res_map, stride=stride,
                                                           progress=False))
    n_pilot = int(pilot.done.sum())
    per_point = sec / n_pilot
    estimate = per_point * res_map**2
    add(f"curvature map, {n_pilot} points of {res_map}×{res_map} (stride {stride})", images, sec,
        int(pilot.hvps[pilot.done].sum()), f"λmin/λmax ratio {float(pilot.ratio[pilot.done].min()):.3g} to "
        f"{float(pilot.ratio[pilot.done].max()):.3g}", f"{per_point:.3g} s per point: {res_map}×{res_map} ≈ {estimate:,.0f} s")
    rec.results["curvature_map_estimate_s"] = estimate
    if estimate * 1.2 < rec.left() - 20:
        full, sec = _timed(dev, lambda: hessian.curvature_map(model, (x, y), dirs, res=res_map, progress=False))
        add(f"curvature map, {res_map}×{res_map}", images, sec, int(full.hvps[full.done].sum()),
            f"λmin/λmax ratio {float(full.ratio[full.done].min()):.3g} to {float(full.ratio[full.done].max()):.3g}",
            f"{int(full.done.sum())} points")
        rec.results["curvature_map_s"] = sec
    else:
        rec.left_out(f"the whole {res_map}×{res_map} curvature map on {images:,} images: about {estimate:,.0f} s by "
                     f"the {n_pilot}-point pilot, more than the {rec.left():.0f} s left; run `python -m fastland.hessian "
                     "--map FILE.h5` on a surface file, which resumes across commands")


# --- stage: study -----------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _extract(archive: Path, dest: Path, per_class: int | None) -> Path:
    """The archive's ``cifar10-jpeg`` tree under ``dest`` (all of it, or ``per_class`` images per class and
    split); returns its root. Reused when a complete copy is already there."""
    root = dest / "cifar10-jpeg"
    stamp = dest / f".extracted-{per_class or 'all'}"
    if stamp.exists():
        return root
    counts: dict[str, int] = {}
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) != 4 or parts[0] != "cifar10-jpeg" or ".." in parts:
                continue
            key = f"{parts[1]}/{parts[2]}"
            if per_class is not None and counts.get(key, 0) >= per_class:
                continue
            counts[key] = counts.get(key, 0) + 1
            target = dest / member.name
            target.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(member) as src:  # type: ignore[union-attr]
                target.write_bytes(src.read())
    stamp.write_text(json.dumps(counts))
    return root


def _synthetic_folder(dest: Path, per_class: int) -> Path:
    """A tiny ImageFolder tree of JPEGs from fastland's synthetic set, where the real archive is absent (CI)."""
    import torch
    from PIL import Image

    from fastland import data

    root = dest / "cifar10-jpeg"
    images, labels = data.synthetic("test")  # 10,000 images: both folders draw from it (the train split is 5× slower)
    for c, name in enumerate(CIFAR_CLASSES):
        mine = (labels == c).nonzero()[:, 0].tolist()
        for split, picks in (("train", mine[:per_class]), ("test", mine[per_class:2 * per_class])):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in picks:
                Image.fromarray(images[i].permute(1, 2, 0).to(torch.uint8).numpy()).save(folder / f"{i:05d}.jpg", quality=75)
    return root


def _tensors(ev: Any) -> tuple[Any, Any]:
    """An EvalSet's stored inputs and targets (``inputs``/``targets``; ``images``/``labels`` before the data refactor)."""
    inputs = getattr(ev, "inputs", None)
    return (inputs, ev.targets) if inputs is not None else (ev.images, ev.labels)


def imagefolder_support(spec: str) -> str | None:
    """None when ``fastland.data`` and ``python -m fastland.study`` take ``--data imagefolder:PATH``, else why
    not (then the stage is skipped: the study cannot read the CIFAR-10 JPEG copy)."""
    import contextlib
    import inspect

    from fastland import data, study

    if "imagefolder" not in inspect.getsource(data):
        return ("fastland.data has no 'imagefolder:PATH' source yet (it is being added), so the study cannot read the "
                "CIFAR-10 JPEG copy; nothing was run")
    try:
        with contextlib.redirect_stderr(io.StringIO()) as err:
            study.build_parser().parse_args(["--data", spec])
    except SystemExit:
        return (f"python -m fastland.study does not take --data {spec} yet ({err.getvalue().strip()}), so the study "
                "cannot read the CIFAR-10 JPEG copy; nothing was run")
    return None


def _study_args(rec: Record, args: argparse.Namespace) -> list[str]:
    if args.study_args:
        return shlex.split(args.study_args)
    if rec.dry_run:  # one model: its first probe alone takes ~10 s on a busy 2-core CPU, even at a batch of 16
        return ["--models", "lenet_bn", "--epochs", "1", "--train-samples", "16", "--probe-every", "5",
                "--res", "3", "--samples", "16", "--eval-samples", "20"]
    # The seed's four models, shortened to fit one 10-minute command: 5 epochs on all 50,000 images, a probe
    # every 4th step, 51×51 surfaces on 2,000 training images, final numbers on 10,000 of each split.
    return ["--preset", "seed", "--epochs", "5", "--probe-every", "4", "--res", "51", "--samples", "2000",
            "--eval-samples", "10000"]


def stage_study(rec: Record, args: argparse.Namespace) -> None:
    """The seed study on the CIFAR-10 JPEG copy: the archive checked (sha256, layout, counts), then
    ``python -m fastland.study`` in a subprocess bounded by the budget, then its report collected."""
    archive = Path(args.data_archive) if args.data_archive else CARRIED_ARCHIVE
    if rec.dry_run and not args.data_archive and not archive.exists() and SHARED_ARCHIVE.exists():
        archive = SHARED_ARCHIVE
    work = Path(args.workdir) if args.workdir else (ROOT / ".cache" / "gpu-runner" / ("study-dry" if rec.dry_run else "study"))
    work.mkdir(parents=True, exist_ok=True)
    per_class = 10 if rec.dry_run else None
    if archive.exists():
        digest = _sha256(archive)
        if not rec.check("CIFAR-10 JPEG archive intact", digest == CIFAR_JPEG_SHA256, f"{archive}: sha256 {digest[:16]}…"):
            return
        root = _extract(archive, work / "data", per_class)
    elif rec.dry_run:
        rec.note(f"no CIFAR-10 JPEG archive ({archive}, {SHARED_ARCHIVE}): the dry run uses synthetic JPEGs")
        root = _synthetic_folder(work / "data", per_class or 10)
    else:
        rec.check("CIFAR-10 JPEG archive present", False, f"{archive} is missing: run `bash benchmarks/carry_data.sh` "
                  "here and name .carry in the device call's carry list")
        return
    counts = {split: {c: len(list((root / split / c).glob("*.jpg"))) for c in CIFAR_CLASSES} for split in ("train", "test")}
    want = {"train": per_class or 5000, "test": per_class or 1000}
    rec.check("ImageFolder layout: train/ and test/, CIFAR-10's ten classes, images per class",
              all(n == want[s] for s in counts for n in counts[s].values()),
              ", ".join(f"{s}: {sum(c.values()):,} ({min(c.values())}-{max(c.values())} per class)" for s, c in counts.items()))
    spec = f"imagefolder:{root}"
    problem = imagefolder_support(spec)
    if problem:
        rec.skip(problem)
        return
    _study_data_check(rec, spec, counts)
    if rec.failed_checks():
        return
    cmd = [sys.executable, "-m", "fastland.study", *_study_args(rec, args), "--data", spec,
           "--device", str(rec.device), "--out", str(work / "run")]
    rec.results["study_command"] = " ".join(shlex.quote(c) for c in cmd)
    timeout = max(rec.left() - 20, 1.0)
    print(f"\n-- {rec.results['study_command']} (at most {timeout:.0f} s)", flush=True)
    code, output = _run_streamed(cmd, timeout)
    rec.results["study_output_tail"] = output[-4000:]
    _collect_study(rec, work / "run", code, output)


def _run_streamed(cmd: list[str], timeout: float) -> tuple[int | None, str]:
    """Run ``cmd``, echoing its output as it comes (a device call shows the end of it), and kill it after
    ``timeout`` seconds; returns its exit code (None when killed) and its last output."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    killer = threading.Timer(timeout, proc.kill)
    killer.start()
    tail: collections.deque[str] = collections.deque(maxlen=400)
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stdout.write(line)
        tail.append(line)
    code = proc.wait()
    killed = not killer.is_alive() and code < 0
    killer.cancel()
    return (None if killed else code), "".join(tail)


def _study_data_check(rec: Record, spec: str, counts: dict[str, dict[str, int]]) -> None:
    """The test split read through ``fastland.data``: every image, CIFAR-10's classes, and a mean pixel near
    120.7 (../shared/data/README.md; the full split only: the dry run's handful of images may differ)."""
    from fastland import data

    try:
        ev = data.load(spec, "test", None, seed=0)
    except Exception as err:  # noqa: BLE001 - fastland.data cannot read the copy: the check says so
        rec.check(f"fastland.data reads {spec}", False, f"raised {type(err).__name__}: {' '.join(str(err).split())[:300]}")
        return
    images, labels = _tensors(ev)
    n_want = sum(counts["test"].values())
    mean = float(images.float().mean())
    hist = [int((labels == c).sum()) for c in range(10)]
    ok = len(ev) == n_want and hist == [counts["test"][c] for c in CIFAR_CLASSES] and (rec.dry_run or abs(mean - 120.7) < 3)
    rec.check(f"fastland.data reads {spec} (test split)", ok,
              f"{len(ev):,} images (want {n_want:,}), per class {hist}, mean pixel {mean:.1f}")


def _collect_study(rec: Record, run: Path, code: int | None, output: str) -> None:
    stages = json.loads((run / "stages.json").read_text()) if (run / "stages.json").exists() else {}
    rec.results["stages_s"] = stages
    rec.table("stages", "Study stages (wall seconds)", ["stage", "seconds"], [[k, f"{v:.1f}"] for k, v in stages.items()])
    if code is None:
        rec.left_out("the rest of the study (it ran out of the budget; what finished is above)")
        return
    last = output.strip().splitlines()[-1] if output.strip() else ""
    if not rec.check("fastland.study finished", code == 0, f"exit code {code}: {last}"):
        return
    results = json.loads((run / "results.json").read_text())
    rec.results["study"] = results
    finite = all(math.isfinite(float(r.get(k, math.nan))) for r in results.values()
                 for k in ("train_loss", "test_loss", "train_acc", "test_acc"))
    rec.check("every model has finite final losses and accuracies", finite,
              ", ".join(f"{n}: test acc {float(r['test_acc']):.1f}%" for n, r in results.items()))
    report = (run / "report.md").read_text()
    numbers = report[report.index("## Numbers"):report.index("## Figures")] if "## Figures" in report else report
    table = [ln for ln in numbers.splitlines() if ln.startswith("|")]
    intro = report[:report.index("## Numbers")].splitlines()[2:] if "## Numbers" in report else []
    rec.table("numbers", "The study's numbers (from its report.md)",
              [c.strip() for c in table[0].strip("|").split("|")],
              [[c.strip() for c in ln.strip("|").split("|")] for ln in table[2:]], [p for p in intro if p.strip()])
    for fig in sorted((run / "figures").glob("fig1_*.png"))[:2]:  # Figure 1 per architecture; the rest stays behind
        dest = rec.outdir / f"{rec.stem}-{fig.name}"
        shutil.copyfile(fig, dest)
        rec.extra_files.append(dest)
    if rec.extra_files:
        rec.note("Figure 1 of each architecture: " + ", ".join(p.name for p in rec.extra_files))


# --- running -----------------------------------------------------------------------------------------
RUNNERS: dict[str, Callable[[Record, argparse.Namespace], None]] = {
    "tests": stage_tests, "kernels": stage_kernels, "engine": stage_engine, "probes": stage_probes, "hessian": stage_hessian,
    "study": stage_study,
}


def setup_environment(stage: str, dry_run: bool) -> None:
    """Environment variables that must be set before torch, Triton or fastland.kernels are imported."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(ROOT / ".cache" / "inductor"))
    os.environ.setdefault("MPLCONFIGDIR", str(ROOT / ".cache" / "matplotlib"))
    os.environ.setdefault("XDG_CACHE_HOME", str(ROOT / ".cache"))
    os.environ.setdefault("MPLBACKEND", "Agg")
    os.environ["FASTLAND_BENCH_DEVICE"] = "cpu" if dry_run else "cuda"
    os.environ.setdefault("FASTLAND_OFFLINE", "1")  # the GPU machine has no network: never try a download
    if dry_run:
        os.environ.setdefault("FASTLAND_BENCH_THREADS", "1")  # steadier on a shared machine; the numbers mean nothing
        if stage == "kernels":
            os.environ["TRITON_INTERPRET"] = "1"  # the checks run the kernels through the interpreter
    else:
        os.environ.pop("TRITON_INTERPRET", None)  # compiled kernels: the point of the GPU run


def run_stage(stage: str, outdir: Path, dry_run: bool, budget: float | None, args: argparse.Namespace) -> int:
    """Run one stage in this process; returns its exit code."""
    import torch

    if not dry_run and not torch.cuda.is_available():
        raise UserError(f"no CUDA device here (torch {torch.__version__}): run the stages on a GPU, or check them on "
                        "this CPU with `bash benchmarks/gpu.sh --dry-run OUTDIR`")
    command = f"bash benchmarks/gpu.sh {stage} {outdir}{' --dry-run' if dry_run else ''}"
    rec = Record(stage, outdir, dry_run, budget or (DRY_BUDGET if dry_run else BUDGET[stage]), command)
    print(f"== {stage}{' (dry run)' if dry_run else ''}: {rec.data['environment']['device']}, budget "
          f"{rec.data['budget_s']:.0f} s, writing {rec.paths()[0]}", flush=True)
    if os.environ.get("FASTLAND_BENCH_THREADS"):
        torch.set_num_threads(int(os.environ["FASTLAND_BENCH_THREADS"]))
    rec.write()
    try:
        RUNNERS[stage](rec, args)
    except Exception as err:  # noqa: BLE001 - whatever broke, the numbers so far are written and the cause named
        rec.check(f"stage {stage} ran to the end", False, f"raised {type(err).__name__}: {' '.join(str(err).split())[:300]}")
        rec.data["traceback"] = traceback.format_exc()[-6000:]
    return rec.finish()


def run_all(outdir: Path, dry_run: bool, args: argparse.Namespace) -> int:
    """Every stage, each in its own process (as on the GPU, one command per stage); a table at the end."""
    rows, codes = [], []
    for stage in STAGES:
        cmd = [sys.executable, str(Path(__file__).resolve()), stage, str(outdir), *(["--dry-run"] if dry_run else [])]
        for opt in ("budget", "data_archive", "study_args", "workdir"):
            if getattr(args, opt) is not None:
                cmd += [f"--{opt.replace('_', '-')}", str(getattr(args, opt))]
        t0 = time.monotonic()
        code = subprocess.call(cmd, cwd=ROOT)
        found = sorted(outdir.glob(f"{stage}-*.json"))
        status = json.loads(found[-1].read_text())["status"] if found else "no output"
        rows.append([stage, status, str(code), f"{time.monotonic() - t0:.0f}"])
        codes.append(code)
    worst = EXIT_OK if not any(codes) else (EXIT_FAILED if EXIT_FAILED in codes else max(codes))
    print(f"\n== all stages{' (dry run)' if dry_run else ''}: {'OK' if worst == EXIT_OK else 'NOT OK'}\n"
          + _md_table(["stage", "status", "exit", "seconds"], rows) + f"\nresults in {outdir}")
    return worst


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="bash benchmarks/gpu.sh", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=(*STAGES, "all"), help="the stage to run; 'all' runs each in turn, in its own process")
    p.add_argument("outdir", type=Path, help="folder for STAGE-DEVICE-DATE.json/.md (created if missing)")
    p.add_argument("--dry-run", action="store_true",
                   help="tiny sizes on the CPU, without CUDA: checks that the stage works before GPU time is spent")
    p.add_argument("--budget", type=float, default=None,
                   help=f"seconds the stage may take (default: {', '.join(f'{k} {v}' for k, v in BUDGET.items())}; "
                        f"{DRY_BUDGET} in a dry run); what would not fit is left out and listed")
    p.add_argument("--data-archive", default=None,
                   help=f"study: the CIFAR-10 JPEG archive (default {CARRIED_ARCHIVE.relative_to(ROOT)}, put there by "
                        "benchmarks/carry_data.sh)")
    p.add_argument("--study-args", default=None,
                   help="study: the options for python -m fastland.study, replacing the runner's choice (quoted, e.g. "
                        "\"--preset quick\"); --data, --device and --out are the runner's")
    p.add_argument("--workdir", default=None, help="study: where the archive is unpacked and the study runs "
                                                   "(default .cache/gpu-runner/)")
    return p


@cli_entry
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.budget is not None and args.budget <= 0:
        raise UserError(f"--budget must be a positive number of seconds, got {args.budget:g}")
    os.chdir(ROOT)
    outdir = args.outdir.resolve()
    try:
        outdir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create the output folder {args.outdir}: {err.strerror}; choose a writable OUTDIR") from None
    if args.stage == "all":
        sys.exit(run_all(outdir, args.dry_run, args))
    setup_environment(args.stage, args.dry_run)
    sys.exit(run_stage(args.stage, outdir, args.dry_run, args.budget, args))


if __name__ == "__main__":
    main()
