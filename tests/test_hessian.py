"""fastland.hessian against plain autograd, a dense Hessian, PyHessian and hessian-eigenthings.

- HVPs equal the double-backward autograd HVP (``torch.autograd.grad`` twice on the mean loss)
  within 1e-5 relative on random vectors: LeNet, LeNet-BN, a residual CNN with BN (not a
  Sequential) and a transformer encoder; both BN modes where there is BN.
- On a model small enough for a dense Hessian (``torch.autograd.functional.hessian`` in fp64):
  top-k eigenvalues within 1e-4 relative, residuals within the stated tolerance, the trace within
  3 standard errors, SLQ weights that reproduce ``vᵀHᵖv`` and a density integrating to 1.
- PyHessian (skipped when not installed) on LeNet-BN in eval mode agrees to 1%; its known bugs
  (signed trace tolerance, crash on an unused parameter, density on current torch) are shown.
- Bad input: one-line ``UserError`` s.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastland import hessian, models
from fastland.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")


# --- models ------------------------------------------------------------------------------
class TinyResNet(nn.Module):
    """Conv-BN stem and two basic blocks (one with a 1x1 conv + BN shortcut), global pool, fc."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.c1, self.b1 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.c2, self.b2 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.c3, self.b3 = nn.Conv2d(4, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c4, self.b4 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.short = nn.Conv2d(4, 8, 1, stride=2, bias=False)
        self.short_bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.stem(x)))
        x = F.relu(x + self.b2(self.c2(F.relu(self.b1(self.c1(x))))))
        x = F.relu(self.short_bn(self.short(x)) + self.b4(self.c4(F.relu(self.b3(self.c3(x))))))
        return self.fc(x.mean(dim=(2, 3)))


class TinyTransformer(nn.Module):
    """Token embedding + learned positions, one encoder layer, mean pool, a classification head."""

    def __init__(self, vocab: int = 20, length: int = 6, dim: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(0.1 * torch.randn(length, dim))
        self.encoder = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(dim, nhead=2, dim_feedforward=32, dropout=0.1, batch_first=True), num_layers=1,
            enable_nested_tensor=False)
        self.head = nn.Linear(dim, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens) + self.pos).mean(dim=1))


def _randomize_bn(model: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(0.5 + torch.rand(m.num_features, generator=gen))
                m.bias.copy_(0.2 * torch.randn(m.num_features, generator=gen))
                m.running_mean.copy_(0.3 * torch.randn(m.num_features, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=gen))
    return model


def _images(n: int, seed: int = 1, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def _case(name: str) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    if name in ("lenet", "lenet_bn"):
        return models.randomized(name, seed=3), _images(24)
    if name == "resnet":
        return _randomize_bn(TinyResNet(), 4), _images(24, size=8)
    gen = torch.Generator().manual_seed(5)
    return TinyTransformer(), (torch.randint(0, 20, (24, 6), generator=gen), torch.randint(0, 3, (24,), generator=gen))


# --- the reference: double backward on the mean loss ----------------------------------------
def autograd_hvp(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], vecs: torch.Tensor,
                 bn_mode: str, loss_fn=F.cross_entropy) -> torch.Tensor:  # noqa: ANN001
    """H v by double backward on the mean loss: ``hessian.reference_hvp``, nothing of the operator's paths."""
    return hessian.reference_hvp(model, batches, vecs, bn_mode, loss_fn)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


HVP_CASES = [("lenet", "eval"), ("lenet_bn", "eval"), ("lenet_bn", "batch"), ("resnet", "eval"), ("resnet", "batch"),
             ("transformer", "eval")]


@pytest.mark.parametrize("ad", ["forward", "reverse", "kept"])
@pytest.mark.parametrize(("name", "bn_mode"), HVP_CASES)
def test_hvp_matches_double_backward(name: str, bn_mode: str, ad: str) -> None:
    model, (x, y) = _case(name)
    state = copy.deepcopy(model.state_dict())
    batches = list(zip(x.split(10), y.split(10), strict=True))  # 10, 10, 4: a short last batch must weigh less
    op = hessian.HVPOperator(model, batches, F.cross_entropy, bn_mode=bn_mode, block=2,
                             ad=None if ad == "kept" else ad, keep_graph=ad == "kept")
    vecs = torch.randn(3, op.numel, generator=torch.Generator().manual_seed(7))
    got = op.hvp(vecs)  # a vmapped pair and a single vector
    want = autograd_hvp(model, batches, vecs, bn_mode)
    for g, w in zip(got, want, strict=True):
        assert _rel(g, w) < 1e-5
    assert _rel(op.hvp(vecs[1]), want[1]) < 1e-5  # a lone [n] vector (kept: through the graphs kept from the first call)
    assert len(op._kept) == (3 if ad == "kept" else 0)
    # The caller's model is untouched: same mode, same parameters and running statistics.
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_block_auto_picks_the_faster_way_and_agrees() -> None:
    model, (x, y) = _case("lenet_bn")
    op = hessian.operator(model, (x, y), batch_size=12)
    vecs = torch.randn(5, op.numel, generator=torch.Generator().manual_seed(8))
    got = op.hvp(vecs)
    assert op.block in (1, 4) and set(op.block_timings) == {1, 4}
    assert op.block == min(op.block_timings, key=op.block_timings.get)
    want = autograd_hvp(model, list(zip(x.split(12), y.split(12), strict=True)), vecs, "eval")
    assert _rel(got, want) < 1e-5


def test_hvp_is_the_mean_over_samples_not_a_sum_over_batches() -> None:
    """The same data in 1, 3 or 8 batches (eval mode) has the same Hessian: the official
    loss-landscape code's sum over batches would scale it by the batch count."""
    model, (x, y) = _case("lenet")
    v = torch.randn(hessian.select_params(model).numel, generator=torch.Generator().manual_seed(2))
    hvs = [hessian.operator(model, (x, y), batch_size=bs).hvp(v) for bs in (24, 10, 3)]
    for hv in hvs[1:]:
        assert _rel(hv, hvs[0]) < 1e-5


@pytest.mark.parametrize("keep_graph", [False, True])
def test_set_point_moves_the_operator(keep_graph: bool) -> None:
    model, (x, y) = _case("lenet_bn")
    op = hessian.operator(model, (x, y), batch_size=12, bn_mode="batch", keep_graph=keep_graph)
    v = torch.randn(op.numel, generator=torch.Generator().manual_seed(3))
    op.hvp(v)  # graphs kept at the first point must not leak into the second
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(0.05 * torch.randn_like(p))
    op.set_point(op.space.flatten(moved))
    fresh = hessian.operator(moved, (x, y), batch_size=12, bn_mode="batch", keep_graph=keep_graph)
    assert _rel(op.hvp(v), fresh.hvp(v)) < 1e-6
    assert abs(op.loss() - fresh.loss()) < 1e-6


# --- a model small enough for a dense Hessian ------------------------------------------------
class SmallNet(nn.Module):
    """1,797 parameters: Linear-BN-tanh, Linear-tanh, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.bn1 = nn.Linear(16, 32), nn.BatchNorm1d(32)
        self.fc2, self.fc3 = nn.Linear(32, 32), nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.tanh(self.fc2(torch.tanh(self.bn1(self.fc1(x))))))


def _small(trained: bool) -> dict:
    torch.manual_seed(11)
    model = _randomize_bn(SmallNet(), 12)
    gen = torch.Generator().manual_seed(13)
    x, y = torch.randn(64, 16, generator=gen), torch.randint(0, 5, (64,), generator=gen)
    if trained:  # near a minimum (the loss goes from 1.6 to 0.004): a few large eigenvalues, a bulk near 0
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(50):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        model.eval()
    dense = {}
    for bn_mode in ("eval", "batch") if not trained else ("eval",):
        ref = copy.deepcopy(model).double().eval()
        if bn_mode == "batch":
            ref.bn1.train()
        names = [n for n, _ in ref.named_parameters()]
        shapes = [p.shape for p in ref.parameters()]
        theta = torch.cat([p.detach().reshape(-1) for p in ref.parameters()])

        def loss(flat: torch.Tensor, ref: nn.Module = ref, names: list = names, shapes: list = shapes) -> torch.Tensor:
            pieces = flat.split([s.numel() for s in shapes])
            parts = {n: t.view(s) for n, t, s in zip(names, pieces, shapes, strict=True)}
            # batches of 16: the batch mode Hessian depends on the split, so the reference splits alike
            return sum(F.cross_entropy(torch.func.functional_call(ref, parts, (xb.double(),)), yb) * (len(xb) / 64)
                       for xb, yb in zip(x.split(16), y.split(16), strict=True))

        dense[bn_mode] = torch.autograd.functional.hessian(loss, theta, vectorize=True)  # reverse-over-reverse
    return {"model": model, "data": (x, y), "dense": dense}


@pytest.fixture(scope="module")
def small() -> dict:
    """SmallNet at random weights: eigenvalues of both signs."""
    return _small(trained=False)


@pytest.fixture(scope="module")
def trained() -> dict:
    """SmallNet after 50 Adam steps on its 64 samples."""
    return _small(trained=True)


@pytest.mark.parametrize("bn_mode", ["eval", "batch"])
def test_top_k_match_dense_eigvalsh(small: dict, bn_mode: str) -> None:
    h = small["dense"][bn_mode]
    exact = torch.linalg.eigvalsh(h).numpy()[::-1]
    res = hessian.top_eigenvalues(small["model"], small["data"], k=4, bn_mode=bn_mode, tol=1e-4, batch_size=16)
    values, vectors = res
    assert res.converged and res.bn_mode == bn_mode
    np.testing.assert_allclose(values, exact[:4], rtol=1e-4)
    assert list(vectors[0]) == [n for n, _ in small["model"].named_parameters()]
    for lam, v in zip(values, res.flat.double(), strict=True):  # the stated tolerance holds on the dense matrix
        assert float((h @ v - lam * v).norm() / abs(lam)) <= 1e-4 * 1.05
    low = hessian.top_eigenvalues(small["model"], small["data"], k=2, bn_mode=bn_mode, which="smallest", tol=1e-4,
                                  batch_size=16, max_iter=600)
    np.testing.assert_allclose(low.values, exact[::-1][:2], rtol=1e-4)


def test_block_lanczos_and_both_ends(small: dict) -> None:
    h = small["dense"]["eval"]
    exact = torch.linalg.eigvalsh(h).numpy()
    op = hessian.operator(small["model"], small["data"], batch_size=16)
    res = hessian.lanczos(op, k=3, block=3, tol=1e-4)
    np.testing.assert_allclose(res.values, exact[::-1][:3], rtol=1e-4)
    for lam, v in zip(res.values, res.flat.double(), strict=True):
        assert float((h @ v - lam * v).norm() / abs(lam)) <= 1e-4 * 1.05
    with pytest.warns(UserWarning, match="raise max_iter"):  # three block steps: far from converged
        early = hessian.lanczos(op, k=3, block=3, tol=1e-9, max_iter=9)
    for lam, v, claimed in zip(early.values, early.flat.double(), early.residuals, strict=True):
        assert float((h @ v - lam * v).norm() / abs(lam)) == pytest.approx(claimed, rel=1e-3)
    both = hessian.lanczos(op, k=1, which="both", tol=1e-3, max_iter=900)
    np.testing.assert_allclose(both.values, [exact[-1], exact[0]], rtol=1e-3)


@pytest.mark.parametrize("method", ["hutchinson", "hutch++"])
def test_trace_within_its_stated_error(trained: dict, method: str) -> None:
    exact = float(torch.trace(trained["dense"]["eval"]))
    t = hessian.trace(trained["model"], trained["data"], method=method, tol=2e-2, batch_size=16)
    assert t.converged and t.bn_mode == "eval" and t.method == method
    assert isinstance(t, float) and t.stderr > 0
    assert abs(float(t) - exact) <= 3 * t.stderr
    assert t.stderr <= 2e-2 * abs(float(t))


def test_hutchpp_beats_hutchinson_near_a_minimum(trained: dict) -> None:
    """The same HVP budget (96): Hutch++'s standard error is smaller where a few large eigenvalues
    dominate ‖H‖_F, as near a minimum."""
    exact = float(torch.trace(trained["dense"]["eval"]))
    errs = {}
    for method in ("hutchinson", "hutch++"):
        with pytest.warns(UserWarning, match="raise max_iter"):
            t = hessian.trace(trained["model"], trained["data"], method=method, tol=1e-9, max_iter=96, batch_size=16)
        assert abs(float(t) - exact) <= 3 * t.stderr
        errs[method] = t.stderr
    assert errs["hutch++"] < errs["hutchinson"]


def test_slq_weights_reproduce_the_moments(small: dict) -> None:
    """Gauss quadrature with the first components squared as weights is exact for vᵀHᵖv, p ≤ 2m−1;
    PyHessian's long-standing bug (wrong components) fails this at p = 0 already for most runs."""
    h = small["dense"]["eval"]
    op = hessian.operator(small["model"], small["data"], batch_size=16)
    nodes, weights = hessian.slq(op, runs=3, steps=12, seed=5)
    gen = hessian._generator(5)
    starts = hessian._rademacher(3, op.numel, gen, op).double()
    starts = starts / starts.norm(dim=1, keepdim=True)
    for r in range(3):
        v = starts[r]
        hp_v = v
        for p in range(4):
            exact = float(v @ hp_v)  # vᵀHᵖv
            quad = float((weights[r] * nodes[r] ** p).sum())
            assert quad == pytest.approx(exact, rel=1e-4, abs=1e-6 * float(h.norm()) ** p)
            hp_v = h @ hp_v


def test_density_integrates_to_one(small: dict) -> None:
    d = hessian.density(small["model"], small["data"], runs=2, steps=30, batch_size=16)
    grid, rho = d
    assert np.trapezoid(rho, grid) == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(d.weights.sum(axis=1), 1.0, atol=1e-9)
    exact = torch.linalg.eigvalsh(small["dense"]["eval"]).numpy()
    assert d.nodes.max() == pytest.approx(exact[-1], rel=1e-3)  # Lanczos finds the edge of the spectrum
    assert d.bn_mode == "eval" and rho.min() >= 0


def test_param_groups_and_parameters_without_gradients() -> None:
    model, (x, y) = _case("lenet")
    x, y = x[:8], y[:8]
    model.register_parameter("unused", nn.Parameter(torch.randn(3, 2)))  # requires grad, unused in forward
    model[3].weight.requires_grad_(False)  # frozen: left out by default
    op = hessian.operator(model, (x, y))
    assert "3.weight" not in op.group.names and "unused" in op.group.names
    hv = op.group.to_dict(op.hvp(torch.randn(op.numel, generator=torch.Generator().manual_seed(1))))
    assert torch.count_nonzero(hv["unused"]) == 0 and torch.count_nonzero(hv["0.weight"]) > 0
    # A group: the Hessian block of the first conv layer equals the dense block.
    group = hessian.operator(model, (x, y), params="0", block=64)
    assert group.group.names == ("0.weight", "0.bias")
    block = group.hvp(torch.eye(group.numel))
    top = float(torch.linalg.eigvalsh((block + block.T).double() / 2)[-1])
    res = hessian.top_eigenvalues(model, (x, y), params=["0"], tol=1e-5)
    assert res.values[0] == pytest.approx(top, rel=1e-4)
    assert set(res.vectors[0]) == {"0.weight", "0.bias"}
    full = res.group.embed(res.flat[0])
    assert full.numel() == op.space.numel
    for name, part in op.space.views(full).items():
        assert (torch.count_nonzero(part) > 0) == (name in ("0.weight", "0.bias")), name


# --- PyHessian and hessian-eigenthings -------------------------------------------------------
def test_top_eigenvalue_matches_pyhessian_on_lenet_bn() -> None:
    pyhessian = pytest.importorskip("pyhessian")
    model, (x, y) = _case("lenet_bn")
    x, y = _images(64, seed=9)
    ours = hessian.top_eigenvalues(model, (x, y), tol=1e-4, batch_size=64, which="magnitude")
    torch.manual_seed(0)
    theirs = pyhessian.hessian(copy.deepcopy(model), nn.CrossEntropyLoss(), data=(x, y), cuda=False)
    values, _ = theirs.eigenvalues(top_n=1, maxIter=300, tol=1e-5)
    assert ours.values[0] == pytest.approx(values[0], rel=1e-2)
    assert ours.bn_mode == "eval"


def test_pyhessian_bugs_that_fastland_does_not_have() -> None:
    pyhessian = pytest.importorskip("pyhessian")
    model, (x, y) = _case("lenet")
    x, y = x[:16], y[:16]

    def neg_ce(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return -F.cross_entropy(out, target)

    # 1. The trace tolerance uses the signed trace: with a negative trace it stops after 2 samples.
    comp = pyhessian.hessian(copy.deepcopy(model), neg_ce, data=(x, y), cuda=False)
    torch.manual_seed(0)
    assert len(comp.trace(maxIter=100, tol=1e-3)) == 2
    ours = hessian.trace(model, (x, y), loss_fn=neg_ce, method="hutchinson", tol=0.2, max_iter=200)
    assert float(ours) < 0 and ours.converged and len(ours.samples) >= 10
    assert ours.stderr <= 0.2 * abs(float(ours))
    # 2. A parameter that requires grad but is unused in forward crashes it; fastland gives a zero block.
    broken = copy.deepcopy(model)
    broken.register_parameter("unused", nn.Parameter(torch.randn(3, 2)))
    comp = pyhessian.hessian(broken, nn.CrossEntropyLoss(), data=(x, y), cuda=False)
    assert not isinstance(comp.gradsH[0], torch.Tensor)  # its gradient list holds the float 0. for the unused one
    with pytest.raises((AssertionError, TypeError, RuntimeError)):  # and autograd.grad refuses that
        comp.eigenvalues(maxIter=5)
    assert hessian.top_eigenvalues(broken, (x, y), tol=1e-3).converged
    # 3. Its density calls torch.eig, which torch removed (1.9 deprecated it).
    with pytest.raises(RuntimeError, match="removed"):
        pyhessian.hessian(copy.deepcopy(model), nn.CrossEntropyLoss(), data=(x, y), cuda=False).density(iter=5)


def test_hessian_eigenthings_averages_batches_unweighted() -> None:
    """hessian-eigenthings divides the sum of per-batch HVPs by the number of batches, so a short last
    batch weighs as much as a full one; fastland's HVP equals the single-batch HVP of all samples."""
    he = pytest.importorskip("hessian_eigenthings")
    model, (x, y) = _case("lenet")
    batches = list(zip(x.split(10), y.split(10), strict=True))  # 10, 10, 4
    v = torch.randn(hessian.select_params(model).numel, generator=torch.Generator().manual_seed(4))
    whole = autograd_hvp(model, [(x, y)], v[None], "eval")[0]
    ours = hessian.HVPOperator(model, batches, F.cross_entropy).hvp(v)
    theirs = he.HessianOperator(copy.deepcopy(model).eval(), batches, he.supervised_loss(F.cross_entropy)).matvec(v)
    assert _rel(ours, whole) < 1e-5
    assert _rel(theirs, whole) > 1e-2


# --- bad input ---------------------------------------------------------------------------------
def _one_line(err: pytest.ExceptionInfo[UserError]) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


def test_bad_input_is_one_line() -> None:
    model, (x, y) = _case("lenet")
    data = (x[:8], y[:8])
    n = hessian.select_params(model).numel
    with pytest.raises(UserError) as e:
        hessian.top_eigenvalues(model, data, k=n + 1)
    assert f"k={n + 1}" in _one_line(e) and str(n) in str(e.value)
    with pytest.raises(UserError) as e:
        hessian.top_eigenvalues(model, data, params="0", k=500)
    assert "456" in _one_line(e)  # the group's size, not the model's
    for tol in (0, -1e-3, float("nan")):
        with pytest.raises(UserError) as e:
            hessian.top_eigenvalues(model, data, tol=tol)
        assert "tol" in _one_line(e)
        with pytest.raises(UserError):
            hessian.trace(model, data, tol=tol)
    with pytest.raises(UserError) as e:
        hessian.top_eigenvalues(model, data, params=["0", "features.0"])
    msg = _one_line(e)
    assert "'features.0'" in msg and "0, 3" in msg
    frozen = copy.deepcopy(model).requires_grad_(False)
    with pytest.raises(UserError) as e:
        hessian.trace(frozen, data)
    assert "requires grad" in _one_line(e)
    assert hessian.top_eigenvalues(frozen, data, params="9", tol=1e-3).converged  # named, frozen: taken
    with pytest.raises(UserError) as e:
        hessian.density(model, data, bn_mode="train")
    assert "bn_mode" in _one_line(e)
    with pytest.raises(UserError) as e:
        hessian.top_eigenvalues(models.randomized("lenet_bn"), (x[:9], y[:9]), bn_mode="batch", batch_size=4)
    assert "batch of one" in _one_line(e)
    with pytest.raises(UserError) as e:  # data as fastland.surface takes it: not a list of batches
        hessian.trace(model, [(x, y), (x, y)])
    assert "data must be" in _one_line(e)
    with pytest.raises(UserError):
        hessian.trace(model, (x, y[:3]))


def test_non_finite_hvp_says_where() -> None:
    model, (x, y) = _case("lenet")
    x = x.clone()
    x[17, 0, 0, 0] = math.inf  # in the second batch of 10
    with pytest.raises(UserError) as e:
        hessian.top_eigenvalues(model, (x, y), batch_size=10)
    msg = _one_line(e)
    assert "Lanczos step 1" in msg and "batch 2 of 3" in msg and "samples 10-19" in msg
    with pytest.raises(UserError) as e:
        hessian.trace(model, (x, y), batch_size=10, method="hutchinson")
    assert "trace sample 1" in _one_line(e)


# --- one data and loss path (fastland.api.prepare) -------------------------------------------------
def test_data_and_loss_mean_what_they_mean_for_surfaces() -> None:
    """Tensors, a Dataset, a DataLoader, an EvalSet and a streamed set (re-read per product) give one HVP; so do
    loss_fn None, 'cross_entropy', nn.CrossEntropyLoss() and F.cross_entropy."""
    from torch.utils.data import DataLoader, TensorDataset

    from fastland import data as data_mod

    model, (x, y) = _case("lenet_bn")
    v = torch.randn(hessian.select_params(model).numel, generator=torch.Generator().manual_seed(6))
    want = autograd_hvp(model, list(zip(x.split(10), y.split(10), strict=True)), v[None], "eval")[0]
    loader = DataLoader(TensorDataset(x, y), batch_size=10)
    streamed = data_mod.StreamedSet(loader, torch.device("cpu"), "dataloader", len(y))
    forms = {"tensors": (x, y), "dataset": TensorDataset(x, y), "dataloader": loader,
             "evalset": data_mod.EvalSet(x, y, "tensors"), "streamed": streamed}
    for name, data in forms.items():
        op = hessian.operator(model, data, batch_size=10)
        assert op.num_samples == 24 and len(op.batches) == 3, name
        assert op.batches.streamed == (name == "streamed") and not (op.keep_graph and name == "streamed")
        assert _rel(op.hvp(v), want) < 1e-5, name
        assert _rel(op.hvp(v), want) < 1e-5, name  # a streamed set is read again for a second product
    for loss in (None, "cross_entropy", nn.CrossEntropyLoss(), F.cross_entropy):
        assert _rel(hessian.operator(model, (x, y), loss, batch_size=10).hvp(v), want) < 1e-5
    with pytest.raises(UserError, match="unknown loss"):
        hessian.operator(model, (x, y), "hinge")
    with pytest.raises(UserError, match="reduction='mean'"):
        hessian.operator(model, (x, y), nn.CrossEntropyLoss(reduction="sum"))


def test_streamed_bn_batch_of_one_is_one_line() -> None:
    from torch.utils.data import DataLoader, TensorDataset

    from fastland import data as data_mod

    model, (x, y) = _case("lenet_bn")
    streamed = data_mod.StreamedSet(DataLoader(TensorDataset(x[:9], y[:9]), batch_size=4), torch.device("cpu"),
                                    "dataloader", 9)
    with pytest.raises(UserError) as e:
        hessian.trace(model, streamed, bn_mode="batch")
    assert "batch of one" in _one_line(e)


def test_channels_last_and_kept_graphs_are_chosen_and_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    model, (x, y) = _case("lenet_bn")
    v = torch.randn(2, hessian.select_params(model).numel, generator=torch.Generator().manual_seed(9))
    plain = hessian.operator(model, (x, y), batch_size=12, channels_last=False, keep_graph=False)
    auto = hessian.operator(model, (x, y), batch_size=12)
    assert auto.keep_graph and auto.ad == "reverse" and 0 < auto.graph_bytes  # tiny: the graphs fit
    assert not auto.channels_last  # a kept graph does not gain from it
    fwd = hessian.operator(model, (x, y), batch_size=12, keep_graph=False)
    assert fwd.channels_last and fwd.batches[0][0].is_contiguous(memory_format=torch.channels_last)  # a conv net, CPU
    kept_cl = hessian.operator(model, (x, y), batch_size=12, keep_graph=True, channels_last=True)
    for block in (1, 2):  # vmapped blocks cannot take channels-last inputs: they run one at a time or on NCHW
        for op in (auto, fwd, kept_cl):
            op.block = block
            assert _rel(op.hvp(v), plain.hvp(v)) < 1e-5
    monkeypatch.setattr(hessian.device_mod, "free_memory", lambda dev: auto.graph_bytes)  # half of it: too little
    small = hessian.operator(model, (x, y), batch_size=12)
    assert not small.keep_graph and small.ad == "forward" and small.channels_last
    mlp, data = _small(False)["model"], _small(False)["data"]
    assert not hessian.operator(mlp, data, keep_graph=False).channels_last  # no convolution


def test_small_groups_get_their_trace_exactly(small: dict) -> None:
    h = small["dense"]["eval"]
    res = hessian.trace(small["model"], small["data"], params="bn1", batch_size=16)
    names = [n for n, _ in small["model"].named_parameters()]
    sizes = [p.numel() for p in small["model"].parameters()]
    start = sum(sizes[: names.index("bn1.weight")])
    exact = float(torch.diagonal(h)[start : start + 64].sum())
    assert res.method == "exact" and res.hvps == 64 and res.stderr == 0
    assert float(res) == pytest.approx(exact, rel=1e-5)


def test_a_loss_without_gradient_is_one_line() -> None:
    class NoGrad(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return self.fc(x)

    gen = torch.Generator().manual_seed(0)
    with pytest.raises(UserError) as e:
        hessian.top_eigenvalues(NoGrad(), (torch.randn(8, 4, generator=gen), torch.randint(0, 3, (8,), generator=gen)))
    assert "exactly zero" in _one_line(e) and "torch.no_grad" in str(e.value)


DP_SCRIPT = '''
import sys, torch
from fastland import hessian, models
from fastland.errors import UserError
model = models.randomized("lenet", 1)
g = torch.Generator().manual_seed(0)
x, y = torch.randn(64, 3, 32, 32, generator=g), torch.randint(0, 10, (64,), generator=g)
x[40, 0, 0, 0] = float("inf")   # in the second rank's half of the batches
try:
    hessian.top_eigenvalues(model, (x, y), batch_size=16)
except UserError as err:
    sys.stdout.write(f"stopped: {err}\\n")  # one write: the two ranks share stdout (print writes the newline apart)
    sys.stdout.flush()
    sys.exit(2)
'''


def test_data_parallel_non_finite_stops_every_rank(tmp_path: Path) -> None:
    """Under torchrun a non-finite product on one rank used to leave the others waiting in the all-reduce: a
    "finite" flag is all-reduced first, so every rank stops with one message (the rank that found it says where)."""
    import os
    import subprocess
    import sys

    script = tmp_path / "dp.py"
    script.write_text(DP_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                              "MASTER_PORT", "FASTLAND_DIST")}
    env |= {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    lines = [line for line in done.stdout.splitlines() if line.startswith("stopped:")]
    assert len(lines) == 2, done.stdout + done.stderr
    assert any("(Lanczos step 1, rank 1, vector 0, batch 3 of 4, samples 32-47," in line for line in lines), lines
    assert any("not finite on 1 other rank(s) (Lanczos step 1)" in line for line in lines), lines
