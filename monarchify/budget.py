"""Per-layer block counts under a parameter budget: an exact multiple-choice knapsack.

``convert --budget 0.5`` keeps at most half of the selected layers' dense parameters (weights
and biases, the same count the report shows) and picks, for every layer, one option among

* Monarch with ``nblocks`` in :data:`CANDIDATES` (those without structural zeros), and
* keeping the layer dense (error 0, full price).

Keeping dense is a candidate on purpose: when a few layers are much harder to approximate
than the rest, paying full price for them and compressing the others harder gives a lower
total error, and the solver should be free to find that. (For a square layer ``nblocks=2``
costs exactly as much as dense, so dense always wins there.) ``--no-budget-dense``
(``MonarchConfig.budget_keep_dense = False``) converts every selected layer instead.

The error of an option is the layer's *relative squared* error: ``||W - M||²/||W||²``, or
with calibration ``tr((W - M) C (W - M)ᵀ) / tr(W C Wᵀ)`` (block-diagonal surrogate, see
:mod:`monarchify.monarch.whitening`). Both come for free from the singular values of each
candidate's sub-blocks. Relative errors make layers comparable (their output scales differ
by orders of magnitude); the objective is their sum.

The solver keeps, layer after layer, the Pareto frontier of (parameters, error) over all
choices so far. A prefix that costs more and errs more than another can be swapped for it in
any completion, so discarding it never loses the optimum: the result is exactly optimal.
The frontier has at most one point per distinct parameter total; transformer stacks repeat
a few shapes, so it stays small (a few thousand points for MiniLM).

Torch only: nothing here knows about transformers.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from monarchify.config import MonarchConfig
from monarchify.errors import ConfigError
from monarchify.monarch.layout import MonarchLayout
from monarchify.monarch.projection import sub_blocks
from monarchify.monarch.whitening import DEFAULT_DAMPING, batched_svd, whitened_sub_blocks
from monarchify.report import LayerReport
from monarchify.selection import FilterFn, dense_weight, is_conv1d, name_matches, select

CANDIDATES = (2, 3, 4, 6, 8, 12, 16)
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
            "error_kind": "activation-weighted relative squared" if self.weighted else "relative squared (Frobenius)",
            "kept_dense": self.dense_layers(),
            "uniform": {str(b): v for b, v in self.uniform.items()},
        }


# --- the solver ---------------------------------------------------------------------------


def solve(layers: Sequence[Sequence[Option]], budget: int) -> list[int]:
    """Indices of the option per layer minimising the summed error with total params <= budget.

    Exact (Pareto-frontier dynamic programme). Ties go to fewer parameters, then to the
    earlier option. Raises :class:`BudgetError` when even the cheapest choices exceed it.
    """
    if not layers:
        return []
    if any(not options for options in layers):
        raise ValueError("every layer needs at least one option")
    cheapest = [min(o.params for o in options) for options in layers]
    rest = [0] * (len(layers) + 1)  # rest[i]: the least the layers from i on can cost
    for i in range(len(layers) - 1, -1, -1):
        rest[i] = rest[i + 1] + cheapest[i]
    if rest[0] > budget:
        raise BudgetError(f"the budget ({budget:,} parameters) is below the smallest possible ({rest[0]:,})")

    # Each stage: frontier points (params, error, previous point index, option index).
    stages: list[list[tuple[int, float, int, int]]] = []
    frontier: list[tuple[int, float, int, int]] = [(0, 0.0, -1, -1)]
    for i, options in enumerate(layers):
        limit = budget - rest[i + 1]
        points = [
            (params + option.params, error + option.error, j, k)
            for j, (params, error, _, _) in enumerate(frontier)
            for k, option in enumerate(options)
            if params + option.params <= limit
        ]
        points.sort(key=lambda point: (point[0], point[1], point[2], point[3]))
        frontier = []
        for point in points:
            if not frontier or point[1] < frontier[-1][1]:
                frontier.append(point)
        stages.append(frontier)

    best = min(range(len(frontier)), key=lambda j: (frontier[j][1], frontier[j][0]))
    picks = [0] * len(layers)
    for i in range(len(layers) - 1, -1, -1):
        _, _, previous, option = stages[i][best]
        picks[i], best = option, previous
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
) -> dict[int, float]:
    """Relative squared error of the optimal projection for every ``nblocks``, from singular
    values only: Frobenius without ``cov``, the whitened surrogate with it (relative to
    ``tr(W C_bd Wᵀ)`` with the same damped block-diagonal covariance)."""
    w = weight.detach().to(torch.float64)
    errors = {}
    for b in nblocks:
        layout = MonarchLayout(w.shape[1], w.shape[0], b)
        blocks = sub_blocks(w, layout) if cov is None else whitened_sub_blocks(w, cov, layout, damping)[0]
        sigma2 = batched_svd(blocks, values_only=True).square()
        keep = torch.tensor(layout.pair_ranks, device=sigma2.device)
        discarded = torch.where(torch.arange(sigma2.shape[-1], device=sigma2.device) >= keep[..., None], sigma2, 0.0)
        total = float(sigma2.sum())
        errors[b] = float(discarded.sum()) / total if total > 0 else 0.0
    return errors


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
) -> LayerChoices:
    """Every option of one layer with its price and error (``pinned``: only that ``nblocks``)."""
    d_out, d_in = weight.shape
    bias = d_out if has_bias else 0
    blocks = [pinned] if pinned is not None else candidate_nblocks(d_in, d_out, candidates, allow_structural_zeros)
    errors = candidate_errors(weight, blocks, cov, damping=damping)
    options = [Option(b, MonarchLayout(d_in, d_out, b).weight_params + bias, errors[b]) for b in blocks]
    if allow_dense and pinned is None:
        options.append(Option(DENSE, d_in * d_out + bias, 0.0))
    return LayerChoices(name, options, d_in * d_out + bias)


# --- applying it to a model -----------------------------------------------------------------

CovarianceOf = Callable[[str], torch.Tensor]


def _pinned(name: str, config: MonarchConfig) -> int | None:
    """The block count a user override fixes for ``name`` (the last matching wins)."""
    value = None
    for pattern, nblocks in config.overrides.items():
        if name_matches(pattern, name):
            value = nblocks
    return value


def plan_budget(
    model: nn.Module,
    config: MonarchConfig,
    filter_fn: FilterFn | None = None,
    *,
    covariance: CovarianceOf | None = None,
    damping: float = DEFAULT_DAMPING,
) -> BudgetPlan:
    """Choose every selected layer's block count under ``config.budget``.

    ``--override`` pins a layer to its block count; every other selected layer is free to
    take any candidate, or to stay dense when ``config.budget_keep_dense``.
    ``covariance(name)``, when given, weighs errors by the layer's calibration activations.
    """
    if config.budget is None:
        raise ConfigError("no budget in the recipe")
    layers = []
    for name, module, _ in select(model, config, filter_fn):
        weight = dense_weight(module)
        layers.append(
            layer_choices(
                name, weight, getattr(module, "bias", None) is not None,
                cov=covariance(name) if covariance else None, pinned=_pinned(name, config),
                allow_dense=config.budget_keep_dense, allow_structural_zeros=config.allow_structural_zeros, damping=damping,
            )
        )
    params_dense = sum(layer.params_dense for layer in layers)
    budget = int(config.budget * params_dense)
    try:
        picks = solve([layer.options for layer in layers], budget)
    except BudgetError:
        least = sum(min(o.params for o in layer.options) for layer in layers)
        raise BudgetError(
            f"--budget {config.budget:g} is below what the candidates allow: at least {least / params_dense:.3f} "
            f"of the selected layers' dense parameters (nblocks up to {max(CANDIDATES)})"
        ) from None
    plan = BudgetPlan(
        config.budget, budget, params_dense,
        {layer.name: layer.options[k] for layer, k in zip(layers, picks)}, weighted=covariance is not None,
    )
    for b in CANDIDATES:
        chosen = [next((o for o in layer.options if o.nblocks == b), None) for layer in layers]
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
    record; solving it again with every layer pinned gives the same answer)."""
    overrides = dict(config.overrides)
    exclude = list(config.exclude)
    for name, option in plan.choices.items():
        if option.nblocks is DENSE:
            exclude.append(re.escape(name))
        else:
            overrides[re.escape(name)] = option.nblocks
    return replace(config, overrides=overrides, exclude=exclude)


def kept_dense_reports(model: nn.Module, plan: BudgetPlan) -> list[LayerReport]:
    """Report rows for the layers the plan keeps dense."""
    rows = []
    for name in plan.dense_layers():
        module = model.get_submodule(name)
        d_out, d_in = dense_weight(module).shape
        bias = getattr(module, "bias", None) is not None
        params = d_out * d_in + (d_out if bias else 0)
        rows.append(
            LayerReport(
                name=name, kind="Conv1D" if is_conv1d(module) else "Linear", shape=[d_out, d_in], nblocks=1,
                padded=False, bias=bias, params_dense=params, params_monarch=params,
                kept_dense=True, reason=f"kept dense by --budget {plan.fraction:g}",
            )
        )
    return rows


def apply_budget(
    model: nn.Module,
    config: MonarchConfig,
    filter_fn: FilterFn | None = None,
    *,
    covariance: CovarianceOf | None = None,
) -> tuple[MonarchConfig, BudgetPlan | None, list[LayerReport]]:
    """``config`` with the budget resolved into per-layer block counts, the plan, and the
    report rows of layers kept dense; ``config`` unchanged when it has no budget."""
    if config.budget is None:
        return config, None, []
    plan = plan_budget(model, config, filter_fn, covariance=covariance)
    return resolved_config(config, plan), plan, kept_dense_reports(model, plan)
