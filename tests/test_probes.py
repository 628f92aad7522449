"""The Santurkar smoothness probes against a plain autograd loop, and their side effects (none)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from fastland import models, probes
from fastland.errors import UserError

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


@pytest.mark.parametrize("mode", ["batched", "sequential"])
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


def test_probe_gradient_is_the_training_gradient() -> None:
    """g of the probe (stateless BN copy, batch statistics) is what backward() put in p.grad."""
    model, _ = _trained("lenet_bn")
    x, y = _batch(seed=7)
    prober = probes.SmoothnessProbe(model, ETAS, "sequential")
    _, g, loss0, weights = prober.line(model, x, y)
    grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert torch.allclose(g, grad, rtol=1e-5, atol=1e-7)
    assert float(loss0) == pytest.approx(float(nn.functional.cross_entropy(model(x), y).detach()), rel=1e-6)
    theta = prober.space.flatten(model)
    assert torch.allclose(weights[2], theta - ETAS[2] * g, atol=1e-7)


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


@pytest.mark.parametrize("mode", ["auto", "batched", "sequential"])
def test_probe_leaves_model_grads_buffers_optimizer_and_rng_alone(mode: str) -> None:
    model, opt = _trained("lenet_bn")
    x, y = _batch(seed=7)
    before = _snapshot(model, opt)
    assert int(model[1].num_batches_tracked) == 4
    probes.SmoothnessProbe(model, ETAS, mode)(model, x, y)
    _assert_same(before, _snapshot(model, opt))


def test_auto_is_a_fixed_rule_per_device() -> None:
    """auto: sequential on the CPU (the faster there, measured), batched on CUDA; never a timing,
    so the same command gives the same numbers."""
    model, _ = _trained("lenet_bn", steps=1)
    x, y = _batch(n=16, seed=3)
    prober = probes.SmoothnessProbe(model, ETAS[:3], "auto")
    assert prober.chosen is None
    r = prober(model, x, y)
    assert prober.chosen == "sequential" and prober.timings == {} and len(r.losses) == 3
    assert prober.compare(*prober.line(model, x, y)[3:], x, y) in ("batched", "sequential")
    assert set(prober.timings) == {"batched", "sequential"}


def test_nonfinite_values_are_kept() -> None:
    """A step length that overflows gives inf/NaN results: recorded as they are, never dropped."""
    model, _ = _trained("lenet", steps=0)
    x, y = _batch(seed=1)
    r = probes.SmoothnessProbe(model, (1e-3, 1e30), "sequential")(model, x, y)
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
    for mode in ("batched", "sequential", "auto"):
        r = probes.SmoothnessProbe(model, ETAS, mode)(model, x, y)
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
