"""``fastland.surface`` / ``fastland.interpolate`` on models, data and losses that are not the built-ins.

The engine must agree with the reference (generalized to any loss) within 1e-5 relative per
point in fp32, on fresh random weights and data, for a residual CNN with BN (not Sequential),
ResNet-20 with and without skips, a small transformer encoder on token sequences, an MLP
regression with MSE, and a model with data-dependent control flow; in both BN modes where
there is BN, and with each strategy that can run the model. And the reference itself must
equal a plain PyTorch loop with the same loss.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import fastland
from fastland import data, directions, losses, models
from fastland.engine import BatchedEvaluator
from fastland.engine import strategy as strategies
from fastland.errors import UserError
from fastland.params import FlatSpace
from fastland.reference import ReferenceEvaluator

RTOL = 1e-5


@pytest.fixture(autouse=True)
def _one_thread(one_thread: object) -> None:
    """One thread: see conftest."""


# --- user models -----------------------------------------------------------------------
class ResidualCNN(nn.Module):
    """A residual CNN with BN, written as users write them (not nn.Sequential)."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(c)
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.drop = nn.Dropout(0.5)  # must be off in evaluation
        self.head = nn.Linear(c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn0(self.stem(x)))
        r = F.relu(self.bn1(self.conv1(h)))
        h = F.relu(h + self.bn2(self.conv2(r)))
        return self.head(self.drop(F.adaptive_avg_pool2d(h, 1).flatten(1)))


class TinyTransformer(nn.Module):
    """A transformer encoder over token ids with a classification head (LayerNorm, dropout, attention)."""

    def __init__(self, vocab: int = 50, d: int = 16, classes: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(0.1 * torch.randn(12, d))
        layer = nn.TransformerEncoderLayer(d, nhead=2, dim_feedforward=32, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens) + self.pos[: tokens.shape[1]]
        return self.head(self.norm(self.encoder(h)).mean(1))


class Branchy(nn.Module):
    """Data-dependent control flow (on the weights, so that batching cannot change the result):
    vmap cannot run it, the loop can."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 12)
        self.b = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        if self.a.weight.sum() > 0:
            h = h * 2
        return self.b(h)


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 16), nn.GELU(), nn.LayerNorm(16), nn.Linear(16, 2))


def randomize_bn(model: nn.Module, seed: int) -> nn.Module:
    return models.randomized(model, seed)


def case(name: str, seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor], object]:
    """(model, (inputs, targets), loss_fn) with fresh random weights and data."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if name == "residual_cnn":
        m = randomize_bn(ResidualCNN(), seed)
        return m, (torch.randn(20, 3, 16, 16, generator=gen), torch.randint(0, 10, (20,), generator=gen)), None
    if name.startswith("resnet20"):
        m = models.randomized(name, seed)
        return m, (torch.randn(12, 3, 32, 32, generator=gen), torch.randint(0, 10, (12,), generator=gen)), None
    if name == "transformer":
        m = TinyTransformer()
        return m, (torch.randint(0, 50, (20, 12), generator=gen), torch.randint(0, 4, (20,), generator=gen)), None
    if name == "mlp_mse":
        return mlp(), (torch.randn(40, 5, generator=gen), torch.randn(40, 2, generator=gen)), "mse"
    if name == "branchy":
        return Branchy(), (torch.randn(30, 6, generator=gen), torch.randint(0, 3, (30,), generator=gen)), nn.CrossEntropyLoss()
    raise ValueError(name)


def setup(name: str, bn_mode: str, seed: int = 0):
    model, (x, y), loss_fn = case(name, seed)
    ev = data.as_data((x, y), "cpu")
    with torch.no_grad():
        task = losses.resolve(loss_fn, model.eval()(ev.sample()[0]), ev.sample()[1])
    space = FlatSpace(model)
    theta = space.flatten(model)
    dirs = directions.make(space, theta, 2, seed=seed + 1, ignore="none")
    gen = torch.Generator().manual_seed(seed)
    coords = 0.6 * (2 * torch.rand(4, 2, generator=gen) - 1)
    coords[0] = 0.0
    want = ReferenceEvaluator(model, space, theta, dirs, ev, task, bn_mode, 8).evaluate(coords)
    return model, space, theta, dirs, ev, task, coords, want


MODELS = ["residual_cnn", "resnet20_bn", "resnet20_noskip_bn", "resnet20", "transformer", "mlp_mse", "branchy"]


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("bn_mode", ["eval", "batch"])
def test_engine_matches_reference_on_user_models(name: str, bn_mode: str) -> None:
    if bn_mode == "batch" and not models.has_batchnorm(case(name)[0]):
        pytest.skip("no BatchNorm: the two modes are the same")
    model, space, theta, dirs, ev, task, coords, want = setup(name, bn_mode)
    assert want[0].std() > 1e-3 * want[0].abs().mean(), "test setup: the loss should vary across the grid"
    ran = []
    for strategy in strategies.STRATEGIES:
        try:
            engine = BatchedEvaluator(model, space, theta, dirs, ev, task, bn_mode=bn_mode, batch_size=8,
                                      strategy=strategy, verbose=False)
            got = engine.evaluate(coords)
        except Exception:
            if strategy == "loop" or name != "branchy":
                raise  # only data-dependent control flow may keep vmap from running
            continue
        ran.append(strategy)
        torch.testing.assert_close(got[0], want[0], rtol=RTOL, atol=0)
        if task.accuracy:
            torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)
        else:
            assert got[1] is None and want[1] is None
    assert ran[0] == "loop" and (name == "branchy" or len(ran) == 3), ran


def test_reference_equals_a_plain_loop_with_the_users_loss() -> None:
    """The mean over the whole data set, with a short last batch weighted by its size."""
    model, (x, y), _ = case("mlp_mse", 3)
    loss_fn = nn.SmoothL1Loss()
    surf = fastland.surface(model, DataLoader(TensorDataset(x, y), batch_size=16), loss_fn, res=3, progress=False,
                            engine="reference")
    space = FlatSpace(model)
    probe = copy.deepcopy(model).eval()
    want = np.zeros((3, 3))
    for j, b in enumerate(surf.y):
        for i, a in enumerate(surf.x):
            flat = space.flatten(model) + a * torch.cat([d.reshape(-1) for d in surf.directions[0].values()]) \
                + b * torch.cat([d.reshape(-1) for d in surf.directions[1].values()])
            space.load_into(probe, flat)
            total = 0.0
            with torch.no_grad():
                for xb, yb in DataLoader(TensorDataset(x, y), batch_size=7):  # another batching: same mean
                    total += float(loss_fn(probe(xb), yb)) * len(yb)
            want[j, i] = total / len(y)
    np.testing.assert_allclose(surf.loss, want, rtol=1e-6)
    assert surf.metrics == {} and surf.attrs["loss"] == "custom:SmoothL1Loss"


def test_auto_falls_back_in_one_line_when_vmap_cannot_run_the_model(capsys: pytest.CaptureFixture) -> None:
    """On CUDA auto prefers vmap; a model with data-dependent control flow falls back to the loop."""
    model, space, theta, dirs, ev, task, coords, want = setup("branchy", "eval")
    engine = BatchedEvaluator(model, space, theta, dirs, ev, task, verbose=False)
    chosen, _ = strategies.choose("auto", torch.device("cuda"), engine._probe_case, print)
    lines = capsys.readouterr().out.strip().splitlines()
    assert chosen == "loop"
    assert len(lines) == 2 and all(line.startswith("engine: the ") and "using loop" in line for line in lines)


def test_data_adapters_agree_and_stream_when_asked() -> None:
    model, (x, y), _ = case("residual_cnn", 5)
    ds = TensorDataset(x, y)
    kw = dict(res=3, progress=False, batch_size=6)
    ref = fastland.surface(model, (x, y), **kw)
    for d in (ds, DataLoader(ds, batch_size=6)):
        np.testing.assert_allclose(fastland.surface(model, d, **kw).loss, ref.loss, rtol=1e-6)
    streamed = data.as_data(DataLoader(ds, batch_size=6), "cpu", cache=False)
    assert not streamed.cached and len(streamed) == 20
    s = fastland.surface(model, streamed, **kw)
    np.testing.assert_allclose(s.loss, ref.loss, rtol=1e-6)
    assert s.attrs["data_cached"] == "streamed" and ref.attrs["data_cached"] == "device"
    np.testing.assert_allclose(s.metrics["accuracy"], ref.metrics["accuracy"])


def test_interpolation_moves_bn_statistics_and_ends_at_the_target() -> None:
    a, b = models.randomized("lenet_bn", 1), models.randomized("lenet_bn", 2)
    ev = data.load("synthetic", "test", 32, seed=1)
    line = fastland.interpolate(a, b, ev, res=5, range=(0, 1), progress=False)
    assert line.attrs["bn_stats"] == "interpolate"
    for model, value in ((a, line.loss[0]), (b, line.loss[-1])):
        alone = fastland.surface(model, ev, dim=1, res=3, range=(-0.1, 0.1), progress=False).loss[1]
        assert value == pytest.approx(alone, rel=1e-5)
    start = fastland.interpolate(a, b.state_dict(), ev, model=models.create("lenet_bn"), res=5, range=(0, 1),
                                 bn_stats="start", progress=False)
    assert start.attrs["bn_stats"] == "start" and start.loss[-1] != pytest.approx(line.loss[-1], rel=1e-3)


def test_surface_returns_what_the_docs_promise(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model, (x, y), _ = case("residual_cnn", 7)
    s = fastland.surface(model, (x, y), res=4, progress=False, out=tmp_path / "s.h5")
    assert s.x.shape == (4,) and s.y.shape == (4,) and s.loss.shape == (4, 4)
    assert set(s.metrics) == {"accuracy"} and len(s.directions) == 2 and s.path == tmp_path / "s.h5"
    assert set(s.directions[0]) == {n for n, _ in model.named_parameters()}
    again = fastland.load(tmp_path / "s.h5")
    np.testing.assert_array_equal(again.loss, s.loss)
    one = fastland.surface(model, (x, y), dim=1, res=5, progress=False)
    assert one.y is None and one.loss.shape == (5,)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fastland.surface(model, (x, y), res=3, bn_mode="batch", batch_size=10, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # never changed


@pytest.mark.parametrize("bad,match", [
    (lambda m, d: fastland.surface(m, (d[0][:0], d[1][:0])), "empty"),
    (lambda m, d: fastland.surface(m, (d[0], d[1].float())), "MSE needs outputs shaped like the targets"),
    (lambda m, d: fastland.surface(m, (d[0], d[1] + 20)), "targets run from"),
    (lambda m, d: fastland.surface(m, (d[0], d[1]), loss_fn=nn.CrossEntropyLoss(reduction="sum")), "reduction"),
    (lambda m, d: fastland.surface("lenet", d), "must be a torch.nn.Module"),
    (lambda m, d: fastland.surface(m, (d[0][:, :2], d[1])), "cannot run on the data"),
    (lambda m, d: fastland.surface(m, d, res=1), "at least 2"),
    (lambda m, d: fastland.surface(m, d, range=(1, -1)), "increasing"),
])
def test_bad_input_is_a_user_error(bad, match: str) -> None:  # type: ignore[no-untyped-def]
    model, d, _ = case("residual_cnn", 8)
    with pytest.raises(UserError, match=match):
        bad(model, d)


def test_non_cifar_images_and_token_inputs() -> None:
    """Gray 28x28 images through a Sequential (the stem applies) and token ids (no float cast)."""
    net = nn.Sequential(nn.Conv2d(1, 4, 5), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                        nn.Linear(4 * 12 * 12, 10))
    models.randomized(net, 3)
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(16, 1, 28, 28, generator=gen), torch.randint(0, 10, (16,), generator=gen)
    s = fastland.surface(net, (x, y), res=3, progress=False)
    r = fastland.surface(net, (x, y), res=3, progress=False, engine="reference")
    np.testing.assert_allclose(s.loss, r.loss, rtol=RTOL)
    model, (tokens, labels), _ = case("transformer", 4)
    s = fastland.surface(model, (tokens, labels), res=3, progress=False)
    assert np.isfinite(s.loss).all() and tokens.dtype == torch.int64
