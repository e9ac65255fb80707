"""Densify: a Monarch layer multiplied out computes what the Monarch layer computed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from monarchify.monarch import MonarchLinear
from monarchify.monarch.layout import OUTPUT_ORDERS
from monarchify.pipeline.densify import dense_linear, densify_


@pytest.mark.parametrize("order", OUTPUT_ORDERS)
@pytest.mark.parametrize("shape", [(12, 20, 4), (10, 7, 3), (16, 16, 2)])
@pytest.mark.parametrize("bias", [True, False])
def test_dense_linear_matches_monarch_in_float64(order, shape, bias):
    torch.manual_seed(0)
    d_in, d_out, b = shape
    layer = MonarchLinear(d_in, d_out, b, bias=bias, output_order=order, allow_structural_zeros=True).double()
    dense = dense_linear(layer)
    x = torch.randn(5, 3, d_in, dtype=torch.float64)
    assert isinstance(dense, nn.Linear) and dense.weight.dtype == torch.float64
    torch.testing.assert_close(dense(x), layer(x), rtol=1e-12, atol=1e-12)
    assert dense.weight.requires_grad and (dense.bias is None) == (not bias)


def test_densify_replaces_every_monarch_layer_in_place_and_keeps_the_output():
    torch.manual_seed(0)
    model = nn.Sequential(MonarchLinear(16, 32, 4), nn.GELU(), nn.Linear(32, 8), MonarchLinear(8, 8, 2))
    x = torch.randn(4, 16)
    before = model(x)
    names = densify_(model)
    assert names == ["0", "3"]
    assert not any(isinstance(m, MonarchLinear) for m in model.modules())
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-6)
    assert densify_(model) == []


def test_dense_linear_of_a_bf16_layer_is_bf16_and_rounded_once():
    torch.manual_seed(0)
    layer = MonarchLinear(64, 64, 4).to(torch.bfloat16)
    dense = dense_linear(layer)
    exact = MonarchLinear(64, 64, 4)
    exact.load_state_dict({k: v.float() for k, v in layer.state_dict().items()})
    assert dense.weight.dtype == torch.bfloat16
    assert torch.equal(dense.weight, exact.to_dense().to(torch.bfloat16))
