"""The budget's prices: every option a layer may take, its parameters and its error.

A layer's options (:func:`price_layer`) are

* Monarch with ``nblocks`` in :data:`CANDIDATES` (those without structural zeros), and
* keeping the layer dense (error 0, full price), and
* with ``budget_ranks``, Monarch plus a rank-``k`` term for every such ``nblocks`` and ``k``
  (Monarch plus low rank, :mod:`monarchify.monarch.lowrank`), priced ``k·(d_in + d_out)`` more.

A price counts weights and biases, the same count the report shows. Keeping dense is a
candidate on purpose: when a few layers are much harder to approximate than the rest, paying
full price for them and compressing the others harder gives a lower total error, and the
solver should be free to find that. (For a square layer ``nblocks=2`` costs exactly as much as
dense, so dense always wins there.) ``budget_keep_dense=False`` leaves that option out.

The error of an option is the layer's *relative squared* error: ``||W - M||²/||W||²``, or
with calibration ``tr((W - M) C (W - M)ᵀ) / tr(W C Wᵀ)`` (block-diagonal surrogate, see
:mod:`monarchify.monarch.whitening`). Both come for free from the singular values of each
candidate's sub-blocks. A low-rank option's error is that of the same Monarch matrix plus the
best rank-``k`` correction of its residual in the same metric: the residual, whitened, is what
the sub-block SVDs discarded, and its own singular values give every ``k`` at once. (The
projector then does a little better: it alternates and uses the full covariance.) Relative
errors make layers comparable: their output scales differ by orders of magnitude.

With ``structure="lowrank"`` the options are ranks instead (:func:`lowrank_choices`): the
low-rank layer ``U V`` at each rank of a grid (by default the ranks matching each candidate
block count, :func:`~monarchify.monarch.lowrank.matching_rank`; or ``budget_ranks``), priced
``rank·(d_in + d_out)``, and keeping it dense. Their errors come from one SVD per layer: the
truncated SVD's relative squared error is the share of the squared singular values it drops,
of ``W``, or with calibration of ``W S`` (``C = S Sᵀ``, the damped full covariance, which the
low-rank fit uses whole).

Torch and :mod:`monarchify.monarch` only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from monarchify.config import MonarchConfig
from monarchify.errors import ConfigError
from monarchify.monarch.layout import BLOCKED, INTERLEAVED, MonarchLayout
from monarchify.monarch.lowrank import (
    ALTERNATIONS, check_rank, covariance_factor, fit_lowrank, lowrank_params, matching_rank,
)
from monarchify.monarch.projection import assemble, project, sub_blocks
from monarchify.monarch.whitening import (
    DEFAULT_DAMPING, batched_svd, cholesky_blocks, diagonal_blocks, padded_covariance, project_whitened, whitened_sub_blocks,
)
from monarchify.pipeline.plan import PlannedLayer, name_matches

CANDIDATES = (2, 3, 4, 6, 8, 12, 16)
PRICING_ORDER = INTERLEAVED
"""The output order the budget prices every layer in, whatever order the layers are built in.

Why one fixed order: the two orders give the same error in distribution but not layer by
layer, and the knapsack turns those small differences into other choices on near-ties. On
the fine-tuned MiniLM MRPC model, pricing in the blocked order chose other block counts for
five layers and its students ended 2.3 points lower, while blocked layers built with the
interleaved pricing's choices trained as well as interleaved ones (``docs/results.md``). With
one pricing order, ``output_order`` is a pure speed switch: same plan, same accuracy. The
interleaved order keeps every budget measured before blocked layers existed unchanged."""
DENSE = None
"""The ``nblocks`` of the keep-dense option."""


@dataclass(frozen=True)
class Option:
    nblocks: int | None
    """``None``: keep the layer dense."""
    params: int
    error: float
    rank: int = 0
    """Rank of the low-rank term added to the Monarch matrix (0: none)."""


@dataclass
class LayerChoices:
    name: str
    options: list[Option]
    params_dense: int


def candidate_nblocks(
    d_in: int, d_out: int, candidates: Sequence[int] = CANDIDATES, allow_structural_zeros: bool = False
) -> list[int]:
    """The candidates a ``d_in -> d_out`` layer accepts (no structural zeros unless allowed)."""
    return [b for b in candidates if allow_structural_zeros or not MonarchLayout(d_in, d_out, b).has_structural_zeros]


def candidate_errors(
    weight: torch.Tensor,
    nblocks: Sequence[int],
    cov: torch.Tensor | None = None,
    *,
    damping: float = DEFAULT_DAMPING,
    output_order: str = BLOCKED,
    row_weights: torch.Tensor | None = None,
) -> dict[int, float]:
    """Relative squared error of the optimal projection for every ``nblocks``, from singular
    values only: Frobenius without ``cov``, the whitened surrogate with it (relative to
    ``tr(W C_bd Wᵀ)`` with the same damped block-diagonal covariance).

    With ``row_weights`` (``s``, one per output): the *absolute* error of that same projection
    with output ``j``'s squared error counted ``s_j`` times, ``Σ_j s_j ((W - M) C_bd (W - M)ᵀ)_jj``
    (the Fisher-weighted error of :func:`monarchify.pipeline.observe.output_fisher`). A row of a
    sub-block's discarded part ``U Σ Vᵀ`` has squared norm ``Σ_i U_ri² σ_i²`` over the discarded
    ``i``, so the left singular vectors give it without forming the residual."""
    w = weight.detach().to(torch.float64)
    errors = {}
    for b in nblocks:
        layout = MonarchLayout(w.shape[1], w.shape[0], b, output_order)
        blocks = sub_blocks(w, layout) if cov is None else whitened_sub_blocks(w, cov, layout, damping)[0]
        if row_weights is None:
            sigma2 = batched_svd(blocks, values_only=True).square()
        else:
            u, sigma, _ = batched_svd(blocks)
            sigma2 = sigma.square()
        keep = torch.tensor(layout.pair_ranks, device=sigma2.device)
        discarded = torch.where(torch.arange(sigma2.shape[-1], device=sigma2.device) >= keep[..., None], sigma2, 0.0)
        if row_weights is not None:
            rows = (u.square() * discarded.unsqueeze(-2)).sum(dim=(1, 3))  # (l, s): summed over input blocks k
            per_output = layout.rows_from_blocks(rows)[: layout.d_out]
            errors[b] = float((per_output * row_weights.to(per_output)).sum())
            continue
        total = float(sigma2.sum())
        errors[b] = float(discarded.sum()) / total if total > 0 else 0.0
    return errors


def candidate_lowrank_errors(
    weight: torch.Tensor,
    nblocks: Sequence[int],
    ranks: Sequence[int],
    cov: torch.Tensor | None = None,
    *,
    damping: float = DEFAULT_DAMPING,
    output_order: str = BLOCKED,
    alternations: int = ALTERNATIONS,
) -> dict[tuple[int, int], float]:
    """``{(nblocks, rank): error}``: the relative squared error of Monarch plus a rank-``rank``
    term, in the metric of :func:`candidate_errors`, after ``alternations`` rounds as the
    projector does them.

    The first fit needs no unwhitening: whitened, sub-block ``(l, k)`` of the residual
    ``(W - M)·blockdiag(S)`` is exactly the part of ``W_lk S_k``'s SVD the projection discarded,
    so the residual is reassembled from those triplets and its singular values price every rank.
    Pricing that first fit alone was measured to mislead: on MiniLM it priced 6 blocks + rank 32
    above 4 blocks (equal parameters) on all 36 layers, while the projector's result was below
    on all 36. Each alternation (re-project ``W - U V`` with the closed form, re-fit ``U V``) is
    exact in this same metric, so the price only falls, and without calibration it is exactly
    the error the projector reaches.
    """
    w = weight.detach().to(torch.float64)
    errors = {}
    for b in nblocks:
        layout = MonarchLayout(w.shape[1], w.shape[0], b, output_order)
        blocks = sub_blocks(w, layout) if cov is None else whitened_sub_blocks(w, cov, layout, damping)[0]
        if alternations:  # the closed-form first fit below would only be overwritten
            total = float(batched_svd(blocks)[1].square().sum())  # the same normaliser as below, bit for bit
            for rank in ranks:
                errors[(b, rank)] = _alternated(w, layout, rank, cov, damping, alternations) / total if total > 0 else 0.0
            continue
        u, sigma, vh = batched_svd(blocks)
        keep = torch.tensor(layout.pair_ranks, device=sigma.device)
        discarded = torch.where(torch.arange(sigma.shape[-1], device=sigma.device) >= keep[..., None], sigma, 0.0)
        residual = (u * discarded.unsqueeze(-2)) @ vh  # (l, k, s, p)
        full = layout.rows_from_blocks(residual.permute(0, 2, 1, 3).reshape(b, layout.s, layout.n_in))
        left = batched_svd(full, values_only=True).square()
        total = float(sigma.square().sum())
        for rank in ranks:
            errors[(b, rank)] = float(left[rank:].sum()) / total if total > 0 else 0.0
    return errors


def _alternated(
    w: torch.Tensor, layout: MonarchLayout, rank: int, cov: torch.Tensor | None, damping: float, alternations: int
) -> float:
    """``||(W - M - U V)·blockdiag(S)||²`` after ``alternations`` rounds, each step exact in that
    metric (``S = I`` without ``cov``)."""
    b, order = layout.nblocks, layout.output_order

    def monarch(target: torch.Tensor) -> torch.Tensor:
        if cov is None:
            p = project(target, b, allow_structural_zeros=True, output_order=order)
        else:
            p = project_whitened(target, cov, b, damping=damping, allow_structural_zeros=True, output_order=order).projection
        return assemble(p.L.to(torch.float64), p.R.to(torch.float64), layout)

    factor = None
    if cov is not None:  # blockdiag(S) restricted to the real inputs is the Cholesky factor of C_bd there
        factor = torch.block_diag(*cholesky_blocks(diagonal_blocks(padded_covariance(cov, layout, damping), layout)))
        factor = factor[: layout.d_in, : layout.d_in]
    m = monarch(w)
    low = fit_lowrank(w - m, rank, factor)
    for _ in range(alternations):
        m = monarch(w - low.dense())
        low = fit_lowrank(w - m, rank, factor)
    return low.sq_error


def layer_choices(
    name: str,
    weight: torch.Tensor,
    has_bias: bool,
    *,
    cov: torch.Tensor | None = None,
    pinned: int | None = None,
    allow_dense: bool = True,
    allow_structural_zeros: bool = False,
    candidates: Sequence[int] = CANDIDATES,
    damping: float = DEFAULT_DAMPING,
    output_order: str = BLOCKED,
    ranks: Sequence[int] = (),
    pinned_rank: int = 0,
    row_weights: torch.Tensor | None = None,
) -> LayerChoices:
    """Every option of one layer with its price and error (``pinned``: only that ``nblocks``,
    with ``pinned_rank``; otherwise every candidate plain and with each of ``ranks``).
    ``row_weights``: errors are Fisher-weighted (:func:`candidate_errors`); plain options only."""
    d_out, d_in = weight.shape
    bias = d_out if has_bias else 0
    blocks = [pinned] if pinned is not None else candidate_nblocks(d_in, d_out, candidates, allow_structural_zeros)
    plain = pinned is None or not pinned_rank  # the rank-0 options
    if pinned is not None:
        try:
            ranks = [check_rank(pinned_rank, d_in, d_out)] if pinned_rank else []
        except ConfigError as exc:
            raise type(exc)(f"layer '{name}': {exc}") from None
    else:  # a rank the layer cannot hold is no option for it
        ranks = [k for k in ranks if 0 < k <= min(d_in, d_out)]
    options = []
    if plain:
        errors = candidate_errors(weight, blocks, cov, damping=damping, output_order=output_order, row_weights=row_weights)
        options += [Option(b, MonarchLayout(d_in, d_out, b).weight_params + bias, errors[b]) for b in blocks]
    if ranks and row_weights is not None:
        raise ConfigError("Fisher-weighted prices cover plain Monarch options only, not low-rank terms",
                          field=("budget_objective", "budget_ranks"))
    if ranks:
        lowrank = candidate_lowrank_errors(weight, blocks, ranks, cov, damping=damping, output_order=output_order)
        options += [
            Option(b, MonarchLayout(d_in, d_out, b).weight_params + bias + lowrank_params(k, d_in, d_out), lowrank[(b, k)], k)
            for b in blocks for k in ranks
        ]
    if allow_dense and pinned is None:
        options.append(Option(DENSE, d_in * d_out + bias, 0.0))
    return LayerChoices(name, options, d_in * d_out + bias)


def lowrank_choices(
    name: str,
    weight: torch.Tensor,
    has_bias: bool,
    nblocks: int,
    *,
    cov: torch.Tensor | None = None,
    pinned: int | None = None,
    allow_dense: bool = True,
    ranks: Sequence[int] = (),
    candidates: Sequence[int] = CANDIDATES,
    damping: float = DEFAULT_DAMPING,
) -> LayerChoices:
    """Every option of one layer of a low-rank recipe: ``U V`` at each of ``ranks`` (default:
    the rank matching each of ``candidates``), or only rank ``pinned``, and keeping it dense.
    Errors are relative squared, from the singular values of ``W`` (``W S`` when calibrated)."""
    d_out, d_in = weight.shape
    bias = d_out if has_bias else 0
    if pinned is not None:
        try:
            if check_rank(pinned, d_in, d_out) < 1:
                raise ConfigError(f"a low-rank layer needs a rank of at least 1, got {pinned}")
        except ConfigError as exc:
            raise type(exc)(f"layer '{name}': {exc}") from None
        grid = [pinned]
    else:
        grid = sorted({k for k in ranks if 0 < k <= min(d_in, d_out)} if ranks else
                      {matching_rank(d_in, d_out, b) for b in candidates})
    w = weight.detach().to(torch.float64)
    target = w if cov is None else w @ covariance_factor(cov, d_in, damping)
    sigma2 = batched_svd(target, values_only=True).square()
    total = float(sigma2.sum())
    options = [
        Option(nblocks, lowrank_params(k, d_in, d_out) + bias, float(sigma2[k:].sum()) / total if total > 0 else 0.0, k)
        for k in grid
    ]
    if allow_dense and pinned is None:
        options.append(Option(DENSE, d_in * d_out + bias, 0.0))
    return LayerChoices(name, options, d_in * d_out + bias)


def lowrank_rank(layer: PlannedLayer, config: MonarchConfig) -> int:
    """The rank of ``layer`` in a low-rank recipe: what ``config.ranks`` gives it, else the one
    matching its block count."""
    return rank_of(layer.name, config) or matching_rank(layer.d_in, layer.d_out, layer.nblocks)


def price_layer(layer: PlannedLayer, config: MonarchConfig, cov: torch.Tensor | None = None,
                damping: float = DEFAULT_DAMPING, row_weights: torch.Tensor | None = None) -> LayerChoices:
    """Every option the budget may give ``layer``, priced (with ``cov``, its calibration
    covariance, in the activation-weighted metric; with ``row_weights``, its outputs' Fisher
    weights, in the model's loss). A layer an override pinned has only its
    own, priced unweighted: there is no choice to weigh. Apart from :func:`~monarchify.pipeline.allocate.plan_budget` so a block-by-block conversion can price each block
    while its statistics exist, and solve once every block is priced."""
    if config.structure == "lowrank":
        return lowrank_choices(
            layer.name, layer.weight, layer.has_bias, layer.nblocks, cov=cov, allow_dense=config.budget_keep_dense,
            damping=damping, pinned=lowrank_rank(layer, config) if layer.pinned or rank_of(layer.name, config) else None,
            ranks=config.budget_ranks,
        )
    return layer_choices(
        layer.name, layer.weight, layer.has_bias, cov=cov, pinned=layer.nblocks if layer.pinned else None,
        allow_dense=config.budget_keep_dense, allow_structural_zeros=config.allow_structural_zeros, damping=damping,
        output_order=PRICING_ORDER, ranks=config.budget_ranks, pinned_rank=rank_of(layer.name, config) if layer.pinned else 0,
        row_weights=None if layer.pinned else row_weights,
    )


def rank_of(name: str, config: MonarchConfig) -> int:
    """The rank ``config.ranks`` gives layer ``name`` (the last matching pattern wins; 0 if none)."""
    rank = 0
    for pattern, value in config.ranks.items():
        if name_matches(pattern, name):
            rank = value
    return rank
