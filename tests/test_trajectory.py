"""Trajectories: the PCA agrees with a plain numpy SVD (in RAM and disk-backed), recovers a planar path
exactly and shares one basis across runs with the same initial weights; the surface on it shows the
checkpoints' own losses where they lie on the plane; the file reads as Li et al.'s plot_2D.py reads
it; the CLI works on a real fastland.train run, resumes, draws its pictures, and refuses bad input
in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

import fastland
import fastland.data
from fastland import models, trajectory
from fastland.errors import UserError
from fastland.params import FlatSpace
from fastland.train import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")
MODEL = "lenet_bn"  # BN γ/β and biases: what ignore=biasbn leaves out


def _space(name: str = MODEL) -> FlatSpace:
    return FlatSpace(models.create(name))


def _write_run(folder: Path, thetas: list[torch.Tensor], name: str = MODEL, steps: list[int] | None = None,
               names: list[str] | None = None, seed: int | None = 0) -> Path:
    """A run folder as fastland.train writes it: one checkpoint per theta (epoch_000 = θ_0) and
    final.pt, a copy of the last one (same step), and config.json."""
    model = models.randomized(name, seed=3)  # buffers (BN running stats) of a real model; θ is overwritten
    space = FlatSpace(model)
    steps = steps if steps is not None else [10 * i for i in range(len(thetas))]
    names = names if names is not None else [f"epoch_{i:03d}.pt" for i in range(len(thetas))]
    for theta, step, fname in zip(thetas, steps, names, strict=True):
        space.load_into(model, theta)
        epoch = int(fname[6:9]) if fname.startswith("epoch_") else 1 + step // 40
        models.save_checkpoint(folder / fname, name, model, {"step": step, "epoch": epoch, "train_loss": 1.0})
    models.save_checkpoint(folder / "final.pt", name, model, {"step": steps[-1], "epoch": len(thetas) - 1})
    if seed is not None:
        (folder / "config.json").write_text(json.dumps({"model": name, "seed": seed, "epochs": len(thetas) - 1}))
    return folder


def _curved_path(space: FlatSpace, n: int, seed: int, start: torch.Tensor | None = None) -> list[torch.Tensor]:
    """A wandering path of n + 1 points: a few smooth directions plus noise, the last one the minimum."""
    gen = torch.Generator().manual_seed(seed)
    end = 0.1 * torch.randn(space.numel, generator=gen)
    d = torch.randn(4, space.numel, generator=gen)
    out = []
    for i in range(n + 1):
        t = 1 - i / n
        noise = 0.02 * torch.randn(space.numel, generator=gen) if 0 < i < n else 0
        out.append(end + t * d[0] + 0.6 * t * t * d[1] + 0.3 * np.sin(4 * t) * d[2] + noise)
    if start is not None:
        out[0] = start.clone()
    return out


def _included_mask(space: FlatSpace, ignore: str) -> torch.Tensor:
    mask = torch.zeros(space.numel, dtype=torch.bool)
    for info in space.infos:
        if ignore == "none" or not info.is_small:
            mask[info.offset : info.offset + info.numel] = True
    return mask


def _numpy_pca(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The plain reference: components, explained variance ratio and explained variance of the
    centred rows by np.linalg.svd (what scikit-learn's full solver does)."""
    centred = rows - rows.mean(0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    return vt[:2], (s**2 / (s**2).sum())[:2], (s**2 / (len(rows) - 1))[:2]


def _assert_matches_svd(traj: trajectory.Trajectory, rows: np.ndarray, mask: torch.Tensor) -> None:
    comps, ratio, var = _numpy_pca(rows)
    d = traj.directions.double().numpy()
    assert np.all(d[:, ~mask.numpy()] == 0), "left-out parameters must be 0 in the directions"
    ours = d[:, mask.numpy()]
    for k in range(2):
        err = min(np.abs(ours[k] - comps[k]).max(), np.abs(ours[k] + comps[k]).max())
        assert err < 1e-5, (k, err)
        assert ours[k][np.abs(ours[k]).argmax()] > 0, "sign rule: the largest-magnitude entry is positive"
    np.testing.assert_allclose(traj.explained_variance_ratio, ratio, rtol=0, atol=1e-6)
    np.testing.assert_allclose(traj.explained_variance, var, rtol=1e-5)
    np.testing.assert_allclose(traj.singular_values, np.sqrt(var * (len(rows) - 1)), rtol=1e-5)
    np.testing.assert_allclose(traj.directions.double() @ traj.directions.double().T, np.eye(2), atol=1e-6)


@pytest.mark.parametrize("ignore", ["biasbn", "none"])
@pytest.mark.parametrize("storage", ["memory", "disk"])
def test_matches_numpy_svd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, storage: str, ignore: str) -> None:
    space = _space()
    thetas = _curved_path(space, 9, seed=1)
    run = _write_run(tmp_path / "run", thetas)
    monkeypatch.setattr(trajectory, "_BLOCK_BYTES", 1)  # many column blocks, the last one partial
    traj = trajectory.pca(run, ignore=ignore, memory_budget=0 if storage == "disk" else None, progress=False)
    assert traj.storage == storage
    mask = _included_mask(space, ignore)
    final = thetas[-1].double()
    rows = np.stack([(t.float().double() - final)[mask].numpy() for t in thetas[:-1]])  # i < n: the paper's matrix
    assert traj.rows == len(rows) == 9
    _assert_matches_svd(traj, rows, mask)
    assert traj.included == tuple(i.name for i in space.infos if ignore == "none" or not i.is_small)
    if ignore == "biasbn":
        assert set(traj.excluded) == {i.name for i in space.infos if i.is_small} and traj.excluded
    # The path: every checkpoint (the final one too), oldest first, by least squares on the directions.
    path = traj.paths[0]
    assert [f.name for f in path.files] == [f"epoch_{i:03d}.pt" for i in range(9)] + ["final.pt"]
    assert path.steps.tolist() == [10 * i for i in range(10)] and path.epoch_end.all()
    d = traj.directions.double().numpy()[:, mask.numpy()]
    full = np.vstack([rows, np.zeros(rows.shape[1])])
    want = np.linalg.lstsq(d.T, full.T, rcond=None)[0].T
    np.testing.assert_allclose(path.coords, want, atol=1e-5 * np.abs(want).max())
    assert np.array_equal(path.coords[-1], [0.0, 0.0])
    resid = np.linalg.norm(full - want @ d, axis=1)
    np.testing.assert_allclose(path.residual, resid, atol=1e-4 * resid.max())
    steps = np.linalg.norm(np.diff(full, axis=0), axis=1)
    assert path.length == pytest.approx(steps.sum(), rel=1e-6)
    assert path.distance == pytest.approx(np.linalg.norm(full[0]), rel=1e-6)
    assert torch.equal(traj.theta_final, thetas[-1].float())
    named = traj.named_directions()
    assert list(named[0]) == list(space.names) and named[1]["0.weight"].shape == (6, 3, 5, 5)


def test_planar_path_recovered_exactly(tmp_path: Path) -> None:
    """θ_i = θ_n + α_i a + β_i b with a, b orthonormal over the included parameters: 100% explained
    variance, every checkpoint on the plane, coordinates equal to (α, β) up to a rotation or reflection.
    Biases and BN parameters wander off the plane: ignore=biasbn must not see them."""
    space = _space()
    mask = _included_mask(space, "biasbn")
    gen = torch.Generator().manual_seed(5)
    basis = torch.zeros(2, space.numel, dtype=torch.float64)
    basis[:, mask] = torch.linalg.qr(torch.randn(int(mask.sum()), 2, generator=gen, dtype=torch.float64))[0].T
    t = np.linspace(0, 1, 12)
    ab = np.stack([3.0 * np.cos(2.5 * t) * (1 - t), 2.0 * np.sin(3.0 * t) * (1 - t) + 0.5 * t * (1 - t)], 1)
    end = 0.1 * torch.randn(space.numel, generator=gen, dtype=torch.float64)
    thetas = []
    for i in range(len(t)):
        theta = end + torch.from_numpy(ab[i]) @ basis
        if i < len(t) - 1:
            theta[~mask] += 0.5 * torch.randn(int((~mask).sum()), generator=gen, dtype=torch.float64)
        thetas.append(theta.float())
    traj = trajectory.pca(_write_run(tmp_path / "run", thetas), progress=False)
    assert traj.explained_variance_ratio.sum() == pytest.approx(1.0, abs=1e-6)
    path = traj.paths[0]
    assert path.residual.max() < 1e-5 * np.abs(ab).max()
    # The PCA axes are an orthonormal basis of the same plane: coords = ab @ R with R orthogonal.
    r = np.linalg.lstsq(ab, path.coords, rcond=None)[0]
    np.testing.assert_allclose(r @ r.T, np.eye(2), atol=1e-5)
    np.testing.assert_allclose(ab @ r, path.coords, atol=1e-5)
    span = traj.directions.double() @ basis.T  # [2, 2]: each PCA axis written in (a, b)
    np.testing.assert_allclose(span @ span.T, np.eye(2), atol=1e-5)


def test_three_checkpoints_span_their_plane(tmp_path: Path) -> None:
    """With 3 checkpoints the centred rows have rank 1: the second axis completes the plane through
    all three, with an explained variance of 0; every checkpoint lies on the plane."""
    space = _space()
    thetas = _curved_path(space, 2, seed=2)
    traj = trajectory.pca(_write_run(tmp_path / "run", thetas), progress=False)
    np.testing.assert_allclose(traj.explained_variance_ratio, [1.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(traj.directions.double() @ traj.directions.double().T, np.eye(2), atol=1e-6)
    path = traj.paths[0]
    scale = np.abs(path.coords).max()
    assert path.residual.max() < 1e-5 * scale and scale > 0
    # The plane contains θ_0 − θ_n, θ_1 − θ_n, so the coordinates reproduce their distances.
    mask = _included_mask(space, "biasbn")
    full = [(x.double() - thetas[-1].double())[mask] for x in thetas]
    for i in range(3):
        for j in range(3):
            dist = float((full[i] - full[j]).norm())
            assert np.linalg.norm(path.coords[i] - path.coords[j]) == pytest.approx(dist, rel=1e-5, abs=1e-6)


def test_step_checkpoints_are_ordered_by_step(tmp_path: Path) -> None:
    """Finer step_XXXXXXX.pt checkpoints interleave with the epoch ones by meta["step"]; a step
    checkpoint at an epoch's step is the same point and counts once (kept under the epoch's name)."""
    space = _space()
    thetas = _curved_path(space, 6, seed=4)
    names = ["epoch_000.pt", "step_0000020.pt", "epoch_001.pt", "step_0000060.pt", "step_0000080.pt",
             "epoch_002.pt", "epoch_003.pt"]
    steps = [0, 20, 40, 60, 80, 80, 120]
    run = _write_run(tmp_path / "run", thetas, steps=steps, names=names)
    traj = trajectory.pca(run, progress=False)
    path = traj.paths[0]
    assert path.steps.tolist() == [0, 20, 40, 60, 80, 120]
    assert [f.name for f in path.files] == ["epoch_000.pt", "step_0000020.pt", "epoch_001.pt", "step_0000060.pt",
                                            "epoch_002.pt", "final.pt"]
    assert path.epoch_end.tolist() == [True, False, True, False, True, True]
    assert traj.rows == 5
    assert trajectory.step_filename(60) == "step_0000060.pt"


def test_runs_with_the_same_init_share_one_basis(tmp_path: Path) -> None:
    space = _space()
    a = _curved_path(space, 6, seed=10)
    b = _curved_path(space, 5, seed=11, start=a[0])
    run_a, run_b = _write_run(tmp_path / "adam", a), _write_run(tmp_path / "sgd", b)
    traj = trajectory.pca([run_a, run_b], progress=False)
    mask = _included_mask(space, "biasbn")
    ref = a[-1].double()
    # All distinct points about the common reference (run a's final): θ_0 once, run b's final included.
    pts = a[:-1] + b[1:]
    rows = np.stack([(t.double() - ref)[mask].numpy() for t in pts])
    assert traj.rows == len(rows)
    _assert_matches_svd(traj, rows, mask)
    pa, pb = traj.paths
    assert pa.run == run_a and pb.run == run_b
    np.testing.assert_allclose(pa.coords[0], pb.coords[0], atol=1e-12)  # the shared start
    assert np.array_equal(pa.coords[-1], [0.0, 0.0]) and np.abs(pb.coords[-1]).max() > 0
    xmin, xmax, ymin, ymax = traj.extent()
    both = np.vstack([pa.coords, pb.coords])
    assert xmin < both[:, 0].min() and xmax > both[:, 0].max() and ymin < both[:, 1].min() and ymax > both[:, 1].max()

    # The same seed in config.json is evidence enough when the initial weights were not saved.
    for run in (run_a, run_b):
        (run / "epoch_000.pt").unlink()
    assert trajectory.pca([run_a, run_b], progress=False).rows == len(rows) - 1


def test_h5_fields_read_as_li_et_al(tmp_path: Path) -> None:
    space = _space()
    a = _curved_path(space, 4, seed=12)
    b = _curved_path(space, 4, seed=13, start=a[0])
    traj = trajectory.pca([_write_run(tmp_path / "a", a), _write_run(tmp_path / "b", b)], progress=False)
    data, attrs = traj.h5_fields()
    with h5py.File(tmp_path / "surf.h5", "w") as f:
        for k, v in data.items():
            f[k] = v
        f.attrs.update(attrs)
    with h5py.File(tmp_path / "surf.h5", "r") as f:  # as plot_2D.plot_contour_trajectory reads them
        np.testing.assert_array_equal(f["proj_xcoord"][:], traj.paths[0].coords[:, 0])
        np.testing.assert_array_equal(f["proj_ycoord"][:], traj.paths[0].coords[:, 1])
        assert f["proj_xcoord"][-1] == 0 and f["proj_ycoord"][-1] == 0
        assert f["explained_variance_ratio_"][0] == traj.explained_variance_ratio[0]
        np.testing.assert_array_equal(f["proj_step"][:], traj.paths[0].steps)
        np.testing.assert_array_equal(f["run1_proj_xcoord"][:], traj.paths[1].coords[:, 0])
        np.testing.assert_array_equal(f["run1_proj_epoch_end"][:], traj.paths[1].epoch_end)
        np.testing.assert_array_equal(f["proj_residual"][:], traj.paths[0].residual)
        assert [s.decode() for s in f["pca_included"][:]] == list(traj.included)
        assert f["proj_checkpoint"][-1].decode() == "final.pt"
        assert f.attrs["pca_ignore"] == "biasbn" and json.loads(f.attrs["pca_runs"]) == [
            str((tmp_path / "a").resolve()), str((tmp_path / "b").resolve())]
        assert json.loads(f.attrs["pca_labels"]) == ["a", "b"]  # config.json names no optimizer here


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real fastland.train run: LeNet on 128 synthetic images, 3 epochs of 4 steps, a checkpoint every 2 steps."""
    out = tmp_path_factory.mktemp("trained") / "adam"
    train(TrainConfig(model="lenet", data="synthetic", samples="128", epochs=3, batch=32, device="cpu", save_every=2),
          out, progress=False)
    return out


def test_trained_run_end_to_end(trained: Path) -> None:
    """A real (tiny) fastland.train run (the ``trained`` fixture): 3 epochs of 4 steps, epoch_000.pt (the
    initial weights), step_XXXXXXX.pt every 2 steps (--save-every), final.pt (= epoch_003.pt)."""
    extra = {"save_every": 2}
    traj = trajectory.pca(trained, progress=False)
    path = traj.paths[0]
    init = (trained / "epoch_000.pt").exists()
    steps = ([0] if init else []) + (list(range(2, 13, 2)) if extra else [4, 8, 12])
    assert path.steps.tolist() == steps
    names = {0: "epoch_000.pt", 4: "epoch_001.pt", 8: "epoch_002.pt", 12: "final.pt"}
    assert [f.name for f in path.files] == [names.get(s, trajectory.step_filename(s)) for s in steps]
    assert path.epoch_end.tolist() == [s in names for s in steps]
    assert np.array_equal(path.coords[-1], [0, 0]) and path.distance > 0
    assert traj.included == ("0.weight", "3.weight", "7.weight", "9.weight", "11.weight")


# --- bad input: one line each --------------------------------------------------------------------
def _one_line(err: pytest.ExceptionInfo[UserError], *words: str) -> None:
    msg = str(err.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, (w, msg)


def test_missing_or_wrong_folder(tmp_path: Path) -> None:
    with pytest.raises(UserError) as e:
        trajectory.pca(tmp_path / "nope", progress=False)
    _one_line(e, "does not exist")
    run = _write_run(tmp_path / "run", _curved_path(_space(), 3, seed=0))
    with pytest.raises(UserError) as e:
        trajectory.pca(run / "final.pt", progress=False)
    _one_line(e, "is a file", str(run))
    with pytest.raises(UserError) as e:
        trajectory.pca([run, run], progress=False)
    _one_line(e, "given twice")
    with pytest.raises(UserError) as e:
        trajectory.pca(run, ignore="bias", progress=False)
    _one_line(e, "biasbn")


def test_too_few_checkpoints(tmp_path: Path) -> None:
    # Two epochs as training writes them: epoch_001, epoch_002 and final.pt (= epoch_002): 2 points.
    thetas = _curved_path(_space(), 2, seed=0)[1:]
    run = _write_run(tmp_path / "run", thetas, names=["epoch_001.pt", "epoch_002.pt"], steps=[5, 10])
    with pytest.raises(UserError) as e:
        trajectory.pca(run, progress=False)
    _one_line(e, "2 distinct checkpoint(s)", "at least 3", "--save-every")
    (run / "epoch_001.pt").unlink()
    with pytest.raises(UserError) as e:
        trajectory.pca(run, progress=False)
    _one_line(e, "at least 3")
    (run / "final.pt").unlink()
    with pytest.raises(UserError) as e:
        trajectory.pca(run, progress=False)
    _one_line(e, "no final.pt")


def test_different_models(tmp_path: Path) -> None:
    run = _write_run(tmp_path / "run", _curved_path(_space(), 3, seed=0))
    other = models.randomized("lenet")
    models.save_checkpoint(run / "epoch_001.pt", "lenet", other, {"step": 10, "epoch": 1})
    with pytest.raises(UserError) as e:
        trajectory.pca(run, progress=False)
    _one_line(e, "lenet model", "lenet_bn", "one model")
    # Across runs, too.
    run_a = _write_run(tmp_path / "a", _curved_path(_space(), 3, seed=0))
    run_b = _write_run(tmp_path / "b", _curved_path(_space("lenet"), 3, seed=0), name="lenet")
    with pytest.raises(UserError) as e:
        trajectory.pca([run_a, run_b], progress=False)
    _one_line(e, "one model")


def test_different_initial_weights_refused(tmp_path: Path) -> None:
    space = _space()
    run_a = _write_run(tmp_path / "a", _curved_path(space, 3, seed=0))
    run_b = _write_run(tmp_path / "b", _curved_path(space, 3, seed=1))
    with pytest.raises(UserError) as e:
        trajectory.pca([run_a, run_b], progress=False)
    _one_line(e, "different initial weights", "step-0", "same --model and --seed", "own basis")
    # Without saved initial weights: the configs' seeds decide.
    for run in (run_a, run_b):
        (run / "epoch_000.pt").unlink()
    (run_b / "config.json").write_text(json.dumps({"model": MODEL, "seed": 7}))
    with pytest.raises(UserError) as e:
        trajectory.pca([run_a, run_b], progress=False)
    _one_line(e, "seed 0 vs", "seed 7", "same --model and --seed")
    (run_b / "config.json").unlink()
    with pytest.raises(UserError) as e:
        trajectory.pca([run_a, run_b], progress=False)
    _one_line(e, "cannot tell", "same --model and --seed")


def test_unusable_checkpoints(tmp_path: Path) -> None:
    space = _space()
    thetas = _curved_path(space, 3, seed=0)
    run = _write_run(tmp_path / "run", thetas)
    models.save_checkpoint(run / "epoch_001.pt", MODEL, models.randomized(MODEL), {"epoch": 1})  # no step
    with pytest.raises(UserError) as e:
        trajectory.pca(run, progress=False)
    _one_line(e, "epoch_001.pt", "meta['step']")
    bad = thetas[1].clone()
    bad[5] = float("nan")
    _write_run(run, thetas[:1] + [bad] + thetas[2:])
    with pytest.raises(UserError) as e:
        trajectory.pca(run, progress=False)
    _one_line(e, "epoch_001.pt", "non-finite")
    _write_run(run, thetas)  # valid again; then a stale checkpoint of an older, longer run
    models.save_checkpoint(run / "epoch_004.pt", MODEL, models.randomized(MODEL), {"step": 999, "epoch": 4})
    with pytest.raises(UserError) as e:
        trajectory.pca(run, progress=False)
    _one_line(e, "epoch_004.pt", "comes after")


def test_straight_path_refused(tmp_path: Path) -> None:
    """Checkpoints on one line through θ_n span no plane."""
    space = _space()
    gen = torch.Generator().manual_seed(0)
    end, d = torch.randn(space.numel, generator=gen), torch.randn(space.numel, generator=gen)
    thetas = [end + s * d for s in (1.0, 0.75, 0.5, 0.25, 0.0)]
    with pytest.raises(UserError) as e:
        trajectory.pca(_write_run(tmp_path / "run", thetas), progress=False)
    _one_line(e, "one line", "1-D")


def test_disk_buffer_needs_space(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = _write_run(tmp_path / "run", _curved_path(_space(), 3, seed=0))
    monkeypatch.setattr(trajectory.shutil, "disk_usage", lambda _: SimpleNamespace(total=1 << 40, used=1 << 40, free=0))
    with pytest.raises(UserError) as e:
        trajectory.pca(run, memory_budget=0, progress=False)
    _one_line(e, "temporary disk space", "TMPDIR")



# --- the surface on the PCA plane, its file, its pictures, the CLI ----------------------------------
ROOT = Path(__file__).resolve().parents[1]


def _planar_run(folder: Path, biases_wander: bool) -> tuple[Path, list[torch.Tensor]]:
    """A LeNet (no BN: no running statistics) run whose checkpoints lie exactly on a plane through
    its final weights, θ_i = θ_n + α_i a + β_i b with a, b orthonormal over every parameter; with
    ``biases_wander`` the biases (left out by ignore=biasbn) also move, off that plane."""
    space = _space("lenet")
    theta_n = space.flatten(models.randomized("lenet", seed=7))
    gen = torch.Generator().manual_seed(8)
    basis = torch.linalg.qr(torch.randn(space.numel, 2, generator=gen, dtype=torch.float64))[0].T
    t = np.linspace(0, 1, 7)
    ab = 20 * np.stack([np.cos(2.0 * t) * (1 - t), np.sin(3.0 * t) * (1 - t) + 0.4 * t * (1 - t)], 1)
    small = ~_included_mask(space, "biasbn")
    thetas = []
    for i in range(len(t)):
        theta = theta_n.double() + torch.from_numpy(ab[i]) @ basis
        if biases_wander and i < len(t) - 1:
            theta[small] += 0.3 * torch.randn(int(small.sum()), generator=gen, dtype=torch.float64)
        thetas.append(theta.float())
    return _write_run(folder, thetas, name="lenet"), thetas


def _corner(value: float, lo: float) -> int:
    return 0 if value == lo else -1


def test_surface_matches_the_checkpoint_losses_on_the_plane(tmp_path: Path) -> None:
    """Every checkpoint of a planar run IS its projected point, so the loss the surface shows there
    equals the loss recorded at the checkpoint: at grid nodes placed on two checkpoints, and at every
    checkpoint through ``proj_plane_train_loss``. Where the biases leave the plane (ignore=biasbn), the
    two differ: the comparison can fail."""
    from fastland.data import load

    data = load("synthetic", "train", 64, seed=0)
    run, thetas = _planar_run(tmp_path / "planar", biases_wander=False)
    traj = trajectory.pca(run, ignore="none", progress=False)
    assert traj.paths[0].residual.max() < 1e-5 * np.abs(traj.paths[0].coords).max()
    # Two checkpoints on opposite corners of a 3x3 grid.
    (xa, ya), (xb, yb) = traj.paths[0].coords[1], traj.paths[0].coords[4]
    rng = (min(xa, xb), max(xa, xb), min(ya, yb), max(ya, yb))
    surf = trajectory.surface(traj, data, res=3, range=rng, progress=False)
    ex = surf.extras
    want = [fastland.evaluate(_model_at("lenet", th), data)["loss"] for th in thetas]
    np.testing.assert_allclose(ex["proj_train_loss"], want, rtol=1e-5)  # each checkpoint as it is
    np.testing.assert_allclose(ex["proj_plane_train_loss"], ex["proj_train_loss"], rtol=1e-4)
    for i, (x, y) in ((1, (xa, ya)), (4, (xb, yb))):
        node = surf.loss[_corner(y, rng[2]), _corner(x, rng[0])]
        assert node == pytest.approx(ex["proj_train_loss"][i], rel=1e-4), i
    assert np.ptp(ex["proj_train_loss"]) > 0.05  # the path climbs: equal values are no accident
    assert surf.attrs["direction"] == "pca" and surf.attrs["ignore"] == "none" and surf.attrs["norm"] == "none"

    # Biases off the plane: the surface (with the final biases) no longer shows the checkpoints' losses.
    run2, _ = _planar_run(tmp_path / "wander", biases_wander=True)
    ex2 = trajectory.surface(run2, data, res=2, ignore="biasbn", progress=False).extras
    assert ex2["proj_residual"].max() == pytest.approx(0, abs=1e-4)  # on the plane of the included parameters
    gap = np.abs(ex2["proj_plane_train_loss"] - ex2["proj_train_loss"])
    assert gap[-1] < 1e-5 and gap[:-1].max() > 1e-2


def _model_at(name: str, theta: torch.Tensor) -> torch.nn.Module:
    model = models.create(name)
    FlatSpace(model).load_into(model, theta)
    return model


@pytest.fixture(scope="module")
def cli_run(trained: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """``python -m fastland.trajectory`` on it, in-process, with its pictures; the data from its config."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("traj") / "t.h5"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        trajectory.main([str(trained), "--res", "5", "--samples", "32", "--device", "cpu", "--out", str(out)])
    return out, stdout.getvalue()


def test_cli_end_to_end_on_a_trained_run(trained: Path, cli_run: tuple[Path, str], capsys: pytest.CaptureFixture[str]) -> None:
    from conftest import run_main

    out, stdout = cli_run
    s = fastland.load(out)
    steps = [0, 2, 4, 6, 8, 10, 12]
    assert s.extras["proj_step"].tolist() == steps
    assert s.extras["proj_epoch_end"].tolist() == [1, 0, 1, 0, 1, 0, 1]
    assert s.extras["proj_xcoord"][-1] == 0 and s.extras["proj_ycoord"][-1] == 0
    assert s.attrs["data_source"] == "synthetic" and s.attrs["samples"] == 32  # the run's data (config.json)
    assert s.loss.shape == (5, 5) and s.done.all() and np.isfinite(s.loss).all()
    final, _, _ = models.load_checkpoint(trained / "final.pt")
    data = fastland.data.load("synthetic", "train", 32, seed=0)
    want = fastland.evaluate(final, data, batch_size=128)
    assert s.extras["proj_train_loss"][-1] == pytest.approx(want["loss"], rel=1e-5)
    assert s.extras["proj_train_acc"][-1] == pytest.approx(want["accuracy"])
    # The surface's centre is the final model: its plane loss there is the final loss.
    assert s.extras["proj_plane_train_loss"][-1] == pytest.approx(want["loss"], rel=1e-5)
    ratio = s.extras["explained_variance_ratio_"]
    for line in (f"1st PC {100 * ratio[0]:.2f} %", "adam", "length", "start→end", "7 ", f"wrote       {out.with_suffix('')}_path.png"):
        assert line in stdout, line
    pictures = ["_path.png", "_path.gif"] + (["_path_3d.png"] if _has_pyvista() else [])
    for suffix in pictures:
        assert (out.parent / f"t{suffix}").stat().st_size > 20_000, suffix
    with Image.open(out.parent / "t_path.gif") as gif:
        assert gif.n_frames == len(steps) and gif.size == (1300, 560)

    # Resumable like any surface: points lost from the file are evaluated again, to the same values.
    with h5py.File(out, "r+") as f:
        f["done"][3:, :] = 0
        f["train_loss"][3:, :] = np.nan
    code, again, err = run_main(trajectory.main, [str(trained), "--res", "5", "--samples", "32", "--device", "cpu",
                                                  "--out", str(out), "--no-render"], capsys)
    assert code == 0, err
    assert "10 to evaluate (resuming)" in again
    np.testing.assert_allclose(fastland.load(out).loss, s.loss, rtol=1e-6)
    # Other settings are refused in one line; --overwrite replaces.
    code, _, err = run_main(trajectory.main, [str(trained), "--res", "4", "--samples", "32", "--device", "cpu",
                                              "--out", str(out), "--no-render"], capsys)
    assert code == 2 and "other settings" in err and "--overwrite" in err and err.count("\n") == 1


def _has_pyvista() -> bool:
    import importlib.util

    return importlib.util.find_spec("pyvista") is not None


def test_file_reads_as_li_et_al_plot_2D(cli_run: tuple[Path, str]) -> None:
    """The reads of plot_2D.plot_contour_trajectory (tomgoldstein/loss-landscape), with this one file as
    its surf_file, dir_file and proj_file and surf_name='train_loss', drawing into a matplotlib figure."""
    from matplotlib.figure import Figure

    out, _ = cli_run
    f = h5py.File(out, "r")
    x = np.array(f["xcoordinates"][:])
    y = np.array(f["ycoordinates"][:])
    X, Y = np.meshgrid(x, y)
    Z = np.array(f["train_loss"][:])
    ax = Figure().subplots()
    ax.contour(X, Y, Z, levels=np.arange(0.1, 10, 0.5))
    pf = h5py.File(out, "r")
    # Their plt.plot(pf['proj_xcoord'], ...) hands matplotlib the h5py datasets, which matplotlib >= 3.x
    # indexes with None, which h5py refuses, whatever the file; read as arrays, it is the same call.
    (line,) = ax.plot(pf["proj_xcoord"][:], pf["proj_ycoord"][:], marker=".")
    df = h5py.File(out, "r")
    ratio_x = df["explained_variance_ratio_"][0]
    ratio_y = df["explained_variance_ratio_"][1]
    ax.set_xlabel("1st PC: %.2f %%" % (ratio_x * 100))  # noqa: UP031 - their code, as written
    assert len(line.get_xdata()) == 7 and line.get_xdata()[-1] == 0
    assert 0 < ratio_y <= ratio_x <= 1 and Z.shape == (len(y), len(x))
    assert np.all((x[0] <= line.get_xdata()) & (line.get_xdata() <= x[-1]))  # the grid covers the path
    for h in (f, pf, df):
        h.close()


def test_several_runs_on_one_picture(tmp_path: Path) -> None:
    """Runs with the same initial weights share one basis; each path is drawn in its own colour, with
    its label in the legend, on the map, in 3-D and in the animation."""
    from fastland.data import load
    from fastland.viz import trajectory as viz

    space = _space("lenet")
    a = _curved_path(space, 4, seed=20)
    b = _curved_path(space, 3, seed=21, start=a[0])
    run_a, run_b = _write_run(tmp_path / "adam", a, name="lenet"), _write_run(tmp_path / "sgd", b, name="lenet")
    for run, opt in ((run_a, "adam"), (run_b, "sgd")):
        cfg = json.loads((run / "config.json").read_text())
        (run / "config.json").write_text(json.dumps(cfg | {"optimizer": opt, "lr": 0.01}))
    png = tmp_path / "fig" / "both.png"
    got = trajectory.figure([run_a, run_b], png, load("synthetic", "train", 16, seed=0), res=3, progress=False)
    assert got == png and png.with_suffix(".h5").is_file()
    s = fastland.load(png.with_suffix(".h5"))
    runs = viz.traces(s)
    assert [r.label for r in runs] == ["adam (adam, lr 0.01)", "sgd (sgd, lr 0.01)"]
    assert len(runs[0].coords) == 5 and len(runs[1].coords) == 4
    np.testing.assert_allclose(runs[0].coords[0], runs[1].coords[0], atol=1e-9)  # the shared start
    assert np.isfinite(runs[1].loss).all() and np.isfinite(runs[1].plane_loss).all()
    image = np.asarray(Image.open(png).convert("RGB")).astype(int)
    for color in viz.COLORS[:2]:
        rgb = np.array([int(color[i : i + 2], 16) for i in (1, 3, 5)])
        assert (np.abs(image - rgb).sum(-1) < 30).sum() > 200, color  # each path's colour is on the map
    gif = viz.animate(s, tmp_path / "both.gif")
    with Image.open(gif) as im:
        assert im.n_frames == len(set(runs[0].steps) | set(runs[1].steps))
    if _has_pyvista():
        from fastland.viz import render

        shot = np.asarray(Image.open(render.path_screenshot(s, tmp_path / "both_3d.png", size=(640, 360))).convert("RGB"))
        assert shot.shape == (360, 640, 3)
        orange = np.array([255, 140, 0])
        assert (np.abs(shot.astype(int) - orange).sum(-1) < 120).sum() > 50  # the first run's tube
    with pytest.raises(UserError) as e:
        viz.path_png(fastland.surface(models.create("lenet"), load("synthetic", "train", 8), res=2, progress=False),
                     tmp_path / "x.png")
    _one_line(e, "no trajectory", "fastland.trajectory")


# --- bad input through the real command line: one line, exit 2 ---------------------------------
def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fastland.trajectory", *args], capture_output=True, text=True,
                          cwd=ROOT, env=os.environ | {"OMP_NUM_THREADS": "1"}, timeout=300)


def test_cli_bad_input_is_one_line(tmp_path: Path) -> None:
    few = _write_run(tmp_path / "few", _curved_path(_space(), 2, seed=0)[1:], names=["epoch_001.pt", "epoch_002.pt"],
                     steps=[5, 10])
    lenet_bn = _write_run(tmp_path / "bn", _curved_path(_space(), 3, seed=0))
    lenet = _write_run(tmp_path / "plain", _curved_path(_space("lenet"), 3, seed=0), name="lenet")
    other_init = _write_run(tmp_path / "other", _curved_path(_space(), 3, seed=1))
    cases = [
        ([str(few)], ["2 distinct checkpoint(s)", "at least 3", "--save-every"]),
        ([str(lenet_bn), str(lenet)], ["one model"]),
        ([str(lenet_bn), str(other_init)], ["different initial weights", "same --model and --seed"]),
        ([str(tmp_path / "missing")], ["does not exist", "fastland.train"]),
        ([str(lenet_bn), "--range", "1", "0"], ["increasing"]),
    ]
    for args, words in cases:
        r = _cli(*args, "--data", "synthetic", "--samples", "8", "--device", "cpu", "--out", str(tmp_path / "o.h5"))
        assert r.returncode == 2, (args, r.stderr)
        assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
        for w in words:
            assert w in r.stderr, (w, r.stderr)
    assert not (tmp_path / "o.h5").exists()


def test_cli_help_explains_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    parser = trajectory.build_parser()
    for action in parser._actions:
        assert action.help and len(action.help) > 15, action.dest
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    text = capsys.readouterr().out
    for option in ("--res", "--samples", "--data", "--split", "--bn-mode", "--device", "--out", "--overwrite",
                   "--no-render", "--range", "--ignore", "--animation", "RUN_DIR", "plot_2D.py"):
        assert option in text, option


def test_resume_keeps_the_files_directions_and_refuses_another_trajectory(tmp_path: Path) -> None:
    """Directions recomputed with another thread count differ in their last bits; a resumed file keeps
    its own (and its range), so it resumes. Another run, or a checkpoint changed since, is one line."""
    import dataclasses

    from fastland.data import load

    data = load("synthetic", "train", 16, seed=0)
    space = _space("lenet")
    thetas = _curved_path(space, 3, seed=30)
    run = _write_run(tmp_path / "run", thetas, name="lenet")
    out = tmp_path / "s.h5"
    traj = trajectory.pca(run, progress=False)
    first = trajectory.surface(traj, data, res=3, out=out, progress=False)
    with h5py.File(out, "r+") as f:
        f["done"][0, :] = 0
    nudged = dataclasses.replace(traj, directions=traj.directions * (1 + 1e-7))
    assert not torch.equal(nudged.directions, traj.directions)
    again = trajectory.surface(nudged, data, res=3, out=out, progress=False)
    assert again.done.all() and again.attrs["directions_sha256"] == first.attrs["directions_sha256"]
    np.testing.assert_allclose(again.loss, first.loss, rtol=1e-6)

    other = _write_run(tmp_path / "other", _curved_path(space, 3, seed=31), name="lenet")
    with pytest.raises(UserError) as e:
        trajectory.surface(other, data, res=3, out=out, progress=False)
    _one_line(e, "other runs", "--overwrite")
    changed = thetas[:1] + [thetas[1] + 0.5 * torch.randn(space.numel, generator=torch.Generator().manual_seed(1))]
    _write_run(run, changed + thetas[2:], name="lenet")
    with pytest.raises(UserError) as e:
        trajectory.surface(run, data, res=3, out=out, progress=False)
    _one_line(e, "other PCA directions", "--overwrite")
    assert trajectory.surface(run, data, res=3, out=out, overwrite=True, progress=False).done.all()


def test_cli_data_and_animation_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A run trained on data given in Python needs --data; an .mp4 needs ffmpeg: one line each, before any work."""
    from conftest import run_main
    from matplotlib import animation

    run = _write_run(tmp_path / "run", _curved_path(_space(), 3, seed=0))
    (run / "config.json").write_text(json.dumps({"model": MODEL, "seed": 0, "data": "tensors"}))
    code, _, err = run_main(trajectory.main, [str(run), "--out", str(tmp_path / "o.h5")], capsys)
    assert code == 2 and "given in Python (tensors)" in err and "--data" in err and err.count("\n") == 1
    (run / "config.json").write_text(json.dumps({"model": MODEL, "seed": 0, "data": "auto", "data_source": "synthetic"}))
    assert trajectory.run_data(run) == "synthetic"  # auto, as it resolved when the run was trained
    if not animation.FFMpegWriter.isAvailable():
        code, _, err = run_main(trajectory.main, [str(run), "--animation", "mp4", "--out", str(tmp_path / "o.h5")], capsys)
        assert code == 2 and "ffmpeg" in err and "--animation gif" in err
    assert not (tmp_path / "o.h5").exists()
