"""The flat parameter space: layout, views without copies, segment tables."""

import pytest
import torch

from fastland import models
from fastland.params import SEG_FILTER, SEG_SMALL, FlatSpace


@pytest.mark.parametrize("name", ["lenet", "lenet_bn"])
def test_layout_is_contiguous_and_ordered(name: str) -> None:
    model = models.create(name)
    space = FlatSpace(model)
    offset = 0
    for info, (pname, p) in zip(space.infos, model.named_parameters(), strict=True):
        assert info.name == pname and info.shape == tuple(p.shape) and info.offset == offset
        offset += p.numel()
    assert space.numel == offset == sum(p.numel() for p in model.parameters())


def test_lenet_parameter_count_matches_design() -> None:
    assert FlatSpace(models.create("lenet")).numel == 62_006


def test_flatten_load_roundtrip() -> None:
    torch.manual_seed(0)
    model = models.create("lenet_bn")
    space = FlatSpace(model)
    theta = torch.randn(space.numel)
    space.load_into(model, theta)
    assert torch.equal(space.flatten(model), theta)
    for name, p in model.named_parameters():
        info = space.infos[space.names.index(name)]
        assert torch.equal(p.detach().reshape(-1), theta[info.offset : info.offset + info.numel])
    assert torch.equal(space.flatten_state(model.state_dict()), theta)


def test_batch_views_share_memory_and_have_batch_dim() -> None:
    space = FlatSpace(models.create("lenet"))
    flat = torch.randn(5, space.numel)
    views = space.batch_views(flat)
    for info in space.infos:
        v = views[info.name]
        assert v.shape == (5, *info.shape)
        assert v.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
        assert torch.equal(v[3].reshape(-1), flat[3, info.offset : info.offset + info.numel])
    flat[2, 0] = 123.0  # writes through: no copy was made
    assert views[space.names[0]][2].reshape(-1)[0] == 123.0


def test_views_reject_wrong_shapes() -> None:
    space = FlatSpace(models.create("lenet"))
    with pytest.raises(ValueError):
        space.views(torch.zeros(space.numel + 1))
    with pytest.raises(ValueError):
        space.batch_views(torch.zeros(space.numel))


@pytest.mark.parametrize("norm", ["filter", "layer"])
def test_segments_cover_theta_once(norm: str) -> None:
    space = FlatSpace(models.create("lenet_bn"))
    seg = space.segments(norm)
    assert int(seg[0, 0]) == 0
    assert torch.equal(seg[1:, 0], (seg[:-1, 0] + seg[:-1, 1]))
    assert int(seg[:, 1].sum()) == space.numel


def test_filter_segments_follow_dim0() -> None:
    space = FlatSpace(models.create("lenet_bn"))
    seg = space.segments("filter")
    conv1 = seg[:6]  # conv1 weight [6, 3, 5, 5]: six filters of 75
    assert conv1[:, 1].tolist() == [75] * 6 and (conv1[:, 2] == SEG_FILTER).all()
    assert seg[6].tolist() == [450, 6, SEG_SMALL]  # conv1 bias
    fc1 = [r for r in seg.tolist() if r[1] == 400]  # Linear(400, 120): one row per neuron
    assert len(fc1) == 120
