"""The Monarch product for a few tokens at a time (decoding), inference only.

At one to a few tokens a layer is a matrix-vector product: the time is reading the weights
plus a fixed cost per dispatched op, and two things make the strided path slow there
(``docs/performance.md``). MKL's small-``N`` products read a ``(rows, cols)`` row-major
weight at about half speed when it is the transposed operand (``x · Wᵀ``, how ``R`` and
``L`` are stored): an ``(N, in) @ (in, out)`` product over a contiguous ``(in, out)`` matrix
runs at memory speed. And the strided path's autograd ``Function`` and output buffer are
overhead a decoding step pays 200 times.

So here the factors come pre-arranged as ``Rt = Rᵀ`` (``b, p, q``) and ``Lt = Lᵀ``
(``b, q, s``), contiguous, made once per weight version by the caller
(:meth:`MonarchLinear <monarchify.monarch.layer.MonarchLinear>` keeps them); the product is
two batched products and one copy of the (small) middle, with the bias fused into the
second product. Only the output copy remains for more than one token (for one, it is a
view). The formulation is plain differentiable torch, but the pre-arranged factors are
detached copies: callers use it without autograd (see :func:`~monarchify.monarch.kernels.monarch_matmul`).
"""

from __future__ import annotations

import torch


def arrange(R: torch.Tensor, L: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Rt, Lt)``: the factors transposed into contiguous ``(b, p, q)`` and ``(b, q, s)``."""
    return R.transpose(1, 2).contiguous(), L.transpose(1, 2).contiguous()


def monarch_small(
    x: torch.Tensor, Rt: torch.Tensor, Lt: torch.Tensor, bias: torch.Tensor | None = None, *, blocked: bool = True
) -> torch.Tensor:
    """``M x + bias`` for ``x`` of shape ``(N, b·p)`` from the arranged factors (:func:`arrange`);
    returns ``(N, b·s)`` in the blocked or interleaved output order."""
    b, p, q = Rt.shape
    s = Lt.shape[2]
    n = x.shape[0]
    h = torch.bmm(x.reshape(n, b, p).transpose(0, 1), Rt)  # (b, N, q): middle f = k·q + j at [k, n, j]
    # Middle f feeds L block f mod b as its column f div b: (b, N, q) indexed [l, n, c].
    h = h.transpose(0, 1).reshape(n, q, b).permute(2, 0, 1).contiguous()
    if bias is None:
        y = torch.bmm(h, Lt)
    else:  # output r of block l is o = l·s + r (blocked) or r·b + l (interleaved)
        by_block = bias.view(b, 1, s) if blocked else bias.view(s, 1, b).permute(2, 1, 0)
        y = torch.baddbmm(by_block, h, Lt)  # (b, N, s)
    return (y.transpose(0, 1) if blocked else y.permute(1, 2, 0)).reshape(n, b * s)
