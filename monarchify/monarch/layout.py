"""The shape bookkeeping of one Monarch matrix, shared by the layer and the projection.

For a map ``d_in -> d_out`` with ``b`` blocks (see ``docs/monarch.md``):

* both sides are zero-padded up to a multiple of ``b``: ``n_in = b·p``, ``n_out = b·s``;
* ``R`` has shape ``(b, q, p)`` with ``q = min(p, s)``; middle index ``f = k·q + j`` is row
  ``j`` of ``R`` block ``k``;
* the middle is permuted by reshape-transpose: index ``f`` feeds ``L`` block ``f mod b`` as
  its column ``f div b``;
* ``L`` has shape ``(b, s, q)``; row ``r`` of ``L`` block ``l`` is output ``o = l·s + r``
  (``output_order="blocked"``, the default) or ``o = r·b + l`` (``"interleaved"``, the
  paper's output permutation, which checkpoints written before format 2 use).

The two output orders are row permutations of each other, with the same parameters, FLOPs
and (on real weights) the same projection error (``docs/performance.md``); blocked outputs
are contiguous slices that BLAS writes in place, interleaved ones cost a strided copy.

Keeping these rules in one place is what lets the projection and the forward pass agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

from monarchify.errors import ConfigError

if TYPE_CHECKING:
    import torch

OUTPUT_ORDERS = ("blocked", "interleaved")
BLOCKED, INTERLEAVED = OUTPUT_ORDERS


@dataclass(frozen=True)
class MonarchLayout:
    d_in: int
    d_out: int
    nblocks: int
    output_order: str = BLOCKED

    def __post_init__(self) -> None:
        for name in ("d_in", "d_out", "nblocks"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.output_order not in OUTPUT_ORDERS:
            raise ConfigError(f"output_order must be one of {', '.join(OUTPUT_ORDERS)}, got {self.output_order!r}")

    # --- sizes -------------------------------------------------------------------------
    @property
    def p(self) -> int:
        """Input block size (after padding)."""
        return math.ceil(self.d_in / self.nblocks)

    @property
    def s(self) -> int:
        """Output block size (after padding)."""
        return math.ceil(self.d_out / self.nblocks)

    @property
    def q(self) -> int:
        """Middle width of one block; the middle is ``b·q = min(n_in, n_out)`` wide."""
        return min(self.p, self.s)

    @property
    def n_in(self) -> int:
        return self.nblocks * self.p

    @property
    def n_out(self) -> int:
        return self.nblocks * self.s

    @property
    def padded(self) -> bool:
        return self.n_in != self.d_in or self.n_out != self.d_out

    @property
    def r_shape(self) -> tuple[int, int, int]:
        return (self.nblocks, self.q, self.p)

    @property
    def l_shape(self) -> tuple[int, int, int]:
        return (self.nblocks, self.s, self.q)

    @property
    def weight_params(self) -> int:
        return self.nblocks * self.q * (self.p + self.s)

    # --- structure ---------------------------------------------------------------------
    @property
    def has_structural_zeros(self) -> bool:
        """True when some (output block, input block) pair gets no middle index at all.

        R block ``k`` owns ``q`` consecutive middle indices; they reach every ``L`` block
        only if they cover every residue mod ``b``, i.e. ``q >= b`` (``b² <= min(n_in, n_out)``).
        """
        return self.q < self.nblocks

    @cached_property
    def pair_ranks(self) -> list[list[int]]:
        """``t[l][k]``: how many middle indices join L block ``l`` and R block ``k``.

        That is the rank the Monarch matrix can give the sub-block (the rows of output block
        ``l``, the columns of input block ``k``).
        """
        b, q = self.nblocks, self.q
        ranks = [[0] * b for _ in range(b)]
        for f in range(b * q):
            ranks[f % b][f // q] += 1
        return ranks

    def pair_indices(self, l: int, k: int) -> tuple[list[int], list[int]]:
        """For pair ``(l, k)``: the columns of ``L[l]`` and the rows of ``R[k]`` it owns, in
        matching order."""
        b, q = self.nblocks, self.q
        middle = [f for f in range(k * q, (k + 1) * q) if f % b == l]
        return [f // b for f in middle], [f - k * q for f in middle]

    # --- output order ------------------------------------------------------------------
    @property
    def blocked(self) -> bool:
        return self.output_order == BLOCKED

    def output_rows(self, l: int) -> slice:
        """The (padded) outputs of ``L`` block ``l``, in row order ``r``."""
        return slice(l * self.s, (l + 1) * self.s) if self.blocked else slice(l, None, self.nblocks)

    def rows_by_block(self, padded: torch.Tensor) -> torch.Tensor:
        """``(n_out, ...)`` → ``(b, s, ...)`` indexed ``[l, r]``: row ``r`` of output block ``l``
        (a view whenever torch can make one)."""
        b, s = self.nblocks, self.s
        if self.blocked:
            return padded.reshape(b, s, *padded.shape[1:])
        return padded.reshape(s, b, *padded.shape[1:]).transpose(0, 1)

    def rows_from_blocks(self, grouped: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`rows_by_block`: ``(b, s, ...)`` → ``(n_out, ...)``."""
        if self.blocked:
            return grouped.reshape(self.n_out, *grouped.shape[2:])
        return grouped.transpose(0, 1).reshape(self.n_out, *grouped.shape[2:])

    def describe(self) -> str:
        text = f"{self.d_in}->{self.d_out}, {self.nblocks} blocks"
        if self.padded:
            text += f" (padded to {self.n_in}->{self.n_out})"
        return text

    def check_structure(self, allow_structural_zeros: bool = False) -> None:
        """Refuse a layout that forces exact zeros into the matrix, unless asked to allow it;
        more blocks than features on a side (blocks of nothing but padding) always."""
        if self.nblocks > min(self.d_in, self.d_out):
            raise ConfigError(
                f"{self.nblocks} blocks is more than a {self.d_in}->{self.d_out} layer has features on its "
                f"narrower side ({min(self.d_in, self.d_out)}); use fewer blocks"
            )
        if self.has_structural_zeros and not allow_structural_zeros:
            raise ConfigError(
                f"{self.nblocks} blocks is too many for a {self.d_in}->{self.d_out} layer: each block's "
                f"{self.q} middle features cannot reach all {self.nblocks} blocks (needs nblocks² ≲ "
                f"min(d_in, d_out) = {min(self.d_in, self.d_out)}), leaving structural zeros; "
                "use fewer blocks or allow structural zeros"
            )
