"""Directions: filter/layer normalization exactly as Li et al. define it, seeds, interpolation."""

import pytest
import torch

from fastland import directions, models
from fastland.params import FlatSpace


def _setup(name: str = "lenet_bn", seed: int = 0) -> tuple[FlatSpace, torch.Tensor]:
    torch.manual_seed(seed)
    model = models.create(name)
    space = FlatSpace(model)
    theta = space.flatten(model) + 0.05 * torch.randn(space.numel)  # no zero tensors (fresh BN bias is 0)
    return space, theta


def _per_tensor(space: FlatSpace, flat: torch.Tensor) -> dict[str, torch.Tensor]:
    return space.views(flat)


def test_filter_norms_match_theta() -> None:
    space, theta = _setup()
    d = directions.make(space, theta, dim=1, seed=3)[0]
    dv, tv = _per_tensor(space, d), _per_tensor(space, theta)
    for info in space.infos:
        if info.is_small:
            assert torch.all(dv[info.name] == 0), info.name  # biasbn: zero on biases and BN params
            continue
        dn = dv[info.name].reshape(info.shape[0], -1).norm(dim=1)
        tn = tv[info.name].reshape(info.shape[0], -1).norm(dim=1)
        torch.testing.assert_close(dn, tn, rtol=1e-6, atol=0)


def test_matches_official_per_filter_loop() -> None:
    """Independent re-statement of the official code's loop over filters."""
    space, theta = _setup()
    raw = directions.random(space, seed=11)[0]
    got = directions.normalize(raw, theta, space, "filter", "none")
    tv, rv = _per_tensor(space, theta), _per_tensor(space, raw.clone())
    for info in space.infos:
        d, w = rv[info.name], tv[info.name]
        if d.dim() <= 1:
            d.copy_(w)  # ignore='' in the official code: the direction is θ itself
        else:
            for df, wf in zip(d, w, strict=True):
                df.mul_(wf.norm() / (df.norm() + 1e-10))
    torch.testing.assert_close(got, torch.cat([v.reshape(-1) for v in rv.values()]), rtol=1e-6, atol=1e-9)


def test_layer_norm_and_none() -> None:
    space, theta = _setup()
    raw = directions.random(space, seed=5)[0]
    layer = _per_tensor(space, directions.normalize(raw, theta, space, "layer", "biasbn"))
    none = _per_tensor(space, directions.normalize(raw, theta, space, "none", "biasbn"))
    tv, rv = _per_tensor(space, theta), _per_tensor(space, raw)
    for info in space.infos:
        if info.is_small:
            continue
        torch.testing.assert_close(layer[info.name].norm(), tv[info.name].norm(), rtol=1e-6, atol=0)
        assert torch.equal(none[info.name], rv[info.name])


def test_seeds_reproduce_and_differ() -> None:
    space, theta = _setup()
    a = directions.make(space, theta, dim=2, seed=7)
    b = directions.make(space, theta, dim=2, seed=7)
    c = directions.make(space, theta, dim=2, seed=8)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert not torch.allclose(a[0], a[1])  # two independent directions
    assert abs(directions.cosine(a[0], a[1])) < 0.1  # nearly orthogonal in high dimension


def test_random_is_drawn_on_cpu_whatever_the_device() -> None:
    space, _ = _setup("lenet")
    gen = torch.Generator().manual_seed(4)
    assert torch.equal(directions.random(space, 4, 2), torch.randn(2, space.numel, generator=gen))


def test_zero_filter_gets_zero_direction_without_nan() -> None:
    space, theta = _setup("lenet")
    theta[:75] = 0  # first conv1 filter
    d = directions.make(space, theta, dim=1, seed=0)[0]
    assert torch.isfinite(d).all() and torch.all(d[:75] == 0)


def test_interpolation_reaches_target() -> None:
    space, t1 = _setup("lenet", 0)
    _, t2 = _setup("lenet", 1)
    d = directions.interpolation(t1, t2)
    torch.testing.assert_close(t1 + d, t2)
    with pytest.raises(ValueError):
        directions.interpolation(t1, t2[:-1])


def test_perturb_reference_is_affine() -> None:
    space, theta = _setup("lenet")
    dirs = torch.randn(2, space.numel)
    coords = torch.tensor([[0.5, -0.25], [0.0, 0.0], [-1.0, 2.0]])
    out = directions.perturb(theta, dirs, coords)
    for p in range(3):
        torch.testing.assert_close(out[p], theta + coords[p, 0] * dirs[0] + coords[p, 1] * dirs[1])
