"""A budget allocated by layer kind, each kind's cost measured on the model's own output.

Why: on SmolLM2 every plan that prices layers one at a time (the summed layer errors, their
squares, Fisher estimates of the loss) lost to uniform block counts training-free, while what a
*kind* of layer costs the model differs far more than its layer errors say: all 30 ``up_proj``
at 2 blocks, the rest dense, multiply held-out perplexity by 1.47; all ``q_proj``/``o_proj`` at 4
blocks by 1.07 (docs/language-models.md). A kind is a layer's name inside its repeated block
(``mlp.up_proj``), so a 30-block model has a handful of kinds and the measurement is a handful
of forward passes per block count, not one per layer.

How: the model is converted uniformly at each candidate block count (calibrated as always; a
layer's factors do not depend on which other layers are converted, since calibration runs the
dense model); then, per kind and count, the dense model with only that kind's layers swapped
for the converted ones is scored on held-out text. Each kind then takes one option, dense or a
count, so that the summed increase in held-out loss is least within the parameter budget
(:func:`choose`: exact, over a few options per kind). Summing assumes the kinds' damage adds up;
it does not (it compounds), but the ranking it gives is what the allocation needs.

The conversions and the scoring are the caller's (:mod:`monarchify.lm.compress`); the module swap is
the pipeline's (:func:`~monarchify.pipeline.apply.apply`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from monarchify.errors import ConfigError
from monarchify.pipeline.apply import apply

_BLOCK_INDEX = re.compile(r"^.*?\.\d+\.")


def kind_of(name: str) -> str:
    """The layer's name inside its repeated block (``model.layers.3.mlp.up_proj`` ->
    ``mlp.up_proj``); a layer outside any numbered list is a kind of its own."""
    return _BLOCK_INDEX.sub("", name, count=1)


def kind_pattern(kind: str) -> str:
    """The ``include``/``exclude``/``overrides`` regex that selects every layer of ``kind``
    (patterns match whole trailing name components)."""
    return re.escape(kind)


def group_by_kind(names: Iterable[str]) -> dict[str, list[str]]:
    kinds: dict[str, list[str]] = {}
    for name in names:
        kinds.setdefault(kind_of(name), []).append(name)
    return kinds


@dataclass(frozen=True)
class KindOption:
    """One way to take a kind: at ``nblocks`` (None: dense), its layers' parameters, and the
    measured increase in held-out loss (mean negative log-likelihood per token) it causes."""

    nblocks: int | None
    params: int
    loss: float


def choose(options: Mapping[str, list[KindOption]], budget_params: int) -> dict[str, KindOption]:
    """One option per kind, the least summed ``loss`` whose summed ``params`` fit
    ``budget_params``; ties go to fewer parameters. Exact: a frontier of (parameters, loss)
    points kept non-dominated kind after kind."""
    frontier: list[tuple[int, float, tuple[KindOption, ...]]] = [(0, 0.0, ())]
    for kind in options:
        merged = sorted(((params + o.params, loss + o.loss, chosen + (o,)) for params, loss, chosen in frontier
                         for o in options[kind] if params + o.params <= budget_params), key=lambda p: (p[0], p[1]))
        frontier = []
        for point in merged:  # by parameters: keep a point only if it lowers the loss
            if not frontier or point[1] < frontier[-1][1]:
                frontier.append(point)
        if not frontier:
            raise ConfigError(f"no choice of block counts fits the budget of {budget_params:,} parameters "
                              f"(the kinds at their smallest need more): raise the budget")
    best = min(frontier, key=lambda p: (p[1], p[0]))
    return dict(zip(options, best[2]))


def measure(dense: Any, sources: Mapping[int, Any], kinds: Mapping[str, list[str]], score: Callable[[Any], float],
            on_measured: Callable[[str, int, float], None] = lambda kind, nblocks, value: None) -> dict[tuple[str, int], float]:
    """``score`` of ``dense`` with one kind's layers taken from ``sources[nblocks]`` (converted
    models), for every kind and count where the source converted them all; the dense layers
    are put back after each."""
    results = {}
    for nblocks, source in sources.items():
        for kind, names in kinds.items():
            replacements = {name: source.get_submodule(name) for name in names}
            if any(type(module) is type(dense.get_submodule(name)) for name, module in replacements.items()):
                continue  # kept dense there (no smaller at this count): not an option
            originals = {name: dense.get_submodule(name) for name in names}
            try:
                apply(dense, replacements)
                results[kind, nblocks] = score(dense)
            finally:
                apply(dense, originals)
            on_measured(kind, nblocks, results[kind, nblocks])
    return results
