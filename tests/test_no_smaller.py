"""``keep_dense_if_not_smaller``: a layer that Monarch would not make smaller stays dense (at two
blocks a square layer holds exactly its dense count, ``2·(n/2)·n``), so converting it would only
add error and dispatches. Language-model ``compress`` turns it on."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from monarchify.config import MonarchConfig
from monarchify.monarch import MonarchLayout
from monarchify.pipeline import convert
from monarchify.pipeline.allocate import allocate
from monarchify.pipeline.plan import plan


class Net(nn.Module):
    def __init__(self, shapes):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Sequential(*[nn.Linear(d_in, d_out) for d_in, d_out in shapes])])


SHAPES = [(48, 48), (48, 100), (100, 48), (64, 16), (16, 64), (96, 96)]


@pytest.mark.parametrize("nblocks", [2, 3, 4])
def test_exactly_the_layers_that_would_not_shrink_stay_dense(nblocks):
    torch.manual_seed(0)
    net = Net(SHAPES)
    layers = plan(net, MonarchConfig(nblocks=nblocks, allow_structural_zeros=True, keep_dense_if_not_smaller=True))
    allocation = allocate(layers, MonarchConfig(nblocks=nblocks, allow_structural_zeros=True, keep_dense_if_not_smaller=True))
    for layer in layers:
        shrinks = MonarchLayout(layer.d_in, layer.d_out, nblocks).weight_params < layer.d_in * layer.d_out
        assert (layer.name in allocation.nblocks) == shrinks, layer.name
        if not shrinks:
            assert allocation.kept[layer.name].reason.startswith("no smaller")
            assert allocation.kept[layer.name].nblocks == nblocks
    # the rule bites where the arithmetic says it must: square layers at two blocks
    square = [layer.name for layer in layers if layer.d_in == layer.d_out]
    assert (nblocks == 2) == all(name in allocation.kept for name in square)


def test_an_override_converts_a_layer_that_does_not_shrink_because_it_was_asked_for():
    net = Net([(48, 48), (48, 48)])
    config = MonarchConfig(nblocks=2, overrides={r"blocks\.0\.0": 2}, keep_dense_if_not_smaller=True)
    allocation = allocate(plan(net, config), config)
    assert set(allocation.nblocks) == {"blocks.0.0"}
    assert set(allocation.kept) == {"blocks.0.1"}


def test_a_converted_model_keeps_such_layers_dense_and_reports_why():
    torch.manual_seed(0)
    net = Net([(48, 48), (48, 100)])
    x = torch.randn(5, 48)
    square_before = net.blocks[0][0](x)
    report = convert(net, MonarchConfig(nblocks=2, keep_dense_if_not_smaller=True))
    assert isinstance(net.blocks[0][0], nn.Linear)
    torch.testing.assert_close(net.blocks[0][0](x), square_before, rtol=0, atol=0)
    assert not isinstance(net.blocks[0][1], nn.Linear)
    kept = {layer.name: layer for layer in report.layers if layer.kept_dense}
    assert set(kept) == {"blocks.0.0"} and "no smaller" in kept["blocks.0.0"].reason


def test_off_by_default_every_selected_layer_converts_as_asked_and_the_recipe_stays_as_it_was():
    net = Net([(48, 48)])
    config = MonarchConfig(nblocks=2)
    assert set(allocate(plan(net, config), config).nblocks) == {"blocks.0.0"}
    assert "keep_dense_if_not_smaller" not in config.to_dict()
    on = MonarchConfig(nblocks=2, keep_dense_if_not_smaller=True)
    assert MonarchConfig.from_dict(on.to_dict()) == on


def test_language_model_compress_turns_it_on_unless_its_recipe_says_otherwise(tmp_path):
    from monarchify.lm.compress import TextCompressOptions

    text = tmp_path / "t.txt"
    text.write_text("some words\n", encoding="utf-8")
    assert TextCompressOptions(model="m", text=[text], out=tmp_path / "o", recipe={"nblocks": 2}).conversion.keep_dense_if_not_smaller
    off = TextCompressOptions(model="m", text=[text], out=tmp_path / "o", recipe={"nblocks": 2, "keep_dense_if_not_smaller": False})
    assert not off.conversion.keep_dense_if_not_smaller
