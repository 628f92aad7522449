"""`python -m fastland.surface` end to end: file layout, resume after kill -9, bad input."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import run_main

import fastland
from fastland import models, surface, surfacefile
from fastland.data import load
from fastland.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run")
    cfg = TrainConfig(model="lenet_bn", data="synthetic", samples="512", epochs=1, device="cpu")
    return train(cfg, out, progress=False)


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    return run_main(surface.main, argv, capsys)


BASE = ["--data", "synthetic", "--samples", "32", "--device", "cpu"]


def test_end_to_end_2d(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("pyvista", reason="the 3-D renders this test checks need PyVista (the GPU machines have none)")
    out = tmp_path / "s.h5"
    code, stdout, err = _run(["--checkpoint", str(ckpt), *BASE, "--xres", "5", "--yres", "4", "--range", "-1", "1",
                              "-0.5", "0.5", "--out", str(out)], capsys)
    assert code == 0, err
    assert "plan: 20 points (5x4)" in stdout and "minimum" in stdout and "points/s" in stdout
    with h5py.File(out, "r") as f:
        assert f["train_loss"].shape == (4, 5) and f["train_acc"].shape == (4, 5)
        np.testing.assert_allclose(f["xcoordinates"][:], np.linspace(-1, 1, 5))
        np.testing.assert_allclose(f["ycoordinates"][:], np.linspace(-0.5, 0.5, 4))
        assert f["done"][:].all()
        assert set(f["xdirection"].keys()) == set(models.create("lenet_bn").state_dict().keys()) & set(
            dict(models.create("lenet_bn").named_parameters()).keys())
        for key in ("model", "checkpoint_sha256", "data_source", "split", "samples", "sample_seed", "direction_seed",
                    "norm", "ignore", "bn_mode", "precision", "engine", "device", "created", "wall_time",
                    "fastland_version", "data_warning"):
            assert key in f.attrs, key
        loss = f["train_loss"][:]

    # Entry [j, i] is the loss at (x_i, y_j): recompute one off-diagonal point with the oracle.
    model, _, _ = models.load_checkpoint(ckpt)
    ev = load("synthetic", "train", 32, seed=0)
    want = fastland.surface(model, ev, res=(5, 4), range=(-1, 1, -0.5, 0.5), engine="reference", progress=False)
    assert loss[1, 4] == pytest.approx(want.loss[1, 4], rel=1e-5)
    for suffix in ("_3d.png", "_3d_log.png", "_map.png", ".vts", ".html"):
        assert (tmp_path / f"s{suffix}").stat().st_size > (10_000 if suffix.endswith(".png") else 500), suffix
        assert f"wrote    {tmp_path / 's'}{suffix}" in stdout


def test_end_to_end_1d_and_interpolation(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "l.h5"
    code, _, err = _run(["--checkpoint", str(ckpt), *BASE, "--dim", "1", "--res", "7", "--out", str(out), "--no-render"],
                        capsys)
    assert code == 0, err
    s = surfacefile.read(out)
    assert s.loss.shape == (7,) and s.y is None and s.done.all()
    other = models.save_checkpoint(tmp_path / "other.pt", "lenet_bn", models.create("lenet_bn"))
    out2 = tmp_path / "i.h5"
    code, _, err = _run(["--checkpoint", str(ckpt), "--to", str(other), *BASE, "--res", "5", "--out", str(out2),
                         "--no-render"], capsys)
    assert code == 0, err
    s2 = surfacefile.read(out2)
    assert s2.attrs["direction"] == "interpolation" and s2.x[0] == -0.5 and s2.x[-1] == 1.5
    assert s2.loss[1] == pytest.approx(s.loss[3], rel=1e-6)  # α=0 is the first checkpoint in both


def test_non_finite_points_are_recorded(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "nan.h5"
    code, stdout, err = _run(["--checkpoint", str(ckpt), *BASE, "--res", "3", "--range", "-1e38", "1e38",
                              "--out", str(out), "--no-render"], capsys)
    assert code == 0, err
    s = surfacefile.read(out)
    assert s.done.all() and not np.isfinite(s.loss).all() and np.isfinite(s.loss[1, 1])
    assert "non-finite (recorded as such)" in stdout


def _cli(args: list[str], cwd: Path) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", FASTLAND_OFFLINE="1")
    return subprocess.Popen([sys.executable, "-m", "fastland.surface", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _done_count(path: Path) -> int:
    try:
        with h5py.File(path, "r", locking=False) as f:
            return int(f["done"][:].sum())
    except (OSError, KeyError):
        return 0


@pytest.mark.slow
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGINT])
def test_interrupted_run_resumes_to_the_same_file(ckpt: Path, tmp_path: Path, how: signal.Signals) -> None:
    args = ["--checkpoint", str(ckpt), "--data", "synthetic", "--samples", "256", "--device", "cpu", "--res", "15",
            "--engine", "reference", "--chunk", "3", "--no-render"]
    full, part = tmp_path / "full.h5", tmp_path / "part.h5"
    p = _cli([*args, "--out", str(full)], tmp_path)
    assert p.wait(timeout=600) == 0, p.stderr.read() if p.stderr else ""

    p = _cli([*args, "--out", str(part)], tmp_path)
    deadline = time.time() + 300
    while _done_count(part) < 12 and time.time() < deadline and p.poll() is None:
        time.sleep(0.02)
    p.send_signal(how)
    code = p.wait(timeout=60)
    done = _done_count(part)
    assert 0 < done < 225, f"the run was not interrupted mid-way (done={done})"
    if how == signal.SIGINT:
        assert code == 130 and "run the same command again to resume" in (p.stderr.read() if p.stderr else "")
    p = _cli([*args, "--out", str(part)], tmp_path)
    stdout, stderr = p.communicate(timeout=600)
    assert p.returncode == 0, stderr
    assert "(resuming)" in stdout and f"{225 - done} to evaluate" in stdout
    a, b = surfacefile.read(full), surfacefile.read(part)
    assert b.done.all()
    np.testing.assert_array_equal(a.loss, b.loss)
    np.testing.assert_array_equal(a.acc, b.acc)


def test_different_settings_are_refused_then_overwritten(ckpt: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "s.h5"
    args = ["--checkpoint", str(ckpt), *BASE, "--res", "3", "--out", str(out), "--no-render"]
    assert _run(args, capsys)[0] == 0
    code, _, err = _run([*args, "--seed", "1"], capsys)
    assert code == 2 and "direction_seed" in err and "--overwrite" in err
    assert _run([*args, "--seed", "1", "--overwrite"], capsys)[0] == 0
    assert surfacefile.read(out).attrs["direction_seed"] == 1


def _bad_inputs(ckpt: Path, tmp_path: Path) -> list[tuple[list[str], str]]:
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00garbage")
    lenet = models.save_checkpoint(tmp_path / "lenet.pt", "lenet", models.create("lenet"))
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    c = ["--checkpoint", str(ckpt), *BASE]
    cases = [
        (["--model", "resnet"], "unknown --model"),
        (["--model", "nosuchpkg.nets:make", *BASE], "cannot import nosuchpkg.nets"),
        (["--checkpoint", str(tmp_path / "nope.pt"), *BASE], "does not exist"),
        (["--checkpoint", str(junk), *BASE], "cannot be read"),
        (["--checkpoint", str(lenet), "--model", "lenet_bn", *BASE], "holds a lenet model"),
        (["--data", "imagefolder:" + str(tmp_path)], "has no train/ folder"),
        (["--data", "imagenet"], "unknown --data"),
        ([*c, "--res", "1"], "at least 2"),
        ([*c, "--range", "1", "-1"], "increasing"),
        ([*c, "--range", "0", "0"], "increasing"),
        ([*c, "--range", "-1", "1", "1", "1"], "increasing"),
        (["--checkpoint", str(ckpt), "--data", "synthetic", "--samples", "0"], "at least 1"),
        (["--checkpoint", str(ckpt), "--data", "synthetic", "--samples", "50001"], "more than the train split"),
        ([*c, "--out", str(blocker / "x.h5")], "is a file, not a folder"),
        ([*c, "--out", str(tmp_path)], "is a folder"),
        (["--checkpoint", str(ckpt), "--data", "cifar10"], "cifar-10-python.tar.gz"),
    ]
    if not torch.cuda.is_available():
        cases.append(([*c, "--device", "cuda"], "no CUDA device"))
    return cases


def test_bad_input_gives_one_line_and_exit_2(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FASTLAND_OFFLINE", "1")
    monkeypatch.setenv("FASTLAND_DATA", str(tmp_path / "nodata"))
    for argv, needle in _bad_inputs(ckpt, tmp_path):
        code, _, err = _run([*argv, "--no-render"], capsys)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert code == 2, (argv, err)
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], (argv, err)
        assert "Traceback" not in err


def test_bad_input_from_the_shell(tmp_path: Path) -> None:
    """The same through a real interpreter: no traceback reaches the user."""
    p = _cli(["--res", "0"], tmp_path)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 2 and err.strip().startswith("error:") and "Traceback" not in err


def test_help_explains_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(["--help"], capsys)
    assert code == 0
    for action in surface.build_parser()._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, action.option_strings
    assert "--bn-mode" in out and "--samples" in out


def test_checkpoints_name_their_model_and_state_dicts_take_model(ckpt: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A lenet checkpoint needs no --model; a user's factory with a plain state_dict; keys that do not fit."""
    lenet = models.save_checkpoint(tmp_path / "lenet.pt", "lenet", models.randomized("lenet", 1))
    code, out, err = _run(["--checkpoint", str(lenet), *BASE, "--res", "3", "--out", str(tmp_path / "a.h5"),
                           "--no-render"], capsys)
    assert code == 0, err
    assert surfacefile.read(tmp_path / "a.h5").attrs["model"] == "lenet"
    (tmp_path / "usernets.py").write_text(
        "import torch.nn as nn\n"
        "def small(width=8):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, width), nn.ReLU(), nn.Linear(width, 10))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    net = models.randomized(models.create("usernets:small", width=6), 2)
    torch.save(net.state_dict(), tmp_path / "plain.pt")
    args = ["--checkpoint", str(tmp_path / "plain.pt"), "--model", "usernets:small", "--model-arg", "width=6", *BASE,
            "--res", "3", "--out", str(tmp_path / "u.h5"), "--no-render"]
    code, _, err = _run(args, capsys)
    assert code == 0, err
    s = surfacefile.read(tmp_path / "u.h5")
    assert s.attrs["model"] == "usernets:small" and s.done.all() and np.isfinite(s.loss).all()
    code, _, err = _run([*args[:4], "--model-arg", "width=5", *args[6:]], capsys)
    assert code == 2 and "does not fit the model" in err and "shapes differ: 1.weight" in err
    code, _, err = _run(["--checkpoint", str(tmp_path / "plain.pt"), *BASE, "--no-render"], capsys)
    assert code == 2 and "plain state_dict" in err and "--model" in err


def test_interpolation_target_is_part_of_the_settings(ckpt: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """A file made for --to b is never resumed for --to c (issue 16: it reported b's losses as c's)."""
    b = models.save_checkpoint(tmp_path / "b.pt", "lenet_bn", models.randomized("lenet_bn", 1))
    c = models.save_checkpoint(tmp_path / "c.pt", "lenet_bn", models.randomized("lenet_bn", 2))
    out = tmp_path / "i.h5"
    base = ["--checkpoint", str(ckpt), *BASE, "--res", "5", "--range", "0", "1", "--out", str(out), "--no-render"]
    assert _run([*base, "--to", str(b)], capsys)[0] == 0
    code, _, err = _run([*base, "--to", str(c)], capsys)
    assert code == 2 and "interpolation_target_sha256" in err
    line = surfacefile.read(out)
    assert line.attrs["bn_stats"] == "interpolate"
    target, _, _ = models.load_checkpoint(b)
    alone = fastland.surface(target, load("synthetic", "train", 32, seed=0), dim=1, res=3, range=(-0.1, 0.1),
                             progress=False)
    assert line.loss[-1] == pytest.approx(alone.loss[1], rel=1e-5)  # the line ends at the --to model


def test_user_model_trains_when_no_checkpoint_is_given(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "tinynet.py").write_text(
        "import torch.nn as nn\n"
        "class Tiny(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.f = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(48, 10))\n"
        "    def forward(self, x):\n"
        "        return self.f(x)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    import fastland.train as train_mod

    monkeypatch.setattr(train_mod.TrainConfig, "epochs", 1)
    monkeypatch.setattr(train_mod.TrainConfig, "samples", "256")
    code, out, err = _run(["--model", "tinynet:Tiny", *BASE, "--res", "3", "--no-render"], capsys)
    assert code == 0, err
    assert "training tinynet:Tiny" in out and (tmp_path / "runs" / "tinynet-Tiny-synthetic" / "final.pt").exists()
    assert list((tmp_path / "surfaces").glob("tinynet-Tiny-synthetic-train32-2d-3x3.h5"))
