"""The reference evaluator: the oracle everything else is checked against."""

import copy

import pytest
import torch
from torch import nn

from fastland import data, directions, losses, models
from fastland.params import FlatSpace
from fastland.reference import ReferenceEvaluator as _Reference


def ReferenceEvaluator(model, space, theta, dirs, ev, *args, **kw):  # noqa: N802
    x, y = ev.sample()
    with torch.no_grad():
        task = losses.resolve(None, copy.deepcopy(model).eval()(x), y)
    return _Reference(model, space, theta, dirs, ev, task, *args, **kw)


@pytest.fixture(scope="module")
def setup() -> tuple[nn.Module, FlatSpace, torch.Tensor, torch.Tensor, data.EvalSet]:
    torch.manual_seed(0)
    model = models.create("lenet_bn")
    # Give BN non-trivial running statistics and affine parameters, as after training.
    model.train()
    ev = data.load("synthetic", "train", 96, seed=0)
    with torch.no_grad():
        for x, _ in ev.batches(32):
            model(x)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    space = FlatSpace(model)
    theta = space.flatten(model)
    dirs = directions.make(space, theta, dim=2, seed=1)
    return model, space, theta, dirs, ev


def _direct_loss(model: nn.Module, ev: data.EvalSet, batch: int) -> tuple[float, float]:
    loss, correct = 0.0, 0
    with torch.no_grad():
        for x, y in ev.batches(batch):
            out = model(x)
            loss += nn.functional.cross_entropy(out, y, reduction="sum").item()
            correct += (out.argmax(1) == y).sum().item()
    return loss / len(ev), 100.0 * correct / len(ev)


def test_origin_is_the_models_own_loss(setup) -> None:  # type: ignore[no-untyped-def]
    model, space, theta, dirs, ev = setup
    m = copy.deepcopy(model).eval()
    want_loss, want_acc = _direct_loss(m, ev, 1000)
    loss, acc = ReferenceEvaluator(model, space, theta, dirs, ev, batch_size=40).evaluate(torch.zeros(1, 2))
    assert loss[0].item() == pytest.approx(want_loss, rel=1e-6)
    assert acc[0].item() == pytest.approx(want_acc)


def test_grid_point_equals_weights_set_by_hand(setup) -> None:  # type: ignore[no-untyped-def]
    model, space, theta, dirs, ev = setup
    a, b = 0.37, -0.81
    m = copy.deepcopy(model).eval()
    dx, dy = space.views(dirs[0]), space.views(dirs[1])
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.add_(a * dx[name] + b * dy[name])
    want_loss, want_acc = _direct_loss(m, ev, 1000)
    loss, acc = ReferenceEvaluator(model, space, theta, dirs, ev).evaluate(torch.tensor([[a, b]]))
    assert loss[0].item() == pytest.approx(want_loss, rel=1e-5)
    assert acc[0].item() == pytest.approx(want_acc)
    assert want_loss != pytest.approx(_direct_loss(copy.deepcopy(model).eval(), ev, 1000)[0], rel=1e-3)


def test_batch_mode_uses_batch_statistics_and_leaves_running_stats(setup) -> None:  # type: ignore[no-untyped-def]
    model, space, theta, dirs, ev = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    coords = torch.tensor([[0.0, 0.0], [0.2, -0.1]])
    loss_b, _ = ReferenceEvaluator(model, space, theta, dirs, ev, bn_mode="batch", batch_size=32).evaluate(coords)
    loss_e, _ = ReferenceEvaluator(model, space, theta, dirs, ev, bn_mode="eval", batch_size=32).evaluate(coords)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # running stats and num_batches_tracked untouched
    # By hand: train-mode BN on each batch of 32, on a throw-away copy.
    m = copy.deepcopy(model).train()
    want = 0.0
    with torch.no_grad():
        for x, y in ev.batches(32):
            want += nn.functional.cross_entropy(m(x), y, reduction="sum").item()
    assert loss_b[0].item() == pytest.approx(want / len(ev), rel=1e-5)
    assert loss_b[0].item() != pytest.approx(loss_e[0].item(), rel=1e-3)  # the modes really differ


def test_non_finite_losses_are_returned_not_raised(setup) -> None:  # type: ignore[no-untyped-def]
    model, space, theta, dirs, ev = setup
    loss, acc = ReferenceEvaluator(model, space, theta, dirs, ev).evaluate(torch.tensor([[1e38, 1e38], [0.0, 0.0]]))
    assert not torch.isfinite(loss[0]) and torch.isfinite(loss[1])
