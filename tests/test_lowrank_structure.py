"""The low-rank baseline structure: the whitened truncated SVD against float64 references, and
the ``LowRankLinear`` layer."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from monarchify.errors import ConfigError
from monarchify.monarch import LowRankLinear, MonarchLayout
from monarchify.monarch.lowrank import matching_rank, truncated_svd
from monarchify.monarch.whitening import output_sq_error

F64 = torch.float64


def _problem(d_out: int, d_in: int, n: int, seed: int):
    """A weight and anisotropic correlated activations ``X`` (``n × d_in``), as real layers see."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d_out, d_in, generator=g, dtype=F64)
    mix = torch.randn(d_in, d_in, generator=g, dtype=F64) * torch.logspace(0, -2, d_in, dtype=F64)
    x = torch.randn(n, d_in, generator=g, dtype=F64) @ mix.T + 0.3 * torch.randn(1, d_in, generator=g, dtype=F64)
    return w, x


def _sqrtm(c: torch.Tensor) -> torch.Tensor:
    """Symmetric square root through an eigendecomposition: a factor other than Cholesky."""
    values, vectors = torch.linalg.eigh(c)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def test_whitened_error_on_the_samples_is_the_discarded_singular_values():
    """Brute force on the samples themselves: ``||(W - U V) Xᵀ||²/N`` computed from ``X``
    equals the sum of the discarded squared singular values of ``W C^{1/2}``."""
    w, x = _problem(12, 9, 200, 0)
    cov = x.T @ x / len(x)
    result = truncated_svd(w, 4, cov, damping=0.0)
    on_samples = float(((w - result.lowrank.dense()) @ x.T).square().sum()) / len(x)
    sigma = torch.linalg.svdvals(w @ _sqrtm(cov))
    assert on_samples == pytest.approx(float(sigma[4:].square().sum()), rel=1e-9)
    assert result.objective == pytest.approx(on_samples, rel=1e-9)
    assert result.energy == pytest.approx(float(sigma.square().sum()), rel=1e-9)


def test_whitened_matches_the_square_root_formulation_and_damping_rule():
    """The same optimum through the symmetric square root of the damped covariance (Cholesky
    and ``C^{1/2}`` differ by a rotation, which the SVD absorbs), damped as whitening.py damps."""
    w, x = _problem(10, 14, 300, 1)
    cov = x.T @ x / len(x)
    damping = 0.05
    damped = cov + damping * cov.diagonal().mean() * torch.eye(14, dtype=F64)
    root = _sqrtm(damped)
    u, sigma, vh = torch.linalg.svd(w @ root, full_matrices=False)
    reference = (u[:, :5] * sigma[:5]) @ vh[:5] @ torch.linalg.inv(root)
    result = truncated_svd(w, 5, cov, damping=damping)
    assert torch.allclose(result.lowrank.dense(), reference, atol=1e-9)


def test_whitened_beats_plain_svd_in_the_weighted_norm_and_loses_in_frobenius():
    w, x = _problem(16, 16, 400, 2)
    cov = x.T @ x / len(x)
    whitened, plain = truncated_svd(w, 6, cov, damping=0.0), truncated_svd(w, 6)
    assert output_sq_error(w, whitened.lowrank.dense(), cov) < 0.9 * output_sq_error(w, plain.lowrank.dense(), cov)
    assert plain.sq_error < whitened.sq_error  # each is optimal in its own metric


def test_no_rank_r_matrix_does_better_in_the_weighted_norm():
    """Local search from random starts (L-BFGS over ``U``, ``V``) never gets below the closed form."""
    w, x = _problem(6, 7, 100, 3)
    cov = x.T @ x / len(x)
    best = truncated_svd(w, 2, cov, damping=0.0).objective
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        u = torch.randn(6, 2, generator=g, dtype=F64, requires_grad=True)
        v = torch.randn(2, 7, generator=g, dtype=F64, requires_grad=True)
        opt = torch.optim.LBFGS([u, v], max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14)

        def closure():
            opt.zero_grad()
            e = w - u @ v
            loss = ((e @ cov) * e).sum()
            loss.backward()
            return loss

        opt.step(closure)
        found = output_sq_error(w, (u @ v).detach(), cov)
        assert found >= best * (1 - 1e-9)
    # and the search does reach it from some start: the closed form is not beaten, it is met
    assert found == pytest.approx(best, rel=1e-4)


def test_identity_covariance_gives_the_plain_svd():
    w, _ = _problem(9, 13, 10, 4)
    plain = truncated_svd(w, 3)
    for damping in (0.0, 0.01):
        whitened = truncated_svd(w, 3, torch.eye(13, dtype=F64), damping=damping)
        assert torch.allclose(whitened.lowrank.dense(), plain.lowrank.dense(), atol=1e-10)
    u, sigma, vh = torch.linalg.svd(w, full_matrices=False)
    assert torch.allclose(plain.lowrank.dense(), (u[:, :3] * sigma[:3]) @ vh[:3], atol=1e-10)
    assert plain.sq_error == pytest.approx(float(sigma[3:].square().sum()), rel=1e-10)
    assert plain.rel_error == pytest.approx((float(sigma[3:].square().sum()) / float(sigma.square().sum())) ** 0.5)


@settings(max_examples=25, deadline=None)
@given(d_out=st.integers(1, 12), d_in=st.integers(1, 12), rank=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_random_shapes(d_out, d_in, rank, seed):
    rank = min(rank, d_out, d_in)
    w, x = _problem(d_out, d_in, 3 * d_in + 2, seed)
    cov = x.T @ x / len(x)
    for c in (None, cov):
        result = truncated_svd(w, rank, c)
        assert result.lowrank.U.shape == (d_out, rank) and result.lowrank.V.shape == (rank, d_in)
        assert 0 <= result.objective <= result.energy * (1 + 1e-9)
    whitened, plain = truncated_svd(w, rank, cov), truncated_svd(w, rank)
    damped = cov + 0.01 * cov.diagonal().mean() * torch.eye(d_in, dtype=F64)
    assert output_sq_error(w, whitened.lowrank.dense(), damped) <= output_sq_error(w, plain.lowrank.dense(), damped) * (1 + 1e-9) + 1e-12
    assert whitened.objective == pytest.approx(output_sq_error(w, whitened.lowrank.dense(), damped), rel=1e-7, abs=1e-10)
    if rank == min(d_out, d_in):  # full rank reproduces the weight
        assert torch.allclose(plain.lowrank.dense(), w, atol=1e-9)


def test_bad_input_is_refused():
    w = torch.randn(4, 5)
    with pytest.raises(ConfigError, match="at least 1"):
        truncated_svd(w, 0)
    with pytest.raises(ConfigError, match="from 0 to min"):
        truncated_svd(w, 5)
    with pytest.raises(ValueError, match="expected"):
        truncated_svd(torch.randn(4, 4, 2), 2)


@pytest.mark.parametrize("d_in, d_out, nblocks", [(576, 576, 4), (576, 1536, 4), (576, 192, 4), (48, 100, 3), (64, 16, 8), (8, 8, 2)])
def test_matching_rank_never_exceeds_monarch_by_design_and_is_within_one_step(d_in, d_out, nblocks):
    rank = matching_rank(d_in, d_out, nblocks)
    monarch = MonarchLayout(d_in, d_out, nblocks).weight_params
    assert 1 <= rank <= min(d_in, d_out)
    if rank < min(d_in, d_out):
        assert rank * (d_in + d_out) <= monarch < (rank + 1) * (d_in + d_out)
    if (d_in, d_out, nblocks) == (576, 576, 4):  # 2·576²/4 parameters = 144·(576 + 576)
        assert rank == 144


def test_layer_computes_u_v_x_plus_bias():
    torch.manual_seed(0)
    layer = LowRankLinear(7, 5, 3).double()
    x = torch.randn(2, 4, 7, dtype=F64)
    expected = x @ (layer.U @ layer.V).T + layer.bias
    assert torch.allclose(layer(x), expected, atol=1e-12)
    assert torch.equal(layer.weight, layer.U.detach() @ layer.V.detach())
    assert sum(p.numel() for p in layer.parameters()) == 3 * (7 + 5) + 5
    assert set(layer.state_dict()) == {"U", "V", "bias"}
    assert "bias" not in LowRankLinear(7, 5, 3, bias=False).state_dict()
    with pytest.raises(ConfigError):
        LowRankLinear(7, 5, 0)


def test_fresh_layer_keeps_linear_output_scale():
    torch.manual_seed(0)
    x = torch.randn(4096, 256)
    with torch.no_grad():
        dense = torch.nn.Linear(256, 256)(x).std()
        low = LowRankLinear(256, 256, 64)(x).std()
    assert float(low / dense) == pytest.approx(1.0, rel=0.15)
