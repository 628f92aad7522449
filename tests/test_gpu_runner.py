"""The GPU runner (benchmarks/gpu.sh, benchmarks/gpu_stages.py) works before GPU time is spent on it.

``bash benchmarks/gpu.sh --dry-run OUTDIR`` runs every stage at tiny sizes on this CPU, each in its own
process, exactly as CI does; the files it writes must be what a GPU run would bring back (a few small
files per stage with plain names, device, versions and date, every check passed). A wrong reference
must fail the engine check by name and leave the numbers so far behind; a spent budget must end the
stage as incomplete; bad usage must end in one line.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GPU_SH = ROOT / "benchmarks" / "gpu.sh"
STAGES = ("tests", "kernels", "engine", "probes", "hessian", "study")


def _gpu_sh(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FASTLAND_PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    return subprocess.run(["bash", str(GPU_SH), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    out = tmp_path_factory.mktemp("gpu-dry-run")
    work = tmp_path_factory.mktemp("gpu-dry-work")
    return _gpu_sh("--dry-run", str(out), "--workdir", str(work)), out


def _stage_files(out: Path, stage: str) -> tuple[dict, str]:
    found = sorted(out.glob(f"{stage}-cpu-dryrun-*.json"))
    assert len(found) == 1, f"{stage}: expected one JSON, found {[p.name for p in out.iterdir()]}"
    md = found[0].with_suffix(".md")
    assert md.exists()
    return json.loads(found[0].read_text()), md.read_text()


def test_dry_run_passes_and_brings_back_few_plain_files(dry_run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    run, out = dry_run
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "all stages (dry run): OK" in run.stdout
    files = sorted(out.iterdir())
    # The device tool brings back at most 8 files per command, each < 16 MiB, named in [A-Za-z0-9._-]:
    # one stage per command must stay inside that.
    for stage in STAGES:
        mine = [p for p in files if p.name.startswith(f"{stage}-")]
        assert 2 <= len(mine) <= 4, (stage, [p.name for p in mine])
    for p in files:
        assert re.fullmatch(r"[A-Za-z0-9._-]+", p.name), p.name
        assert p.stat().st_size < 16 * 2**20, p.name


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_records_device_versions_date_and_checks(dry_run: tuple[subprocess.CompletedProcess[str], Path],
                                                            stage: str) -> None:
    _, out = dry_run
    data, md = _stage_files(out, stage)
    assert data["stage"] == stage and data["dry_run"] is True
    assert data["status"] == "ok" or (stage == "study" and data["status"] == "skipped"), data["status"]
    env = data["environment"]
    for key in ("device", "torch", "triton", "numpy", "cuda", "driver", "date", "commit", "python"):
        assert env.get(key) not in (None, ""), key
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", env["date"])
    assert data["checks"], "every stage checks something before it times"
    assert all(c["ok"] for c in data["checks"]), [c for c in data["checks"] if not c["ok"]]
    assert 0 < data["seconds"] <= data["budget_s"]
    assert md.startswith(f"# GPU runner, stage `{stage}`: {env['device']}")
    assert f"status: **{data['status']}**" in md and env["torch"] in md and "| check | result | detail |" in md


def test_stage_numbers_are_sane(dry_run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    _, out = dry_run
    tests, _ = _stage_files(out, "tests")
    assert tests["results"]["counts"]["skipped"] > 0  # every cuda test collected, and skipped without CUDA
    assert tests["results"]["counts"]["passed"] == tests["results"]["counts"]["failed"] == 0

    kernels, md = _stage_files(out, "kernels")
    benches = kernels["results"]["benchmark"]["benchmarks"]
    assert benches and all(b["extra_info"]["gbps"] > 0 for b in benches)
    assert "| case | impl |" in md

    engine, md = _stage_files(out, "engine")
    cases = engine["results"]["cases"]
    assert [c["model"] for c in cases] == ["lenet_bn", "vgg16_bn"]
    for c in cases:
        assert c["check_max_rel_err"] <= 1e-5  # fp32 on the CPU, against the reference
        assert c["grid_s"] > 0 and c["timed_points"] == c["grid_points"]
        assert c["baseline_s_per_point"] > 0 and c["speedup_vs_baseline"] > 0
    assert "| lenet_bn | 5×5 | 64 |" in md

    probes, md = _stage_files(out, "probes")
    modes = {(b["extra_info"]["model"], b["extra_info"]["mode"]) for b in probes["results"]["benchmark"]["benchmarks"]}
    assert modes == {(m, mode) for m in ("lenet", "lenet_bn") for mode in ("none", "layered", "batched", "sequential", "auto")}
    assert "| lenet_bn | 8 |" in md

    hess, md = _stage_files(out, "hessian")
    checks = [c["name"] for c in hess["checks"]]
    for name in ("lenet_bn", "resnet20_bn"):
        for bn_mode in ("eval", "batch"):
            assert f"HVP = autograd double backward [{name}, bn_mode={bn_mode}, 16 images]" in checks
    whats = [t["what"] for t in hess["results"]["timings"]]
    assert whats[0] == "top-1 eigenvalue (fastland)" and "curvature map, 5×5" in whats, whats
    assert all(t["seconds"] > 0 for t in hess["results"]["timings"])
    assert hess["results"]["curvature_map_s"] > 0  # the whole 5×5 map fits a dry run's budget
    assert "| lenet_bn | 64 | top-1 eigenvalue (fastland) |" in md

    study, md = _stage_files(out, "study")
    if study["status"] == "skipped":
        assert "imagefolder" in md and "nothing was run" in md
    else:
        assert set(study["results"]["study"]) == {"lenet_bn"}  # the dry run trains one model
        assert "The study's numbers" in md


def test_a_wrong_reference_fails_the_engine_check_by_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine is checked against a reference evaluator of *another* model (a real evaluator with other
    weights): the check must fail by name, that case must not be timed, and the files must still be written."""
    monkeypatch.setenv("FASTLAND_BENCH_DEVICE", "cpu")
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_engine
    import gpu_stages

    from fastland import directions, models
    from fastland.params import FlatSpace
    from fastland.reference import ReferenceEvaluator

    def other_reference(name: str, images: int) -> ReferenceEvaluator:
        _, _, _, _, ev = bench_engine.problem(name, images)
        model = models.randomized(name, seed=7)
        space = FlatSpace(model)
        theta = space.flatten(model)
        return ReferenceEvaluator(model, space, theta, directions.make(space, theta, dim=2, seed=1), ev,
                                  bench_engine.task(name, images))

    monkeypatch.setattr(bench_engine, "reference", other_reference)
    monkeypatch.setattr(gpu_stages, "DRY_ENGINE_CASES", gpu_stages.DRY_ENGINE_CASES[:1])
    rec = gpu_stages.Record("engine", tmp_path, True, 120, "test")
    gpu_stages.stage_engine(rec, None)  # type: ignore[arg-type]
    assert rec.finish() == gpu_stages.EXIT_FAILED
    data = json.loads(rec.paths()[0].read_text())
    assert data["status"] == "failed"
    failed = [c["name"] for c in data["checks"] if not c["ok"]]
    assert len(failed) == 1 and failed[0].startswith("engine = reference [lenet_bn 5x5, 64 images")
    case = data["results"]["cases"][0]
    assert "grid_s" not in case and "baseline_s_per_point" not in case  # nothing timed after a failed check
    assert data["results"]["matmul_peak_tflops"]["fp32"] > 0  # what was measured before is kept
    assert "**FAILED**" in rec.paths()[1].read_text()


def test_a_wrong_hessian_reference_fails_its_checks_and_nothing_is_timed(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """autograd's product scaled by 1.001 (a real double backward, slightly wrong): every HVP check fails by
    name and no Hessian timing is taken."""
    monkeypatch.setenv("FASTLAND_BENCH_DEVICE", "cpu")
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_stages

    right = gpu_stages._autograd_hvp
    monkeypatch.setattr(gpu_stages, "_autograd_hvp", lambda *a: 1.001 * right(*a))
    monkeypatch.setattr(gpu_stages, "HESSIAN_MODELS", ("lenet_bn",))
    rec = gpu_stages.Record("hessian", tmp_path, True, 120, "test")
    gpu_stages.stage_hessian(rec, None)  # type: ignore[arg-type]
    assert rec.finish() == gpu_stages.EXIT_FAILED
    data = json.loads(rec.paths()[0].read_text())
    failed = [c["name"] for c in data["checks"] if not c["ok"]]
    assert failed[:2] == ["HVP = autograd double backward [lenet_bn, bn_mode=eval, 16 images]",
                          "HVP = autograd double backward [lenet_bn, bn_mode=batch, 16 images]"], failed
    assert "timings" not in data["results"]


def test_a_spent_budget_ends_the_stage_incomplete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASTLAND_BENCH_DEVICE", "cpu")
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_stages

    rec = gpu_stages.Record("engine", tmp_path, True, 1e-3, "test")
    gpu_stages.stage_engine(rec, None)  # type: ignore[arg-type]
    assert rec.finish() == gpu_stages.EXIT_INCOMPLETE
    data = json.loads(rec.paths()[0].read_text())
    assert data["status"] == "incomplete" and len(data["left_out"]) == len(gpu_stages.DRY_ENGINE_CASES)
    assert "## Left out (the budget ran out)" in rec.paths()[1].read_text()


@pytest.mark.parametrize(("args", "message"), [
    ((), "usage: bash benchmarks/gpu.sh STAGE OUTDIR"),
    (("bogus", "OUT"), "invalid choice: 'bogus'"),
    (("engine", "OUT", "--budget", "-5"), "--budget must be a positive number"),
])
def test_bad_usage_is_one_line_and_exit_2(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    run = _gpu_sh(*(str(tmp_path / a) if a == "OUT" else a for a in args), timeout=120)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], run.stderr


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the message where there is no GPU")
def test_a_gpu_stage_without_cuda_says_to_use_the_dry_run(tmp_path: Path) -> None:
    run = _gpu_sh("kernels", str(tmp_path), timeout=120)
    assert run.returncode == 2 and "no CUDA device here" in run.stderr and "--dry-run" in run.stderr
    assert not list(tmp_path.iterdir())


def test_study_data_helpers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The dry run's two data sources: a subset of the real archive (where there is one) and synthetic JPEGs."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_stages

    root = gpu_stages._synthetic_folder(tmp_path / "synthetic", 2)
    for split in ("train", "test"):
        assert sorted(d.name for d in (root / split).iterdir()) == sorted(gpu_stages.CIFAR_CLASSES)
        assert sum(1 for _ in (root / split).glob("*/*.jpg")) == 20
    archive = next((a for a in (gpu_stages.CARRIED_ARCHIVE, gpu_stages.SHARED_ARCHIVE) if a.exists()), None)
    if archive is None:
        pytest.skip("no CIFAR-10 JPEG archive here (.carry/ or ../shared/data/)")
    root = gpu_stages._extract(archive, tmp_path / "real", 3)
    for split in ("train", "test"):
        counts = {c: len(list((root / split / c).glob("*.jpg"))) for c in gpu_stages.CIFAR_CLASSES}
        assert set(counts.values()) == {3}, counts


def test_gpu_only_tables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The tables that only a GPU run fills (Triton rows; targets met or not), from rows shaped as there."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_stages

    def bench(impl: str, gbps: float, **extra: float) -> dict:
        return {"name": f"test_perturb[vgg16-P32-fp32-{impl}]", "param": f"vgg16-P32-fp32-{impl}",
                "extra_info": {"impl": impl, "n": 14_728_266, "gbps": gbps, **extra}}

    header, rows, notes = gpu_stages._kernel_headline([
        bench("triton", 2400.0, copy_gbps=2900.0, frac_of_copy=2400 / 2900), bench("eager", 900.0),
        bench("compile", 1500.0), bench("triton_aligned", 2000.0, copy_gbps=2900.0, frac_of_copy=2000 / 2900)])
    assert [r[:2] for r in rows] == [["perturb[vgg16-P32-fp32]", "triton"], ["perturb[vgg16-P32-fp32]", "triton_aligned"]]
    assert rows[0][-2:] == ["0.83", "met"] and rows[1][-2:] == ["0.69", "NOT met"] and rows[0][5] == "1.6"
    assert len(header) == len(rows[0]) and not notes

    rec = gpu_stages.Record("engine", tmp_path, True, 60, "test")
    rec.dry_run = False  # the table as a GPU run writes it
    rec.results["cases"] = [
        {"model": "lenet_bn", "res": 201, "images": 10_000, "target_s": 20.0, "strategy": "vmap", "precision": "tf32",
         "grid_s": 12.5, "extrapolated": False, "points_per_s": 3232.0, "tflops_factorized": 40.0, "frac_of_peak": 0.2,
         "baseline_s_per_point": 0.2, "timed_s": 12.5, "timed_points": 40401, "speedup_vs_baseline": 646.0},
        {"model": "vgg16_bn", "res": 51, "images": 10_000, "target_s": 60.0, "strategy": "im2col", "precision": "tf32",
         "grid_s": 95.0, "extrapolated": True, "points_per_s": 27.4, "tflops_factorized": 170.0, "frac_of_peak": 0.4,
         "timed_s": 40.0, "timed_points": 1100},
        {"model": "resnet20_bn", "res": 51, "images": 10_000, "target_s": None, "strategy": "loop"},
    ]
    gpu_stages._engine_table(rec)
    rows = rec.sections["engine"][2]
    assert rows[0][5] == "≤ 20 s: met" and rows[0][-2:] == ["646×", "met"]
    assert rows[1][4] == "95.00 (extrapolated)" and rows[1][5] == "≤ 60 s: NOT met" and rows[1][-1] == "–"
    assert rows[2][4:] == ["–"] * 8 and all(len(r) == len(rec.sections["engine"][1]) for r in rows)
