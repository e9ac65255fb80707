"""The Frobenius-optimal Monarch approximation of a dense weight, in closed form.

Each of the ``b²`` sub-blocks ``W[l::b, k·p:(k+1)·p]`` is independently the product of the
``L``-columns and ``R``-rows its pair owns (see :class:`MonarchLayout`), so the best Monarch
matrix is a rank-``t(l,k)`` truncated SVD of every sub-block (Eckart–Young): a global optimum
of a non-convex problem, and its squared error is exactly the sum of the discarded squared
singular values, which is why the error report costs nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from monarchify.errors import NonFiniteWeightError
from monarchify.monarch.layout import MonarchLayout


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
    sub-blocks indexed ``[l, k]``: rows ``o ≡ l (mod b)``, columns of input block ``k``.

    Zero padding keeps the projection optimal for the real part: padded rows and columns of a
    block carry no energy, so the truncated SVD of the padded block restricted to the real
    rows/columns is still the best the structure allows.
    """
    b, p, s = layout.nblocks, layout.p, layout.s
    padded = F.pad(weight, (0, layout.n_in - layout.d_in, 0, layout.n_out - layout.d_out))
    return padded.reshape(s, b, b, p).permute(1, 2, 0, 3)


def project(
    weight: torch.Tensor,
    nblocks: int,
    *,
    compute_dtype: torch.dtype = torch.float64,
    allow_structural_zeros: bool = False,
) -> Projection:
    """Project a dense ``(d_out, d_in)`` weight onto Monarch matrices with ``nblocks`` blocks.

    The SVDs run in ``compute_dtype`` (float64 by default, whatever the weight's dtype); the
    factors come back in ``compute_dtype`` for the caller to cast.
    """
    if weight.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    d_out, d_in = weight.shape
    layout = MonarchLayout(d_in, d_out, nblocks)
    layout.check_structure(allow_structural_zeros)
    w = weight.detach().to(compute_dtype)
    if not torch.isfinite(w).all():
        raise NonFiniteWeightError("the weight contains NaN or Inf values")

    blocks = sub_blocks(w, layout)
    u, sigma, vh = torch.linalg.svd(blocks, full_matrices=False)
    root = sigma.sqrt()

    b = layout.nblocks
    L = w.new_zeros(layout.l_shape)
    R = w.new_zeros(layout.r_shape)
    sq_error = 0.0
    for l in range(b):
        for k in range(b):
            t = layout.pair_ranks[l][k]
            cols, rows = layout.pair_indices(l, k)
            if t:
                L[l][:, cols] = u[l, k, :, :t] * root[l, k, :t]
                R[k][rows, :] = root[l, k, :t, None] * vh[l, k, :t, :]
            sq_error += float(sigma[l, k, t:].square().sum())
    return Projection(layout, L, R, sq_error, float(w.square().sum()))
