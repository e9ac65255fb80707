"""Monarch plus low rank: the rank-k correction is optimal (checked against ``torch.linalg.svd``
of an independently whitened residual, and against random perturbations), alternating never
raises the error, the layer computes ``(M + U V) x``, and the budget prices the option with the
error the projection reaches."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from monarchify.config import MonarchConfig, parse_ranks
from monarchify.errors import ConfigError
from monarchify.monarch import MonarchLayout, MonarchLinear, project
from monarchify.monarch.lowrank import check_rank, covariance_factor, fit_lowrank, lowrank_params, project_lowrank
from monarchify.monarch.projection import assemble
from monarchify.monarch.whitening import diagonal_blocks, padded_covariance, project_whitened
from monarchify.pipeline import convert
from monarchify.pipeline.allocate import plan_budget, resolved_config
from monarchify.pipeline.pricing import DENSE, candidate_errors, candidate_lowrank_errors, layer_choices
from monarchify.pipeline.densify import dense_linear, densify_
from monarchify.pipeline.plan import plan

from conftest import tiny_bert

F64 = torch.float64


def _random(shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _covariance(d, seed, n=400):
    x = _random((n, d), seed) @ _random((d, d), seed + 1)
    return x.T @ x / n


def _sqrt_psd(c):
    """The symmetric square root, by eigendecomposition: not the Cholesky factor the code uses."""
    vals, vecs = torch.linalg.eigh(c)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


def _damped(cov, d, damping):
    scale = float(cov.diagonal().mean())
    return cov + damping * scale * torch.eye(d, dtype=F64)


# --- the correction alone -----------------------------------------------------------------


def test_plain_correction_is_the_truncated_svd():
    e = _random((9, 13), 0)
    for k in range(0, 10):
        low = fit_lowrank(e, k)
        u, s, vh = torch.linalg.svd(e, full_matrices=False)
        best = (u[:, :k] * s[:k]) @ vh[:k]
        assert torch.allclose(low.dense(), best, atol=1e-12)
        assert low.sq_error == pytest.approx(float(s[k:].square().sum()), rel=1e-10, abs=1e-20)
        assert float((e - low.dense()).square().sum()) == pytest.approx(low.sq_error, rel=1e-9, abs=1e-20)


def test_whitened_correction_is_optimal_in_the_output_metric():
    """Against the SVD of ``E C^{1/2}`` (symmetric root, not Cholesky) mapped back by ``C^{-1/2}``."""
    d_out, d_in, k, damping = 10, 14, 3, 0.05
    e, cov = _random((d_out, d_in), 1), _covariance(d_in, 2)
    c = _damped(cov, d_in, damping)
    root = _sqrt_psd(c)
    u, s, vh = torch.linalg.svd(e @ root, full_matrices=False)
    best = (u[:, :k] * s[:k]) @ vh[:k] @ torch.linalg.inv(root)
    low = fit_lowrank(e, k, covariance_factor(cov, d_in, damping))
    assert torch.allclose(low.dense(), best, atol=1e-9)

    def objective(approx):
        diff = e - approx
        return float(((diff @ c) * diff).sum())

    assert objective(low.dense()) == pytest.approx(float(s[k:].square().sum()), rel=1e-9)
    assert low.sq_error == pytest.approx(objective(low.dense()), rel=1e-9)
    # No nearby rank-k matrix does better, and the Frobenius-optimal one does worse.
    g = torch.Generator().manual_seed(3)
    for scale in (1e-4, 1e-2, 1e-1):
        for _ in range(20):
            U = low.U + scale * torch.randn(low.U.shape, generator=g, dtype=F64)
            V = low.V + scale * torch.randn(low.V.shape, generator=g, dtype=F64)
            assert objective(U @ V) >= objective(low.dense()) - 1e-12
    assert objective(fit_lowrank(e, k).dense()) > objective(low.dense())


def test_identity_covariance_gives_the_plain_correction():
    e = _random((8, 12), 4)
    plain = fit_lowrank(e, 3)
    whitened = fit_lowrank(e, 3, covariance_factor(torch.eye(12, dtype=F64), 12, damping=0.0))
    assert torch.allclose(whitened.dense(), plain.dense(), atol=1e-12)
    assert whitened.sq_error == pytest.approx(plain.sq_error, rel=1e-10)


def test_factors_are_balanced():
    low = fit_lowrank(_random((12, 20), 5), 4, covariance_factor(_covariance(20, 6), 20, 0.01))
    assert torch.allclose(low.U.norm(dim=0), low.V.norm(dim=1), rtol=1e-10)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 12), st.integers(1, 12), st.data(), st.booleans(), st.integers(0, 10**6))
def test_correction_properties_over_random_shapes(d_out, d_in, data, whitened, seed):
    k = data.draw(st.integers(0, min(d_out, d_in)))
    e = _random((d_out, d_in), seed)
    factor = covariance_factor(_covariance(d_in, seed + 1, n=3 * d_in + 5), d_in, 0.01) if whitened else None
    low = fit_lowrank(e, k, factor)
    assert low.U.shape == (d_out, k) and low.V.shape == (k, d_in)
    assert low.sq_error <= low.residual_sq * (1 + 1e-12) + 1e-15
    metric = e - low.dense() if factor is None else (e - low.dense()) @ factor
    assert float(metric.square().sum()) == pytest.approx(low.sq_error, rel=1e-8, abs=1e-10)
    if k < min(d_out, d_in):  # one more rank never hurts
        assert fit_lowrank(e, k + 1, factor).sq_error <= low.sq_error + 1e-10
    else:
        assert low.sq_error == pytest.approx(0.0, abs=1e-9 * max(low.residual_sq, 1.0))


@pytest.mark.parametrize("rank", [-1, 13, 2.0, True, "3"])
def test_impossible_ranks_are_refused(rank):
    with pytest.raises(ConfigError, match="rank must be an integer from 0 to"):
        check_rank(rank, 12, 20)


# --- Monarch plus low rank ----------------------------------------------------------------


@pytest.mark.parametrize("calibrated", [False, True])
def test_first_fit_is_monarch_then_best_correction_and_alternating_never_raises_the_error(calibrated):
    w = _random((24, 30), 7)  # 3 blocks pad 30 -> 30, 24 -> 24; 4 blocks pad 30 -> 32
    cov = _covariance(30, 8) if calibrated else None
    for nblocks in (3, 4):
        first = project_lowrank(w, nblocks, 5, cov, damping=0.01, sweeps=0, alternations=0)
        if calibrated:
            monarch = project_whitened(w, cov, nblocks, damping=0.01).projection
        else:
            monarch = project(w, nblocks)
        assert torch.allclose(first.projection.L, monarch.L.to(F64)) and torch.allclose(first.projection.R, monarch.R.to(F64))
        factor = covariance_factor(cov, 30, 0.01) if calibrated else None
        best = fit_lowrank(w - assemble(monarch.L.to(F64), monarch.R.to(F64), monarch.layout), 5, factor)
        assert torch.allclose(first.lowrank.dense(), best.dense(), atol=1e-10)
        many = project_lowrank(w, nblocks, 5, cov, damping=0.01, sweeps=2, alternations=4)
        assert all(b <= a * (1 + 1e-10) for a, b in zip(many.history, many.history[1:]))
        assert many.objective < first.objective
        error = w - many.dense()
        objective = float(error.square().sum()) if cov is None else float((error @ factor).square().sum())
        assert many.objective == pytest.approx(objective, rel=1e-9)
        assert many.rel_error == pytest.approx(float(error.norm() / w.norm()), rel=1e-9)


def test_low_rank_lowers_the_error_and_full_rank_is_exact():
    w = _random((16, 16), 9)
    plain = project(w, 4)
    assert project_lowrank(w, 4, 2).rel_error < plain.rel_error
    assert project_lowrank(w, 4, 16).rel_error < 1e-10


# --- the layer ----------------------------------------------------------------------------


def test_rank_zero_is_exactly_the_plain_layer():
    plain, zero = MonarchLinear(20, 16, 4), MonarchLinear(20, 16, 4, rank=0)
    assert list(plain.state_dict()) == list(zero.state_dict()) == ["R", "L", "bias"]
    assert sum(p.numel() for p in zero.parameters()) == sum(p.numel() for p in plain.parameters())
    assert "rank" not in repr(zero)


@pytest.mark.parametrize("order", ["blocked", "interleaved"])
@pytest.mark.parametrize("shape", [(24, 16), (30, 22), (10, 26)])
def test_forward_and_gradients_match_the_dense_matrix(order, shape):
    d_in, d_out = shape
    torch.manual_seed(0)
    layer = MonarchLinear(d_in, d_out, 3, rank=4, output_order=order, dtype=F64)
    with torch.no_grad():
        layer.U.normal_()  # a fresh layer's U is zero
    assert list(layer.state_dict()) == ["R", "L", "U", "V", "bias"]
    assert sum(p.numel() for p in layer.parameters()) == layer.layout.weight_params + lowrank_params(4, d_in, d_out) + d_out
    x = torch.randn(2, 5, d_in, dtype=F64, requires_grad=True)
    reference_x = x.detach().clone().requires_grad_()
    y = layer(x)
    dense = assemble(layer.L, layer.R, layer.layout) + layer.U @ layer.V  # differentiable reference
    expected = reference_x @ dense.T + layer.bias
    assert torch.allclose(y, expected, atol=1e-12)
    assert torch.allclose(layer.to_dense(), dense.detach(), atol=1e-13)
    grad = torch.randn_like(y)
    params = [layer.L, layer.R, layer.U, layer.V, layer.bias]
    got = torch.autograd.grad(y, [x, *params], grad)
    want = torch.autograd.grad(expected, [reference_x, *params], grad)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-11)


def test_fresh_layer_starts_as_its_monarch_part_and_weight_follows_u():
    layer = MonarchLinear(16, 16, 4, rank=3, dtype=F64)
    assert torch.equal(layer.U, torch.zeros(16, 3, dtype=F64))
    before = layer.weight
    with torch.no_grad():
        layer.U.add_(1.0)
    assert not torch.allclose(layer.weight, before)
    assert torch.allclose(layer.weight, layer.to_dense())


def test_densify_includes_the_low_rank_term():
    torch.manual_seed(1)
    model = torch.nn.Sequential(MonarchLinear(18, 12, 3, rank=2), torch.nn.ReLU(), MonarchLinear(12, 18, 3))
    with torch.no_grad():
        model[0].U.normal_()
    x = torch.randn(7, 18)
    expected = model(x)
    dense = dense_linear(model[0])
    assert torch.allclose(dense.weight, model[0].to_dense(), atol=1e-6)
    assert densify_(model) == ["0", "2"]
    assert torch.allclose(model(x), expected, atol=1e-5)


# --- the recipe and the budget --------------------------------------------------------------


def test_recipe_fields_round_trip_and_stay_out_of_plain_recipes():
    plain = MonarchConfig(budget=0.4)
    assert "budget_ranks" not in plain.to_dict() and "ranks" not in plain.to_dict()
    config = MonarchConfig(budget=0.4, budget_ranks=[16, 8, 16], ranks={"query": 4})
    assert config.budget_ranks == [8, 16]
    again = MonarchConfig.from_dict(config.to_dict())
    assert again == config
    assert parse_ranks("8, 16,32") == [8, 16, 32]
    for bad, message in [
        ({"budget_ranks": [8]}, "only means something with a budget"),
        ({"budget": 0.4, "budget_ranks": [0]}, "budget rank must be a positive integer"),
        ({"ranks": {"query": -1}}, "must be a non-negative integer"),
        ({"ranks": {"(": 2}}, "not a valid regular expression"),
    ]:
        with pytest.raises(ConfigError, match=message):
            MonarchConfig(**bad)
    with pytest.raises(ConfigError, match="separated by commas"):
        parse_ranks("8;16")


def _brute_lowrank_error(w, nblocks, rank, cov=None, damping=0.01):
    """The budget's low-rank error from scratch: the projection (plain or whitened), its padded
    residual, and the SVD of that residual times the symmetric root of the block-diagonal
    damped covariance."""
    layout = MonarchLayout(w.shape[1], w.shape[0], nblocks)
    if cov is None:
        m = project(w, nblocks)
        c_bd = torch.eye(layout.n_in, dtype=F64)
    else:
        m = project_whitened(w, cov, nblocks, damping=damping).projection
        c_bd = torch.block_diag(*diagonal_blocks(padded_covariance(cov, layout, damping), layout))
    pad = (0, layout.n_in - layout.d_in, 0, layout.n_out - layout.d_out)
    wp = torch.nn.functional.pad(w, pad)
    e = torch.nn.functional.pad(w - assemble(m.L.to(F64), m.R.to(F64), layout), pad)
    s = torch.linalg.svdvals(e @ _sqrt_psd(c_bd))
    return float(s[rank:].square().sum()) / float(((wp @ c_bd) * wp).sum())


@pytest.mark.parametrize("calibrated", [False, True])
def test_candidate_low_rank_errors_match_brute_force(calibrated):
    w = _random((20, 27), 10)  # 2 and 4 blocks pad
    cov = _covariance(27, 11) if calibrated else None
    errors = candidate_lowrank_errors(w, [2, 3, 4], [1, 3, 6], cov, damping=0.01, alternations=0)
    alternated = candidate_lowrank_errors(w, [2, 3, 4], [1, 3, 6], cov, damping=0.01)
    plain = candidate_errors(w, [2, 3, 4], cov, damping=0.01)
    for b in (2, 3, 4):
        previous = plain[b]
        for k in (1, 3, 6):
            assert errors[(b, k)] == pytest.approx(_brute_lowrank_error(w, b, k, cov), rel=1e-8)
            assert errors[(b, k)] <= previous + 1e-12
            assert alternated[(b, k)] <= errors[(b, k)] * (1 + 1e-10)
            previous = errors[(b, k)]
            if not calibrated:  # the price is exactly what the projector reaches
                result = project_lowrank(w, b, k)
                assert alternated[(b, k)] == pytest.approx(result.rel_error**2, rel=1e-8)


def test_layer_choices_price_low_rank_options_and_pins():
    w = _random((48, 32), 12)
    choices = layer_choices("x", w, has_bias=True, ranks=[4, 40])  # 40 > min(d_in, d_out): no option
    ranked = [o for o in choices.options if o.rank]
    assert {o.rank for o in ranked} == {4}
    for option in ranked:
        assert option.params == MonarchLayout(32, 48, option.nblocks).weight_params + 48 + 4 * (32 + 48)
    assert [o for o in choices.options if not o.rank] == layer_choices("x", w, has_bias=True).options
    pinned = layer_choices("x", w, has_bias=False, pinned=4, pinned_rank=8)
    assert [(o.nblocks, o.rank) for o in pinned.options] == [(4, 8)]
    with pytest.raises(ConfigError, match="layer 'x': rank must be"):
        layer_choices("x", w, has_bias=False, pinned=4, pinned_rank=33)


def test_budget_with_ranks_never_does_worse_and_converts_as_planned():
    model = tiny_bert(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4)
    # Built in the order the budget prices in, so that built and priced errors compare.
    from monarchify.pipeline.pricing import PRICING_ORDER

    without = MonarchConfig(budget=0.35, output_order=PRICING_ORDER)
    with_ranks = MonarchConfig(budget=0.35, budget_ranks=[2, 4, 8], output_order=PRICING_ORDER)
    base = plan_budget(plan(model, without), without)
    solved = plan_budget(plan(model, with_ranks), with_ranks)
    assert solved.params_used <= solved.params_budget
    assert solved.error <= base.error + 1e-12
    assert solved.to_dict()["ranks"] == [2, 4, 8] and "ranks" not in base.to_dict()
    resolved = resolved_config(with_ranks, solved)
    again = plan_budget(plan(model, resolved), resolved)
    assert {n: (o.nblocks, o.rank) for n, o in again.choices.items()} == {
        n: (o.nblocks, o.rank) for n, o in solved.choices.items() if o.nblocks is not DENSE
    }
    report = convert(model, with_ranks)
    for layer in report.converted:
        option = solved.choices[layer.name]
        assert (layer.nblocks, layer.rank, layer.params_monarch) == (option.nblocks, option.rank, option.params)
        module = model.get_submodule(layer.name)
        assert module.rank == option.rank
        # The projection alternates, so it reaches at most the error the budget priced.
        assert layer.rel_error**2 <= option.error * (1 + 1e-9) + 1e-12
        assert layer.flops_monarch == 2 * (option.params - layer.shape[0])
    if any(o.rank for o in solved.choices.values()):
        assert any(layer.rank for layer in report.layers)
        assert any(row.get("rank") for row in report.to_dict()["layers"])


def test_ranks_without_a_budget_and_a_rank_the_layer_cannot_hold():
    model = tiny_bert(hidden_size=64, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4)
    report = convert(model, MonarchConfig(nblocks=4, ranks={"query": 8, "layer\\.0\\.attention\\.self\\.query": 3}))
    ranks = {layer.name.rsplit(".", 1)[-1]: layer.rank for layer in report.layers}
    assert ranks["query"] == 3 and ranks["key"] == 0
    with pytest.raises(ConfigError, match="self.key': rank must be an integer from 0 to"):
        convert(tiny_bert(hidden_size=64, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4),
                MonarchConfig(nblocks=4, ranks={"key": 65}))


@pytest.mark.parametrize("order", ["blocked", "interleaved"])
@pytest.mark.parametrize("impl", ["strided", "reference"])
def test_every_cpu_kernel_path_adds_the_low_rank_term(impl, order):
    from monarchify.monarch import kernels

    torch.manual_seed(2)
    layer = MonarchLinear(40, 22, 4, rank=5, dtype=F64, output_order=order)  # 22 outputs: padded
    with torch.no_grad():
        layer.U.normal_()
    x = torch.randn(9, 40, dtype=F64, requires_grad=True)
    with kernels.use(impl):
        y = layer(x)
        y.square().sum().backward()
    assert torch.allclose(y, x @ layer.to_dense().T + layer.bias, atol=1e-12)
    ref_x = x.detach().clone().requires_grad_()
    (ref_x @ (assemble(layer.L, layer.R, layer.layout) + layer.U @ layer.V).T + layer.bias).square().sum().backward()
    assert torch.allclose(x.grad, ref_x.grad, atol=1e-10)


def test_low_rank_layer_runs_under_autocast():
    torch.manual_seed(3)
    layer = MonarchLinear(32, 32, 4, rank=4)
    with torch.no_grad():
        layer.U.normal_()
    x = torch.randn(6, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    assert torch.allclose(y.float(), layer(x), atol=0.1, rtol=0.05)
