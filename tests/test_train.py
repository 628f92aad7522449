"""Probed training: probes never change the weights, resume is exact, divergence keeps the metrics, bad input."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_main

from fastland import data as data_mod
from fastland import models, probes
from fastland import train as train_mod
from fastland.probes import ProbeConfig
from fastland.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = 512


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trainset() -> data_mod.EvalSet:
    return data_mod.load("synthetic", "train", SAMPLES, seed=0)


def _cfg(**kw: object) -> TrainConfig:
    base = {"model": "lenet_bn", "data": "synthetic", "samples": str(SAMPLES), "epochs": 2, "batch": 64, "device": "cpu"}
    return TrainConfig(**(base | kw))  # type: ignore[arg-type]


def _state(path: Path) -> dict[str, torch.Tensor]:
    return models.read_checkpoint(path)["state_dict"]


def _assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    return run_main(train_mod.main, argv, capsys)


def test_probes_do_not_change_training(trainset: data_mod.EvalSet, tmp_path: Path) -> None:
    """Adam state, p.grad, BN running stats and num_batches_tracked: the weights come out bit-identical."""
    cfg = _cfg()
    plain = train(cfg, tmp_path / "plain", progress=False, trainset=trainset)
    batched = train(cfg, tmp_path / "batched", ProbeConfig(mode="batched", count=3), progress=False, trainset=trainset)
    seq = train(cfg, tmp_path / "seq", ProbeConfig(mode="sequential", every=3, count=3), progress=False, trainset=trainset)
    ref = _state(plain)
    assert int(ref["1.num_batches_tracked"]) == 16
    for run in (batched, seq):
        _assert_same_state(ref, _state(run))
    opt_ref = models.read_checkpoint(tmp_path / "plain" / "epoch_002.pt")["optimizer"]["state"]
    for name in ("batched", "seq"):
        opt = models.read_checkpoint(tmp_path / name / "epoch_002.pt")["optimizer"]["state"]
        for k in opt_ref:
            for key in opt_ref[k]:
                assert torch.equal(opt_ref[k][key], opt[k][key]), (name, k, key)
    rows = probes.read_metrics(tmp_path / "seq" / "metrics.csv")
    assert list(rows["step"]) == [0, 3, 6, 9, 12, 15]
    assert not (tmp_path / "plain" / "metrics.csv").exists()


def _rows(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_resume_reuses_the_auto_choice_and_gives_identical_rows(trainset: data_mod.EvalSet, tmp_path: Path) -> None:
    """A run stopped in epoch 2 (rows past its last checkpoint, a torn last line) resumes to the same file."""
    cfg, probe = _cfg(), ProbeConfig(mode="auto", count=3)
    full = tmp_path / "full"
    train(cfg, full, probe, progress=False, trainset=trainset)
    chosen = json.loads((full / "metrics.json").read_text())["chosen"]
    assert chosen in ("batched", "layered", "sequential")

    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    (cut / "final.pt").unlink()
    (cut / "epoch_002.pt").unlink()
    lines = _rows(full / "metrics.csv")
    (cut / "metrics.csv").write_text("\n".join(lines[:12]) + "\n" + lines[12][:25])  # 3 rows into epoch 2, torn
    meta = json.loads((cut / "metrics.json").read_text())
    meta["chosen"] = "sequential" if chosen == "batched" else "batched"  # the resumed run must not re-measure
    (cut / "metrics.json").write_text(json.dumps(meta))
    train(cfg, cut, probe, progress=False, trainset=trainset)
    got = json.loads((cut / "metrics.json").read_text())["chosen"]
    assert got == meta["chosen"]
    resumed = _rows(cut / "metrics.csv")
    assert len(resumed) == 1 + 16
    # rows of epoch 1 are kept as they were; epoch 2 is recomputed on the other path: equal to fp32 rounding
    assert resumed[:9] == lines[:9]
    a, b = probes.read_metrics(full / "metrics.csv"), probes.read_metrics(cut / "metrics.csv")
    for col in a:
        np.testing.assert_allclose(a[col], b[col], rtol=2e-5, atol=1e-6, err_msg=col)
    np.testing.assert_array_equal(a["loss"], b["loss"])  # the training itself is bit-identical
    _assert_same_state(_state(full / "final.pt"), _state(cut / "final.pt"))


def test_resume_after_kill_gives_identical_rows(tmp_path: Path) -> None:
    """kill -9 during epoch 2 or 3, then the same command: metrics.csv is byte-identical."""
    args = ["--model", "lenet_bn", "--data", "synthetic", "--samples", "256", "--batch", "16", "--epochs", "3",
            "--device", "cpu", "--probe-mode", "sequential", "--probe-count", "2"]
    ref = tmp_path / "ref"
    cfg, probe = _cfg(batch=16, samples="256", epochs=3), ProbeConfig(mode="sequential", count=2)
    small = data_mod.load("synthetic", "train", 256, seed=0)
    train(cfg, ref, probe, progress=False, trainset=small)
    steps = 256 // 16

    run = tmp_path / "run"
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "fastland.train", *args, "--out", str(run)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            metrics = run / "metrics.csv"
            if (run / "epoch_001.pt").exists() and metrics.exists() and len(_rows(metrics)) > steps + 2:
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    if (run / "final.pt").exists():
        pytest.skip("the run finished before it could be killed (machine too fast for this test)")
    assert (run / "epoch_001.pt").exists() and not (run / "epoch_003.pt").exists()
    assert len(_rows(run / "metrics.csv")) > steps + 1  # rows past the checkpoint, to be cut back

    train(cfg, run, probe, progress=False, trainset=small)
    assert (run / "metrics.csv").read_bytes() == (ref / "metrics.csv").read_bytes()
    _assert_same_state(_state(ref / "final.pt"), _state(run / "final.pt"))


def test_resume_with_other_probe_settings_is_refused(trainset: data_mod.EvalSet, tmp_path: Path) -> None:
    cfg = _cfg(epochs=2, samples="128", batch=64)
    small = data_mod.load("synthetic", "train", 128, seed=0)
    train(cfg, tmp_path, ProbeConfig(mode="sequential", count=2), progress=False, trainset=small)
    (tmp_path / "final.pt").unlink()
    (tmp_path / "epoch_002.pt").unlink()
    with pytest.raises(train_mod.UserError, match="other settings"):
        train(cfg, tmp_path, ProbeConfig(mode="sequential", count=3), progress=False, trainset=small)
    # the weights do not depend on the probes: resuming without them is fine
    train(cfg, tmp_path, None, progress=False, trainset=small)
    assert (tmp_path / "final.pt").exists()
    assert len(_rows(tmp_path / "metrics.csv")) == 1 + 2  # epoch 1's rows, cut at the checkpoint


def test_divergence_stops_with_one_line_and_keeps_metrics(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _main(["--model", "lenet", "--optimizer", "sgd", "--lr", "1e4", "--data", "synthetic",
                          "--samples", str(SAMPLES), "--batch", "64", "--epochs", "1", "--probe-mode", "sequential",
                          "--out", str(tmp_path)], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: training diverged") and "Traceback" not in err
    assert "probe rows in metrics.csv" in lines[0] and "smaller --lr" in lines[0]
    rows = probes.read_metrics(tmp_path / "metrics.csv")
    assert len(rows["step"]) >= 1 and np.isfinite(rows["loss"]).all()
    assert f"{len(rows['step'])} probe rows" in lines[0]
    assert (tmp_path / "smoothness.png").stat().st_size > 10_000
    assert not (tmp_path / "final.pt").exists()


BAD = [
    (["--model", "resnet"], "resnet"),
    (["--compare", "lenet", "alexnet"], "alexnet"),
    (["--compare", "lenet"], "two different models"),
    (["--model", "lenet", "--compare", "lenet", "lenet_bn"], "not allowed"),
    (["--probe-steps", "abc"], "probe-steps"),
    (["--probe-steps", "0.1,-1"], "positive"),
    (["--probe-steps", ","], "empty"),
    (["--probe-every", "0"], "probe-every"),
    (["--probe-count", "0"], "probe-count"),
    (["--probe-mode", "fast"], "probe-mode"),
    (["--epochs", "0"], "epochs"),
    (["--epochs", "two"], "epochs"),
    (["--lr", "-1"], "lr"),
    (["--batch", "1"], "batch"),
    (["--optimizer", "rmsprop"], "optimizer"),
    (["--samples", "-3"], "samples"),
    (["--preset", "fast"], "preset"),
]


@pytest.mark.parametrize("argv,needle", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_line_and_exit_2(argv: list[str], needle: str, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _main([*argv, "--data", "synthetic", "--out", str(tmp_path / "x")], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err
    assert not (tmp_path / "x").exists()


def test_bad_input_from_the_shell() -> None:
    proc = subprocess.run([sys.executable, "-m", "fastland.train", "--model", "nope", "--data", "synthetic"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "nope" in proc.stderr and "Traceback" not in proc.stderr


def test_compare_trains_both_and_plots(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _main(["--compare", "lenet", "lenet_bn", "--data", "synthetic", "--samples", "256", "--batch", "64",
                            "--epochs", "1", "--probe-every", "2", "--probe-mode", "sequential", "--device", "cpu",
                            "--out", str(tmp_path)], capsys)
    assert code == 0, err
    assert (tmp_path / "smoothness.png").stat().st_size > 20_000
    for model in ("lenet", "lenet_bn"):
        run = tmp_path / model
        for f in ("config.json", "epoch_001.pt", "final.pt", "metrics.csv", "metrics.json", "smoothness.png"):
            assert (run / f).exists(), (model, f)
        cfg = json.loads((run / "config.json").read_text())
        assert cfg["model"] == model and cfg["optimizer"] == "adam" and cfg["lr"] == 0.01
        meta = json.loads((run / "metrics.json").read_text())
        etas = np.array(meta["probe"]["etas"])
        np.testing.assert_allclose(etas, np.linspace(0.005, 0.04, 8))
        m = probes.read_metrics(run / "metrics.csv")
        with open(run / "metrics.csv") as f:
            assert next(csv.reader(f)) == probes.metric_columns(8) == meta["columns"]
        assert list(m["step"]) == [0, 2] and list(m["epoch"]) == [1, 1]
        losses = np.stack([m[f"loss_eta{i}"] for i in range(8)], 1)
        change = np.stack([m[f"gradpred_eta{i}"] for i in range(8)], 1)
        np.testing.assert_allclose(m["loss_min"], losses.min(1))
        np.testing.assert_allclose(m["loss_max"], losses.max(1))
        np.testing.assert_allclose(m["gradpred_min"], change.min(1))
        np.testing.assert_allclose(m["gradpred_max"], change.max(1))
        np.testing.assert_allclose(m["beta_smooth"], (change / (etas * m["grad_norm"][:, None])).max(1), rtol=1e-6)
        assert (m["grad_norm"] > 0).all() and ((m["batch_acc"] >= 0) & (m["batch_acc"] <= 100)).all()
    assert "comparison plot" in out
    # re-plotting saved runs from the shell
    from fastland import trainplots

    trainplots.main([str(tmp_path / "lenet"), str(tmp_path / "lenet_bn" / "metrics.csv"), "--out", str(tmp_path / "re.png")])
    assert (tmp_path / "re.png").stat().st_size > 20_000
    with pytest.raises(SystemExit) as exc:
        trainplots.main([str(tmp_path / "nothing-here")])
    assert exc.value.code == 2 and "does not exist" in capsys.readouterr().err


def test_presets_and_overrides() -> None:
    p = train_mod.build_parser()
    seed = train_mod.config_from_args(p.parse_args([]), "lenet")
    assert (seed.optimizer, seed.lr, seed.batch, seed.epochs) == ("adam", 0.01, 128, 20)
    sant = train_mod.config_from_args(p.parse_args(["--preset", "santurkar"]), "vgg16_bn")
    assert (sant.optimizer, sant.lr, sant.batch, sant.momentum) == ("sgd", 0.1, 128, 0.0)
    args = p.parse_args(["--preset", "santurkar", "--lr", "0.05", "--momentum", "0.9", "--epochs", "3"])
    over = train_mod.config_from_args(args, "lenet")
    assert (over.optimizer, over.lr, over.momentum, over.epochs) == ("sgd", 0.05, 0.9, 3)
    probe = train_mod.probe_from_args(p.parse_args(["--preset", "santurkar"]))
    assert probe is not None and probe.resolve(sant.lr) == pytest.approx(np.linspace(0.05, 0.4, 8))
    probe = train_mod.probe_from_args(p.parse_args(["--probe-steps", "0.01, 0.03", "--probe-every", "5"]))
    assert probe is not None and probe.resolve(0.1) == (0.01, 0.03) and probe.every == 5
    assert train_mod.probe_from_args(p.parse_args(["--no-probe"])) is None


def test_help_explains_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _main(["--help"], capsys)
    assert code == 0
    for action in train_mod.build_parser()._actions:
        for flag in action.option_strings:
            assert flag in out
        assert action.help, action.option_strings
    assert "linearly" in out and "santurkar" in out


def test_no_probe_trains_without_metrics(trainset: data_mod.EvalSet, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _main(["--model", "lenet", "--no-probe", "--data", "synthetic", "--samples", "128", "--batch", "64",
                            "--epochs", "1", "--device", "cpu", "--out", str(tmp_path)], capsys)
    assert code == 0, err
    assert (tmp_path / "final.pt").exists() and not (tmp_path / "metrics.csv").exists()


@pytest.mark.cuda
def test_cuda_probes_do_not_change_training(tmp_path: Path) -> None:
    """On the GPU (deterministic cuDNN), probed and unprobed training end at the same weights."""
    trainset = data_mod.load("synthetic", "train", SAMPLES, seed=0, device="cuda")
    old = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        cfg = _cfg(device="cuda")
        plain = _state(train(cfg, tmp_path / "plain", progress=False, trainset=trainset))
        for mode in ("batched", "sequential"):
            probed = _state(train(cfg, tmp_path / mode, ProbeConfig(mode=mode), progress=False, trainset=trainset))
            for k in plain:
                assert (plain[k].double() - probed[k].double()).abs().max() <= 1e-7, (mode, k)
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = old
    rows = probes.read_metrics(tmp_path / "batched" / "metrics.csv")
    assert np.isfinite(rows["beta_smooth"]).all() and len(rows["step"]) == 16
