"""`python -m fastland.study`: the numbers it reports, the report, and stage reuse."""

import json
from pathlib import Path

import numpy as np
import pytest

from fastland import study
from fastland.surfacefile import Surface


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
    for r in study.RADII:  # rise = r² on the ring, up to half a grid step of radius
        h = 1 / 80
        assert (r - h) ** 2 <= f[f"rise_mean_{r}"] <= (r + h) ** 2
        assert f[f"rise_max_{r}"] <= (r + h) ** 2


def test_flatness_reports_divergence() -> None:
    s = _bowl()
    s.loss[0, :] = np.inf  # far edge diverged
    f = study.flatness(s)
    assert np.isinf(f["rise_max_1.0"]) and np.isfinite(f["rise_mean_1.0"])


@pytest.mark.slow
def test_tiny_study_end_to_end_and_reuse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("FASTLAND_OFFLINE", "1")
    monkeypatch.setenv("FASTLAND_DATA", str(tmp_path / "nodata"))
    argv = ["--epochs", "1", "--train-samples", "512", "--res", "7", "--samples", "32", "--eval-samples", "128",
            "--probe-every", "2", "--device", "cpu", "--out", str(tmp_path / "s")]
    study.main(argv)
    out = tmp_path / "s"
    report = (out / "report.md").read_text()
    assert "synthetic" in report and "| lenet | lenet_bn |" in report
    assert "effective β-smoothness, median" in report and "loss rise at r=0.5" in report
    html = (out / "report.html").read_text()
    assert "<table>" in html and "fig1_lenet.png" in html
    for line in report.splitlines():
        if line.startswith("![") and "(" in line:
            assert (out / line.split("(")[-1].rstrip(")")).is_file(), line
    from fastland import surfacefile

    assert surfacefile.read(out / "lenet_bn" / "surface.h5").attrs["data_warning"]  # auto fell back: say so
    results = json.loads((out / "results.json").read_text())
    assert results["lenet"]["probes"] == 2 and np.isfinite(results["lenet_bn"]["beta_median"])
    stages = json.loads((out / "stages.json").read_text())
    capsys.readouterr()
    study.main(argv)  # everything is reused: no training, no evaluation of grid points
    printed = capsys.readouterr().out
    assert "finished before" in printed and "epoch 1/1" not in printed and "0 to evaluate" in printed
    again = json.loads((out / "stages.json").read_text())
    assert {k: v for k, v in again.items() if k != "figures"} == {k: v for k, v in stages.items() if k != "figures"}


def _result(acc: float, beta: float, band: float, rise: float) -> dict[str, float]:
    return {"train_acc": acc, "beta_median": beta, "band_median": band, "rise_mean_0.5": rise}


def test_findings_compare_like_with_like() -> None:
    both = study.findings(["lenet", "lenet_bn"], {"lenet": _result(60, 5.0, 0.2, 3.0),
                                                   "lenet_bn": _result(70, 2.0, 0.1, 4.0)})
    assert len(both) == 1
    assert "β-smoothness is lower with BN" in both[0] and "band is lower with BN" in both[0]
    assert "radius 0.5 on the surface is lower without BN" in both[0]


def test_findings_flag_a_collapsed_run() -> None:
    dead = study.findings(["lenet", "lenet_bn"], {"lenet": _result(10.2, 0.1, 1e-4, 1e-4),
                                                   "lenet_bn": _result(80, 9.0, 0.02, 0.4)})
    assert any("lenet did not learn" in f for f in dead)
    assert any("no like-for-like comparison" in f for f in dead)
    assert not any("is lower with BN" in f for f in dead)
