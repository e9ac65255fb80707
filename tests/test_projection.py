"""The Monarch layer and the optimal projection, against float64 references and brute force."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from monarchify.errors import ConfigError, NonFiniteWeightError
from monarchify.monarch import MonarchLayout, MonarchLinear, project

F64 = torch.float64


@st.composite
def shapes(draw, allow_pad: bool = True):
    """(d_in, d_out, nblocks) without structural zeros, optionally needing padding."""
    nblocks = draw(st.integers(1, 5))
    lo = nblocks * nblocks
    d_in = draw(st.integers(lo, lo + 40))
    d_out = draw(st.integers(lo, lo + 40))
    if not allow_pad:
        d_in, d_out = nblocks * -(-d_in // nblocks), nblocks * -(-d_out // nblocks)
    return d_in, d_out, nblocks


def random_monarch(d_in, d_out, nblocks, seed=0, output_order="blocked"):
    torch.manual_seed(seed)
    layer = MonarchLinear(d_in, d_out, nblocks, dtype=F64, output_order=output_order)
    with torch.no_grad():
        layer.L.normal_()
        layer.R.normal_()
    return layer


def brute_force_error(weight: np.ndarray, nblocks: int, order: str = "blocked") -> float:
    """The optimal squared error from the definition, written independently of the library:
    enumerate every middle index, find the (output rows, input columns) pair it joins, and
    truncate each pair's sub-block to the number of middle indices it owns. Output block ``l``
    is rows ``l·s + r`` (blocked) or ``r·b + l`` (interleaved)."""
    d_out, d_in = weight.shape
    b = nblocks
    p, s = -(-d_in // b), -(-d_out // b)
    q = min(p, s)
    w = np.zeros((b * s, b * p))
    w[:d_out, :d_in] = weight
    owned = np.zeros((b, b), dtype=int)
    for f in range(b * q):
        owned[f % b, f // q] += 1  # L block f mod b, R block f div q
    total = 0.0
    for l in range(b):
        rows = [l * s + r if order == "blocked" else r * b + l for r in range(s)]
        for k in range(b):
            block = w[np.ix_(rows, range(k * p, (k + 1) * p))]
            sigma = np.linalg.svd(block, compute_uv=False)
            total += float(np.sum(sigma[owned[l, k]:] ** 2))
    return total


def load(layer: MonarchLinear, projection) -> MonarchLinear:
    with torch.no_grad():
        layer.L.copy_(projection.L)
        layer.R.copy_(projection.R)
    return layer


@settings(max_examples=40, deadline=None)
@given(shapes())
def test_forward_equals_to_dense(shape):
    d_in, d_out, b = shape
    layer = random_monarch(d_in, d_out, b)
    x = torch.randn(7, d_in, dtype=F64)
    expected = x @ layer.to_dense().T + layer.bias
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(shapes())
def test_monarch_matrix_projects_onto_itself(shape):
    d_in, d_out, b = shape
    dense = random_monarch(d_in, d_out, b, seed=1).to_dense()
    projection = project(dense, b)
    assert projection.rel_error < 1e-10
    rebuilt = load(MonarchLinear(d_in, d_out, b, dtype=F64), projection).to_dense()
    assert float((rebuilt - dense).norm() / dense.norm()) < 1e-10


@settings(max_examples=30, deadline=None)
@given(shapes(), st.integers(0, 2**31 - 1), st.sampled_from(["blocked", "interleaved"]))
def test_reported_error_is_the_reconstruction_error_and_optimal(shape, seed, order):
    d_in, d_out, b = shape
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(d_out, d_in, generator=gen, dtype=F64)
    projection = project(weight, b, output_order=order)
    rebuilt = load(MonarchLinear(d_in, d_out, b, dtype=F64, output_order=order), projection).to_dense()
    explicit = float((weight - rebuilt).square().sum())
    assert projection.sq_error == pytest.approx(explicit, rel=1e-9, abs=1e-9)
    assert projection.sq_error == pytest.approx(brute_force_error(weight.numpy(), b, order), rel=1e-9, abs=1e-9)
    assert projection.rel_error == pytest.approx((explicit / float(weight.square().sum())) ** 0.5, rel=1e-9)


def test_perturbing_the_factors_never_lowers_the_error():
    torch.manual_seed(3)
    for d_in, d_out, b in [(24, 24, 2), (30, 17, 3), (16, 40, 4)]:
        weight = torch.randn(d_out, d_in, dtype=F64)
        projection = project(weight, b)
        layer = load(MonarchLinear(d_in, d_out, b, dtype=F64), projection)
        best = float((weight - layer.to_dense()).square().sum())
        for scale in (1e-1, 1e-3, 1e-6):
            for _ in range(20):
                trial = MonarchLinear(d_in, d_out, b, dtype=F64)
                with torch.no_grad():
                    trial.L.copy_(projection.L + scale * torch.randn_like(projection.L))
                    trial.R.copy_(projection.R + scale * torch.randn_like(projection.R))
                assert float((weight - trial.to_dense()).square().sum()) >= best * (1 - 1e-12)


def test_projection_runs_in_float64_whatever_the_weight_dtype():
    torch.manual_seed(0)
    weight = torch.randn(32, 32, dtype=F64)
    exact = project(weight, 4)
    half = project(weight.to(torch.bfloat16), 4)
    assert half.L.dtype == F64
    # The error is that of the bf16 weight itself, computed exactly; close to the f64 one.
    rounded = weight.to(torch.bfloat16).to(F64)
    assert half.sq_error == pytest.approx(brute_force_error(rounded.numpy(), 4), rel=1e-9)
    assert half.rel_error == pytest.approx(exact.rel_error, rel=1e-2)


def test_padding_is_stated_and_exact_for_the_real_block():
    """Zero padding changes nothing on the real block: the projection of a 17×30 weight is the
    independent optimum (SVDs of the zero-padded sub-blocks), its reported error is measured
    on the real block, the factors put nothing in the padding, and the layer computes the
    real block's product."""
    layout = MonarchLayout(30, 17, 4)
    assert layout.padded and (layout.n_in, layout.n_out) == (32, 20)
    weight = torch.randn(17, 30, generator=torch.Generator().manual_seed(5), dtype=F64)
    projection = project(weight, 4)
    layer = load(MonarchLinear(30, 17, 4, dtype=F64), projection)
    rebuilt = layer.to_dense()
    assert rebuilt.shape == (17, 30)
    explicit = float((weight - rebuilt).square().sum())
    assert projection.sq_error == pytest.approx(explicit, rel=1e-9)
    assert projection.sq_error == pytest.approx(brute_force_error(weight.numpy(), 4), rel=1e-9)
    assert projection.rel_error == pytest.approx((explicit / float(weight.square().sum())) ** 0.5, rel=1e-9)
    # Padded inputs 30, 31 are columns 6, 7 of R block 3; padded outputs 17..19 are rows 2..4
    # of L block 3 (output o = l·s + r, s = 5).
    assert float(projection.R[3][:, 6:].abs().max()) < 1e-12
    assert float(projection.L[3, 2:, :].abs().max()) < 1e-12
    # Interleaved (o = r·b + l), they are row 4 of L blocks 1..3.
    interleaved = project(weight, 4, output_order="interleaved")
    assert float(interleaved.L[1:, 4, :].abs().max()) < 1e-12
    assert interleaved.sq_error == pytest.approx(brute_force_error(weight.numpy(), 4, "interleaved"), rel=1e-9)
    # Projecting the explicitly zero-padded 20×32 weight gives the same real block.
    padded = torch.zeros(20, 32, dtype=F64)
    padded[:17, :30] = weight
    full = project(padded, 4)
    assert full.sq_error == pytest.approx(projection.sq_error, rel=1e-9)
    full_rebuilt = load(MonarchLinear(32, 20, 4, dtype=F64), full).to_dense()
    torch.testing.assert_close(full_rebuilt[:17, :30], rebuilt, rtol=1e-9, atol=1e-9)
    assert float(full_rebuilt[17:].abs().max()) < 1e-12 and float(full_rebuilt[:, 30:].abs().max()) < 1e-12
    x = torch.randn(2, 3, 30, dtype=F64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ rebuilt.T + layer.bias, rtol=1e-12, atol=1e-12)


def test_parameter_counts_follow_the_doc():
    assert MonarchLayout(768, 3072, 4).weight_params == 737_280
    assert MonarchLayout(512, 512, 4).weight_params * 2 == 512 * 512  # 2/b of dense
    layout = MonarchLayout(37, 53, 3)
    assert (layout.p, layout.s, layout.q) == (13, 18, 13)
    assert sum(map(sum, layout.pair_ranks)) == 3 * 13  # every middle index in exactly one pair


@pytest.mark.parametrize("d_in,d_out,b", [(8, 8, 4), (16, 6, 3), (100, 100, 11)])
def test_structural_zeros_are_refused_unless_allowed(d_in, d_out, b):
    with pytest.raises(ConfigError, match="structural zeros"):
        MonarchLinear(d_in, d_out, b)
    with pytest.raises(ConfigError, match="structural zeros"):
        project(torch.randn(d_out, d_in), b)
    layer = MonarchLinear(d_in, d_out, b, allow_structural_zeros=True, dtype=F64)
    projection = project(layer.to_dense(), b, allow_structural_zeros=True)
    assert projection.rel_error < 1e-10


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weight_is_refused(bad):
    weight = torch.randn(8, 8)
    weight[3, 2] = bad
    with pytest.raises(NonFiniteWeightError):
        project(weight, 2)


@pytest.mark.parametrize("value", [0, -1, 2.0, True, "4"])
def test_bad_block_counts_are_refused(value):
    with pytest.raises(ConfigError):
        MonarchLayout(8, 8, value)


@pytest.mark.slow
@pytest.mark.parametrize("order", ["blocked", "interleaved"])
def test_gradients_match_autograd_through_the_dense_matrix(order):
    layer = random_monarch(12, 18, 3, output_order=order)
    x = torch.randn(5, 12, dtype=F64, requires_grad=True)
    torch.autograd.gradcheck(lambda x, L, R, bias: torch.nn.functional.linear(x, _dense(layer, L, R), bias),
                             (x, layer.L, layer.R, layer.bias))
    out = layer(x)
    grads = torch.autograd.grad(out.square().sum(), (x, layer.L, layer.R, layer.bias))
    ref = torch.autograd.grad(
        torch.nn.functional.linear(x, _dense(layer, layer.L, layer.R), layer.bias).square().sum(),
        (x, layer.L, layer.R, layer.bias),
    )
    for got, want in zip(grads, ref):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def _dense(layer, L, R):
    """Differentiable dense matrix from the layout rules (mirrors ``to_dense`` with autograd)."""
    lay = layer.layout
    b, p, s = lay.nblocks, lay.p, lay.s
    rows = []
    for o in range(lay.n_out):
        l, r = divmod(o, s) if lay.blocked else (o % b, o // b)
        row = []
        for k in range(b):
            cols, idx = lay.pair_indices(l, k)
            if cols:
                row.append(L[l, r, cols] @ R[k][idx, :])
            else:
                row.append(L.new_zeros(p))
        rows.append(torch.cat(row))
    return torch.stack(rows)[: lay.d_out, : lay.d_in]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_forward_in_low_precision_tracks_float64(dtype):
    ref = random_monarch(64, 96, 4)
    layer = MonarchLinear(64, 96, 4, dtype=dtype)
    layer.load_state_dict({k: v.to(dtype) for k, v in ref.state_dict().items()})
    x = torch.randn(9, 64, dtype=F64)
    with torch.no_grad():
        got = layer(x.to(dtype)).to(F64)
        want = ref(x)
    tol = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}[dtype]
    assert float((got - want).norm() / want.norm()) < tol


def test_random_init_matches_nn_linear_output_variance():
    torch.manual_seed(0)
    x = torch.randn(4096, 256)
    dense = torch.nn.Linear(256, 512, bias=False)
    monarch = MonarchLinear(256, 512, 4, bias=False)
    ratio = float(monarch(x).detach().var() / dense(x).detach().var())
    assert 0.85 < ratio < 1.15


def test_weight_is_recomputed_only_when_the_factors_change(monkeypatch):
    """Models that read ``.weight`` every forward (T5) must not pay a dense product each time,
    and a stale or shared copy must never be handed out."""
    layer = MonarchLinear(24, 16, 2, dtype=F64)
    calls = []
    original = MonarchLinear.to_dense
    monkeypatch.setattr(MonarchLinear, "to_dense", lambda self: calls.append(1) or original(self))
    first = layer.weight
    assert torch.equal(layer.weight, first) and len(calls) == 1
    first.zero_()  # a caller writing into its copy changes nothing for the next reader
    assert torch.equal(layer.weight, original(layer)) and len(calls) == 1

    with torch.no_grad():
        layer.L.mul_(2.0)  # in place: the version counter moves
    assert torch.equal(layer.weight, original(layer)) and len(calls) == 2
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer(torch.randn(3, 24, dtype=F64)).sum().backward()
    optimizer.step()
    assert torch.equal(layer.weight, original(layer)) and len(calls) == 3
    layer.to(torch.float32)
    assert layer.weight.dtype == torch.float32 and len(calls) == 4


def test_more_blocks_than_features_is_refused_even_with_structural_zeros_allowed():
    with pytest.raises(ConfigError, match="more than a 64->6 layer has features on its narrower side \\(6\\)"):
        MonarchLinear(64, 6, 8, allow_structural_zeros=True)
    with pytest.raises(ConfigError, match="min\\(d_in, d_out\\) = 64"):
        MonarchLinear(64, 64, 9)  # the unpadded size, not the padded 72
