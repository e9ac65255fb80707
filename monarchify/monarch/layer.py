"""``MonarchLinear``: a drop-in replacement for ``nn.Linear`` with a Monarch weight, and
``LowRankLinear``, the low-rank baseline it is compared against."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from monarchify.errors import ConfigError
from monarchify.monarch.kernels import arrange, decode_native, monarch_matmul
from monarchify.monarch.layout import BLOCKED, MonarchLayout
from monarchify.monarch.lowrank import check_rank
from monarchify.monarch.projection import assemble


class MonarchLinear(nn.Module):
    """``y = (M + U V) x + bias`` with ``M = P_out · blockdiag(L) · P_mid · blockdiag(R)``.

    Parameters ``R`` (``b, q, p``) and ``L`` (``b, s, q``) follow :class:`MonarchLayout`;
    ``output_order`` says whether ``P_out`` is the identity (``"blocked"``, the default: the
    fast one) or the paper's interleaving (``"interleaved"``, how older checkpoints are stored).
    Inputs whose width ``nblocks`` does not divide are zero-padded and padded outputs are
    dropped, so any ``in_features``/``out_features`` work.

    ``rank > 0`` adds a low-rank term ``U`` (``out × rank``) ``V`` (``rank × in``) for the
    directions Monarch cannot reach (:mod:`monarchify.monarch.lowrank`); with the default 0 the
    layer has no ``U``/``V`` at all, so its parameters and ``state_dict`` are exactly those of
    a plain Monarch layer.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        nblocks: int,
        bias: bool = True,
        *,
        allow_structural_zeros: bool = False,
        output_order: str = BLOCKED,
        rank: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.layout = MonarchLayout(in_features, out_features, nblocks, output_order)
        self.layout.check_structure(allow_structural_zeros)
        # Read on every call: the layout's properties recompute them (Python time a decoding
        # step pays once per layer).
        self._pad_in = self.layout.n_in - in_features
        self._pad_out = self.layout.n_out - out_features
        self._blocked = self.layout.blocked
        self.in_features = in_features
        self.out_features = out_features
        self.nblocks = nblocks
        self.rank = check_rank(rank, in_features, out_features)
        self._plain = not (self._pad_in or self._pad_out or self.rank)
        """Neither padded nor with a low-rank term: a decoding step may take the native kernel
        straight from ``forward``."""
        factory = {"device": device, "dtype": dtype}
        self.R = nn.Parameter(torch.empty(self.layout.r_shape, **factory))
        self.L = nn.Parameter(torch.empty(self.layout.l_shape, **factory))
        if rank:  # registered only when used: a rank-0 layer's state_dict is the plain one
            self.U = nn.Parameter(torch.empty(out_features, rank, **factory))
            self.V = nn.Parameter(torch.empty(rank, in_features, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.dense_class: type[nn.Module] | None = None
        """The class of the dense layer this one replaced, set by whoever swaps it in (None:
        unknown). Densifying puts that kind of layer back: GPT-2's ``Conv1D`` stores its weight
        as ``(in, out)``, and an ``nn.Linear`` in its place would save a folder its architecture
        loads transposed."""
        if self.R.device.type != "meta":
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """Random init for training from scratch, with ``nn.Linear``'s output variance.

        ``R`` keeps the variance of its input (Var = 1/p) and ``L`` scales it by 1/3 like
        ``nn.Linear``'s default init does (Var = 1/(3q)), so swapping a freshly built
        ``nn.Linear`` for a freshly built ``MonarchLinear`` leaves activation scales alone.
        """
        lay = self.layout
        nn.init.uniform_(self.R, -math.sqrt(3.0 / lay.p), math.sqrt(3.0 / lay.p))
        nn.init.uniform_(self.L, -1.0 / math.sqrt(lay.q), 1.0 / math.sqrt(lay.q))
        if self.rank:  # LoRA's start: U = 0, so a fresh layer computes what its Monarch part does
            nn.init.uniform_(self.V, -1.0 / math.sqrt(self.in_features), 1.0 / math.sqrt(self.in_features))
            nn.init.zeros_(self.U)
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ to_dense().T + bias`` over the last dimension of ``x``.

        The product itself is :func:`monarch_matmul`: a fused Triton kernel for CUDA tensors,
        strided BLAS calls with a hand-written backward elsewhere, and for CPU inference on a
        few tokens (decoding) a compiled C kernel or two products over factors pre-arranged
        once (see ``kernels/`` and :meth:`_arranged`). The low-rank term is two thin GEMMs
        added onto it.
        """
        if self._plain and not (self.training or torch.is_grad_enabled()):
            # Parameters read from _parameters: nn.Module's attribute lookup is Python time
            # that a decoding step pays once per factor per layer.
            params = self._parameters
            y = decode_native(x, params["R"], params["L"], params.get("bias"), self.out_features, self._blocked)
            if y is not None:
                return y
        lead = x.shape[:-1]
        x = x.reshape(-1, self.in_features)
        unpadded = x
        if self._pad_in:
            x = F.pad(x, (0, self._pad_in))
        bias = self.bias
        if bias is not None and self._pad_out:
            bias = F.pad(bias, (0, self._pad_out))
        if self.training:  # the weights are moving: no arranged copy is kept (or offered)
            self.__dict__.pop("_arranged_cache", None)
            arranged = None
        else:
            arranged = self._arranged
        y = monarch_matmul(x, self.R, self.L, bias, blocked=self._blocked, arranged=arranged)
        if self._pad_out:
            y = y[:, : self.out_features].contiguous()
        if self.rank:
            # In place: an out-of-place addmm's fresh (N, out) buffer cost more than both GEMMs
            # (CPU, 512 tokens, 384->1536, rank 16). In-place ops skip autocast: cast by hand.
            low = F.linear(unpadded, self.V)
            y = y.addmm_(low.to(y.dtype), self.U.t().to(y.dtype))
        return y.reshape(*lead, self.out_features)

    def _arranged(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``R`` and ``L`` transposed into contiguous copies for the small-batch path
        (:mod:`~monarchify.monarch.kernels.small`), made on first use and kept until the
        factors change, keyed like :attr:`weight`'s product.

        Kept rather than made per call because making them reads and writes every weight,
        which is what a decoding step's product costs in the first place. The price is
        memory: an evaluating model that takes this path (batched decoding, 5 to 8 rows, or
        any few rows where the native kernel cannot be built) holds its Monarch factors twice
        (still less than the dense layers at 4 blocks). Training mode drops the copies.
        """
        R, L = self.R, self.L
        key = (R._version, L._version, R.data_ptr(), L.data_ptr(), R.dtype, R.device)
        cached = self.__dict__.get("_arranged_cache")
        if cached is None or cached[0] != key:
            with torch.no_grad():
                cached = (key, arrange(R.detach(), L.detach()))
            self.__dict__["_arranged_cache"] = cached
        return cached[1]

    @property
    def output_order(self) -> str:
        """``"blocked"`` or ``"interleaved"``: the layout's, never stored twice."""
        return self.layout.output_order

    @torch.no_grad()
    def to_dense(self) -> torch.Tensor:
        """The ``(out_features, in_features)`` matrix this layer multiplies by.

        Built from the factors by :func:`~monarchify.monarch.projection.assemble`, not by
        pushing an identity through ``forward``, so it is an independent check of the kernels.
        """
        dense = assemble(self.L, self.R, self.layout)
        return dense + self.U @ self.V if self.rank else dense

    @property
    def weight(self) -> torch.Tensor:
        """A detached dense copy, for code that inspects ``.weight`` (dtype, device, shape,
        initialisers run by ``from_pretrained``). Training goes through ``L`` and ``R``.

        Some models read it on every forward pass (T5 checks ``wo.weight.dtype`` up to three
        times per layer), so the product is kept until ``L``, ``R`` (or ``U``, ``V``) change (their version
        counters, storage, dtype or device), and each read gets its own copy, so that writing
        into it cannot corrupt the next.
        """
        key = (self.L._version, self.R._version, self.L.data_ptr(), self.R.data_ptr(), self.L.dtype, self.L.device)
        if self.rank:
            key += (self.U._version, self.V._version, self.U.data_ptr(), self.V.data_ptr())
        cached = self.__dict__.get("_dense_cache")
        if cached is None or cached[0] != key:
            cached = (key, self.to_dense())
            self.__dict__["_dense_cache"] = cached
        return cached[1].clone()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"nblocks={self.nblocks}, bias={self.bias is not None}, output_order={self.output_order}"
            + (f", rank={self.rank}" if self.rank else "")
        )


class LowRankLinear(nn.Module):
    """``y = U (V x) + bias``: the low-rank structure on its own, the baseline Monarch is
    compared against (``MonarchConfig.structure = "lowrank"``, :mod:`monarchify.monarch.lowrank`).

    A separate module rather than a ``MonarchLinear`` with empty blocks: that would carry ``L``
    and ``R`` tensors and a Monarch kernel call that compute nothing, and its parameter count
    and ``state_dict`` would not be those of the structure being compared. ``U`` is
    ``out × rank``, ``V`` is ``rank × in``: ``rank·(in + out)`` parameters plus the bias.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if check_rank(rank, in_features, out_features) < 1:
            raise ConfigError(f"a low-rank layer needs a rank of at least 1, got {rank}")
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        factory = {"device": device, "dtype": dtype}
        self.U = nn.Parameter(torch.empty(out_features, rank, **factory))
        self.V = nn.Parameter(torch.empty(rank, in_features, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        if self.U.device.type != "meta":
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """Random init with ``nn.Linear``'s output variance, split like ``MonarchLinear``'s:
        ``V`` keeps its input's variance, ``U`` scales it by ``1/(3·rank)``."""
        nn.init.uniform_(self.V, -math.sqrt(3.0 / self.in_features), math.sqrt(3.0 / self.in_features))
        nn.init.uniform_(self.U, -1.0 / math.sqrt(self.rank), 1.0 / math.sqrt(self.rank))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.V), self.U, self.bias)

    @torch.no_grad()
    def to_dense(self) -> torch.Tensor:
        """The ``(out_features, in_features)`` matrix this layer multiplies by."""
        return self.U @ self.V

    @property
    def weight(self) -> torch.Tensor:
        """A detached dense copy, for code that inspects ``.weight`` (dtype, device, shape);
        see :attr:`MonarchLinear.weight` for why models read it."""
        return self.to_dense()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, bias={self.bias is not None}"


STRUCTURED_LAYERS = (MonarchLinear, LowRankLinear)
"""The modules a conversion puts in place of ``nn.Linear``: what saving, loading, densifying
and training look for."""
