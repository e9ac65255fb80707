"""The Monarch product as strided BLAS calls: no copies but one, forward and backward.

The plain version (:mod:`.reference`) copies the middle twice and the output twice per
forward pass. Both permutations disappear if the middle is kept *feature-major*: store
``H = blockdiag(R) · xᵀ`` as a ``(b·q, N)`` row-major matrix (one ``bmm``, reading ``x``
through a transposed view). The rows ``L`` block ``l`` needs, middle indices
``f ≡ l (mod b)``, are then every ``b``-th row: a matrix with leading dimension ``b·N``,
which BLAS reads in place. The output order decides the rest (see :class:`MonarchLayout`):
blocked outputs (``o = l·s + r``) are column slices of ``y`` that the ``L`` product writes in
place, followed by one bias pass (``nn.Linear`` makes a bias pass too); interleaved ones
(``o = r·b + l``, the paper's) take a strided copy, done in the pass that adds the bias.

The backward pass has the same shape: every product reads or writes strided views
(``bmm(..., out=view)`` writes a view whose rows are ``b·N`` apart directly); only the
interleaved order needs one copy, to de-interleave the incoming gradient. The saved tensors
are ``x`` and ``H``.

Everything here is device-agnostic torch; it is the CPU path and the fallback elsewhere.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

_empty = torch.empty
"""Allocates every buffer this module writes into; tests swap in a NaN-filling one to prove
each element is written."""


def _forward(x: torch.Tensor, R: torch.Tensor, L: torch.Tensor, bias: torch.Tensor | None, blocked: bool):
    b, q, p = R.shape
    s = L.shape[1]
    n = x.shape[0]
    # H[k·q + j, n] = Σ_i R[k, j, i] x[n, k·p + i]: (b, q, p) @ (b, p, N), x read transposed.
    h = torch.bmm(R, x.view(n, b, p).permute(1, 2, 0))
    # L block l reads rows f = c·b + l of H: (b, N, q) views with leading dimension b·N.
    h_blocks = h.view(q, b, n).permute(1, 2, 0)
    if blocked:  # output block l is columns l·s ... l·s + s - 1: written in place
        y = _empty((n, b * s), dtype=h.dtype, device=h.device)
        torch.bmm(h_blocks, L.transpose(1, 2), out=y.view(n, b, s).transpose(0, 1))
        return (y if bias is None else y.add_(bias)), h
    y_blocks = torch.bmm(h_blocks, L.transpose(1, 2))  # (b, N, s)
    y = _empty((n, s, b), dtype=y_blocks.dtype, device=y_blocks.device)
    # Interleave o = r·b + l (adding the bias in the same pass), one output block at a time:
    # the inner loop then runs along r (contiguous reads), about twice as fast as one
    # permuted copy whose inner loop is the b-long l axis.
    for l in range(b):
        if bias is None:
            y[:, :, l].copy_(y_blocks[l])
        else:
            torch.add(y_blocks[l], bias[l::b], out=y[:, :, l])
    return y.view(n, b * s), h


def aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself, or a copy when its data is not 64-byte aligned.

    MKL picks alignment-dependent kernels for small token counts, so the same weights at
    another address (e.g. memory-mapped from a safetensors file) would round differently;
    a checkpoint reloaded from disk must give bit-identical outputs. Torch's own
    allocations are aligned, so the copy only happens for such borrowed memory.
    """
    return t if t.data_ptr() % 64 == 0 else t.clone()


class StridedMonarch(torch.autograd.Function):
    """``y = M x + bias`` for a 2-D ``x`` whose width is ``b·p`` (already padded)."""

    @staticmethod
    def forward(ctx, x, R, L, bias, blocked):  # noqa: D401 - autograd signature
        R, L = aligned(R), aligned(L)
        y, h = _forward(x, R, L, bias, blocked)
        ctx.save_for_backward(x, R, L, h)
        ctx.has_bias = bias is not None
        ctx.blocked = blocked
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, R, L, h = ctx.saved_tensors
        b, q, p = R.shape
        s = L.shape[1]
        n = x.shape[0]
        need_x, need_r, need_l, need_bias, _ = ctx.needs_input_grad
        g = _output_blocks(grad_y.contiguous(), b, s, ctx.blocked)  # g[l, n, r]
        grad_x = grad_r = grad_l = grad_bias = None
        if need_l:
            # dL[l] = g[l]ᵀ · H_lᵀ, H_l = rows l::b of H.
            grad_l = torch.bmm(g.transpose(1, 2), h.view(q, b, n).permute(1, 2, 0))
        if need_x or need_r:
            # dH rows l::b = L[l]ᵀ · g[l]ᵀ, written in place into the feature-major layout.
            grad_h = _empty((b * q, n), dtype=g.dtype, device=g.device)
            torch.bmm(L.transpose(1, 2), g.transpose(1, 2), out=grad_h.view(q, b, n).permute(1, 0, 2))
            grad_h = grad_h.view(b, q, n)
            if need_r:
                grad_r = torch.bmm(grad_h, x.view(n, b, p).transpose(0, 1))
            if need_x:
                grad_x = _empty((n, b * p), dtype=g.dtype, device=g.device)
                torch.bmm(grad_h.transpose(1, 2), R, out=grad_x.view(n, b, p).transpose(0, 1))
        if need_bias and ctx.has_bias:
            grad_bias = grad_y.sum(0)
        return grad_x, grad_r, grad_l, grad_bias, None


def _output_blocks(grad_y: torch.Tensor, b: int, s: int, blocked: bool) -> torch.Tensor:
    """``g[l, n, r]``: the gradient of output ``r`` of block ``l``, ``(b, N, s)``.

    Blocked: a view whose rows are ``b·s`` apart, which BLAS reads in place. Interleaved:
    one copy, block by block (as in the forward pass).
    """
    n = grad_y.shape[0]
    if blocked:
        return grad_y.view(n, b, s).transpose(0, 1)
    g = _empty((b, n, s), dtype=grad_y.dtype, device=grad_y.device)
    interleaved = grad_y.view(n, s, b)
    for l in range(b):
        g[l].copy_(interleaved[:, :, l])
    return g


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd will want gradients through a product of these tensors."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def monarch_strided(
    x: torch.Tensor, R: torch.Tensor, L: torch.Tensor, bias: torch.Tensor | None = None, *, blocked: bool = True
) -> torch.Tensor:
    """``M x + bias`` for ``x`` of shape ``(N, b·p)``; ``bias`` has ``b·s`` entries or is None.
    ``blocked``: the output order (see :class:`~monarchify.monarch.layout.MonarchLayout`).

    Without autograd the forward pass runs bare: the ``Function`` machinery (a context,
    saved tensors) costs more than a one-token product's arithmetic."""
    x = x.contiguous()
    if not needs_grad(x, R, L, bias):
        return _forward(x, aligned(R), aligned(L), bias, blocked)[0]
    return StridedMonarch.apply(x, R, L, bias, blocked)
