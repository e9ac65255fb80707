"""The budget's solvers, knowing nothing of layers or Monarch: an exact multiple-choice
knapsack (:func:`solve`) and a nested one that trades a little error for plans that move
little when the budget does (:func:`solve_nested`).

Every item (a layer) has a few options, each with a price in parameters and an error; pick one
option per item so the summed error is least and the summed price stays within the budget. A
dynamic programme over the parameters spent, one vectorised step per item (:func:`solve`):
exact for budgets up to :data:`GRID` parameters, and for larger ones exact up to a rounding of
every price to ``budget / GRID`` (prices round up, so the budget holds). What the options are
and what they cost is :mod:`monarchify.pipeline.pricing`'s business.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from monarchify.errors import ConfigError


class BudgetError(ConfigError):
    """A budget that no choice of block counts can meet."""


class Priced(Protocol):
    """What the solver reads of an option (:class:`~monarchify.pipeline.pricing.Option` is one)."""

    @property
    def params(self) -> int: ...

    @property
    def error(self) -> float: ...


GRID = 1 << 17
"""Cells of the solver's parameter axis: a budget above it is counted in units of
``ceil(budget / GRID)`` parameters."""


def solve(layers: Sequence[Sequence[Priced]], budget: int) -> list[int]:
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


def _hull(options: Sequence[Priced]) -> list[int]:
    """The options on the lower convex hull of (params, error), cheapest first: the ones a
    marginal-rate allocator ever stops at. Each next one costs more and errs less, at a
    falling rate of error saved per parameter; ties go to the earlier option."""
    order = sorted(range(len(options)), key=lambda k: (options[k].params, options[k].error, k))
    hull: list[int] = []
    for k in order:
        if hull and options[k].error >= options[hull[-1]].error:
            continue  # costs at least as much and errs no less: never worth it
        while len(hull) >= 2:
            a, b = options[hull[-2]], options[hull[-1]]
            # b is under the line from a to k only if its rate from a beats k's rate from b
            if (a.error - b.error) * (options[k].params - b.params) > (b.error - options[k].error) * (b.params - a.params):
                break
            hull.pop()
        hull.append(k)
    return hull


def solve_nested(layers: Sequence[Sequence[Priced]], budget: int) -> list[int]:
    """Indices of an option per layer within ``budget``, chosen so that nearby budgets give
    nearby plans.

    Every layer starts at its cheapest option and moves up its lower convex hull of (params,
    error); all layers' steps are taken in one order, by error saved per parameter (ties: the
    earlier layer), for as long as they fit. That prefix is nested in the budget. What it
    leaves (less than the first step that did not fit) goes to the later steps that still fit,
    each layer stopping at its first step that does not, so the plans of two budgets differ
    only in the few layers at that margin. The exact :func:`solve` can reshuffle many layers
    for a budget a few thousand parameters larger; this one gives up at most a little of its
    summed error (0.6 % at most over MiniLM's budgets 0.36 to 0.38, ``docs/accuracy.md``). Raises :class:`BudgetError` as :func:`solve` does.
    """
    if any(not options for options in layers):
        raise ValueError("every layer needs at least one option")
    hulls = [_hull(options) for options in layers]
    position = [0] * len(layers)
    spent = sum(options[hull[0]].params for options, hull in zip(layers, hulls))
    if spent > budget:
        raise BudgetError(f"the budget ({budget:,} parameters) is below the smallest possible ({spent:,})")
    steps = []
    for i, (options, hull) in enumerate(zip(layers, hulls)):
        for j in range(1, len(hull)):
            low, high = options[hull[j - 1]], options[hull[j]]
            steps.append(((low.error - high.error) / (high.params - low.params), i, j))
    steps.sort(key=lambda step: (-step[0], step[1], step[2]))
    stopped: set[int] = set()
    for _, i, j in steps:
        if i in stopped or position[i] != j - 1:
            continue
        cost = layers[i][hulls[i][j]].params - layers[i][hulls[i][j - 1]].params
        if spent + cost > budget:
            stopped.add(i)  # this layer's later steps cost more still: leave it here
            continue
        spent += cost
        position[i] = j
    return [hull[p] for hull, p in zip(hulls, position)]
