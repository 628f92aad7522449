"""`python -m fastland.study`: its numbers, a tiny quick study and a tiny resnet study end to end, the
report's numbers re-derived from the files the study wrote, stage reuse, and bad input in one line."""

import contextlib
import csv
import io
import json
import shutil
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import one_error_line, run_main

from fastland import files, study
from fastland import train as train_mod
from fastland.surfacefile import Surface

# A quick-preset study shrunk to seconds: LeNet ± BN, 2 epochs of 2 steps, tiny grids and Hessians.
TINY = ["--epochs", "2", "--train-samples", "256", "--probe-every", "2", "--res", "7", "--samples", "32",
        "--eval-samples", "128", "--hessian-samples", "32", "--hessian-hvps", "40", "--trajectory-res", "5",
        "--device", "cpu"]


def _bowl(n: int = 81) -> Surface:
    x = np.linspace(-1, 1, n)
    xx, yy = np.meshgrid(x, x)
    loss = 0.3 + (xx - 0.2) ** 2 + (yy + 0.1) ** 2
    return Surface(x, x, loss, {"accuracy": np.zeros_like(loss)}, np.ones_like(loss, dtype=np.uint8), {},
                   path=Path("bowl.h5"))


def test_flatness_of_an_analytic_bowl() -> None:
    f = study.flatness(_bowl())
    assert f["min_loss"] == pytest.approx(0.3) and f["min_alpha"] == pytest.approx(0.2)
    assert f["min_beta"] == pytest.approx(-0.1)
    assert f["loss_range"] == pytest.approx(1.2**2 + 1.1**2)  # the corner (-1, 1) is farthest from (0.2, -0.1)
    for r in study.RADII:  # rise = r² on the ring, up to half a grid step of radius
        h = 1 / 80
        assert (r - h) ** 2 <= f[f"rise_mean_{r}"] <= (r + h) ** 2
        assert f[f"rise_max_{r}"] <= (r + h) ** 2


def test_flatness_reports_divergence() -> None:
    s = _bowl()
    s.loss[0, :] = np.inf  # far edge diverged
    f = study.flatness(s)
    assert np.isinf(f["rise_max_1.0"]) and np.isfinite(f["rise_mean_1.0"]) and np.isinf(f["loss_range"])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """The tiny quick study, run twice (the second run reuses every stage): its folder and both outputs."""
    out = tmp_path_factory.mktemp("study") / "s"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FASTLAND_OFFLINE", "1")
        mp.setenv("FASTLAND_DATA", str(out.parent / "nodata"))
        mp.setattr(train_mod.Progress, "LINE_SECONDS", 0.0)  # a progress line every step: the log shows training move
        texts = []
        for _ in range(2):  # capsys is function-scoped: capture by hand
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()):
                study.main([*TINY, "--out", str(out)])
            texts.append(buf.getvalue())
    return out, texts[0], texts[1]


@pytest.mark.slow
def test_tiny_quick_study_end_to_end_and_reuse(tiny: tuple[Path, str, str]) -> None:
    out, first, again = tiny
    report = (out / "report.md").read_text()
    assert "synthetic" in report and "| | lenet | lenet_bn |" in report.replace("|  |", "| |")
    for row in ("effective β-smoothness, median", "Hessian λmax at the minimum, BN eval mode",
                "Hessian trace at the minimum, BN batch mode", "loss rise at r=0.5", "trajectory: variance on PC1"):
        assert row in report
    assert "Shortened from the seed's experiment: lenet" not in report and "2 epochs instead of 20" in report
    assert "epochs of Adam (lr 0.01, batch 128)" in report
    assert report.index("## What the numbers show") < report.index("## Numbers") < report.index("## Figures")
    html = (out / "report.html").read_text()
    assert "<table>" in html and "fig1_lenet.png" in html and "trajectory_lenet_bn.png" in html
    for line in report.splitlines():
        if line.startswith("!["):
            assert (out / line.split("](")[-1].rstrip(")")).is_file(), line
    from fastland import surfacefile

    assert surfacefile.read(out / "lenet_bn" / "surface.h5").attrs["data_warning"]  # auto fell back: say so
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"lenet", "lenet_bn"}  # the GPU runner reads {model: numbers}
    assert results["lenet"]["probes"] == 2 and np.isfinite(results["lenet_bn"]["beta_median"])
    assert "lambda_max_batch" in results["lenet_bn"] and "lambda_max_batch" not in results["lenet"]
    ev = json.loads((out / "lenet_bn" / "evaluation.json").read_text())
    assert ev["train_batch_stats"]["batch_size"] == 128 and ev["train_batch_stats"]["loss"] > 0
    assert results["lenet_bn"]["train_loss_batch"] == ev["train_batch_stats"]["loss"]
    batch_row = _table(report)["final train loss / accuracy (%), BN batch statistics"]
    assert batch_row[0] == "= eval (no BN)" and " / " in batch_row[1], batch_row
    hess = json.loads((out / "lenet_bn" / "hessian.json").read_text())
    assert set(hess["modes"]) == {"eval", "batch"} and hess["modes"]["batch"]["trace"]["bn_mode"] == "batch"
    assert results["lenet"]["trajectory_points"] >= 3
    assert "steps/s, ETA" in first  # training prints progress lines when stderr is not a terminal
    # The second run reuses every stage: no training step, no grid point, no Hessian-vector product.
    assert "finished before" in again and "steps/s" not in again and "epoch 1/2" not in again
    assert again.count("0 to evaluate (resuming)") == 4 and again.count("kept (λmax") == 3
    stages = json.loads((out / "stages.json").read_text())
    assert {"lenet: train with probes", "lenet_bn: hessian", "lenet_bn: trajectory"} <= set(stages)


def _table(report: str) -> dict[str, list[str]]:
    rows = [ln.strip("|").split("|") for ln in report.split("## Numbers")[1].split("## Figures")[0].splitlines()
            if ln.startswith("|") and not ln.startswith("|---")]
    return {r[0].strip(): [c.strip() for c in r[1:]] for r in rows[1:]}


@pytest.mark.slow
def test_report_numbers_rederived_from_the_files(tiny: tuple[Path, str, str]) -> None:
    """The median β-smoothness from metrics.csv, the loss range from surface.h5 and λmax from hessian.json,
    computed here without fastland, equal what results.json and the report say."""
    out = tiny[0]
    results = json.loads((out / "results.json").read_text())
    table = _table((out / "report.md").read_text())
    for k, name in enumerate(("lenet", "lenet_bn")):
        with open(out / name / "train" / "metrics.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        beta = np.median([float(r["beta_smooth"]) for r in rows])
        assert results[name]["beta_median"] == pytest.approx(beta, rel=1e-12)
        assert table["effective β-smoothness, median"][k] == f"{beta:.4g}"
        with h5py.File(out / name / "surface.h5", "r") as f:
            loss, done = f["train_loss"][...], f["done"][...]
        assert done.all()
        assert results[name]["loss_range"] == pytest.approx(loss.max() - loss.min(), rel=1e-12)
        assert table["surface: loss range over the grid"][k] == f"{loss.max() - loss.min():.4g}"
        lam = json.loads((out / name / "hessian.json").read_text())["modes"]["eval"]["top_eigenvalue"]["values"][0]
        assert results[name]["lambda_max_eval"] == lam
        assert table["Hessian λmax at the minimum, BN eval mode"][k].startswith(f"{lam:.4g}")


DOCS = Path(__file__).resolve().parents[1] / "docs" / "study"


@pytest.mark.skipif(not (DOCS / "report.md").exists(), reason="no committed study report")
def test_the_committed_report_matches_its_files() -> None:
    """docs/study: the report's β-smoothness medians and λmax come from the committed metrics.csv and hessian.json."""
    table = _table((DOCS / "report.md").read_text())
    names = [c.strip() for c in (DOCS / "report.md").read_text().split("## Numbers")[1].splitlines()[2].strip("|")
             .split("|")][1:]
    assert "CIFAR-10 (JPEG copy)" in (DOCS / "report.md").read_text() and names
    for k, name in enumerate(names):
        with open(DOCS / name / "train" / "metrics.csv", newline="") as f:
            beta = np.median([float(r["beta_smooth"]) for r in csv.DictReader(f)])
        assert table["effective β-smoothness, median"][k] == f"{beta:.4g}"
        lam = json.loads((DOCS / name / "hessian.json").read_text())["modes"]["eval"]["top_eigenvalue"]["values"][0]
        assert table["Hessian λmax at the minimum, BN eval mode"][k].startswith(f"{lam:.4g}")
    for line in (DOCS / "report.md").read_text().splitlines():
        if line.startswith("!["):
            figure = DOCS / line.split("](")[-1].rstrip(")")
            assert figure.is_file() and figure.stat().st_size < 300_000, figure


@pytest.mark.slow
def test_tiny_resnet_preset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The resnet preset's four models (ResNet-20 ± skip, ± BN) at a tiny size: every stage, the tables and findings."""
    monkeypatch.setenv("FASTLAND_OFFLINE", "1")
    monkeypatch.setenv("FASTLAND_DATA", str(tmp_path / "nodata"))
    code, printed, err = run_main(study.main, [
        "--preset", "resnet", "--epochs", "2", "--train-samples", "64", "--probe-every", "2", "--res", "5",
        "--samples", "16", "--eval-samples", "32", "--hessian-samples", "4", "--hessian-hvps", "34",
        "--trajectory-res", "5", "--device", "cpu", "--out", str(tmp_path / "r")], capsys)
    assert code == 0, err[-2000:]
    out = tmp_path / "r"
    names = ["resnet20", "resnet20_bn", "resnet20_noskip", "resnet20_noskip_bn"]
    results = json.loads((out / "results.json").read_text())
    assert list(results) == names
    report = (out / "report.md").read_text()
    assert "| | " + " | ".join(names) + " |" in report.replace("|  |", "| |")
    for n in names:
        assert (out / "figures" / f"trajectory_{n}.png").is_file()
        assert np.isfinite(results[n]["lambda_max_eval"]) and np.isfinite(results[n]["trace_eval"])
        assert ("lambda_max_batch" in results[n]) == n.endswith("_bn")
    assert (out / "figures" / "fig1_resnet20.png").is_file() and (out / "figures" / "fig1_resnet20_noskip.png").is_file()
    assert len(list((out / "figures").glob("fig2_resnet20*.png"))) in (2, 8)  # one 4-panel figure per scale, or maps
    assert "resnet56" not in report  # ResNet-56 is the preset's CUDA form
    assert "epochs of Adam (lr 0.001, batch 128)" in report  # the preset's rate: ResNets without BN fail at 0.01


def _fails(capsys: pytest.CaptureFixture[str], argv: list[str], needle: str) -> None:
    code, out, err = run_main(study.main, argv, capsys)
    one_error_line(subprocess.CompletedProcess(argv, code, out, err), needle)


@pytest.mark.parametrize(("argv", "needle"), [
    (["--train-samples", "0"], "--train-samples must be at least 1"),
    (["--eval-samples", "0"], "--eval-samples must be at least 1"),
    (["--samples", "0"], "--samples must be at least 1"),
    (["--hessian-samples", "-3"], "--hessian-samples must be at least 1"),
    (["--train-samples", "ten"], "--train-samples must be a positive number or 'all'"),
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--probe-every", "0"], "--probe-every must be at least 1"),
    (["--res", "1"], "--res must be at least 2"),
    (["--hessian-hvps", "10"], f"--hessian-hvps must be at least {study.TRACE_MIN_HVPS}"),
    (["--lr", "nan"], "--lr must be a positive number"),
    (["--data", "mnist"], "unknown --data 'mnist'"),
    (["--models", "alexnet"], "invalid choice: 'alexnet'"),
])
def test_bad_input_is_one_line(argv: list[str], needle: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _fails(capsys, [*argv, "--out", str(tmp_path / "s")], needle)
    assert not (tmp_path / "s" / "study.json").exists()  # refused before any work


def test_unreadable_data_leave_no_study_behind(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A wrong --data path fails after the folder checks; fixing the path must not be refused as other settings."""
    _fails(capsys, ["--data", f"imagefolder:{tmp_path / 'nowhere'}", "--out", str(tmp_path / "s")], "does not exist")
    assert not (tmp_path / "s" / "study.json").exists()


ARCHIVE = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz"


@pytest.mark.skipif(not ARCHIVE.exists(), reason=f"{ARCHIVE} is absent (it is not part of a user's clone)")
def test_on_the_jpeg_copy_the_report_names_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)  # the default folder: study/PRESET-DATA
    code, _, err = run_main(study.main, ["--data", f"imagefolder:{ARCHIVE}", "--models", "lenet_bn", *TINY[:-2],
                                         "--device", "cpu"], capsys)
    assert code == 0, err[-2000:]
    report = (tmp_path / "study" / "quick-cifar10-jpeg" / "report.md").read_text()
    assert "on **CIFAR-10 (JPEG copy)**" in report and "synthetic" not in report
    assert "256 training images instead of all 50,000" in report


def test_out_that_is_a_file_or_locked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "f").write_text("x")
    _fails(capsys, ["--out", str(tmp_path / "f")], "is a file, not a folder")
    with files.WriteLock(tmp_path / "busy", "study folder"):
        _fails(capsys, ["--data", "synthetic", "--train-samples", "16", "--out", str(tmp_path / "busy")],
               "another fastland process")


@pytest.mark.slow
def test_other_settings_are_refused_and_overwrite_starts_again(tiny: tuple[Path, str, str], tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("FASTLAND_OFFLINE", "1")
    monkeypatch.setenv("FASTLAND_DATA", str(tmp_path / "nodata"))
    out = tmp_path / "s"
    shutil.copytree(tiny[0], out)
    before = (out / "lenet" / "surface.h5").read_bytes()
    argv = [*TINY, "--res", "5", "--models", "lenet", "--out", str(out)]
    _fails(capsys, argv, "holds a study made with other settings (res: 7 there, 5 now); pass --overwrite")
    assert (out / "lenet" / "surface.h5").read_bytes() == before  # nothing touched
    code, printed, err = run_main(study.main, [*argv, "--overwrite"], capsys)
    assert code == 0, err[-2000:]
    assert "--overwrite: starting the study" in printed and not (out / "lenet_bn").exists()
    assert json.loads((out / "results.json").read_text())["lenet"]["probes"] == 2
    with h5py.File(out / "lenet" / "surface.h5", "r") as f:
        assert f["train_loss"].shape == (5, 5)


def _result(acc: float, beta: float, band: float, rise: float, lam: float = 1.0, loss: float = 1.0) -> dict[str, float]:
    return {"train_acc": acc, "test_acc": acc, "train_loss": loss, "beta_median": beta, "beta_p90": 2 * beta,
            "band_median": band, "rise_mean_0.5": rise, "loss_range": 10 * rise, "lambda_max_eval": lam,
            "trace_eval": 10 * lam}


def test_findings_compare_like_with_like() -> None:
    found = study.findings(["lenet", "lenet_bn"], {"lenet": _result(60, 5.0, 0.2, 3.0, 50.0, loss=1.0),
                                                    "lenet_bn": _result(70, 2.0, 0.3, 3.1, 80.0, loss=0.5)})
    assert len(found) == 5
    flat, band, beta, curv, total = found
    assert flat.startswith("**lenet vs lenet_bn, the seed's claim 1, “BN makes the loss surface flatter")
    assert ": no difference.**" in flat and "is 3.1 with BN and 3 without (about equal)" in flat
    assert ": disagrees.**" in band and "is 0.3 with BN and 0.2 without (1.5× higher with BN)" in band
    assert ": agrees.**" in beta and "is 2 with BN and 5 without (2.5× lower with BN)" in beta
    assert "top eigenvalue is 80 with BN and 50 without (1.6× higher with BN)" in curv and "against the seed" in curv
    assert "put to 3 tests here: 1 held, 1 failed, 1 found no difference" in total
    assert "one run per model" in total and "lenet_bn ended at a lower training loss than lenet (0.5 against 1)" in total


def test_findings_flag_a_collapsed_run_and_compare_skips() -> None:
    dead = study.findings(["lenet", "lenet_bn"], {"lenet": _result(10.2, 0.1, 1e-4, 1e-4),
                                                   "lenet_bn": _result(80, 9.0, 0.02, 0.4)})
    assert any("lenet did not learn" in f for f in dead)
    assert any("no like-for-like comparison" in f for f in dead)
    assert not any("agrees" in f or "disagrees" in f or "In all" in f for f in dead)
    skips = study.findings(["resnet20", "resnet20_noskip"], {"resnet20": _result(70, 3.0, 0.1, 0.5, 10.0),
                                                             "resnet20_noskip": _result(50, 6.0, 0.1, 2.0, 40.0)})
    assert len(skips) == 1 and skips[0].startswith("**Skip connections, resnet20 vs resnet20_noskip**")
    assert "0.5 with skips and 2 without (4.0× lower with skips)" in skips[0]
    alone = study.findings(["lenet_bn"], {"lenet_bn": _result(80, 9.0, 0.02, 0.4)})
    assert alone == ["No model here has its counterpart with (or without) BN or skip connections, so nothing is "
                     "compared; the table has each model's numbers."]


def test_findings_flag_running_statistics_that_do_not_fit() -> None:
    """ResNet-20-BN after 5 short epochs (docs/study-resnet): eval-mode loss 1.65 against 0.90 with batch statistics."""
    misfit = _result(47.0, 100.0, 0.03, 4.0, 2191.0, loss=1.647) | {"train_loss_batch": 0.9017, "train_acc_batch": 67.65}
    fits = _result(60.0, 2.0, 0.02, 1.0, 15.0, loss=0.83) | {"train_loss_batch": 0.80, "train_acc_batch": 71.0}
    plain = _result(46.0, 74.0, 0.02, 0.6, 93.0, loss=1.47) | {"train_loss_batch": None}
    found = study.findings(["resnet20", "resnet20_bn"], {"resnet20": plain, "resnet20_bn": misfit})
    assert found[0].startswith("**resnet20_bn's BN running statistics do not fit its weights**: on the training images "
                               "its loss is 1.647 with them (eval mode) and 0.9017 with each batch's statistics "
                               "(accuracy 47.0% against 67.7%)"), found[0]
    assert sum("do not fit" in f for f in found) == 1  # not for the model without BN
    assert not any("do not fit" in f for f in study.findings(["lenet", "lenet_bn"], {"lenet": plain, "lenet_bn": fits}))
