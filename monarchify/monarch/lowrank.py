"""Monarch plus low rank: ``W ≈ M + U V``, the low-rank term fitted to what Monarch misses.

A Monarch matrix gives every ``(output block, input block)`` sub-block a small rank of its own,
so it cannot represent a few directions that cross all blocks, which real weights have (a large
common component, outlier features). A rank-``k`` term ``U V`` (``U``: ``d_out × k``, ``V``:
``k × d_in``) adds exactly those, at ``k·(d_in + d_out)`` parameters.

Given ``M``, the best ``U V`` is closed form in the metric the rest of the projection uses:

* plain: Eckart–Young on the residual ``E = W - M``: its top-``k`` singular triplets;
* calibrated: minimise ``tr((E - U V) C (E - U V)ᵀ)`` with the damped input covariance ``C``
  (the damping of :func:`~monarchify.monarch.whitening.padded_covariance`). With ``C = S Sᵀ``
  (Cholesky; any factor works, ``C^{1/2}`` included, since only ``S Sᵀ`` enters the
  objective) this is ``||(E - U V) S||²``, minimised over rank ``k`` by the truncated SVD of
  ``E S`` with its right factor mapped back by ``S⁻¹``.

Both are global optima for the given ``M``, and the squared error is the sum of the discarded
squared singular values. :func:`project_lowrank` then alternates (re-project ``W - U V`` to
Monarch, re-fit ``U V``): every step is an exact minimisation of the same objective given the
other factor, so the error never rises (``ALTERNATIONS`` says how many rounds pay).

The same fit with nothing subtracted (``M = 0``) is the low-rank *structure*, the baseline a
Monarch conversion is compared against: :func:`truncated_svd` (plain, or whitened as SVD-LLM
does) and :func:`matching_rank`, the rank with as many parameters as a given block count.

Torch only: nothing here knows about transformers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from monarchify.errors import ConfigError, NonFiniteWeightError
from monarchify.monarch.layout import BLOCKED, MonarchLayout
from monarchify.monarch.projection import Projection, assemble, project
from monarchify.monarch.whitening import (
    DEFAULT_DAMPING, WhitenedProjection, _prepare, batched_svd, padded_covariance, project_whitened, refine_full,
)

F64 = torch.float64
ALTERNATIONS = 2
"""Rounds of (re-project ``W - U V`` to Monarch, re-fit ``U V``) after the first fit. Measured
on MiniLM-L6 (``benchmarks/lowrank_alternation.py``); see ``docs/monarch.md``."""


def check_rank(rank: object, d_in: int, d_out: int) -> int:
    """A rank a ``d_in -> d_out`` layer can hold: an integer from 0 to ``min(d_in, d_out)``
    (past that the term is no longer low rank and only costs parameters)."""
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank <= min(d_in, d_out):
        raise ConfigError(f"rank must be an integer from 0 to min(d_in, d_out) = {min(d_in, d_out)}, got {rank!r}")
    return rank


def lowrank_params(rank: int, d_in: int, d_out: int) -> int:
    """Parameters of the low-rank term (``U`` and ``V``)."""
    return rank * (d_in + d_out)


@dataclass
class LowRank:
    """The factors of a rank-``k`` correction and what it left over."""

    U: torch.Tensor
    """``(d_out, k)``."""
    V: torch.Tensor
    """``(k, d_in)``."""
    sq_error: float
    """``||(E - U V) S||_F²`` (``S = I`` when plain): the discarded squared singular values."""
    residual_sq: float
    """``||E S||_F²``: the same before the correction."""

    @property
    def rank(self) -> int:
        return self.U.shape[1]

    def dense(self) -> torch.Tensor:
        return self.U @ self.V


def covariance_factor(cov: torch.Tensor, d_in: int, damping: float = DEFAULT_DAMPING) -> torch.Tensor:
    """Lower Cholesky factor ``S`` of the damped ``(d_in, d_in)`` covariance: the same damping
    rule as the whitened projection (a one-block layout has no padding)."""
    full = padded_covariance(cov, MonarchLayout(d_in, 1, 1), damping)
    factor, info = torch.linalg.cholesky_ex(full)
    if int(info) != 0:
        raise ConfigError("the input covariance is not positive definite (too few samples or dead features); use a positive damping")
    return factor


def fit_lowrank(
    residual: torch.Tensor, rank: int, factor: torch.Tensor | None = None
) -> LowRank:
    """The rank-``rank`` ``U V`` minimising ``||(residual - U V) S||_F`` (``S = factor``, the
    identity when ``None``), in float64.

    ``U`` and ``V`` share each singular value as ``√σ`` and are then balanced (every component
    gets equal norms in ``U`` and ``V``), so fine-tuning starts from well-scaled factors.
    """
    e = residual.detach().to(F64)
    d_out, d_in = e.shape
    check_rank(rank, d_in, d_out)
    target = e if factor is None else e @ factor.to(F64)
    u, sigma, vh = batched_svd(target)
    u, kept, vh = u[:, :rank], sigma[:rank], vh[:rank]
    if factor is not None:  # rows v S⁻¹ (solve X S = v)
        vh = torch.linalg.solve_triangular(factor.to(F64), vh, upper=False, left=False)
    root = kept.sqrt()
    U, V = u * root, root[:, None] * vh
    _balance(U, V)
    total = float(sigma.square().sum())
    return LowRank(U, V, float(sigma[rank:].square().sum()), total)


def _balance(U: torch.Tensor, V: torch.Tensor) -> None:
    """Rescale each component so its ``U`` column and ``V`` row have equal norms (``U V`` unchanged)."""
    u_norm, v_norm = U.norm(dim=0), V.norm(dim=1)
    ok = (u_norm > 0) & (v_norm > 0)
    c = torch.where(ok, (v_norm / torch.where(ok, u_norm, 1.0)).sqrt(), torch.ones_like(u_norm))
    U.mul_(c)
    V.div_(c[:, None])


@dataclass
class MonarchLowRank:
    """``M + U V``: the Monarch part (as a plain :class:`Projection` of ``W - U V``), the
    low-rank part, and the errors of their sum."""

    projection: Projection
    lowrank: LowRank
    sq_error: float
    """``||W - M - U V||_F²``."""
    weight_sq_norm: float
    objective: float
    """The minimised objective: ``sq_error`` when plain, ``tr(E C Eᵀ)`` with the damped full
    covariance when calibrated."""
    energy: float
    """The objective of ``M = 0, U V = 0`` (``||W||²`` or ``tr(W C Wᵀ)``)."""
    history: list[float] = field(default_factory=list)
    """The objective after the first fit and after every alternation."""

    @property
    def layout(self) -> MonarchLayout:
        return self.projection.layout

    @property
    def rel_error(self) -> float:
        """``||W - M - U V||_F / ||W||_F`` (0 for an all-zero weight)."""
        return (max(self.sq_error, 0.0) / self.weight_sq_norm) ** 0.5 if self.weight_sq_norm > 0 else 0.0

    def dense(self) -> torch.Tensor:
        """``M + U V`` as a dense ``(d_out, d_in)`` float64 matrix."""
        p = self.projection
        return assemble(p.L.to(F64), p.R.to(F64), p.layout) + self.lowrank.dense()


def project_lowrank(
    weight: torch.Tensor,
    nblocks: int,
    rank: int,
    cov: torch.Tensor | None = None,
    *,
    damping: float = DEFAULT_DAMPING,
    sweeps: int = 0,
    alternations: int = ALTERNATIONS,
    allow_structural_zeros: bool = False,
    output_order: str = BLOCKED,
) -> MonarchLowRank:
    """``M + U V`` with ``nblocks`` Monarch blocks and a rank-``rank`` term, in float64.

    Without ``cov``: the Frobenius-optimal Monarch projection, the best ``U V`` for its
    residual, then ``alternations`` rounds of re-projecting ``W - U V`` and re-fitting.
    With ``cov``: the whitened projection refined ``sweeps`` times on the full covariance (as
    :class:`~monarchify.pipeline.project.WhitenedProjector` does), the ``U V`` optimal in the
    same damped full-covariance metric, and alternations that continue the refinement from the
    current ``M`` (never the closed form again), so each round can only lower the objective.
    """
    w, layout = _prepare(weight, nblocks, allow_structural_zeros, output_order)
    check_rank(rank, layout.d_in, layout.d_out)
    factor = None if cov is None else covariance_factor(cov, layout.d_in, damping)

    def monarch(target: torch.Tensor, start: Projection | None) -> Projection:
        if cov is None:
            return project(target, nblocks, allow_structural_zeros=True, output_order=output_order)
        if start is None:
            first = project_whitened(target, cov, nblocks, damping=damping, allow_structural_zeros=True, output_order=output_order)
            if not sweeps:
                return first.projection
            start = first.projection
        return refine_full(target, cov, start, sweeps=max(sweeps, 1), damping=damping, measure=False).projection

    def objective(e: torch.Tensor) -> float:
        return float(e.square().sum()) if factor is None else float((e @ factor).square().sum())

    proj = monarch(w, None)
    low = fit_lowrank(w - _dense(proj), rank, factor)
    history = [objective(w - _dense(proj) - low.dense())]
    for _ in range(alternations):
        proj = monarch(w - low.dense(), proj)
        low = fit_lowrank(w - _dense(proj), rank, factor)
        history.append(objective(w - _dense(proj) - low.dense()))
    error = w - _dense(proj) - low.dense()
    return MonarchLowRank(
        proj, low, float(error.square().sum()), float(w.square().sum()), history[-1], objective(w), history
    )


def _dense(projection: Projection | WhitenedProjection) -> torch.Tensor:
    p = projection.projection if isinstance(projection, WhitenedProjection) else projection
    return assemble(p.L.to(F64), p.R.to(F64), p.layout)


# --- low rank on its own: the baseline structure ------------------------------------------


def matching_rank(d_in: int, d_out: int, nblocks: int) -> int:
    """The rank whose ``rank·(d_in + d_out)`` parameters come closest to ``nblocks`` Monarch
    blocks' weight parameters of a ``d_in -> d_out`` layer without exceeding them (at least 1,
    at most ``min(d_in, d_out)``): "``-b 4`` as low rank" never gets more parameters than
    Monarch, so a comparison cannot favour the baseline by more than one rank step."""
    monarch = MonarchLayout(d_in, d_out, nblocks).weight_params
    return max(1, min(min(d_in, d_out), monarch // (d_in + d_out)))


@dataclass
class LowRankProjection:
    """``W ≈ U V`` on its own (no Monarch part), with its errors."""

    lowrank: LowRank
    sq_error: float
    """``||W - U V||_F²``."""
    weight_sq_norm: float

    @property
    def rank(self) -> int:
        return self.lowrank.rank

    @property
    def rel_error(self) -> float:
        """``||W - U V||_F / ||W||_F`` (0 for an all-zero weight)."""
        return (max(self.sq_error, 0.0) / self.weight_sq_norm) ** 0.5 if self.weight_sq_norm > 0 else 0.0

    @property
    def objective(self) -> float:
        """The minimised error: ``sq_error`` when plain, ``tr((W - U V) C (W - U V)ᵀ)`` with the
        damped covariance when whitened; the sum of the discarded squared singular values."""
        return self.lowrank.sq_error

    @property
    def energy(self) -> float:
        """The objective of ``U V = 0``."""
        return self.lowrank.residual_sq


def truncated_svd(
    weight: torch.Tensor, rank: int, cov: torch.Tensor | None = None, *, damping: float = DEFAULT_DAMPING
) -> LowRankProjection:
    """The rank-``rank`` ``U V`` closest to ``weight``, in float64: the plain truncated SVD
    without ``cov``, the whitened one (SVD-LLM's) with the input covariance ``cov = XᵀX/N``.

    Why the whitened one is optimal for the output error: ``||(W - A) Xᵀ||²/N = tr((W - A) C
    (W - A)ᵀ) = ||(W - A) S||²`` with ``C = S Sᵀ`` (damped as the Monarch projection damps it,
    Cholesky factor). ``S`` is invertible, so ``A ↦ A S`` maps the rank-``r`` matrices onto
    themselves: minimising over ``A`` is minimising ``||W S - B||`` over rank-``r`` ``B``,
    which Eckart–Young solves with the top-``r`` triplets of ``W S``; ``A = B S⁻¹``. The error
    is the sum of the discarded squared singular values of ``W S``. (ASVD's diagonal scaling is
    the special case of a diagonal ``C``.) This is :func:`fit_lowrank` with nothing subtracted.
    """
    if weight.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    w = weight.detach().to(F64)
    if not torch.isfinite(w).all():
        raise NonFiniteWeightError("the weight contains NaN or Inf values")
    d_out, d_in = w.shape
    if check_rank(rank, d_in, d_out) < 1:
        raise ConfigError(f"a low-rank layer needs a rank of at least 1, got {rank}")
    factor = None if cov is None else covariance_factor(cov, d_in, damping)
    low = fit_lowrank(w, rank, factor)
    return LowRankProjection(low, float((w - low.dense()).square().sum()), float(w.square().sum()))
