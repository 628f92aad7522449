"""Curvature maps, Hessian eigenvector axes and the ``python -m fastland.hessian`` command line.

- The map equals the eigenvalues of the dense Hessian (fp64, ``torch.autograd.functional.hessian``) at
  the weights of chosen grid points, in both BN modes; it is stored beside the loss, resumes after an
  interruption without recomputing finished points, refuses other settings or another model, and draws.
- Eigenvector axes: unit eigenvectors scaled as documented, the eigenvalues and BN mode recorded, and the
  loss along the first axis curves like λ1/2·α²·‖d‖² near 0 (a second-order check on the surface itself).
- The CLI through a real interpreter: the numbers equal the API's, files and summary are written, and bad
  input is one line with a non-zero exit.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import one_error_line, run_cli, write_image_folder
from torch import nn

import fastland
from fastland import curvature, hessian, models, surfacefile
from fastland.errors import UserError
from fastland.params import FlatSpace

pytestmark = pytest.mark.usefixtures("one_thread")


class Net(nn.Module):
    """275 parameters: Linear-BN-tanh-Linear, small enough for a dense Hessian."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.bn, self.fc2 = nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.bn(self.fc1(x))))


def _net(seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(seed)
    model = Net()
    with torch.no_grad():
        model.bn.running_mean.normal_()
        model.bn.running_var.uniform_(0.5, 1.5)
        model.bn.weight.uniform_(0.5, 1.5)
    gen = torch.Generator().manual_seed(seed + 1)
    return model.eval(), (torch.randn(48, 8, generator=gen), torch.randint(0, 3, (48,), generator=gen))


def dense_eigenvalues(model: nn.Module, theta: torch.Tensor, data: tuple[torch.Tensor, torch.Tensor], bn_mode: str,
                      batch: int) -> np.ndarray:
    """Every eigenvalue of the Hessian of the mean loss at the flat weights ``theta``, in fp64 (batch mode: BN in
    train mode on batches of ``batch``, as the operator splits them)."""
    ref = copy.deepcopy(model).double().eval()
    if bn_mode == "batch":
        ref.bn.train()
    names = [n for n, _ in ref.named_parameters()]
    shapes = [p.shape for p in ref.parameters()]
    x, y = data

    def loss(flat: torch.Tensor) -> torch.Tensor:
        parts = {n: t.view(s) for n, t, s in zip(names, flat.split([s.numel() for s in shapes]), shapes, strict=True)}
        return sum(F.cross_entropy(torch.func.functional_call(ref, parts, (xb.double(),)), yb) * (len(xb) / len(x))
                   for xb, yb in zip(x.split(batch), y.split(batch), strict=True))

    return torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss, theta.double())).numpy()


def _weights(model: nn.Module, surf: surfacefile.Surface, i: int, j: int) -> torch.Tensor:
    space = FlatSpace(model)
    dirs = [space.flatten_state(d) for d in surf.directions]
    return space.flatten(model).double() + surf.x[i] * dirs[0].double() + surf.y[j] * dirs[1].double()


# --- the map ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("bn_mode", ["eval", "batch"])
def test_map_matches_dense_eigenvalues_at_grid_points(tmp_path: Path, bn_mode: str) -> None:
    model, data = _net()
    path = tmp_path / "s.h5"
    fastland.surface(model, data, res=5, out=path, bn_mode=bn_mode, batch_size=16, progress=False)
    cmap = hessian.curvature_map(model, data, path, bn_mode=bn_mode, batch_size=16, tol=1e-5, stride=2, progress=False)
    assert cmap.ratio.shape == (3, 3) and (cmap.done == 1).all() and cmap.attrs["bn_mode"] == bn_mode
    surf = surfacefile.read(path, directions=True)
    for jj, ii in ((0, 0), (1, 1), (2, 1)):  # map indices; the surface's every second point
        ev = dense_eigenvalues(model, _weights(model, surf, 2 * ii, 2 * jj), data, bn_mode, 16)
        scale = abs(ev).max()
        assert cmap.lambda_max[jj, ii] == pytest.approx(ev[-1], rel=1e-4)
        assert abs(cmap.lambda_min[jj, ii] - ev[0]) <= 1e-4 * scale
        assert cmap.ratio[jj, ii] == pytest.approx(abs(ev[0] / ev[-1]), abs=2e-4)
    # Stored beside the loss, full-size, NaN and not done off the stride; read back on its own grid.
    with h5py.File(path, "r") as f:
        assert f["train_lambda_max"].shape == f["train_loss"].shape == (5, 5)
        assert np.isnan(f["train_curvature_ratio"][1, :]).all() and not f["curvature_done"][1, :].any()
        assert f.attrs["curvature_bn_mode"] == bn_mode and int(f.attrs["curvature_stride"]) == 2
    back = curvature.read(path)
    np.testing.assert_array_equal(back.ratio, cmap.ratio)
    np.testing.assert_array_equal(back.x, surf.x[::2])


def test_map_resumes_refuses_and_draws(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, data = _net(3)
    path = tmp_path / "s.h5"
    fastland.surface(model, data, res=4, out=path, batch_size=16, progress=False)
    full = hessian.curvature_map(model, data, path, tol=1e-4, progress=False, overwrite=True)
    # Interrupted after 30 products: the points finished by then are kept, and only the others run again.
    calls = {"n": 0}
    real = hessian.HVPOperator.hvp

    def dying(self: hessian.HVPOperator, v: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] > 30:
            raise KeyboardInterrupt
        return real(self, v)

    monkeypatch.setattr(hessian.HVPOperator, "hvp", dying)
    with pytest.raises(KeyboardInterrupt):
        hessian.curvature_map(model, data, path, tol=1e-4, progress=False, overwrite=True)
    monkeypatch.setattr(hessian.HVPOperator, "hvp", real)
    with h5py.File(path, "r") as f:
        kept = int((f["curvature_done"][...] != 0).sum())
        assert 0 < kept < 16
        assert np.isfinite(f["train_lambda_max"][...][f["curvature_done"][...] != 0]).all()
    again = hessian.curvature_map(model, data, path, tol=1e-4, progress=False)
    assert int(surfacefile.settings_of(path)["curvature_last_run_points"]) == 16 - kept
    np.testing.assert_allclose(again.lambda_max, full.lambda_max, rtol=1e-4)
    np.testing.assert_allclose(again.lambda_min, full.lambda_min, atol=1e-4 * np.abs(full.lambda_max).max())
    # Other settings, another model: one line each; overwrite starts again.
    with pytest.raises(UserError, match="other settings.*tol"):
        hessian.curvature_map(model, data, path, tol=1e-3, progress=False)
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.fc1.weight.add_(0.1)
    with pytest.raises(UserError, match="not the one"):
        hessian.curvature_map(other, data, path, tol=1e-4, progress=False)
    assert (hessian.curvature_map(model, data, path, tol=1e-3, progress=False, overwrite=True).done == 1).all()
    # Drawn: the matplotlib maps, and the 3-D surface coloured by the ratio.
    from fastland.viz import plots

    surf = surfacefile.read(path)
    assert plots.has_curvature(surf)
    png = plots.curvature_png(surf, tmp_path / "c.png")
    assert png.stat().st_size > 20_000
    pytest.importorskip("pyvista")
    from fastland.viz import render

    shot = render.curvature_screenshot(surf, tmp_path / "c3d.png", size=(640, 360))
    assert shot.stat().st_size > 20_000


def test_map_in_memory_from_directions_and_warm_starts() -> None:
    """Directions and a grid without a file; warm starts need fewer products than cold ones, with the same answer."""
    model, data = _net(5)
    space = FlatSpace(model)
    dirs = fastland.directions.make(space, space.flatten(model), 2, seed=1)
    warm = hessian.curvature_map(model, data, [dirs[0], dirs[1]], res=4, tol=1e-4, progress=False)
    cold = hessian.curvature_map(model, data, [dirs[0], dirs[1]], res=4, tol=1e-4, progress=False, warm_start=False)
    assert warm.path is None and warm.ratio.shape == (4, 4)
    np.testing.assert_allclose(warm.lambda_max, cold.lambda_max, rtol=1e-4)
    np.testing.assert_allclose(warm.lambda_min, cold.lambda_min, atol=2e-4 * np.abs(cold.lambda_max).max())
    assert warm.hvps.sum() < cold.hvps.sum()
    lock = hessian.curvature_map(model, data, [dirs[0], dirs[1]], res=4, tol=1e-4, progress=False, points=3)
    np.testing.assert_allclose(lock.lambda_max, cold.lambda_max, rtol=1e-4)  # several points through one vmap


def test_snake_order_visits_neighbours() -> None:
    order = curvature.snake(np.arange(12), 4)
    assert order.tolist() == [0, 1, 2, 3, 7, 6, 5, 4, 8, 9, 10, 11]


# --- eigenvector axes ------------------------------------------------------------------------------
@pytest.mark.parametrize("bn_mode", ["eval", "batch"])
def test_hessian_axes_curve_like_their_eigenvalue(bn_mode: str) -> None:
    model, data = _net(7)
    h = 0.01
    surf = fastland.surface(model, data, dim=1, res=5, range=(-2 * h, 2 * h), directions="hessian", bn_mode=bn_mode,
                            batch_size=16, progress=False)
    a = surf.attrs
    lam, scale = a["hessian_eigenvalues"][0], a["hessian_scale"]
    space = FlatSpace(model)
    theta = space.flatten(model)
    assert a["direction"] == "hessian" and a["hessian_bn_mode"] == bn_mode
    assert scale == pytest.approx(curvature.axis_scale(space, theta, "filter", "biasbn"))
    d = space.flatten_state(surf.directions[0])
    assert float(d.norm()) == pytest.approx(scale, rel=1e-5)  # a unit eigenvector times the scale
    ev = dense_eigenvalues(model, theta, data, bn_mode, 16)
    assert lam == pytest.approx(ev[-1], rel=1e-4)
    f = surf.loss
    second = (f[3] - 2 * f[2] + f[1]) / h**2  # d²/dα² L(θ + α·d) at 0 = dᵀHd = λ1·‖d‖²
    assert second == pytest.approx(lam * scale**2, rel=1e-2)


def test_hessian_axes_recorded_and_kept_on_resume(tmp_path: Path) -> None:
    model, data = _net(9)
    path = tmp_path / "h.h5"
    first = fastland.surface(model, data, res=3, directions="hessian", norm="none", out=path, progress=False)
    a = first.attrs
    assert list(a["hessian_eigenvalues"]) == sorted(a["hessian_eigenvalues"], reverse=True) and a["hessian_scale"] == 1.0
    space = FlatSpace(model)
    d1, d2 = (space.flatten_state(d) for d in first.directions)
    assert float(d1 @ d2) == pytest.approx(0.0, abs=1e-5) and float(d1.norm()) == pytest.approx(1.0, rel=1e-5)
    again = fastland.surface(model, data, res=3, directions="hessian", norm="none", out=path, progress=False)
    assert again.attrs["directions_sha256"] == a["directions_sha256"] and again.attrs["last_run_points"] == 0
    with pytest.raises(UserError, match="unknown directions"):
        fastland.surface(model, data, res=3, directions="pca", progress=False)


# --- the command line --------------------------------------------------------------------------------
TINY = '''
import torch
from torch import nn


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 4, 4, stride=4), nn.BatchNorm2d(4), nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))


def frozen():
    return Tiny().requires_grad_(False)
'''


@pytest.fixture(scope="module")
def cli(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A user's model (tinymods:Tiny, 224 parameters) with a trained-looking checkpoint, a broken one (a NaN
    weight), and a small ImageFolder."""
    root = tmp_path_factory.mktemp("hcli")
    (root / "tinymods.py").write_text(TINY)
    sys.path.insert(0, str(root))
    try:
        import tinymods
    finally:
        sys.path.remove(str(root))
    torch.manual_seed(0)
    model = models.randomized(tinymods.Tiny(), 1)
    models.save_checkpoint(root / "ck.pt", "tinymods:Tiny", model)
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.fc.weight[0, 0] = float("nan")
    models.save_checkpoint(root / "nan.pt", "tinymods:Tiny", broken)
    torch.save(model.state_dict(), root / "plain.pt")
    write_image_folder(root / "imgs", 48)
    env = {"PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "FASTLAND_CACHE": str(root / "cache")}
    data = ["--data", f"imagefolder:{root / 'imgs'}", "--samples", "32", "--device", "cpu"]
    return {"root": root, "env": env, "data": data, "model": model}


def test_cli_spectrum_matches_the_api(cli: dict) -> None:
    root = cli["root"]
    done = run_cli("fastland.hessian", ["--checkpoint", str(root / "ck.pt"), *cli["data"], "--k", "2", "--trace",
                                        "--density", "--density-runs", "1", "--density-steps", "12", "--per-layer",
                                        "--bn-mode", "both", "--batch-size", "16", "--out", str(root / "out" / "h")],
                   cwd=root, env=cli["env"])
    assert done.returncode == 0, done.stderr
    rec = json.loads((root / "out" / "h.json").read_text())
    assert set(rec["modes"]) == {"eval", "batch"} and rec["model"] == "tinymods:Tiny" and rec["samples"] == 32
    for mode in ("eval", "batch"):
        m = rec["modes"][mode]
        assert len(m["top_eigenvalues"]["values"]) == 2 and m["top_eigenvalues"]["converged"]
        assert m["top_eigenvalues"]["bn_mode"] == mode and "trace" in m and "density" in m
        assert [r["group"] for r in m["per_layer"]] == ["conv", "bn", "fc"]
        assert m["per_layer"][1]["trace"]["method"] == "exact"  # 8 BN parameters: the trace exactly
        assert f"BN {mode}" in done.stdout
    with h5py.File(root / "out" / "h.h5", "r") as f:
        vec = f["eval/eigenvectors"][...]
        assert vec.shape == (2, 224) and np.allclose(np.linalg.norm(vec, axis=1), 1, atol=1e-5)
        assert f["eval/density/density"].shape == f["eval/density/grid"].shape
    assert (root / "out" / "h_density.png").stat().st_size > 10_000
    assert "wrote" in done.stdout and "λ top-2" in done.stdout
    # The same numbers from the API on the same data (the CLI's EvalSet, batches of 16).
    from fastland import data as data_mod

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FASTLAND_CACHE", cli["env"]["FASTLAND_CACHE"])
        evalset = data_mod.load(f"imagefolder:{root / 'imgs'}", "train", 32)
    api = hessian.top_eigenvalues(cli["model"], evalset, k=2, batch_size=16, bn_mode="batch")
    np.testing.assert_allclose(rec["modes"]["batch"]["top_eigenvalues"]["values"], api.values, rtol=1e-3)


def test_cli_surface_curvature_and_map(cli: dict) -> None:
    """``fastland.surface --directions hessian --curvature`` writes the maps; ``fastland.hessian --map`` resumes them."""
    root = cli["root"]
    out = root / "surf.h5"
    done = run_cli("fastland.surface", ["--checkpoint", str(root / "ck.pt"), *cli["data"], "--res", "3",
                                        "--directions", "hessian", "--curvature", "--no-render", "--out", str(out)],
                   cwd=root, env=cli["env"])
    assert done.returncode == 0, done.stderr
    assert "curvature 9/9 points" in done.stdout and "|λmin/λmax|" in done.stdout
    s = surfacefile.read(out)
    assert s.attrs["direction"] == "hessian" and (s.extras["curvature_done"] == 1).all()
    assert np.isfinite(s.extras["train_curvature_ratio"]).all()
    again = run_cli("fastland.hessian", ["--map", str(out), "--no-plot"], cwd=root, env=cli["env"])
    assert again.returncode == 0, again.stderr
    assert "0 to compute" in again.stdout
    bad = run_cli("fastland.hessian", ["--map", str(out), "--tol", "1e-2", "--no-plot"], cwd=root, env=cli["env"])
    one_error_line(bad, "other settings")


@pytest.mark.parametrize(("args", "needle"), [
    (["--k", "300"], "k=300 asks for 300 eigenvalues, more than the 224 parameters"),
    (["--params", "conv", "--k", "200"], "more than the 196 parameters"),
    (["--params", "features.0"], "no parameter group 'features.0'; groups are module names such as conv, bn, fc"),
    (["--tol", "0"], "--tol must be a positive number"),
    (["--model", "tinymods:frozen", "--checkpoint", "plain.pt"], "no parameter of the model requires grad"),
    (["--checkpoint", "nan.pt"], "the Hessian-vector product is not finite (Lanczos step 1, vector 0, batch 1 of 1, "
                                 "samples 0-31, where the loss is nan"),
])
def test_cli_bad_input_is_one_line(cli: dict, args: list[str], needle: str) -> None:
    base = [] if "--checkpoint" in args else ["--checkpoint", "ck.pt"]
    done = run_cli("fastland.hessian", [*base, *cli["data"], "--no-plot", "--out", "bad/h", *args], cwd=cli["root"],
                   env=cli["env"])
    one_error_line(done, needle)
    assert not (cli["root"] / "bad" / "h.json").exists()
