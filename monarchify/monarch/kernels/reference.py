"""The plain Monarch product: two ``torch.bmm`` calls and the transposes between them.

This is the layer's original forward pass, kept as the yardstick the fast paths are tested
and timed against (``monarchify bench`` reports it as ``reference``). Autograd
differentiates it like any other torch code, on any device and dtype.
"""

from __future__ import annotations

import torch


def monarch_reference(x: torch.Tensor, R: torch.Tensor, L: torch.Tensor, *, blocked: bool = True) -> torch.Tensor:
    """``y = P_out · blockdiag(L) · P_mid · blockdiag(R) · x`` for ``x`` of shape ``(N, b·p)``.

    ``R`` is ``(b, q, p)`` and ``L`` is ``(b, s, q)``; the result is ``(N, b·s)`` (padding,
    if any, is the caller's business). ``P_out`` is the identity for the blocked output
    order and the paper's interleaving otherwise.
    """
    b, q, p = R.shape
    s = L.shape[1]
    n = x.shape[0]
    # (b, N, p) @ (b, p, q) -> (b, N, q): every input block through its R block.
    h = torch.bmm(x.reshape(n, b, p).transpose(0, 1), R.transpose(1, 2))
    # Middle index f = k*q + j goes to L block f mod b as column f div b.
    h = h.transpose(0, 1).reshape(n, q, b).permute(2, 0, 1)
    # (b, N, q) @ (b, q, s) -> (b, N, s); output o = l*s + r (blocked) or r*b + l.
    y = torch.bmm(h, L.transpose(1, 2))
    return (y.transpose(0, 1) if blocked else y.permute(1, 2, 0)).reshape(n, b * s)
