"""The Santurkar smoothness probes against a plain autograd loop, the layered path against the
sequential one (bit for bit on the CPU, on fresh random inputs and on the same training steps),
and their side effects (none)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fastland import data as data_mod
from fastland import models, probes
from fastland.errors import UserError
from fastland.probes import ProbeConfig
from fastland.train import TrainConfig, train

ETAS = probes.default_etas(0.05)  # large enough that the losses along the line visibly differ


pytestmark = pytest.mark.usefixtures("one_thread")


def _batch(n: int = 32, seed: int = 0, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (n,), generator=gen)
    return x.to(device), y.to(device)


def _trained(name: str, steps: int = 3, device: str = "cpu") -> tuple[nn.Module, torch.optim.Optimizer]:
    """A model a few Adam steps into training, with p.grad set and BN running stats moved."""
    torch.manual_seed(0)
    model = models.create(name).to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for s in range(steps):
        x, y = _batch(seed=100 + s, device=device)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    x, y = _batch(seed=7, device=device)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()  # the step being probed: grads present, not applied
    return model, opt


def reference_probe(model: nn.Module, x: torch.Tensor, y: torch.Tensor, etas: tuple[float, ...]) -> dict[str, list[float]]:
    """The probes by the book: a copy of the model, weights set by hand, loss.backward() per η."""
    m = copy.deepcopy(model).train()  # its running stats move; they do not enter a train-mode forward
    params = list(m.parameters())
    theta = [p.detach().clone() for p in params]

    def loss_and_grad(weights: list[torch.Tensor]) -> tuple[float, torch.Tensor]:
        with torch.no_grad():
            for p, w in zip(params, weights, strict=True):
                p.copy_(w)
        for p in params:
            p.grad = None
        loss = nn.functional.cross_entropy(m(x), y)
        loss.backward()
        return float(loss.detach()), torch.cat([p.grad.reshape(-1) for p in params]).double()

    loss0, g = loss_and_grad(theta)
    g_parts = [g[o : o + t.numel()].view(t.shape).to(t) for o, t in zip(_offsets(theta), theta, strict=True)]
    losses, change, beta = [], [], []
    for eta in etas:
        loss, ge = loss_and_grad([t - eta * gp for t, gp in zip(theta, g_parts, strict=True)])
        losses.append(loss)
        change.append(float((g - ge).norm()))
        beta.append(change[-1] / (eta * float(g.norm())))
    return {"loss": [loss0], "grad_norm": [float(g.norm())], "losses": losses, "gradpred": change, "beta": beta}


def _offsets(tensors: list[torch.Tensor]) -> list[int]:
    out, o = [], 0
    for t in tensors:
        out.append(o)
        o += t.numel()
    return out


def _assert_matches(r: probes.ProbeResult, ref: dict[str, list[float]], rel: float = 1e-5) -> None:
    assert r.loss == pytest.approx(ref["loss"][0], rel=rel, abs=1e-6)
    assert r.grad_norm == pytest.approx(ref["grad_norm"][0], rel=rel)
    assert r.losses == pytest.approx(ref["losses"], rel=rel, abs=1e-6)
    assert r.gradpred == pytest.approx(ref["gradpred"], rel=rel, abs=1e-6)
    assert r.beta == pytest.approx(ref["beta"], rel=rel)
    assert r.loss_min == pytest.approx(min(ref["losses"]), rel=rel)
    assert r.loss_max == pytest.approx(max(ref["losses"]), rel=rel)
    assert r.gradpred_min == pytest.approx(min(ref["gradpred"]), rel=rel)
    assert r.gradpred_max == pytest.approx(max(ref["gradpred"]), rel=rel)
    assert r.beta_smooth == pytest.approx(max(ref["beta"]), rel=rel)


@pytest.mark.parametrize("mode", ["layered", "batched", "sequential"])
@pytest.mark.parametrize("name", ["lenet_bn", "lenet"])
def test_probe_matches_plain_autograd_loop(name: str, mode: str) -> None:
    model, _ = _trained(name)
    x, y = _batch(seed=7)
    ref = reference_probe(model, x, y, ETAS)
    r = probes.SmoothnessProbe(model, ETAS, mode)(model, x, y)
    _assert_matches(r, ref)
    # the line is not flat: the test would notice a probe that ignored η
    assert max(ref["losses"]) - min(ref["losses"]) > 1e-3
    assert r.etas == list(ETAS)


@pytest.mark.parametrize("name", ["lenet_bn", "lenet"])
def test_probe_gradient_is_the_training_gradient(name: str) -> None:
    """g of the probe (stateless BN copy, batch statistics) is what backward() put in p.grad, bit for bit on
    the CPU; so a probe that takes the training step's g and loss (``from_grad``) gives the same numbers."""
    model, _ = _trained(name)
    x, y = _batch(seed=7)
    prober = probes.SmoothnessProbe(model, ETAS, "sequential")
    _, g, loss0, weights = prober.line(model, x, y)
    grad = prober.training_gradient(model)
    assert grad is not None and torch.equal(g, grad)
    step_loss = nn.functional.cross_entropy(model(x), y).detach()
    assert torch.equal(loss0, step_loss)
    theta = prober.space.flatten(model)
    assert torch.allclose(weights[2], theta - ETAS[2] * g, atol=1e-7)
    for mode in ("layered", "sequential"):
        fresh = probes.SmoothnessProbe(model, ETAS, mode)(model, x, y)
        taken = probes.SmoothnessProbe(model, ETAS, mode)(model, x, y, from_grad=True, loss=step_loss)
        assert fresh == taken, mode
    # a parameter without a gradient: the probe computes g itself
    next(model.parameters()).grad = None
    assert prober.training_gradient(model) is None
    assert probes.SmoothnessProbe(model, ETAS, "layered")(model, x, y, from_grad=True, loss=step_loss) == fresh


@pytest.mark.parametrize("name", ["lenet_bn", "lenet"])
def test_batched_equals_sequential(name: str) -> None:
    model, _ = _trained(name, steps=5)
    x, y = _batch(n=48, seed=11)
    prober = probes.SmoothnessProbe(model, ETAS, "batched")
    _, _, _, weights = prober.line(model, x, y)
    lb, gb = prober.gradients_batched(weights, x, y)
    ls, gs = prober.gradients_sequential(weights, x, y)
    assert torch.allclose(lb, ls, rtol=1e-6, atol=1e-6)
    assert torch.allclose(gb, gs, rtol=1e-4, atol=1e-6)
    assert ((gb - gs).norm(dim=1) / gs.norm(dim=1)).max() < 1e-5
    rb = probes.SmoothnessProbe(model, ETAS, "batched")(model, x, y)
    rs = probes.SmoothnessProbe(model, ETAS, "sequential")(model, x, y)
    for field in ("losses", "gradpred", "beta"):
        assert getattr(rb, field) == pytest.approx(getattr(rs, field), rel=1e-5, abs=1e-6)


# --- the layered path: the sequential path's numbers ---------------------------------------
def _gradient_rounding_bound(grads: torch.Tensor) -> torch.Tensor:
    """What "identical" allows for a value made from a gradient ∇L(θ'): fp32 rounding of it, 1e-6·‖∇L(θ')‖
    (see the probes' module doc); the layered path meets it with room (bit for bit on this CPU)."""
    return 1e-6 * grads.norm(dim=1)


def _assert_layered_is_sequential(prober: probes.SmoothnessProbe, weights: torch.Tensor, x: torch.Tensor,
                                  y: torch.Tensor) -> None:
    ls, gs = prober.gradients_sequential(weights, x, y)
    ll, gl = prober.gradients_layered(weights, x, y)
    assert torch.equal(ll, ls)  # the same forward kernels on the same inputs: the losses bit for bit
    first = prober.layered.layers[0]
    stacked = set(first.params) if prober.layered.stack else set()
    for info in prober.space.infos:
        a, b = gl[:, info.offset:info.offset + info.numel], gs[:, info.offset:info.offset + info.numel]
        if info.name in stacked:  # one kernel for all K: bit for bit with oneDNN here, rounding at most elsewhere
            assert ((a - b).norm(dim=1) <= _gradient_rounding_bound(gs)).all(), info.name
        else:
            assert torch.equal(a, b), info.name
    assert ((gl - gs).norm(dim=1) <= _gradient_rounding_bound(gs)).all()


@pytest.mark.parametrize(("name", "n"), [("lenet", 64), ("lenet_bn", 64), ("vgg16_bn", 4)])
def test_layered_equals_sequential_on_fresh_inputs(name: str, n: int) -> None:
    """Random weights a few steps into training, random inputs (never zeros), 8 step lengths."""
    torch.manual_seed(3)
    model = models.create(name).train()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for s in range(2):
        x, y = _batch(n=n, seed=20 + s)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    x, y = _batch(n=n, seed=31)
    prober = probes.SmoothnessProbe(model, probes.default_etas(0.01) if n > 8 else ETAS[::4], "layered")
    assert prober.layered is not None and prober.layered.stack
    theta, g, _, weights = prober.line(model, x, y)
    _assert_layered_is_sequential(prober, weights, x, y)
    # what a probe runs: each weight set made in turn, bit for bit directions.perturb's row
    ll, gl = prober.gradients_layered(weights, x, y)
    for _ in range(2):  # the second call reuses the kept buffers
        lk, gk = prober.layered.line_gradients(theta, g, prober.etas, x, y, prober._loss_of)
        assert torch.equal(lk, ll) and torch.equal(gk, gl)
    assert torch.equal(prober.layered._buffers["weights"], weights[-1])


class _Odd(nn.Module):
    """Every branch of the layered path: nested Sequentials, stride and padding, a conv without bias, a BN
    without affine parameters, a general max-pool (3x3, stride 2), odd sizes, Identity, a Linear without bias."""

    @staticmethod
    def make() -> nn.Sequential:
        torch.manual_seed(5)
        return nn.Sequential(
            nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8, affine=False), nn.ReLU()),
            nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.ReLU(), nn.MaxPool2d(3, stride=2),  # 16 -> 7
            nn.Identity(), nn.MaxPool2d(2),  # 7 -> 3: odd, the general pool
            nn.Flatten(), nn.Linear(72, 20, bias=False), nn.BatchNorm1d(20), nn.ReLU(), nn.Linear(20, 10),
        )


def test_layered_covers_its_layer_types() -> None:
    model = _Odd.make().train()
    x, y = _batch(n=24, seed=8)
    prober = probes.SmoothnessProbe(model, ETAS[:3], "layered")
    _assert_layered_is_sequential(prober, prober.line(model, x, y)[3], x, y)


def test_fast_pool_routes_like_max_pool2d_at_ties() -> None:
    """ReLU + 2x2 max-pool as two torch.maximum and threshold differences: the same values and the same
    gradient as autograd through nn.ReLU and nn.MaxPool2d, with exact ties in every pattern (constant
    patches, a diagonal pair, a row pair) and windows whose maximum is negative."""
    gen = torch.Generator().manual_seed(4)
    z = torch.randn(6, 3, 8, 10, generator=gen)
    z[:, :, 0:2, 0:2] = 0.5  # a 4-way tie
    z[:, :, 2, 3], z[:, :, 3, 2] = 0.9, 0.9  # a diagonal tie above the others
    z[:, 0, 2:4, 2] = -5.0
    z[:, :, 4, 4:6] = 0.7  # a tie in the first row
    z[:, :, 5, 6:8] = 0.8  # a tie in the second row
    z[:, :, 6:8, 8:10] = -0.3  # a negative maximum, tied: ReLU gives 0
    d = torch.randn(6, 3, 4, 5, generator=gen)
    for relu in (True, False):
        ref_in = z.clone().requires_grad_()
        ref = nn.MaxPool2d(2)(torch.relu(ref_in) if relu else ref_in)
        ref.backward(d)
        layer, saved = probes._MaxPool(nn.MaxPool2d(2), relu), []
        out = layer.forward(z, {}, saved)
        assert torch.equal(out, ref.detach())
        assert torch.equal(layer.backward(d, {}, saved, {}, True), ref_in.grad)


class _Softplus(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.softplus(x)


def test_models_outside_the_pattern_take_the_sequential_path() -> None:
    model = models.create("lenet")
    model[1] = _Softplus()  # not a layer the layered path knows
    x, y = _batch(n=16, seed=2)
    auto = probes.SmoothnessProbe(model, ETAS[:2], "auto")
    assert auto.layered is None and "_Softplus" in auto.not_layered
    auto(model.train(), x, y)
    assert auto.chosen == "sequential"
    with pytest.raises(UserError, match="layered"):
        probes.SmoothnessProbe(model, ETAS[:2], "layered")
    # a pattern that only the input shows: a Linear on a 3-D tensor (another backward than addmm's)
    seq = nn.Sequential(nn.Linear(32, 10), nn.Flatten(), nn.Linear(3 * 10, 10)).train()
    auto = probes.SmoothnessProbe(seq, ETAS[:2], "auto")
    ref = probes.SmoothnessProbe(seq, ETAS[:2], "sequential")(seq, x[:, :, 0], y)
    assert auto(seq, x[:, :, 0], y) == ref and auto.chosen == "sequential"
    with pytest.raises(UserError, match="layered"):
        probes.SmoothnessProbe(seq, ETAS[:2], "layered")(seq, x[:, :, 0], y)


def _check_identical(today: dict[str, np.ndarray], new: dict[str, np.ndarray], etas: list[float]) -> None:
    """``metrics.csv`` of the same steps: the loss columns bit for bit (no forward kernel differs), and each
    column made from a gradient within fp32 rounding of that gradient, 1e-6·‖∇L(θ')‖ ≤ 1e-6·(‖g‖ + ‖g − ∇L(θ')‖)."""
    assert today.keys() == new.keys()
    for col in ("epoch", "step", "loss", "batch_acc", "grad_norm", "loss_min", "loss_max",
                *(f"loss_eta{i}" for i in range(len(etas)))):
        assert np.array_equal(today[col], new[col]), col
    g = today["grad_norm"]
    for i in range(len(etas)):
        gp = today[f"gradpred_eta{i}"]
        assert (np.abs(new[f"gradpred_eta{i}"] - gp) <= 1e-6 * (g + gp)).all(), i
    bound = 1e-6 * (g + today["gradpred_max"]) / (min(etas) * g)
    for col in ("gradpred_min", "gradpred_max"):
        assert (np.abs(new[col] - today[col]) <= 1e-6 * (g + today["gradpred_max"])).all(), col
    assert (np.abs(new["beta_smooth"] - today["beta_smooth"]) <= bound).all()


@pytest.mark.parametrize("name", ["lenet", "lenet_bn"])
def test_layered_training_probes_equal_todays_on_the_same_steps(name: str, tmp_path: Path) -> None:
    """Two runs of one training (a probe never changes it, so their steps are the same): today's path
    (sequential, g recomputed) and the new default (layered, g taken from the training step). Real CIFAR-10
    images (JPEG copy) where ../shared/data has them, else synthetic data."""
    archive = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz"
    source = f"imagefolder:{archive}" if archive.exists() else "synthetic"
    trainset = data_mod.load(source, "train", 384, seed=0)
    cfg = TrainConfig(model=name, data=source, samples="384", epochs=1, batch=64, device="cpu")
    runs = {}
    for mode in ("sequential", "auto"):
        train(cfg, tmp_path / mode, ProbeConfig(mode=mode), progress=False, trainset=trainset)
        runs[mode] = probes.read_metrics(tmp_path / mode / "metrics.csv")
    assert json.loads((tmp_path / "auto" / "metrics.json").read_text())["chosen"] == "layered"
    assert len(runs["auto"]["step"]) == 6 and np.isfinite(runs["auto"]["beta_smooth"]).all()
    _check_identical(runs["sequential"], runs["auto"], probes.default_etas(cfg.lr))
    for a, b in zip(_state_of(tmp_path / "sequential"), _state_of(tmp_path / "auto"), strict=True):
        assert torch.equal(a, b)  # and the training itself is the same


def _state_of(run: Path) -> list[torch.Tensor]:
    return list(models.read_checkpoint(run / "final.pt")["state_dict"].values())


def _snapshot(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, object]:
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},  # params, running stats, num_batches_tracked
        "grads": [p.grad.clone() for p in model.parameters()],
        "opt": copy.deepcopy(opt.state_dict()),
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "training": model.training,
    }


def _assert_same(a: dict[str, object], b: dict[str, object]) -> None:
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        assert torch.equal(a["state"][k], b["state"][k]), k
    assert all(torch.equal(p, q) for p, q in zip(a["grads"], b["grads"], strict=True))
    for k, st in a["opt"]["state"].items():
        for key, v in st.items():
            assert torch.equal(v, b["opt"]["state"][k][key]), (k, key)
    assert torch.equal(a["rng"], b["rng"])
    assert all(torch.equal(p, q) for p, q in zip(a["cuda_rng"], b["cuda_rng"], strict=True))
    assert a["training"] == b["training"]


@pytest.mark.parametrize("from_grad", [False, True])
@pytest.mark.parametrize("mode", ["auto", "layered", "batched", "sequential"])
def test_probe_leaves_model_grads_buffers_optimizer_and_rng_alone(mode: str, from_grad: bool) -> None:
    model, opt = _trained("lenet_bn")
    x, y = _batch(seed=7)
    before = _snapshot(model, opt)
    assert int(model[1].num_batches_tracked) == 4
    prober = probes.SmoothnessProbe(model, ETAS, mode)
    for _ in range(2):  # the second probe reuses the buffers the layered path keeps
        prober(model, x, y, from_grad=from_grad)
    _assert_same(before, _snapshot(model, opt))


def test_auto_is_a_fixed_rule_per_device() -> None:
    """auto: on the CPU layered where the model fits, else sequential; batched on CUDA; never a timing,
    so the same command gives the same numbers."""
    model, _ = _trained("lenet_bn", steps=1)
    x, y = _batch(n=16, seed=3)
    prober = probes.SmoothnessProbe(model, ETAS[:3], "auto")
    assert prober.chosen is None and prober._auto(torch.device("cuda")) == "batched"
    r = prober(model, x, y)
    assert prober.chosen == "layered" and prober.timings == {} and len(r.losses) == 3
    assert prober.compare(*prober.line(model, x, y)[3:], x, y) in ("batched", "sequential", "layered")
    assert set(prober.timings) == {"batched", "sequential", "layered"}
    resnet = models.create("resnet20")
    other = probes.SmoothnessProbe(resnet, ETAS[:2], "auto")
    assert other.layered is None and "not an nn.Sequential" in other.not_layered
    other(resnet.train(), x, y)
    assert other.chosen == "sequential"


@pytest.mark.parametrize("mode", ["layered", "sequential"])
def test_nonfinite_values_are_kept(mode: str) -> None:
    """A step length that overflows gives inf/NaN results: recorded as they are, never dropped."""
    model, _ = _trained("lenet", steps=0)
    x, y = _batch(seed=1)
    r = probes.SmoothnessProbe(model, (1e-3, 1e30), mode)(model, x, y)
    assert math.isfinite(r.losses[0]) and not math.isfinite(r.losses[1])
    assert not math.isfinite(r.loss_max) and not math.isfinite(r.beta_smooth)


def test_default_grid_is_linear_from_half_to_four_lr() -> None:
    assert probes.default_etas(0.1) == pytest.approx([0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4])
    assert probes.default_etas(0.01, 3) == pytest.approx([0.005, 0.0225, 0.04])
    assert probes.default_etas(0.01, 1) == pytest.approx([0.005])
    assert probes.ProbeConfig().resolve(0.1) == probes.default_etas(0.1)
    assert probes.ProbeConfig(etas=(0.3, 0.1)).resolve(0.1) == (0.3, 0.1)


def test_parse_etas() -> None:
    assert probes.parse_etas("0.005,0.01, 0.02") == (0.005, 0.01, 0.02)
    assert probes.parse_etas("1e-3 2e-3") == (0.001, 0.002)
    for bad in ("", " , ", "abc", "0.1,-1", "0", "nan", "inf", ",".join(["0.1"] * 65)):
        with pytest.raises(UserError):
            probes.parse_etas(bad)


@pytest.mark.parametrize("cfg", [probes.ProbeConfig(every=0), probes.ProbeConfig(mode="fast"),
                                 probes.ProbeConfig(count=0), probes.ProbeConfig(etas=(0.1, 0.0))])
def test_bad_probe_config(cfg: probes.ProbeConfig) -> None:
    with pytest.raises(UserError):
        cfg.check()


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["lenet_bn", "vgg16_bn"])
def test_cuda_probe_matches_cpu_reference(name: str) -> None:
    """On the GPU, both paths agree with the CPU autograd loop (the probe runs in full fp32)."""
    model, opt = _trained(name, steps=2, device="cuda")
    x, y = _batch(n=16, seed=7, device="cuda")
    cpu_model = copy.deepcopy(model).cpu()
    ref = reference_probe(cpu_model, x.cpu(), y.cpu(), ETAS)
    before = _snapshot(model, opt)
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    for mode in ("batched", "sequential", "layered", "auto"):
        r = probes.SmoothnessProbe(model, ETAS, mode)(model, x, y, from_grad=True)
        if name == "lenet_bn":
            _assert_matches(r, ref, rel=1e-4)
        else:
            # VGG: a max-pool near-tie (within fp32 rounding) can route a subgradient differently on another
            # device, moving a gradient by ~1%; the forward pass must agree tightly, the gradients in magnitude.
            assert r.losses == pytest.approx(ref["losses"], rel=1e-4)
            assert r.grad_norm == pytest.approx(ref["grad_norm"][0], rel=2e-2)
            assert r.gradpred == pytest.approx(ref["gradpred"], rel=0.1)
    _assert_same(before, _snapshot(model, opt))
    assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == tf32  # restored after full fp32
