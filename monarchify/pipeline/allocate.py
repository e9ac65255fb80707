"""Stage 3, allocate: every planned layer's final block count, or keeping it dense.

Two deciders, in this order: the parameter budget (when the recipe has one) and the speed gate
(when it has one). Without either, every layer keeps the block count the plan gave it.

The budget is an exact multiple-choice knapsack. ``budget=0.5`` keeps at most half of the selected layers' dense parameters (weights
and biases, the same count the report shows) and picks, for every layer, one option among

* Monarch with ``nblocks`` in :data:`CANDIDATES` (those without structural zeros), and
* keeping the layer dense (error 0, full price), and
* with ``budget_ranks``, Monarch plus a rank-``k`` term for every such ``nblocks`` and ``k``
  (Monarch plus low rank, :mod:`monarchify.monarch.lowrank`), priced ``k·(d_in + d_out)`` more.

Keeping dense is a candidate on purpose: when a few layers are much harder to approximate
than the rest, paying full price for them and compressing the others harder gives a lower
total error, and the solver should be free to find that. (For a square layer ``nblocks=2``
costs exactly as much as dense, so dense always wins there.) ``budget_keep_dense=False``
converts every selected layer instead.

The error of an option is the layer's *relative squared* error: ``||W - M||²/||W||²``, or
with calibration ``tr((W - M) C (W - M)ᵀ) / tr(W C Wᵀ)`` (block-diagonal surrogate, see
:mod:`monarchify.monarch.whitening`). Both come for free from the singular values of each
candidate's sub-blocks. A low-rank option's error is that of the same Monarch matrix plus the
best rank-``k`` correction of its residual in the same metric: the residual, whitened, is what
the sub-block SVDs discarded, and its own singular values give every ``k`` at once. (The
projector then does a little better: it alternates and uses the full covariance.) Relative errors make layers comparable (their output scales differ
by orders of magnitude); the objective is their sum, or with ``budget_objective="output"`` their
sum weighted by each layer's output sensitivity (measured by the observe stage,
:func:`monarchify.pipeline.observe.output_sensitivity`), or with ``"even"`` the sum of their
squares. The plain sum is indifferent between one layer at error 0.6 and two at 0.3; a deep
stack is not (each layer's error feeds the next), and on SmolLM2 the plain sum sent three
down projections to 16 blocks to keep others at 2.

The solver is a dynamic programme over the parameters spent, one vectorised step per layer
(:func:`solve`): exact for budgets up to :data:`GRID` parameters, and for larger ones exact up
to a rounding of every price to ``budget / GRID`` (prices round up, so the budget holds).

With ``structure="lowrank"`` the same solver chooses ranks instead: a layer's options are the
low-rank layer ``U V`` at each rank of a grid (by default the ranks matching each candidate
block count, :func:`~monarchify.monarch.lowrank.matching_rank`; or ``budget_ranks``), priced
``rank·(d_in + d_out)``, and keeping it dense. Their errors come from one SVD per layer: the
truncated SVD's relative squared error is the share of the squared singular values it drops,
of ``W``, or with calibration of ``W S`` (``C = S Sᵀ``, the damped full covariance, which the
low-rank fit uses whole).

The speed gate times each distinct layer shape on this device (:mod:`monarchify.pipeline.speed_gate`)
and keeps dense the layers Monarch does not make faster.

Torch only: nothing here knows about transformers.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

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
from monarchify.pipeline.speed_gate import SpeedGate

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


class BudgetError(ConfigError):
    """A budget that no choice of block counts can meet."""


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


@dataclass
class BudgetPlan:
    """The solver's answer, and what uniform block counts would have given."""

    fraction: float
    params_budget: int
    params_dense: int
    choices: dict[str, Option]
    uniform: dict[int, dict[str, float]] = field(default_factory=dict)
    """``{nblocks: {"params": ..., "error": ...}}`` for every candidate all layers accept."""
    weighted: bool = False
    ranks: list[int] = field(default_factory=list)
    """The low-rank terms the solver could add (``budget_ranks``)."""
    sensitivity: dict[str, float] | None = None
    """Per-layer weights of the errors (``budget_objective="output"``); ``choices`` hold the
    weighted errors."""
    even: bool = False
    """``budget_objective="even"``: ``choices`` hold the squared errors."""
    structure: str = "monarch"
    """``"lowrank"``: the options were ranks of a low-rank layer (their ``nblocks`` is the
    layer's planned block count, unused)."""

    @property
    def params_used(self) -> int:
        return sum(option.params for option in self.choices.values())

    @property
    def error(self) -> float:
        return sum(option.error for option in self.choices.values())

    def dense_layers(self) -> list[str]:
        return [name for name, option in self.choices.items() if option.nblocks is DENSE]

    def to_dict(self) -> dict[str, Any]:
        return {
            "fraction": self.fraction,
            "params_budget": self.params_budget,
            "params_used": self.params_used,
            "params_dense": self.params_dense,
            "total_error": self.error,
            "error_kind": ("squared " if self.even else "") + ("output-sensitivity-weighted " if self.sensitivity else "")
            + ("activation-weighted relative squared" if self.weighted else "relative squared (Frobenius)"),
            "kept_dense": self.dense_layers(),
            "uniform": {str(b): v for b, v in self.uniform.items()},
            **({"ranks": self.ranks, "lowrank": {n: o.rank for n, o in self.choices.items() if o.rank}} if self.ranks else {}),
            **({"structure": self.structure, "lowrank": {n: o.rank for n, o in self.choices.items() if o.rank}}
               if self.structure != "monarch" else {}),
            **({"sensitivity": self.sensitivity} if self.sensitivity else {}),
        }


# --- the solver ---------------------------------------------------------------------------


GRID = 1 << 17
"""Cells of the solver's parameter axis: a budget above it is counted in units of
``ceil(budget / GRID)`` parameters."""


def solve(layers: Sequence[Sequence[Option]], budget: int) -> list[int]:
    """Indices of the option per layer minimising the summed error with total params <= budget.

    A dynamic programme over the parameters spent so far, one vectorised step per layer: the
    least error of the layers seen at each total, and which option reached it. Exact while the
    budget fits :data:`GRID` cells (every test-sized problem; MiniLM's budgets do not). Above it
    parameters are counted in units of ``ceil(budget / GRID)``, each option's price rounded
    *up*, so a solution found always keeps the budget, and at most one unit per layer of it
    (under 0.2 % of the budget for 200 layers) goes unspent that the exact optimum could use.
    The Pareto-frontier programme this replaces was exact everywhere, but on a 30-block LLM its
    frontier grew to millions of points: 47 minutes and 9.8 GB for one budget.

    Ties go to fewer parameters, then to the earlier option. Raises :class:`BudgetError` when
    even the cheapest choices exceed the budget.
    """
    if not layers:
        return []
    if any(not options for options in layers):
        raise ValueError("every layer needs at least one option")
    cheapest = [min(range(len(options)), key=lambda k: (options[k].params, k)) for options in layers]
    least = sum(options[k].params for options, k in zip(layers, cheapest))
    if least > budget:
        raise BudgetError(f"the budget ({budget:,} parameters) is below the smallest possible ({least:,})")
    unit = -(-budget // GRID) if budget > GRID else 1
    cells = budget // unit + 1
    best = torch.full((cells,), float("inf"), dtype=torch.float64)  # best[c]: least error at exactly c units
    best[0] = 0.0
    picks_at: list[torch.Tensor] = []
    for options in layers:
        candidates = torch.full((len(options), cells), float("inf"), dtype=torch.float64)
        for k, option in enumerate(options):
            price = -(-option.params // unit)
            if price < cells:
                candidates[k, price:] = best[: cells - price] + option.error
        pick = candidates.argmin(dim=0)  # the first of equal errors: the earlier option
        best = candidates.gather(0, pick[None]).squeeze(0)
        picks_at.append(pick.to(torch.int16 if len(options) < 2**15 else torch.int32))
    if bool(torch.isinf(best).all()):  # rounding up priced the only feasible choices out
        return cheapest
    total = int(torch.argmin(best))  # the first of equal errors: fewer parameters
    picks = [0] * len(layers)
    for i in range(len(layers) - 1, -1, -1):
        picks[i] = int(picks_at[i][total])
        total -= -(-layers[i][picks[i]].params // unit)
    return picks


# --- candidate errors ---------------------------------------------------------------------


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
) -> dict[int, float]:
    """Relative squared error of the optimal projection for every ``nblocks``, from singular
    values only: Frobenius without ``cov``, the whitened surrogate with it (relative to
    ``tr(W C_bd Wᵀ)`` with the same damped block-diagonal covariance)."""
    w = weight.detach().to(torch.float64)
    errors = {}
    for b in nblocks:
        layout = MonarchLayout(w.shape[1], w.shape[0], b, output_order)
        blocks = sub_blocks(w, layout) if cov is None else whitened_sub_blocks(w, cov, layout, damping)[0]
        sigma2 = batched_svd(blocks, values_only=True).square()
        keep = torch.tensor(layout.pair_ranks, device=sigma2.device)
        discarded = torch.where(torch.arange(sigma2.shape[-1], device=sigma2.device) >= keep[..., None], sigma2, 0.0)
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
) -> LayerChoices:
    """Every option of one layer with its price and error (``pinned``: only that ``nblocks``,
    with ``pinned_rank``; otherwise every candidate plain and with each of ``ranks``)."""
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
        errors = candidate_errors(weight, blocks, cov, damping=damping, output_order=output_order)
        options += [Option(b, MonarchLayout(d_in, d_out, b).weight_params + bias, errors[b]) for b in blocks]
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


# --- the budget over a planned model ------------------------------------------------------

CovarianceOf = Callable[[str], torch.Tensor]


def price_layer(layer: PlannedLayer, config: MonarchConfig, cov: torch.Tensor | None = None,
                damping: float = DEFAULT_DAMPING) -> LayerChoices:
    """Every option the budget may give ``layer``, priced (with ``cov``, its calibration
    covariance, in the activation-weighted metric). A layer an override pinned has only its
    own. Apart from :func:`plan_budget` so a block-by-block conversion can price each block
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
    )


def plan_budget(
    layers: Sequence[PlannedLayer],
    config: MonarchConfig,
    *,
    covariance: CovarianceOf | None = None,
    damping: float = DEFAULT_DAMPING,
    weights: Mapping[str, float] | None = None,
    priced: Mapping[str, LayerChoices] | None = None,
) -> BudgetPlan:
    """Choose every planned layer's block count under ``config.budget``.

    A layer an override pinned keeps its block count; every other layer is free to take any
    candidate, or to stay dense when ``config.budget_keep_dense``. ``covariance(name)``, when
    given, weighs errors by the layer's calibration activations; ``weights[name]`` multiplies
    a layer's errors (its output sensitivity, ``budget_objective="output"``). ``priced``: the
    layers' options already priced (:func:`price_layer`, calibrated), instead of ``covariance``.
    """
    if config.budget is None:
        raise ConfigError("the recipe has no budget")
    lowrank = config.structure == "lowrank"
    choices = [
        priced[layer.name] if priced is not None else
        price_layer(layer, config, covariance(layer.name) if covariance else None, damping)
        for layer in layers
    ]
    if weights is not None:
        choices = [replace(layer, options=[replace(o, error=o.error * weights[layer.name]) for o in layer.options])
                   for layer in choices]
    if config.budget_objective == "even":
        choices = [replace(layer, options=[replace(o, error=o.error ** 2) for o in layer.options]) for layer in choices]
    params_dense = sum(layer.params_dense for layer in choices)
    budget = int(config.budget * params_dense)
    try:
        picks = solve([layer.options for layer in choices], budget)
    except BudgetError:
        least = sum(min(o.params for o in layer.options) for layer in choices)
        smallest = "the smallest rank of the grid" if lowrank else f"nblocks up to {max(CANDIDATES)}"
        raise BudgetError(
            f"budget {config.budget:g} is below what the candidates allow: at least {least / params_dense:.3f} "
            f"of the selected layers' dense parameters ({smallest})"
        ) from None
    plan = BudgetPlan(
        config.budget, budget, params_dense,
        {layer.name: layer.options[k] for layer, k in zip(choices, picks)}, weighted=covariance is not None or priced is not None,
        ranks=list(config.budget_ranks) if not lowrank else [], sensitivity=dict(weights) if weights is not None else None,
        structure=config.structure, even=config.budget_objective == "even",
    )
    for b in CANDIDATES:
        chosen = [next((o for o in layer.options if o.nblocks == b and not o.rank), None) for layer in choices]
        if all(chosen):
            plan.uniform[b] = {
                "params": sum(o.params for o in chosen),
                "fraction": sum(o.params for o in chosen) / params_dense,
                "error": sum(o.error for o in chosen),
            }
    return plan


def resolved_config(config: MonarchConfig, plan: BudgetPlan) -> MonarchConfig:
    """The recipe that reproduces ``plan`` without solving again: an exact-name override per
    converted layer and an exact-name exclude per layer kept dense (``budget`` is kept as a
    record; solving it again with every layer pinned gives the same answer). This is the
    recipe a budgeted checkpoint records."""
    overrides = dict(config.overrides)
    exclude = list(config.exclude)
    ranks = dict(config.ranks)
    for name, option in plan.choices.items():
        if option.nblocks is DENSE:
            exclude.append(re.escape(name))
        else:
            overrides[re.escape(name)] = option.nblocks
            if option.rank or ranks:  # a rank-0 choice is written only to override a pattern
                ranks[re.escape(name)] = option.rank
    return replace(config, overrides=overrides, exclude=exclude, ranks=ranks)


def rank_of(name: str, config: MonarchConfig) -> int:
    """The rank ``config.ranks`` gives layer ``name`` (the last matching pattern wins; 0 if none)."""
    rank = 0
    for pattern, value in config.ranks.items():
        if name_matches(pattern, name):
            rank = value
    return rank


# --- the allocation -----------------------------------------------------------------------


@dataclass
class KeptDense:
    """A selected layer that stays dense, and why."""

    reason: str
    nblocks: int | None = None
    """The block count it would have had (None when the budget chose dense)."""


@dataclass
class Allocation:
    """The answer of this stage: what each planned layer becomes."""

    nblocks: dict[str, int] = field(default_factory=dict)
    """Layers that become Monarch, with their block counts."""
    kept: dict[str, KeptDense] = field(default_factory=dict)
    budget: BudgetPlan | None = None
    speed: dict[str, Any] = field(default_factory=dict)
    """Layer name -> the speed gate's :class:`~monarchify.pipeline.speed_gate.SpeedVerdict`."""
    output_order: str = BLOCKED
    ranks: dict[str, int] = field(default_factory=dict)
    """Monarch layers with a low-rank term, and its rank (absent: none); with ``structure``
    ``"lowrank"``, every converted layer's rank."""
    structure: str = "monarch"
    """What the converted layers become (``MonarchConfig.structure``); for ``"lowrank"``,
    ``nblocks`` only marks a layer as converted (and is the block count its rank matches)."""

    def layout(self, layer: PlannedLayer) -> MonarchLayout:
        return MonarchLayout(layer.d_in, layer.d_out, self.nblocks[layer.name], self.output_order)

    def recipe(self, config: MonarchConfig) -> MonarchConfig:
        """The recipe to record: with a budget, every layer's block count written out."""
        return resolved_config(config, self.budget) if self.budget is not None else config


def needs_sensitivity(layers: Sequence[PlannedLayer], config: MonarchConfig) -> bool:
    """Whether the budget will weigh these layers by their output sensitivity: with
    ``budget_objective="output"``, unless every layer is pinned (a recorded recipe re-applied
    chooses nothing, so it needs no weights and the observe stage measures none)."""
    return config.budget_objective == "output" and not all(layer.pinned for layer in layers)


def allocate(
    layers: Sequence[PlannedLayer], config: MonarchConfig, *, covariance: CovarianceOf | None = None,
    weights: Mapping[str, float] | None = None, priced: Mapping[str, LayerChoices] | None = None,
) -> Allocation:
    """Decide every planned layer: the budget first, then the speed gate on what it converts.
    ``weights``: the budget's per-layer error weights (``budget_objective="output"``);
    ``priced``: the budget's options, priced already (see :func:`plan_budget`).

    Layouts are checked here (a block count that leaves structural zeros is refused unless the
    recipe allows it), naming the layer, before any projection starts.
    """
    allocation = Allocation(output_order=config.output_order, structure=config.structure)
    if config.budget is not None:
        damping = config.calibration.damping if config.calibration is not None else DEFAULT_DAMPING
        if weights is None and needs_sensitivity(layers, config):
            raise ConfigError("budget_objective 'output' weighs each layer by its effect on the model's output, "
                              "measured on calibration text: calibrate the conversion")
        allocation.budget = plan_budget(layers, config, covariance=covariance, damping=damping, priced=priced,
                                        weights=weights if config.budget_objective == "output" else None)
        reason = f"kept dense by the budget ({config.budget:g})"
        for name, option in allocation.budget.choices.items():
            if option.nblocks is DENSE:
                allocation.kept[name] = KeptDense(reason)
            else:
                allocation.nblocks[name] = option.nblocks
                if option.rank:
                    allocation.ranks[name] = option.rank
    elif config.structure == "lowrank":
        allocation.nblocks = {layer.name: layer.nblocks for layer in layers}
        allocation.ranks = {layer.name: lowrank_rank(layer, config) for layer in layers}
    else:
        allocation.nblocks = {layer.name: layer.nblocks for layer in layers}
        allocation.ranks = {layer.name: rank for layer in layers if (rank := rank_of(layer.name, config))}

    monarch = [layer for layer in layers if layer.name in allocation.nblocks]
    for layer in monarch:
        try:
            if config.structure == "lowrank":  # no blocks, so no layout to check
                check_rank(allocation.ranks[layer.name], layer.d_in, layer.d_out)
                continue
            allocation.layout(layer).check_structure(config.allow_structural_zeros)
            check_rank(allocation.ranks.get(layer.name, 0), layer.d_in, layer.d_out)
        except ConfigError as exc:
            raise type(exc)(f"layer '{layer.name}': {exc}") from None
    if config.speed_gate is not None:
        _apply_speed_gate(allocation, monarch, config)
    return allocation


def _apply_speed_gate(allocation: Allocation, layers: Sequence[PlannedLayer], config: MonarchConfig) -> None:
    gate = SpeedGate(config.speed_gate)
    for layer in layers:
        weight = layer.weight
        verdict = gate.measure(allocation.layout(layer), weight.dtype, weight.device, layer.has_bias)
        allocation.speed[layer.name] = verdict
        if verdict.reason is not None:
            allocation.kept[layer.name] = KeptDense(verdict.reason, allocation.nblocks.pop(layer.name))
            allocation.ranks.pop(layer.name, None)
