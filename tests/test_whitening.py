"""Activation-aware projection: exact optimality for its objective, against explicit
reconstructions, brute-force perturbation and the plain projection it generalises."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from monarchify.errors import ConfigError, NonFiniteWeightError
from monarchify.monarch import MonarchLayout, MonarchLinear, project
from monarchify.monarch.whitening import (
    assemble, cross_rel_error, cross_target, output_rel_error, output_sq_error, project_whitened, refine_full,
)

F64 = torch.float64


@st.composite
def cases(draw):
    """(d_in, d_out, nblocks) without structural zeros, padding allowed."""
    b = draw(st.integers(1, 4))
    return draw(st.integers(b * b, b * b + 14)), draw(st.integers(b * b, b * b + 14)), b


def correlated_inputs(n: int, d_in: int, seed: int) -> torch.Tensor:
    """Samples with a strongly non-isotropic, cross-correlated covariance (like activations)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d_in, d_in, generator=g, dtype=F64) * torch.logspace(0, -2, d_in, dtype=F64)
    return torch.randn(n, d_in, generator=g, dtype=F64) @ mix + torch.randn(d_in, generator=g, dtype=F64)


def block_diagonal_cov(cov: torch.Tensor, layout: MonarchLayout) -> torch.Tensor:
    """The covariance the undamped projection's objective uses, built here from its
    definition: ``C`` with every entry between two Monarch input blocks (of width ``p``)
    zeroed. Padding needs no care: it lies outside the real ``(d_in, d_in)`` corner."""
    block = torch.arange(cov.shape[0]) // layout.p
    return cov * (block[:, None] == block[None, :])


def damped(cov: torch.Tensor, damping: float) -> torch.Tensor:
    """``C + damping · mean(diag C) · I``, the damped covariance as the module docstring defines it."""
    return cov + damping * cov.diagonal().mean() * torch.eye(cov.shape[0], dtype=cov.dtype)


def sq_error(weight: torch.Tensor, approx: torch.Tensor, cov: torch.Tensor) -> float:
    """``tr((W - M) C (W - M)ᵀ)`` written out here, so the objective is not checked against itself."""
    e = weight - approx
    return float(((e @ cov) * e).sum())


def weight_and_cov(d_in, d_out, seed=0):
    g = torch.Generator().manual_seed(seed + 100)
    x = correlated_inputs(3 * d_in + 5, d_in, seed)
    return torch.randn(d_out, d_in, generator=g, dtype=F64), x.T @ x / x.shape[0]


def test_assemble_matches_the_layer():
    for d_in, d_out, b in [(12, 20, 2), (16, 16, 4), (17, 23, 3), (30, 10, 3)]:
        layer = MonarchLinear(d_in, d_out, b, dtype=F64)
        expected = layer.to_dense()
        torch.testing.assert_close(assemble(layer.L.detach(), layer.R.detach(), layer.layout), expected)


@settings(max_examples=30, deadline=None)
@given(cases(), st.integers(0, 1000))
def test_objective_equals_the_predicted_value(case, seed):
    d_in, d_out, b = case
    w, cov = weight_and_cov(d_in, d_out, seed)
    result = project_whitened(w, cov, b, damping=0.0)
    p = result.projection
    approx = assemble(p.L, p.R, p.layout)
    c_bd = block_diagonal_cov(cov, p.layout)
    assert sq_error(w, approx, c_bd) == pytest.approx(result.objective, rel=1e-9, abs=1e-9)
    assert sq_error(w, torch.zeros_like(w), c_bd) == pytest.approx(result.energy, rel=1e-9)
    assert output_sq_error(w, approx, c_bd) == pytest.approx(result.objective, rel=1e-9, abs=1e-9)
    # The Projection keeps the meaning of rel_error: the plain weight error of these factors.
    assert p.sq_error == pytest.approx(float((w - approx).square().sum()), rel=1e-9, abs=1e-12)


@settings(max_examples=15, deadline=None)
@given(cases(), st.integers(0, 1000))
def test_no_perturbation_of_the_factors_lowers_the_objective(case, seed):
    d_in, d_out, b = case
    w, cov = weight_and_cov(d_in, d_out, seed)
    result = project_whitened(w, cov, b, damping=0.0)
    p = result.projection
    c_bd = block_diagonal_cov(cov, p.layout)
    g = torch.Generator().manual_seed(seed)
    for scale in (1e-1, 1e-3, 1e-6):
        for _ in range(5):
            L = p.L + scale * torch.randn(p.L.shape, generator=g, dtype=F64)
            R = p.R + scale * torch.randn(p.R.shape, generator=g, dtype=F64)
            assert sq_error(w, assemble(L, R, p.layout), c_bd) >= result.objective * (1 - 1e-9) - 1e-12


@pytest.mark.slow
def test_gradient_descent_from_random_starts_never_beats_it():
    """A small brute-force search of the non-convex problem: Adam from random factors."""
    d_in, d_out, b = 12, 8, 2
    w, cov = weight_and_cov(d_in, d_out, 3)
    result = project_whitened(w, cov, b, damping=0.0)
    layout = result.projection.layout
    c_bd = block_diagonal_cov(cov, layout)
    for seed in range(2):
        g = torch.Generator().manual_seed(seed)
        L = torch.randn(layout.l_shape, generator=g, dtype=F64).requires_grad_()
        R = torch.randn(layout.r_shape, generator=g, dtype=F64).requires_grad_()
        opt = torch.optim.Adam([L, R], lr=0.05)
        for _ in range(800):
            opt.zero_grad()
            e = w - assemble(L, R, layout)
            loss = ((e @ c_bd) * e).sum()
            loss.backward()
            opt.step()
        assert loss.item() >= result.objective * (1 - 1e-6)
    # ...while it does get close, so the search is not simply failing.
    assert loss.item() <= result.objective * 1.5


@settings(max_examples=30, deadline=None)
@given(cases(), st.integers(0, 1000))
def test_identity_covariance_gives_the_plain_projection(case, seed):
    d_in, d_out, b = case
    w, _ = weight_and_cov(d_in, d_out, seed)
    result = project_whitened(w, torch.eye(d_in, dtype=F64), b, damping=0.0)
    plain = project(w, b)
    assert result.objective == pytest.approx(plain.sq_error, rel=1e-9, abs=1e-10)
    torch.testing.assert_close(
        assemble(result.projection.L, result.projection.R, plain.layout),
        assemble(plain.L.to(F64), plain.R.to(F64), plain.layout),
        rtol=1e-7, atol=1e-9,
    )


@settings(max_examples=30, deadline=None)
@given(cases(), st.integers(0, 1000))
def test_a_monarch_matrix_projects_onto_itself_under_any_covariance(case, seed):
    d_in, d_out, b = case
    torch.manual_seed(seed)
    layer = MonarchLinear(d_in, d_out, b, dtype=F64)
    target = layer.to_dense().detach()
    _, cov = weight_and_cov(d_in, d_out, seed)
    result = project_whitened(target, cov, b)
    torch.testing.assert_close(assemble(result.projection.L, result.projection.R, layer.layout), target, rtol=1e-8, atol=1e-9)
    assert result.objective <= 1e-18 * max(result.energy, 1.0) + 1e-20


def test_whitening_beats_plain_on_the_objective_and_on_fresh_samples():
    d_in, d_out, b = 32, 24, 4
    g = torch.Generator().manual_seed(0)
    w = torch.randn(d_out, d_in, generator=g, dtype=F64)
    samples = correlated_inputs(800, d_in, 7)
    fit, held = samples[:400], samples[400:]  # same distribution, other samples
    cov_fit, cov_held = fit.T @ fit / 400, held.T @ held / 400
    white = project_whitened(w, cov_fit, b)
    plain = project(w, b)
    m_white = assemble(white.projection.L, white.projection.R, plain.layout)
    m_plain = assemble(plain.L.to(F64), plain.R.to(F64), plain.layout)
    assert output_rel_error(w, m_white, cov_held) < 0.9 * output_rel_error(w, m_plain, cov_held)
    # ...and the explicit error on the samples agrees with the covariance form.
    direct = float(((held @ (w - m_white).T).norm() / (held @ w.T).norm()))
    assert output_rel_error(w, m_white, cov_held) == pytest.approx(direct, rel=1e-9)


@settings(max_examples=10, deadline=None)
@given(cases(), st.integers(0, 1000))
def test_full_refinement_never_increases_the_full_objective(case, seed):
    d_in, d_out, b = case
    w, cov = weight_and_cov(d_in, d_out, seed)
    start = project_whitened(w, cov, b, damping=1e-3)
    c_full = damped(cov, 1e-3)
    before = sq_error(w, assemble(start.projection.L, start.projection.R, start.projection.layout), c_full)
    refined = refine_full(w, cov, start, sweeps=3, damping=1e-3)
    after = sq_error(w, assemble(refined.projection.L, refined.projection.R, start.projection.layout), c_full)
    history = [before, *refined.history]
    assert all(b2 <= b1 * (1 + 1e-9) + 1e-12 for b1, b2 in zip(history, history[1:]))
    assert after == pytest.approx(refined.objective, rel=1e-9, abs=1e-12)


def test_full_refinement_is_a_no_op_for_a_block_diagonal_covariance():
    """With no cross-block correlation the block-diagonal solution is already optimal."""
    d_in, d_out, b = 12, 12, 3
    w, cov = weight_and_cov(d_in, d_out, 1)
    layout = MonarchLayout(d_in, d_out, b)
    cov_bd = block_diagonal_cov(cov, layout)
    start = project_whitened(w, cov_bd, b, damping=0.0)
    refined = refine_full(w, cov_bd, start, sweeps=2, damping=0.0)
    assert refined.objective == pytest.approx(start.objective, rel=1e-9)


def test_padded_inputs_stay_zero_and_damping_handles_dead_features():
    d_in, d_out, b = 10, 9, 3  # both sides padded
    w, cov = weight_and_cov(d_in, d_out, 2)
    cov[4, :] = cov[:, 4] = 0.0  # a dead input feature: singular without damping
    with pytest.raises(ConfigError, match="positive definite"):
        project_whitened(w, cov, b, damping=0.0)
    result = project_whitened(w, cov, b, damping=0.01)
    layout = result.projection.layout
    assert torch.isfinite(result.projection.L).all() and torch.isfinite(result.projection.R).all()
    # Padded input columns of R carry nothing (the last input block's padding).
    assert float(result.projection.R[-1][:, d_in - (b - 1) * layout.p :].abs().max()) == 0.0


def test_bad_inputs_fail_cleanly():
    w, cov = weight_and_cov(8, 8, 0)
    with pytest.raises(ValueError, match="covariance has shape"):
        project_whitened(w, cov[:4, :4], 2)
    bad = cov.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(NonFiniteWeightError):
        project_whitened(w, bad, 2)
    with pytest.raises(ConfigError, match="damping"):
        project_whitened(w, cov, 2, damping=-1.0)
    with pytest.raises(ConfigError, match="structural zeros"):
        project_whitened(w, cov, 4)


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 4), st.integers(0, 2**31 - 1))
def test_the_interleaved_order_is_the_blocked_one_on_row_permuted_weights(b, seed):
    """Output blocks are independent in both objectives, so projecting ``W`` with interleaved
    outputs must give exactly the row-permuted result of projecting the row-permuted ``W``
    with blocked ones (plain, whitened and refined), whatever the covariance."""
    s, p = b + 3, b + 2
    d_out, d_in = b * s, b * p
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(d_out, d_in, generator=g, dtype=F64)
    x = correlated_inputs(64, d_in, seed)
    cov = x.T @ x / 64
    # Blocked row l·s + r holds interleaved row r·b + l.
    rows = torch.tensor([r * b + l for l in range(b) for r in range(s)])
    permuted = weight[rows]

    def dense(result):
        proj = result.projection if hasattr(result, "projection") else result
        return assemble(proj.L, proj.R, proj.layout)

    inter = project(weight, b, output_order="interleaved")
    block = project(permuted, b, output_order="blocked")
    torch.testing.assert_close(dense(inter)[rows], dense(block))
    inter = project_whitened(weight, cov, b, output_order="interleaved")
    block = project_whitened(permuted, cov, b, output_order="blocked")
    torch.testing.assert_close(dense(inter)[rows], dense(block))
    assert inter.objective == pytest.approx(block.objective, rel=1e-9, abs=1e-12)
    inter, block = refine_full(weight, cov, inter, sweeps=2), refine_full(permuted, cov, block, sweeps=2)
    torch.testing.assert_close(dense(inter)[rows], dense(block))


def test_the_cross_target_turns_the_cross_objective_into_a_whitened_one():
    """``||W X_dᵀ - M X_cᵀ||²/N + λ||W - M||²`` and ``tr((T - M)(C + λI)(T - M)ᵀ)`` differ by a
    constant for every ``M`` (so the whitened projection of ``T`` is the cross objective's), ``T``
    is the exact least-squares map (checked by ``lstsq`` on the stacked, damped system), and it
    is ``W`` when the two inputs agree."""
    n, d_in, d_out, damping = 300, 12, 10, 0.05
    x_dense = correlated_inputs(n, d_in, 0)
    x_conv = x_dense + 0.3 * correlated_inputs(n, d_in, 1)  # distorted by earlier layers
    w = torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(2), dtype=F64)
    c, cross = x_conv.T @ x_conv / n, x_dense.T @ x_conv / n
    lam = damping * float(c.diagonal().mean())
    target = cross_target(w, c, cross, damping)

    def direct(m):
        return float((x_dense @ w.T - x_conv @ m.T).square().sum()) / n + lam * float((w - m).square().sum())

    def whitened(m):
        e = target - m
        return float(((e @ (c + lam * torch.eye(d_in, dtype=F64))) * e).sum())

    ms = [torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(s), dtype=F64) for s in range(3)]
    gaps = [direct(m) - whitened(m) for m in ms]
    assert max(gaps) - min(gaps) == pytest.approx(0, abs=1e-9 * max(map(direct, ms)))
    stacked_x = torch.cat([x_conv / n**0.5, lam**0.5 * torch.eye(d_in, dtype=F64)])
    stacked_y = torch.cat([x_dense @ w.T / n**0.5, lam**0.5 * w.T])
    assert torch.allclose(target, torch.linalg.lstsq(stacked_x, stacked_y).solution.T, atol=1e-9)
    same = x_dense.T @ x_dense / n
    assert torch.allclose(cross_target(w, same, same, damping), w, atol=1e-12)
    m = target + 0.1 * ms[0]  # the relative error measured from the three covariances
    dense_energy = float((x_dense @ w.T).square().sum())
    expected = (float((x_dense @ w.T - x_conv @ m.T).square().sum()) / dense_energy) ** 0.5
    assert cross_rel_error(w, m, x_dense.T @ x_dense / n, cross, c) == pytest.approx(expected, rel=1e-9)


def test_refinement_without_measuring_gives_the_same_factors():
    """A conversion skips the objective's bookkeeping (a full product per sweep); the factors
    must not notice."""
    w = torch.randn(20, 18, generator=torch.Generator().manual_seed(3), dtype=F64)
    x = correlated_inputs(200, 18, 4)
    cov = x.T @ x / 200
    start = project_whitened(w, cov, 3)
    measured = refine_full(w, cov, start, sweeps=2)
    quick = refine_full(w, cov, start, sweeps=2, measure=False)
    assert torch.equal(measured.projection.L, quick.projection.L) and torch.equal(measured.projection.R, quick.projection.R)
    assert len(measured.history) == 2 and quick.history == [] and quick.objective != quick.objective  # NaN
