"""Activation-aware Monarch projection: minimise the output error, not the weight error.

What a layer *does* is ``W x`` on the inputs it really sees, so the error that matters is
``||(W - M) Xᵀ||_F² = tr((W - M) C (W - M)ᵀ)`` with ``C = XᵀX / N`` the (uncentred) input
second-moment matrix. The Frobenius projection treats every input direction alike; real
activations are very anisotropic, so it spends the budget on directions the layer never sees.

Block-diagonal whitening keeps the closed form. Keep only the diagonal blocks ``C_k`` of
``C`` (one per Monarch input block) and factor ``C_k = S_k S_kᵀ`` (Cholesky). Then
``tr(E C_bd Eᵀ) = Σ_k ||E_k S_k||²``, and because ``blockdiag(S)`` acts inside input blocks,
``(W - M)·blockdiag(S)`` has the Monarch sub-block structure: sub-block ``(l, k)`` is
``W_lk S_k - L_l[:, cols] (R_k[rows] S_k)``. So the best ``M`` is the plain projection of
``W·blockdiag(S)`` (Eckart–Young per sub-block) with each ``R`` block mapped back by
``S_k⁻¹``: still Monarch, still a global optimum, and the surrogate error is still the sum of
the discarded squared singular values.

The cross-block terms of ``C`` are what the surrogate ignores. :func:`refine_full` lowers the
full objective by exact block-coordinate descent (each step is the whitened projection of a
corrected target, so the error never rises).

Damping adds ``damping · mean(diag C)`` to the diagonal: a rank-deficient ``C`` (dead
features, few samples) would otherwise make ``S_k`` singular and the solution arbitrary in
unseen directions. Padded input columns get variance ``mean(diag C)`` and no correlation:
``W`` is zero there, so they stay zero in ``M``.

Torch only: nothing here knows about transformers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from monarchify.errors import ConfigError, NonFiniteWeightError
from monarchify.monarch.layout import BLOCKED, MonarchLayout
from monarchify.monarch.projection import Projection, assemble, sub_blocks, write_pair
from monarchify.monarch.threads import torch_threads

F64 = torch.float64
DEFAULT_DAMPING = 0.01


@dataclass
class WhitenedProjection:
    """An activation-aware projection: the factors (as a plain :class:`Projection`, whose
    ``sq_error`` is the ordinary ``||W - M||_F²``) plus the objective it minimised."""

    projection: Projection
    objective: float
    """``tr((W - M) C (W - M)ᵀ)`` with the damped covariance the projection used
    (block-diagonal unless refined with the full covariance)."""
    energy: float
    """``tr(W C Wᵀ)`` with the same covariance, for a relative error."""
    history: list[float] = field(default_factory=list)
    """Full-covariance objective after each sweep of :func:`refine_full` (empty otherwise)."""

    @property
    def rel_objective(self) -> float:
        return (max(self.objective, 0.0) / self.energy) ** 0.5 if self.energy > 0 else 0.0


def _check_cov(cov: torch.Tensor, d_in: int) -> torch.Tensor:
    if cov.shape != (d_in, d_in):
        raise ValueError(f"covariance has shape {tuple(cov.shape)}, expected ({d_in}, {d_in})")
    c = cov.detach().to(F64)
    if not torch.isfinite(c).all():
        raise NonFiniteWeightError("the input covariance contains NaN or Inf values")
    return c


def padded_covariance(cov: torch.Tensor, layout: MonarchLayout, damping: float = DEFAULT_DAMPING) -> torch.Tensor:
    """The damped ``(n_in, n_in)`` covariance the projection works with.

    ``scale = mean(diag C)`` (1 when ``C`` is all zero, which makes the projection the plain
    one). Padded coordinates get variance ``scale`` and no correlation; every coordinate gets
    ``damping · scale`` more variance.
    """
    if damping < 0:
        raise ConfigError(f"damping must be >= 0, got {damping}")
    c = _check_cov(cov, layout.d_in)
    diag_mean = float(c.diagonal().mean())
    scale = diag_mean if diag_mean > 0 else 1.0
    pad = layout.n_in - layout.d_in
    full = F.pad(c, (0, pad, 0, pad))
    idx = torch.arange(layout.d_in, layout.n_in)
    full[idx, idx] = scale
    full.diagonal().add_(damping * scale)
    return full


def diagonal_blocks(full: torch.Tensor, layout: MonarchLayout) -> torch.Tensor:
    """The ``(b, p, p)`` diagonal blocks of a padded ``(n_in, n_in)`` matrix."""
    b, p = layout.nblocks, layout.p
    return full.reshape(b, p, b, p).diagonal(dim1=0, dim2=2).permute(2, 0, 1)


def cholesky_blocks(blocks: torch.Tensor) -> torch.Tensor:
    """Lower Cholesky factors of the diagonal blocks, with a clean error if one is singular."""
    factors, info = torch.linalg.cholesky_ex(blocks)
    if bool((info != 0).any()):
        bad = int((info != 0).nonzero()[0])
        raise ConfigError(
            f"the input covariance of block {bad} is not positive definite (too few samples or "
            "dead features); use a positive damping"
        )
    return factors


def damping_scale(cov: torch.Tensor, damping: float) -> float:
    """What :func:`padded_covariance` adds to the diagonal: ``damping · mean(diag C)``."""
    diag_mean = float(cov.diagonal().to(F64).mean())
    return damping * (diag_mean if diag_mean > 0 else 1.0)


def cross_target(weight: torch.Tensor, cov: torch.Tensor, cross: torch.Tensor, damping: float = DEFAULT_DAMPING) -> torch.Tensor:
    """The dense map ``T`` that turns a least-squares fit to *other* inputs into a whitened
    projection: ``T = W (C_dc + λI)(C + λI)⁻¹``.

    A layer fed ``X_c`` (what the converted earlier layers produce) should reproduce the dense
    model's ``W X_d``. For any ``M``, ``||W X_dᵀ - M X_cᵀ||²/N + λ||W - M||²`` equals
    ``tr((T - M)(C + λI)(T - M)ᵀ)`` plus a constant, with ``C = X_cᵀX_c/N``, ``C_dc =
    X_dᵀX_c/N`` and ``λ`` the damping :func:`padded_covariance` adds; so the whitened projection
    (and :func:`refine_full`) of ``T`` against ``C`` minimises the cross objective exactly as it
    minimises the ordinary one. The damping pulls ``M`` toward ``W`` (not toward zero), so when
    ``X_c = X_d`` the target is ``W`` itself.
    """
    c = _check_cov(cov, weight.shape[1])
    cd = _check_cov(cross, weight.shape[1])
    lam = damping_scale(c, damping)
    eye = torch.eye(c.shape[0], dtype=F64, device=c.device)
    factor, info = torch.linalg.cholesky_ex(c + lam * eye)
    if int(info) != 0:
        raise ConfigError("the input covariance is not positive definite (too few samples or dead features); use a positive damping")
    rhs = (weight.detach().to(F64) @ (cd + lam * eye)).T  # (C + λ) Tᵀ = (C_dc + λ)ᵀ Wᵀ
    return torch.cholesky_solve(rhs, factor).T


def cross_rel_error(weight: torch.Tensor, approx: torch.Tensor, dense: torch.Tensor, cross: torch.Tensor, cov: torch.Tensor) -> float:
    """``||W X_dᵀ - M X_cᵀ|| / ||W X_dᵀ||`` from ``C_dd``, ``C_dc`` and ``C_cc`` (0 when ``W X_d``
    is 0): how far the converted layer, on the converted model's inputs, lands from the dense
    layer on the dense model's."""
    w, m = weight.to(F64), approx.to(F64)
    energy = float(((w @ dense.to(F64)) * w).sum())
    error = energy - 2 * float(((w @ cross.to(F64)) * m).sum()) + float(((m @ cov.to(F64)) * m).sum())
    return (max(error, 0.0) / energy) ** 0.5 if energy > 0 else 0.0


def output_sq_error(weight: torch.Tensor, approx: torch.Tensor, cov: torch.Tensor) -> float:
    """``tr((W - M) C (W - M)ᵀ)``: the mean squared output error over the samples behind ``C``."""
    e = weight.to(F64) - approx.to(F64)
    return float(((e @ cov.to(F64)) * e).sum())


def output_rel_error(weight: torch.Tensor, approx: torch.Tensor, cov: torch.Tensor, energy: float | None = None) -> float:
    """``||(W - M) Xᵀ|| / ||W Xᵀ||`` from the covariance of ``X`` (0 when ``W X`` is 0);
    ``energy``: ``||W Xᵀ||²`` when known already (one product fewer)."""
    if energy is None:
        energy = output_sq_error(weight, torch.zeros_like(weight), cov)
    return (max(output_sq_error(weight, approx, cov), 0.0) / energy) ** 0.5 if energy > 0 else 0.0


def _balance(L: torch.Tensor, R: torch.Tensor, layout: MonarchLayout) -> None:
    """Rescale every middle index so its ``L`` column and ``R`` row have equal norms.

    ``M`` is unchanged; the plain projection is balanced by construction (``√σ`` on both
    sides), and keeping that after unwhitening gives fine-tuning well-scaled factors.
    """
    b, q = layout.nblocks, layout.q
    r_norm = R.norm(dim=2)  # (b, q): row j of R block k is middle f = k·q + j
    middle = torch.arange(b * q, device=L.device)
    l_norm = L.norm(dim=1)  # (b, q): column c of L block l is middle f = c·b + l
    l_of_f = l_norm[middle % b, middle // b].reshape(b, q)
    ok = (r_norm > 0) & (l_of_f > 0)
    c = torch.where(ok, (r_norm / torch.where(ok, l_of_f, 1.0)).sqrt(), torch.ones_like(r_norm))
    R.div_(c.unsqueeze(-1))
    c_by_l = torch.empty(b, q, dtype=L.dtype, device=L.device)
    flat = c.reshape(-1)
    c_by_l[middle % b, middle // b] = flat
    L.mul_(c_by_l.unsqueeze(1))


def batched_svd(a: torch.Tensor, values_only: bool = False):
    """``torch.linalg.svd`` (or ``svdvals``) of a batch of matrices, single-threaded on the CPU.

    torch's threaded batch loop calling a threaded LAPACK oversubscribes the cores: 16 blocks
    of 96×384 took 2.3 s with 2 threads and 0.06 s with one (2-core CPU, float64).
    """
    with torch_threads(torch.get_num_threads() if a.is_cuda else 1):
        return torch.linalg.svdvals(a) if values_only else torch.linalg.svd(a, full_matrices=False)


def _fill_pair_factors(L, R, u, sigma, vh, layout: MonarchLayout) -> float:
    """Write the top-``t`` triplets of every ``(l, k)`` sub-block into ``L``/``R``; return the
    discarded squared singular values."""
    root = sigma.sqrt()
    discarded = 0.0
    for l in range(layout.nblocks):
        for k in range(layout.nblocks):
            write_pair(L, R, layout, l, k, u[l, k], root[l, k], vh[l, k])
            discarded += float(sigma[l, k, layout.pair_ranks[l][k]:].square().sum())
    return discarded


def _prepare(
    weight: torch.Tensor, nblocks: int, allow_structural_zeros: bool, output_order: str
) -> tuple[torch.Tensor, MonarchLayout]:
    if weight.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    d_out, d_in = weight.shape
    layout = MonarchLayout(d_in, d_out, nblocks, output_order)
    layout.check_structure(allow_structural_zeros)
    w = weight.detach().to(F64)
    if not torch.isfinite(w).all():
        raise NonFiniteWeightError("the weight contains NaN or Inf values")
    return w, layout


def whitened_sub_blocks(weight: torch.Tensor, cov: torch.Tensor, layout: MonarchLayout, damping: float):
    """``W_lk S_k`` for every sub-block, and the factors ``S`` — what both the projection
    and the budget's candidate errors need."""
    factors = cholesky_blocks(diagonal_blocks(padded_covariance(cov, layout, damping), layout))
    return sub_blocks(weight.to(F64), layout) @ factors.unsqueeze(0), factors


def project_whitened(
    weight: torch.Tensor,
    cov: torch.Tensor,
    nblocks: int,
    *,
    damping: float = DEFAULT_DAMPING,
    allow_structural_zeros: bool = False,
    output_order: str = BLOCKED,
) -> WhitenedProjection:
    """The Monarch matrix minimising ``tr((W - M) C_bd (W - M)ᵀ)`` exactly, where ``C_bd`` is
    the damped block-diagonal part of the input covariance ``cov`` (``d_in × d_in``).

    Computed in float64; factors come back in float64 for the caller to cast.
    """
    w, layout = _prepare(weight, nblocks, allow_structural_zeros, output_order)
    whitened, factors = whitened_sub_blocks(w, cov, layout, damping)
    u, sigma, vh = batched_svd(whitened)
    # Unwhiten the right singular vectors: rows v S_k⁻¹ (solve X S_k = v).
    vh = torch.linalg.solve_triangular(factors.unsqueeze(0), vh, upper=False, left=False)
    L = w.new_zeros(layout.l_shape)
    R = w.new_zeros(layout.r_shape)
    objective = _fill_pair_factors(L, R, u, sigma, vh, layout)
    _balance(L, R, layout)
    approx = assemble(L, R, layout)
    plain = Projection(layout, L, R, float((w - approx).square().sum()), float(w.square().sum()))
    return WhitenedProjection(plain, objective, float(sigma.square().sum()))


def refine_full(
    weight: torch.Tensor,
    cov: torch.Tensor,
    start: WhitenedProjection | Projection,
    *,
    sweeps: int = 5,
    damping: float = DEFAULT_DAMPING,
    measure: bool = True,
) -> WhitenedProjection:
    """Lower the *full*-covariance objective ``tr((W - M) C (W - M)ᵀ)`` from ``start`` by
    block-coordinate descent over input blocks.

    With every other input block fixed, the best block-``k`` column of ``M`` solves
    ``min ||(X - T) S_k||²`` over rank-``t(l,k)`` sub-blocks, where ``T = A C[:, k] C_kk⁻¹``
    and ``A = W - M`` without block ``k``'s own term: a whitened projection again, so every
    step is exact and the objective never increases. Output classes ``l`` are independent.

    ``measure=False`` skips the objective after each sweep and at the end (``history`` empty,
    ``objective`` and ``energy`` NaN): each is a full ``d_out × n_in²`` product, as much work
    as a sweep's, and a conversion reads only the factors.
    """
    base = start.projection if isinstance(start, WhitenedProjection) else start
    layout = base.layout
    w, _ = _prepare(weight, layout.nblocks, True, layout.output_order)
    b, p = layout.nblocks, layout.p
    c = padded_covariance(cov, layout, damping)
    factors = cholesky_blocks(diagonal_blocks(c, layout))
    wp = _pad(w, layout)
    L, R = base.L.to(F64).clone(), base.R.to(F64).clone()
    approx = _pad(assemble(L, R, layout), layout)

    def objective(m: torch.Tensor) -> float:
        e = wp - m
        return float(((e @ c) * e).sum())

    history = []
    for _ in range(sweeps):
        for k in range(b):
            cols = slice(k * p, (k + 1) * p)
            rest = wp - approx
            rest[:, cols] += approx[:, cols]
            target = torch.cholesky_solve((rest @ c[:, cols]).T, factors[k]).T  # G C_kk⁻¹
            blocks = layout.rows_by_block(target) @ factors[k]  # (b, s, p): output block l
            u, sigma, vh = batched_svd(blocks)
            vh = torch.linalg.solve_triangular(factors[k], vh, upper=False, left=False)
            root = sigma.sqrt()
            for l in range(b):
                write_pair(L, R, layout, l, k, u[l], root[l], vh[l])
                lcols, rows = layout.pair_indices(l, k)
                approx[layout.output_rows(l), cols] = L[l][:, lcols] @ R[k][rows, :] if lcols else 0.0
        if measure:
            history.append(objective(approx))
    _balance(L, R, layout)  # M unchanged
    approx = assemble(L, R, layout)
    plain = Projection(layout, L, R, float((w - approx).square().sum()), float(w.square().sum()))
    if not measure:
        return WhitenedProjection(plain, float("nan"), float("nan"))
    return WhitenedProjection(plain, objective(_pad(approx, layout)), objective(torch.zeros_like(wp)), history)


def _pad(matrix: torch.Tensor, layout: MonarchLayout) -> torch.Tensor:
    """A ``(d_out, d_in)`` matrix zero-padded to ``(n_out, n_in)``."""
    return F.pad(matrix, (0, layout.n_in - layout.d_in, 0, layout.n_out - layout.d_out))
