"""Stage 6, report: the one place a conversion's :class:`~monarchify.report.ConversionReport`
is built, from what the earlier stages decided and measured.

A dry run builds it from the plan and the allocation alone (no errors yet); a conversion adds
each projected layer's error. Rows follow the plan, which follows the model's module order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from monarchify.config import MonarchConfig
from monarchify.monarch import MonarchLayout
from monarchify.monarch.lowrank import lowrank_params
from monarchify.pipeline.allocate import Allocation
from monarchify.pipeline.observe import Observation
from monarchify.pipeline.plan import PlannedLayer
from monarchify.pipeline.project import Projected
from monarchify.report import ConversionReport, LayerReport


def recorded_recipe(config: MonarchConfig, allocation: Allocation, observation: Observation | None) -> dict[str, Any]:
    """The recipe a checkpoint records: budget choices written out as per-layer overrides and
    excludes, and the calibration as a record of the data and method used."""
    recipe = replace(allocation.recipe(config), calibration=None).to_dict()
    recipe["calibration"] = observation.record() if observation is not None else None
    return recipe


def _row(layer: PlannedLayer, allocation: Allocation, projected: Projected | None) -> LayerReport:
    kept = allocation.kept.get(layer.name)
    nblocks = allocation.nblocks.get(layer.name) or (kept.nblocks if kept is not None else None)
    bias = layer.d_out if layer.has_bias else 0
    rank = allocation.ranks.get(layer.name, 0) if kept is None else 0
    lowrank = allocation.structure == "lowrank"
    if lowrank:  # no blocks: the rank says it all
        nblocks = 1
    layout = MonarchLayout(layer.d_in, layer.d_out, nblocks) if nblocks else None
    if kept is not None:
        params = layer.params_dense
    else:
        params = (0 if lowrank else layout.weight_params) + bias + lowrank_params(rank, layer.d_in, layer.d_out)
    row = LayerReport(
        name=layer.name,
        kind=layer.kind,
        shape=[layer.d_out, layer.d_in],
        nblocks=nblocks or 1,
        padded=layout.padded if layout is not None and not lowrank else False,
        bias=layer.has_bias,
        params_dense=layer.params_dense,
        params_monarch=params,
        rel_error=projected.rel_error if projected is not None else None,
        kept_dense=kept is not None,
        reason=kept.reason if kept is not None else None,
        rank=rank,
        structure="lowrank" if lowrank and kept is None else "monarch",
    )
    if projected is not None:
        row.extra.update(projected.extra)
    if layer.name in allocation.speed:
        row.extra["speed"] = allocation.speed[layer.name].to_dict()
    return row


def build_report(
    layers: Sequence[PlannedLayer],
    allocation: Allocation,
    config: MonarchConfig,
    *,
    params_before: int,
    params_after: int | None = None,
    observation: Observation | None = None,
    projected: dict[str, Projected] | None = None,
) -> ConversionReport:
    """The report of a conversion (``projected`` given) or of a dry run (``params_after`` then
    follows from the planned parameter counts)."""
    rows = [_row(layer, allocation, (projected or {}).get(layer.name)) for layer in layers]
    if params_after is None:
        params_after = params_before - sum(row.params_dense - row.params_monarch for row in rows)
    meta: dict[str, Any] = {"recipe": recorded_recipe(config, allocation, observation)}
    if allocation.budget is not None:
        meta["budget"] = allocation.budget.to_dict()
    if observation is not None:
        meta["calibration"] = {
            **observation.record(), "tokens": observation.tokens, "collect_seconds": round(observation.seconds, 2),
            **_mean_output_errors(rows),
        }
    if config.speed_gate is not None:
        gate = config.speed_gate
        meta["speed_gate"] = {"tokens": gate.tokens, "backward": gate.backward, "repeat": gate.repeat,
                              "kept_dense": sum(not verdict.faster for verdict in allocation.speed.values())}
    return ConversionReport(rows, params_before, params_after, meta=meta)


def _mean_output_errors(rows: list[LayerReport]) -> dict[str, float]:
    measured = [row.extra for row in rows if "output_rel_error" in row.extra]
    if not measured:
        return {}
    return {
        "mean_output_rel_error": sum(e["output_rel_error"] for e in measured) / len(measured),
        "mean_output_rel_error_plain": sum(e["output_rel_error_plain"] for e in measured) / len(measured),
    }
