"""The small-batch (decoding) path: same outputs as the reference path, chosen only where it
is meant to run, and its pre-arranged factors never stale.

References are a float64 dense matrix written out entry by entry from the layout rules
(``dense_from_factors`` in test_speed_kernels.py) or the plain two-``bmm`` path.
"""

from __future__ import annotations

import pytest
import torch

from monarchify.monarch import MonarchLinear, kernels
from monarchify.monarch.kernels import small

from test_speed_kernels import F64, ORDERS, dense_from_factors, factors

# (b, p, s): square, wider, narrower, a GQA-like 4:1 projection, structural zeros (q = 3 < b = 4)
SHAPES = [(4, 8, 8), (4, 6, 16), (4, 16, 6), (4, 16, 4), (4, 3, 12), (1, 5, 7), (3, 4, 4)]


@ORDERS
@pytest.mark.parametrize("b,p,s", SHAPES)
@pytest.mark.parametrize("tokens", [1, 3, 8])
@pytest.mark.parametrize("with_bias", [True, False])
def test_small_path_matches_the_float64_dense_matrix(b, p, s, tokens, with_bias, blocked):
    R, L, bias = factors(b, p, s)
    bias = bias if with_bias else None
    x = torch.randn(tokens, b * p, dtype=F64)
    expected = x @ dense_from_factors(R, L, blocked).T + (0 if bias is None else bias)
    Rt, Lt = small.arrange(R, L)
    torch.testing.assert_close(small.monarch_small(x, Rt, Lt, bias, blocked=blocked), expected, rtol=1e-12, atol=1e-12)


class Spy:
    """Counts the calls of the small path (and still runs it)."""

    def __init__(self, monkeypatch):
        self.calls = 0
        original = kernels.monarch_small

        def counting(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(kernels, "monarch_small", counting)


LAYERS = {
    "square": dict(in_features=64, out_features=64, nblocks=4),
    "mlp_up": dict(in_features=48, out_features=128, nblocks=4),
    "gqa_kv": dict(in_features=64, out_features=16, nblocks=4),  # like 4096 -> 1024
    "padded": dict(in_features=30, out_features=17, nblocks=4),
    "structural_zeros": dict(in_features=12, out_features=48, nblocks=4, allow_structural_zeros=True),
    "low_rank": dict(in_features=64, out_features=96, nblocks=4, rank=5),
    "no_bias": dict(in_features=64, out_features=96, nblocks=2, bias=False),
}
TOLERANCE = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=2e-5, atol=2e-5)}


@pytest.mark.parametrize("order", ["blocked", "interleaved"])
@pytest.mark.parametrize("name", sorted(LAYERS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_eval_decoding_takes_the_small_path_and_agrees_with_the_reference(monkeypatch, name, order, dtype):
    torch.manual_seed(0)
    layer = MonarchLinear(**LAYERS[name], output_order=order, dtype=dtype).eval()
    if layer.rank:
        torch.nn.init.normal_(layer.U)  # the fresh U is zero: make the low-rank term count
    spy = Spy(monkeypatch)
    inputs = [
        torch.randn(1, 1, layer.in_features, dtype=dtype),  # one decoding step: (batch, 1, width)
        torch.randn(layer.in_features, 3, dtype=dtype).t(),  # not contiguous
        torch.randn(kernels.SMALL_BATCH_TOKENS, layer.in_features, dtype=dtype),
    ]
    for x in inputs:
        with torch.no_grad():
            got = layer(x)
            with kernels.use("reference"):
                want = layer(x)
        torch.testing.assert_close(got, want, **TOLERANCE[dtype])
    assert spy.calls == 3


def test_more_tokens_gradients_and_training_mode_keep_the_other_paths(monkeypatch):
    torch.manual_seed(0)
    layer = MonarchLinear(64, 96, 4).eval()
    spy = Spy(monkeypatch)
    with torch.no_grad():
        layer(torch.randn(kernels.SMALL_BATCH_TOKENS + 1, 64))  # above the threshold
    x = torch.randn(3, 64, requires_grad=True)
    y = layer(x)  # eval, but autograd wants gradients
    y.square().sum().backward()
    layer.train()
    with torch.no_grad():
        layer(torch.randn(1, 64))
    assert spy.calls == 0
    assert "_arranged_cache" not in layer.__dict__
    dense = layer.to_dense()
    torch.testing.assert_close(x.grad, 2 * y.detach() @ dense, rtol=1e-5, atol=1e-5)


def test_a_forced_small_path_still_differentiates_correctly():
    """With gradients wanted, ``use("small")`` arranges the factors per call, through autograd."""
    torch.manual_seed(0)
    layer = MonarchLinear(30, 17, 4, dtype=F64, output_order="interleaved").eval()
    x = torch.randn(2, 30, dtype=F64, requires_grad=True)
    upstream = torch.randn(2, 17, dtype=F64)
    with kernels.use("small"):
        (layer(x) * upstream).sum().backward()
    got = [t.grad.clone() for t in (x, layer.R, layer.L, layer.bias)]
    for t in (x, layer.R, layer.L, layer.bias):
        t.grad = None
    with kernels.use("reference"):
        (layer(x) * upstream).sum().backward()
    for g, t in zip(got, (x, layer.R, layer.L, layer.bias)):
        torch.testing.assert_close(g, t.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("change", ["in_place", "optimizer_step", "load_state_dict", "dtype"])
def test_the_arranged_factors_follow_every_change_of_the_parameters(change):
    torch.manual_seed(0)
    layer = MonarchLinear(32, 48, 4).eval()
    x = torch.randn(1, 32)
    with torch.no_grad():
        layer(x)
    assert "_arranged_cache" in layer.__dict__
    if change == "in_place":
        with torch.no_grad():
            layer.L.mul_(-2.0)
    elif change == "optimizer_step":
        layer.train()
        optimizer = torch.optim.SGD(layer.parameters(), lr=0.5)
        layer(torch.randn(4, 32)).square().sum().backward()
        optimizer.step()
        layer.eval()
    elif change == "load_state_dict":
        other = MonarchLinear(32, 48, 4)
        layer.load_state_dict(other.state_dict())
    else:
        layer.double()
        x = x.double()
    with torch.no_grad():
        got = layer(x)
    torch.testing.assert_close(got, x @ layer.to_dense().T + layer.bias.detach(), rtol=1e-5, atol=1e-5)


def test_auto_chooses_small_only_for_cpu_inference_over_few_rows():
    few, many = torch.zeros(kernels.SMALL_BATCH_TOKENS, 4), torch.zeros(kernels.SMALL_BATCH_TOKENS + 1, 4)
    assert kernels.auto_choice(few, inference=True) == "small"
    assert kernels.auto_choice(few) == "strided"
    assert kernels.auto_choice(many, inference=True) == "strided"
