"""Stage 3, allocate: every planned layer's final block count, or keeping it dense.

Two deciders, in this order: the parameter budget (when the recipe has one) and the speed gate
(when it has one). Without either, every layer keeps the block count the plan gave it.

The budget is an exact multiple-choice knapsack (:mod:`monarchify.pipeline.knapsack`) over
every layer's options (:mod:`monarchify.pipeline.pricing`: Monarch block counts, with low-rank
terms, or ranks of a low-rank layer, and keeping it dense, each priced in parameters and
relative squared error). ``budget=0.5`` keeps at most half of the selected layers' dense
parameters. The objective is the errors' sum, or with ``budget_objective="output"`` their
sum weighted by each layer's output sensitivity (measured by the observe stage,
:func:`monarchify.pipeline.observe.output_sensitivity`), or with ``"even"`` the sum of their
squares, or with ``"fisher"`` each option's error in the model's loss (every output channel
weighted by its Fisher information, :func:`monarchify.pipeline.observe.output_fisher`). The plain sum is indifferent between one layer at error 0.6 and two at 0.3; a deep
stack is not (each layer's error feeds the next), and on SmolLM2 the plain sum sent three
down projections to 16 blocks to keep others at 2.

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
from monarchify.monarch.layout import BLOCKED, MonarchLayout
from monarchify.monarch.lowrank import check_rank, lowrank_params
from monarchify.monarch.whitening import DEFAULT_DAMPING
from monarchify.pipeline.knapsack import BudgetError, solve, solve_nested
from monarchify.pipeline.plan import PlannedLayer
from monarchify.pipeline.pricing import CANDIDATES, DENSE, LayerChoices, Option, lowrank_rank, price_layer, rank_of
from monarchify.pipeline.speed_gate import SpeedGate


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
    fisher: bool = False
    """``budget_objective="fisher"``: ``choices`` hold Fisher-weighted absolute errors."""
    structure: str = "monarch"
    """``"lowrank"``: the options were ranks of a low-rank layer (their ``nblocks`` is the
    layer's planned block count, unused)."""
    moved: dict[str, dict[str, Any]] = field(default_factory=dict)
    """The layers whose choice differs from the nearest uniform plan (:meth:`compare_uniform`),
    with both options' block counts, errors and parameters: what the budget changed, and the
    trade that made it worth it."""

    def compare_uniform(self, options: Mapping[str, Sequence[Option]]) -> None:
        """Record in ``moved`` how the plan departs from the uniform block count whose parameter
        count is nearest to it. A user reading the plan wants the few layers that differ from
        "4 blocks everywhere", and the price of each: a layer kept dense bought its error back
        with parameters the others gave up."""
        if not self.uniform:
            return
        nearest = min(self.uniform, key=lambda b: (abs(self.uniform[b]["params"] - self.params_used), b))
        self.moved = {}
        for name, chosen in self.choices.items():
            uniform = next(o for o in options[name] if o.nblocks == nearest and not o.rank)
            if (chosen.nblocks, chosen.rank) != (uniform.nblocks, uniform.rank):
                self.moved[name] = {
                    "uniform_nblocks": nearest, "nblocks": chosen.nblocks, "rank": chosen.rank,
                    "uniform_error": uniform.error, "error": chosen.error, "params_change": chosen.params - uniform.params,
                }

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
            "error_kind": "Fisher-weighted activation-weighted squared (estimated loss)" if self.fisher else
            ("squared " if self.even else "") + ("output-sensitivity-weighted " if self.sensitivity else "")
            + ("activation-weighted relative squared" if self.weighted else "relative squared (Frobenius)"),
            "kept_dense": self.dense_layers(),
            "uniform": {str(b): v for b, v in self.uniform.items()},
            **({"ranks": self.ranks, "lowrank": {n: o.rank for n, o in self.choices.items() if o.rank}} if self.ranks else {}),
            **({"structure": self.structure, "lowrank": {n: o.rank for n, o in self.choices.items() if o.rank}}
               if self.structure != "monarch" else {}),
            **({"sensitivity": self.sensitivity} if self.sensitivity else {}),
            **({"moved": self.moved} if self.moved else {}),
        }


# --- the budget over a planned model ------------------------------------------------------

CovarianceOf = Callable[[str], torch.Tensor]


def plan_budget(
    layers: Sequence[PlannedLayer],
    config: MonarchConfig,
    *,
    covariance: CovarianceOf | None = None,
    damping: float = DEFAULT_DAMPING,
    weights: Mapping[str, float] | None = None,
    priced: Mapping[str, LayerChoices] | None = None,
    row_weights: Mapping[str, torch.Tensor] | None = None,
) -> BudgetPlan:
    """Choose every planned layer's block count under ``config.budget``.

    A layer an override pinned keeps its block count; every other layer is free to take any
    candidate, or to stay dense when ``config.budget_keep_dense``. ``covariance(name)``, when
    given, weighs errors by the layer's calibration activations; ``weights[name]`` multiplies
    a layer's errors (its output sensitivity, ``budget_objective="output"``). ``priced``: the
    layers' options already priced (:func:`price_layer`, calibrated), instead of ``covariance``.
    ``row_weights[name]``: the layer's output channels' Fisher weights (``budget_objective="fisher"``).
    """
    if config.budget is None:
        raise ConfigError("the recipe has no budget")
    lowrank = config.structure == "lowrank"
    choices = [
        priced[layer.name] if priced is not None else
        price_layer(layer, config, covariance(layer.name) if covariance else None, damping,
                    row_weights[layer.name] if row_weights is not None else None)
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
        picks = (solve_nested if config.budget_solver == "nested" else solve)([layer.options for layer in choices], budget)
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
        structure=config.structure, even=config.budget_objective == "even", fisher=config.budget_objective == "fisher",
    )
    for b in CANDIDATES:
        chosen = [next((o for o in layer.options if o.nblocks == b and not o.rank), None) for layer in choices]
        if all(chosen):
            plan.uniform[b] = {
                "params": sum(o.params for o in chosen),
                "fraction": sum(o.params for o in chosen) / params_dense,
                "error": sum(o.error for o in chosen),
            }
    plan.compare_uniform({layer.name: layer.options for layer in choices})
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


def needs_fisher(layers: Sequence[PlannedLayer], config: MonarchConfig) -> bool:
    """Whether the budget will price these layers by their outputs' Fisher weights (as
    :func:`needs_sensitivity`, for ``budget_objective="fisher"``)."""
    return config.budget is not None and config.budget_objective == "fisher" and not all(layer.pinned for layer in layers)


def allocate(
    layers: Sequence[PlannedLayer], config: MonarchConfig, *, covariance: CovarianceOf | None = None,
    weights: Mapping[str, float] | None = None, priced: Mapping[str, LayerChoices] | None = None,
    row_weights: Mapping[str, torch.Tensor] | None = None,
) -> Allocation:
    """Decide every planned layer: the budget first, then the speed gate on what it converts.
    ``weights``: the budget's per-layer error weights (``budget_objective="output"``);
    ``priced``: the budget's options, priced already (see :func:`plan_budget`); ``row_weights``:
    the Fisher weights of every layer's outputs (``budget_objective="fisher"``).

    Layouts are checked here (a block count that leaves structural zeros is refused unless the
    recipe allows it), naming the layer, before any projection starts.
    """
    allocation = Allocation(output_order=config.output_order, structure=config.structure)
    if config.budget is not None:
        damping = config.calibration.damping if config.calibration is not None else DEFAULT_DAMPING
        if weights is None and needs_sensitivity(layers, config):
            raise ConfigError("budget_objective 'output' weighs each layer by its effect on the model's output, "
                              "measured on calibration text: calibrate the conversion")
        if row_weights is None and priced is None and needs_fisher(layers, config):
            raise ConfigError("budget_objective 'fisher' weighs each layer's outputs by the model's gradients on "
                              "calibration text: calibrate the conversion", field="budget_objective")
        allocation.budget = plan_budget(layers, config, covariance=covariance, damping=damping, priced=priced,
                                        weights=weights if config.budget_objective == "output" else None,
                                        row_weights=row_weights)
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
        if config.keep_dense_if_not_smaller:
            _keep_dense_where_no_smaller(allocation, layers)

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


def _keep_dense_where_no_smaller(allocation: Allocation, layers: Sequence[PlannedLayer]) -> None:
    """``keep_dense_if_not_smaller``: a layer whose Monarch form holds as many weights as its
    dense one would only gain error (and dispatches): two blocks of a square layer are
    ``2·(n/2)·n = n²`` weights. An override naming its block count still converts it."""
    for layer in layers:
        if layer.pinned or layer.name not in allocation.nblocks:
            continue
        params = allocation.layout(layer).weight_params + lowrank_params(allocation.ranks.get(layer.name, 0), layer.d_in, layer.d_out)
        if params >= layer.d_in * layer.d_out:
            nblocks = allocation.nblocks.pop(layer.name)
            allocation.ranks.pop(layer.name, None)
            allocation.kept[layer.name] = KeptDense(
                f"no smaller: {nblocks} blocks hold {params:,} weights, dense {layer.d_in}→{layer.d_out} holds {layer.d_in * layer.d_out:,}", nblocks)


def _apply_speed_gate(allocation: Allocation, layers: Sequence[PlannedLayer], config: MonarchConfig) -> None:
    gate = SpeedGate(config.speed_gate)
    for layer in layers:
        weight = layer.weight
        verdict = gate.measure(allocation.layout(layer), weight.dtype, weight.device, layer.has_bias)
        allocation.speed[layer.name] = verdict
        if verdict.reason is not None:
            allocation.kept[layer.name] = KeptDense(verdict.reason, allocation.nblocks.pop(layer.name))
            allocation.ranks.pop(layer.name, None)
