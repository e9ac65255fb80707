"""The Frobenius-optimal Monarch approximation of a dense weight, in closed form.

Each of the ``b²`` sub-blocks ``W[rows of output block l, k·p:(k+1)·p]`` is independently the product of the
``L``-columns and ``R``-rows its pair owns (see :class:`MonarchLayout`), so the best Monarch
matrix is a rank-``t(l,k)`` truncated SVD of every sub-block (Eckart–Young): a global optimum
of a non-convex problem, and its squared error is exactly the sum of the discarded squared
singular values, which is why the error report costs nothing.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

from monarchify.errors import NonFiniteWeightError
from monarchify.monarch.layout import BLOCKED, MonarchLayout
from monarchify.monarch.threads import torch_threads


@dataclass
class Projection:
    """Factors of the optimal Monarch approximation and its exact error."""

    layout: MonarchLayout
    L: torch.Tensor
    R: torch.Tensor
    sq_error: float
    """``||W - M||_F²``: the sum of the discarded squared singular values."""
    weight_sq_norm: float
    """``||W||_F²``, for the relative error."""

    @property
    def rel_error(self) -> float:
        """``||W - M||_F / ||W||_F`` (0 for an all-zero weight)."""
        if self.weight_sq_norm == 0.0:
            return 0.0
        return (max(self.sq_error, 0.0) / self.weight_sq_norm) ** 0.5


def sub_blocks(weight: torch.Tensor, layout: MonarchLayout) -> torch.Tensor:
    """Zero-pad ``weight`` (``d_out × d_in``) and cut it into the ``(b, b, s, p)`` stack of
    sub-blocks indexed ``[l, k]``: the rows of output block ``l`` (in the layout's output
    order), the columns of input block ``k``.

    Zero padding keeps the projection optimal for the real part: padded rows and columns of a
    block carry no energy, so the truncated SVD of the padded block restricted to the real
    rows/columns is still the best the structure allows.
    """
    padded = F.pad(weight, (0, layout.n_in - layout.d_in, 0, layout.n_out - layout.d_out))
    return _grouped(padded, layout)


def _grouped(padded: torch.Tensor, layout: MonarchLayout) -> torch.Tensor:
    b, p, s = layout.nblocks, layout.p, layout.s
    return layout.rows_by_block(padded).reshape(b, s, b, p).permute(0, 2, 1, 3)


def project(
    weight: torch.Tensor,
    nblocks: int,
    *,
    compute_dtype: torch.dtype = torch.float64,
    allow_structural_zeros: bool = False,
    output_order: str = BLOCKED,
) -> Projection:
    """Project a dense ``(d_out, d_in)`` weight onto Monarch matrices with ``nblocks`` blocks.

    The factors and the error come back in ``compute_dtype`` (float64 by default, whatever
    the weight's dtype) for the caller to cast; :func:`truncated_svd` says how the top
    singular triplets are found and why that stays optimal and exact.
    """
    if weight.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    d_out, d_in = weight.shape
    layout = MonarchLayout(d_in, d_out, nblocks, output_order)
    layout.check_structure(allow_structural_zeros)
    w = weight.detach()
    if w.dtype not in (torch.float32, torch.float64):  # 16-bit weights are exact in float32
        w = w.float()
    # A sum is finite iff every entry is, unless it overflows: then check entry by entry.
    if not bool(torch.isfinite(w.sum())) and not bool(torch.isfinite(w).all()):
        raise NonFiniteWeightError("the weight contains NaN or Inf values")

    b = layout.nblocks
    ranks = torch.tensor(layout.pair_ranks, device=w.device)
    blocks = _blocks(w, layout)
    u, sigma, vh, sq_err = truncated_svd(blocks, ranks, solver_dtype=solver_dtype_for(weight.dtype), dtype=compute_dtype)
    root = sigma.sqrt()
    # (converting first is twice as fast as vector_norm's own dtype= on the CPU)
    weight_sq_norm = float(torch.linalg.vector_norm(w.double())) ** 2

    factory = {"dtype": compute_dtype, "device": w.device}
    if layout.q % b == 0:  # every pair owns t = q/b middle indices: write all at once
        # L[l, :, k·t + c] and R[k, c·b + l, :] (see MonarchLayout.pair_indices)
        L = (u * root.unsqueeze(-2)).permute(0, 2, 1, 3).reshape(layout.l_shape)
        R = (root.unsqueeze(-1) * vh).permute(1, 2, 0, 3).reshape(layout.r_shape)
    else:
        L, R = torch.zeros(layout.l_shape, **factory), torch.zeros(layout.r_shape, **factory)
        for l in range(b):
            for k in range(b):
                write_pair(L, R, layout, l, k, u[l, k], root[l, k], vh[l, k])
    return Projection(layout, L.contiguous(), R.contiguous(), float(sq_err.sum()), weight_sq_norm)


def write_pair(
    L: torch.Tensor, R: torch.Tensor, layout: MonarchLayout, l: int, k: int,
    u: torch.Tensor, root: torch.Tensor, vh: torch.Tensor,
) -> None:
    """Give sub-block ``(l, k)`` its top ``t(l, k)`` singular triplets: ``u·√σ`` into the
    columns of ``L[l]`` and ``√σ·vh`` into the rows of ``R[k]`` that the pair owns
    (:meth:`MonarchLayout.pair_indices`). ``u`` is ``(s, ≥t)``, ``root`` the ``√σ`` and ``vh``
    ``(≥t, p)``; a pair of rank 0 gets nothing.

    Every projection (plain, whitened, refined) writes its factors through here, so the
    layout rule lives in one place.
    """
    t = layout.pair_ranks[l][k]
    if t:
        cols, rows = layout.pair_indices(l, k)
        L[l][:, cols] = u[:, :t] * root[:t]
        R[k][rows, :] = root[:t, None] * vh[:t, :]


def assemble(L: torch.Tensor, R: torch.Tensor, layout: MonarchLayout) -> torch.Tensor:
    """The dense ``(d_out, d_in)`` matrix of factors ``L``, ``R``.

    Written as ``L_full @ blockdiag(R)`` (one block column at a time) with ``L_full[o(l, r), c·b + l] = L[l, r, c]`` (the
    middle permutation folded into where ``L`` lands, ``o(l, r)`` the layout's output
    order): independent of the layer's forward pass (strided or fused kernels), so each
    checks the other. Differentiable.
    """
    b = layout.nblocks
    eye = torch.eye(b, dtype=L.dtype, device=L.device)
    grouped = torch.einsum("lrc,lm->lrcm", L, eye).reshape(b, layout.s, b * layout.q)
    # L_full's column block k meets only R[k]: b products of (n_out, q) by (q, p), not one
    # product with the mostly-zero blockdiag(R), which would cost b times the work.
    full = layout.rows_from_blocks(grouped).reshape(-1, b, layout.q)
    dense = torch.einsum("okc,kci->oki", full, R).reshape(full.shape[0], b * layout.p)
    return dense[: layout.d_out, : layout.d_in]


def _blocks(weight: torch.Tensor, layout: MonarchLayout) -> torch.Tensor:
    """:func:`sub_blocks` as a view when nothing needs padding (no copy of the weight)."""
    return sub_blocks(weight, layout) if layout.padded else _grouped(weight, layout)


# --- the top singular triplets of many blocks at once -----------------------------------

SVD_BELOW = 64
"""Blocks whose smaller side is under this go straight to ``torch.linalg.svd``: at that size
it is as fast as anything and exact."""
NEARLY_EXACT = 1e-6
"""A block whose discarded energy is below this fraction of its own is recomputed with a full
SVD: the Gram route cannot resolve an error that small (``docs/performance.md``)."""


def solver_dtype_for(weight_dtype: torch.dtype) -> torch.dtype:
    """Precision of the eigensolver: float32 for weights stored in 32 bits or fewer, float64
    for float64 weights.

    Eigenvectors from a float32 Gram matrix cost the optimal error a relative ~1e-10 on
    real and random weights (measured in ``benchmarks/projection_speed.py``), far below
    the 1e-6 the project asks for and below what storing the factors in float32 costs
    anyway; everything after the eigensolver runs in float64.
    """
    return torch.float64 if weight_dtype == torch.float64 else torch.float32


def truncated_svd(
    blocks: torch.Tensor,
    ranks: torch.Tensor,
    *,
    solver_dtype: torch.dtype = torch.float64,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top ``t = ranks.max()`` singular triplets of every ``(s, p)`` matrix in ``blocks``.

    Returns ``u (..., s, t)``, ``sigma (..., t)`` (descending), ``vh (..., t, p)`` and
    ``sq_error (...)``: ``||A - A_r||_F²`` where ``A_r`` keeps the first ``ranks`` triplets
    (``ranks`` broadcasts against the batch dimensions). Everything after the
    eigensolver, and the results, are in ``dtype`` (default: the blocks' dtype).

    Route (measured against ``torch.linalg.svd`` in ``docs/performance.md``): eigenvectors
    ``V`` of the smaller Gram matrix ``AᵀA`` (eigendecomposition in ``solver_dtype``), then
    in ``dtype`` ``V`` is re-orthonormalised, ``Y = A V`` gives ``sigma = ||Y e_i||`` and
    ``u = Y / sigma``. Since ``A_r = A V Vᵀ`` exactly for orthonormal ``V``, the error
    ``||A||² - Σ sigma²`` is exact for the factors returned, whatever the eigensolver's
    precision, and is optimal when ``V`` spans the top singular subspace. Blocks with an
    error too small for that subtraction to resolve fall back to a full SVD.
    """
    dtype = dtype or blocks.dtype
    t = int(ranks.max()) if ranks.numel() else 0
    s, p = blocks.shape[-2:]
    n = min(s, p)
    if n < SVD_BELOW or t == 0:
        return _svd_route(blocks.to(dtype), ranks, t)
    batch = blocks.shape[:-2]
    transpose = p > s
    a = blocks.reshape(-1, s, p)
    a = a.mT if transpose else a  # (K, m, n) with n <= m
    # eigh sorts ascending: the last t columns, reversed, are the top singular directions
    # in descending order (to the solver's precision; near-ties may swap, which moves the
    # error by their tiny difference, and the error reported stays exact).
    v = _top_eigenvectors(_gram(a, solver_dtype), t).flip(-1)
    a = a.to(dtype)
    v = _orthonormalise(v.to(dtype))
    y = a @ v  # (K, m, t)
    sigma = torch.linalg.vector_norm(y, dim=-2)
    inverse = torch.where(sigma > 0, 1 / sigma, torch.zeros_like(sigma))
    left = y.mul_(inverse.unsqueeze(-2))  # zero columns (sigma = 0) stay zero
    if transpose:  # A = aᵀ: its left vectors are v, its right vectors are `left`
        u, vh = v, left.mT
    else:
        u, vh = left, v.mT
    u = u.reshape(*batch, s, t)
    vh = vh.reshape(*batch, t, p)
    sigma = sigma.reshape(*batch, t)
    total = torch.linalg.vector_norm(a, dim=(-2, -1)).square().reshape(batch)
    sq_error = (total - _kept_energy(sigma, ranks)).clamp_min(0)

    redo = (sq_error <= NEARLY_EXACT * total) & (total > 0)
    if bool(redo.any()):
        ru, rs, rv, re = _svd_route(blocks.to(dtype)[redo], ranks.expand(batch)[redo], t)
        u[redo], sigma[redo], vh[redo], sq_error[redo] = ru, rs, rv, re
    return u, sigma, vh, sq_error


def _kept_energy(sigma: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """``Σ_{i < rank} sigma_i²`` per block."""
    keep = torch.arange(sigma.shape[-1], device=sigma.device) < ranks.unsqueeze(-1)
    return (sigma.square() * keep).sum(-1)


def _svd_route(blocks: torch.Tensor, ranks: torch.Tensor, t: int):
    u, sigma, vh = torch.linalg.svd(blocks, full_matrices=False)
    discard = torch.arange(sigma.shape[-1], device=sigma.device) >= ranks.unsqueeze(-1)
    sq_error = (sigma.square() * discard).sum(-1)
    return u[..., :t], sigma[..., :t], vh[..., :t, :], sq_error


def _gram(a: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    a = a.to(dtype)
    return a.mT @ a


def _orthonormalise(v: torch.Tensor) -> torch.Tensor:
    """Make nearly orthonormal columns orthonormal to ``v``'s precision.

    Eigenvectors from a float32 solver are orthonormal to ``ε ≈ 1e-6``; one Newton–Schulz
    step ``V (3I - VᵀV) / 2`` brings that to ``O(ε²)`` with two small batched products
    (cheaper than a Cholesky QR's LAPACK calls), enough for ``||A||² - ||AV||²`` to be the
    exact error to ~1e-12 relative. Far from orthonormal (cannot happen for eigh output):
    a QR.
    """
    gram = v.mT @ v
    eye = torch.eye(gram.shape[-1], dtype=v.dtype, device=v.device)
    if float((gram - eye).abs().amax()) > 1e-3:
        return torch.linalg.qr(v).Q
    return v @ (1.5 * eye - 0.5 * gram)


def _top_eigenvectors(gram: torch.Tensor, t: int) -> torch.Tensor:
    """Eigenvectors of the ``t`` largest eigenvalues of each symmetric matrix, ``(K, n, t)``.

    On the CPU the batch is split across threads, each running LAPACK single-threaded:
    LAPACK gains little from threads at n ≈ 200, and letting torch's threaded batch loop
    call a threaded LAPACK oversubscribes the cores (measured 10× slower on 2 cores). The
    threads are kept between calls: a conversion projects layer after layer, and starting
    a pool per layer was measurable (with a faster weight norm: 5.23 → 4.75 s for the
    nblocks-2 benchmark of docs/performance.md).
    """
    workers = min(torch.get_num_threads(), gram.shape[0])
    if gram.is_cuda or workers == 1:
        return torch.linalg.eigh(gram)[1][..., -t:]
    chunks = gram.tensor_split(workers)
    with torch_threads(1):
        parts = list(_eigh_pool(workers).map(lambda g: torch.linalg.eigh(g)[1][..., -t:], chunks))
    return torch.cat(parts)


@lru_cache(maxsize=1)
def _eigh_pool(workers: int) -> ThreadPoolExecutor:
    """One long-lived pool per thread count (idle threads cost nothing)."""
    return ThreadPoolExecutor(workers, thread_name_prefix="monarchify-eigh")
