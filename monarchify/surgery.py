"""Model surgery: replace the selected dense layers of a model by ``MonarchLinear`` in place.

``convert(model, config)`` is the one verb. It projects every selected layer first and
swaps them only once all projections succeeded, so a failure (a NaN weight, a bad layout)
leaves the model exactly as it was.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from monarchify.budget import apply_budget
from monarchify.config import MonarchConfig
from monarchify.errors import NonFiniteWeightError
from monarchify.monarch import MonarchLayout, MonarchLinear, Projection, project
from monarchify.report import ConversionReport, LayerReport
from monarchify.selection import FilterFn, dense_weight, is_conv1d, select

Projector = Callable[[str, torch.Tensor, MonarchLayout], Projection]
"""``(layer name, dense (d_out, d_in) weight, layout) -> Projection``: how a layer is projected."""
Progress = Callable[[str], None]
KeepDense = Callable[[str, nn.Module, MonarchLayout], "str | None"]
"""``(layer name, module, layout) -> reason to leave the layer dense, or None to convert it``."""


@dataclass
class PlannedLayer:
    name: str
    module: nn.Module
    layout: MonarchLayout

    @property
    def kind(self) -> str:
        return "Conv1D" if is_conv1d(self.module) else "Linear"

    @property
    def has_bias(self) -> bool:
        return getattr(self.module, "bias", None) is not None

    def report(self, rel_error: float | None = None) -> LayerReport:
        lay = self.layout
        bias = lay.d_out if self.has_bias else 0
        return LayerReport(
            name=self.name,
            kind=self.kind,
            shape=[lay.d_out, lay.d_in],
            nblocks=lay.nblocks,
            padded=lay.padded,
            bias=self.has_bias,
            params_dense=lay.d_out * lay.d_in + bias,
            params_monarch=lay.weight_params + bias,
            rel_error=rel_error,
        )

    def report_kept(self, reason: str) -> LayerReport:
        """The entry of a selected layer left dense (e.g. by the speed gate)."""
        entry = self.report()
        entry.kept_dense, entry.reason, entry.params_monarch = True, reason, entry.params_dense
        return entry


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def plan(model: nn.Module, config: MonarchConfig, filter_fn: FilterFn | None = None) -> list[PlannedLayer]:
    """The layers ``convert`` would replace, with their layouts checked; touches nothing."""
    planned = []
    for name, module, nblocks in select(model, config, filter_fn):
        d_out, d_in = dense_weight(module).shape
        layout = MonarchLayout(d_in, d_out, nblocks)
        try:
            layout.check_structure(config.allow_structural_zeros)
        except ValueError as exc:
            raise type(exc)(f"layer '{name}': {exc}") from None
        planned.append(PlannedLayer(name, module, layout))
    return planned


def dry_run(model: nn.Module, config: MonarchConfig, filter_fn: FilterFn | None = None) -> ConversionReport:
    """What ``convert`` would do (layers, shapes, parameters), without projecting anything."""
    config, budget_rows = _resolve_budget(model, config, filter_fn)
    layers = in_model_order(model, [p.report() for p in plan(model, config, filter_fn)] + budget_rows)
    before = count_params(model)
    saved = sum(layer.params_dense - layer.params_monarch for layer in layers)
    return ConversionReport(layers, before, before - saved)


def optimal_projector(config: MonarchConfig) -> Projector:
    def projector(name: str, weight: torch.Tensor, layout: MonarchLayout) -> Projection:
        return project(weight, layout.nblocks, allow_structural_zeros=config.allow_structural_zeros)

    return projector


def build_layer(projection: Projection, like: nn.Module) -> MonarchLinear:
    """A ``MonarchLinear`` holding ``projection``'s factors, on ``like``'s device and dtype."""
    weight = dense_weight(like)
    lay = projection.layout
    bias = getattr(like, "bias", None)
    with torch.device("meta"):
        layer = MonarchLinear(
            lay.d_in, lay.d_out, lay.nblocks, bias=bias is not None, allow_structural_zeros=True
        )
    layer = layer.to_empty(device=weight.device).to(weight.dtype)
    with torch.no_grad():
        layer.L.copy_(projection.L)
        layer.R.copy_(projection.R)
        if bias is not None:
            layer.bias.copy_(bias)
    layer.requires_grad_(weight.requires_grad)
    return layer


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def convert(
    model: nn.Module,
    config: MonarchConfig | None = None,
    filter_fn: FilterFn | None = None,
    *,
    projector: Projector | None = None,
    progress: Progress | None = None,
    keep_dense: KeepDense | None = None,
) -> ConversionReport:
    """Replace the selected linear layers of ``model`` by their optimal Monarch projection.

    Returns the per-layer report (shapes, parameters, exact relative errors). ``projector``
    swaps in another projection (e.g. activation-aware); ``progress`` is called with each
    layer's name as it is done; ``keep_dense`` (e.g. :class:`monarchify.speed_gate.SpeedGate`)
    may veto a layer, which then stays dense, unprojected, with its reason in the report.
    """
    config = config or MonarchConfig()
    config, budget_rows = _resolve_budget(model, config, filter_fn)
    projector = projector or optimal_projector(config)
    planned = plan(model, config, filter_fn)
    before = count_params(model)

    built: list[tuple[PlannedLayer, MonarchLinear, float]] = []
    kept: dict[str, str] = {}
    for item in planned:
        reason = keep_dense(item.name, item.module, item.layout) if keep_dense is not None else None
        if reason is not None:
            kept[item.name] = reason
            if progress is not None:
                progress(item.name)
            continue
        try:
            projection = projector(item.name, dense_weight(item.module), item.layout)
        except NonFiniteWeightError as exc:
            raise NonFiniteWeightError(f"layer '{item.name}': {exc}") from None
        built.append((item, build_layer(projection, item.module), projection.rel_error))
        if progress is not None:
            progress(item.name)

    for item, layer, _ in built:
        replace_module(model, item.name, layer)
    errors = {item.name: rel_error for item, _, rel_error in built}
    layers = [item.report(errors[item.name]) if item.name in errors else item.report_kept(kept[item.name]) for item in planned]
    layers = in_model_order(model, layers + budget_rows)
    return ConversionReport(layers, before, count_params(model), meta={"recipe": config.to_dict()})


def _resolve_budget(
    model: nn.Module, config: MonarchConfig, filter_fn: FilterFn | None
) -> tuple[MonarchConfig, list[LayerReport]]:
    """With ``config.budget``: the recipe with every layer's block count chosen (layers kept
    dense excluded) and their report rows; otherwise ``config`` unchanged."""
    if config.budget is None:
        return config, []
    config, _, rows = apply_budget(model, config, filter_fn)
    return config, rows


def in_model_order(model: nn.Module, layers: list[LayerReport]) -> list[LayerReport]:
    """``layers`` sorted the way ``model.named_modules()`` lists them."""
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return sorted(layers, key=lambda layer: order.get(layer.name, len(order)))
