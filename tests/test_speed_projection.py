"""The fast projection route (Gram eigenvectors) against the full SVD it replaced.

The blocks here are large enough (smaller side >= SVD_BELOW) for ``project`` to take the
Gram route; the core tests in ``test_projection.py`` cover the tiny shapes, which take the
SVD route.
"""

from __future__ import annotations

import pytest
import torch

from monarchify.monarch import MonarchLayout, MonarchLinear, project
from monarchify.monarch import projection as proj
from monarchify.monarch.projection import solver_dtype_for, truncated_svd

F64 = torch.float64


def optimum(weight: torch.Tensor, nblocks: int, order: str = "blocked") -> float:
    """The optimal squared error, from a float64 SVD of every sub-block, with the sub-blocks
    and their ranks taken from the rules in docs/monarch.md here rather than from the library
    (these shapes need no padding): the rows of output block ``l`` (``l·s ... l·s + s - 1``
    blocked, ``o ≡ l (mod b)`` interleaved) × input block ``k``, truncated to the number of
    middle indices ``f`` with ``f mod b = l`` and ``f div q = k``."""
    d_out, d_in = weight.shape
    b = nblocks
    assert d_in % b == 0 and d_out % b == 0, "this reference has no padding"
    p, q, s = d_in // b, min(d_in, d_out) // b, d_out // b
    total = 0.0
    for l in range(b):
        for k in range(b):
            rank = sum(1 for f in range(b * q) if f % b == l and f // q == k)
            rows = slice(l * s, (l + 1) * s) if order == "blocked" else slice(l, None, b)
            sigma = torch.linalg.svdvals(weight.double()[rows, k * p : (k + 1) * p])
            total += float(sigma[rank:].square().sum())
    return total


def rebuilt(weight: torch.Tensor, nblocks: int, projection) -> torch.Tensor:
    layer = MonarchLinear(weight.shape[1], weight.shape[0], nblocks, dtype=F64, output_order=projection.layout.output_order)
    with torch.no_grad():
        layer.L.copy_(projection.L)
        layer.R.copy_(projection.R)
    return layer.to_dense()


# (d_out, d_in, nblocks): square, tall and wide sub-blocks (the wide ones are transposed).
SHAPES = [(256, 256, 4), (512, 128, 2), (128, 512, 2), (384, 192, 3)]


def test_these_shapes_really_take_the_gram_route():
    for d_out, d_in, b in SHAPES:
        layout = MonarchLayout(d_in, d_out, b)
        assert min(layout.p, layout.s) >= proj.SVD_BELOW


@pytest.mark.parametrize("order", ["blocked", "interleaved"])
@pytest.mark.parametrize("d_out,d_in,b", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_gram_route_is_optimal_and_reports_the_exact_error(d_out, d_in, b, dtype, order):
    gen = torch.Generator().manual_seed(d_out + d_in + b)
    weight = (torch.randn(d_out, d_in, generator=gen, dtype=F64) / d_in**0.5).to(dtype)
    result = project(weight, b, output_order=order)
    best = optimum(weight, b, order)
    explicit = float((weight.double() - rebuilt(weight, b, result)).square().sum())
    # The reported error is the reconstruction error of the factors returned...
    assert result.sq_error == pytest.approx(explicit, rel=1e-9)
    # ...and that error is the optimum to far better than the 1e-6 the project asks.
    assert result.sq_error >= best * (1 - 1e-12)
    assert (result.sq_error - best) / best < 1e-8


def test_pretrained_like_weights_with_a_decaying_spectrum_stay_optimal():
    """Trained weights have decaying spectra and a few large directions: an easier case for
    the eigenvector subspace, but one where float32 rounding of the Gram matrix is largest."""
    gen = torch.Generator().manual_seed(7)
    u = torch.linalg.qr(torch.randn(384, 384, generator=gen, dtype=F64))[0]
    v = torch.linalg.qr(torch.randn(384, 384, generator=gen, dtype=F64))[0]
    weight = ((u * torch.logspace(1, -3, 384, dtype=F64)) @ v.T).float()
    result = project(weight, 4)
    best = optimum(weight, 4)
    assert (result.sq_error - best) / best < 1e-6


def test_an_exactly_monarch_weight_projects_onto_itself():
    torch.manual_seed(0)
    layer = MonarchLinear(256, 256, 4, dtype=F64)
    with torch.no_grad():
        layer.L.normal_()
        layer.R.normal_()
    dense = layer.to_dense()
    result = project(dense, 4)
    assert result.rel_error < 1e-10
    assert float((rebuilt(dense, 4, result) - dense).norm() / dense.norm()) < 1e-10


def test_zero_and_rank_deficient_blocks_give_finite_optimal_factors():
    gen = torch.Generator().manual_seed(1)
    weight = torch.zeros(256, 256, dtype=F64)
    weight[:, :64] = torch.randn(256, 3, generator=gen, dtype=F64) @ torch.randn(3, 64, generator=gen, dtype=F64)
    weight[:, 128:192] = torch.randn(256, 64, generator=gen, dtype=F64)
    result = project(weight, 4)
    assert torch.isfinite(result.L).all() and torch.isfinite(result.R).all()
    assert result.sq_error == pytest.approx(optimum(weight, 4), rel=1e-9, abs=1e-9)
    assert project(torch.zeros(256, 256), 4).rel_error == 0.0


def test_factors_are_balanced_square_roots_of_the_singular_values():
    gen = torch.Generator().manual_seed(2)
    weight = torch.randn(256, 256, generator=gen)
    result = project(weight, 4)
    layout = result.layout
    for l in range(4):
        for k in range(4):
            cols, rows = layout.pair_indices(l, k)
            torch.testing.assert_close(result.L[l][:, cols].norm(dim=0), result.R[k][rows, :].norm(dim=1), rtol=1e-9, atol=1e-12)


def test_truncated_svd_matches_the_svd_triplet_by_triplet_on_a_separated_spectrum():
    gen = torch.Generator().manual_seed(3)
    q1 = torch.linalg.qr(torch.randn(3, 120, 80, generator=gen, dtype=F64))[0]
    q2 = torch.linalg.qr(torch.randn(3, 80, 80, generator=gen, dtype=F64))[0]
    sigma = torch.linspace(10, 1, 80, dtype=F64)
    blocks = (q1 * sigma) @ q2.mT
    ranks = torch.tensor([5, 20, 40])
    # float64 solver: every triplet. float32 solver: the subspace is off by ~eps32·λ/gap
    # (first order in the factors) but the error only at second order, which is what the
    # projection promises: optimal error, exactly reported.
    for solver, tol in ((F64, 1e-8), (torch.float32, 1e-4)):
        u, s, vh, err = truncated_svd(blocks, ranks, solver_dtype=solver)
        torch.testing.assert_close(s, sigma[:40].expand(3, 40), rtol=tol, atol=tol)
        for i, r in enumerate(ranks.tolist()):
            approx = (u[i, :, :r] * s[i, :r]) @ vh[i, :r]
            best = (q1[i, :, :r] * sigma[:r]) @ q2[i, :, :r].mT
            assert float((approx - best).norm() / best.norm()) < tol
            assert float(err[i]) == pytest.approx(float(sigma[r:].square().sum()), rel=1e-9)
            assert float(err[i]) == pytest.approx(float((blocks[i] - approx).square().sum()), rel=1e-9)


def test_solver_precision_follows_the_weight_and_threads_are_restored():
    assert solver_dtype_for(torch.float32) == torch.float32
    assert solver_dtype_for(torch.bfloat16) == torch.float32
    assert solver_dtype_for(F64) == F64
    threads = torch.get_num_threads()
    project(torch.randn(256, 256), 4)
    assert torch.get_num_threads() == threads


def test_eigenvectors_split_across_threads_match_one_call_and_the_pool_is_reused():
    """The batch split over worker threads must not change the answer, whatever the number
    of threads (the chunks differ) and however often it is called (the pool is kept)."""
    gen = torch.Generator().manual_seed(5)
    a = torch.randn(7, 90, 80, generator=gen)
    gram = a.mT @ a
    expected = torch.linalg.eigh(gram)[1][..., -20:]
    threads = torch.get_num_threads()
    try:
        for workers in (1, 2, 3):
            torch.set_num_threads(workers)
            for _ in range(2):
                got = proj._top_eigenvectors(gram, 20)
                # eigenvectors are defined up to sign: compare the projectors they span
                assert torch.allclose(got @ got.mT, expected @ expected.mT, atol=1e-4)
                assert torch.get_num_threads() == workers
        assert proj._eigh_pool(3) is proj._eigh_pool(3)
    finally:
        torch.set_num_threads(threads)
