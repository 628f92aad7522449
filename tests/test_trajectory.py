"""Trajectory PCA: agrees with a plain numpy SVD (in RAM and disk-backed), recovers a planar path
exactly, shares one basis across runs with the same initial weights, refuses bad input in one line."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import torch

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
        np.testing.assert_array_equal(f["run1/proj_xcoord"][:], traj.paths[1].coords[:, 0])
        assert [s.decode() for s in f["pca_included"][:]] == list(traj.included)
        assert f["proj_checkpoint"][-1].decode() == "final.pt"
        assert f.attrs["pca_ignore"] == "biasbn" and json.loads(f.attrs["pca_runs"]) == [str(tmp_path / "a"),
                                                                                          str(tmp_path / "b")]


def test_trained_run_end_to_end(tmp_path: Path) -> None:
    """A real (tiny) fastland.train run: 3 epochs of 4 steps, epoch_000.pt (the initial weights) where
    training saves it, step_XXXXXXX.pt every 2 steps where it has --save-every, final.pt (= epoch_003.pt)."""
    extra = {"save_every": 2} if "save_every" in {f.name for f in fields(TrainConfig)} else {}
    cfg = TrainConfig(model="lenet", data="synthetic", samples="128", epochs=3, batch=32, device="cpu", **extra)
    train(cfg, tmp_path / "run", progress=False)
    traj = trajectory.pca(tmp_path / "run", progress=False)
    path = traj.paths[0]
    init = (tmp_path / "run" / "epoch_000.pt").exists()
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

