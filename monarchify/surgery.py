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

from monarchify.config import MonarchConfig
from monarchify.errors import NonFiniteWeightError
from monarchify.monarch import MonarchLayout, MonarchLinear, Projection, project
from monarchify.report import ConversionReport, LayerReport
from monarchify.selection import FilterFn, dense_weight, is_conv1d, select

Projector = Callable[[str, torch.Tensor, MonarchLayout], Projection]
"""``(layer name, dense (d_out, d_in) weight, layout) -> Projection``: how a layer is projected."""
Progress = Callable[[str], None]


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
    layers = [p.report() for p in plan(model, config, filter_fn)]
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
) -> ConversionReport:
    """Replace the selected linear layers of ``model`` by their optimal Monarch projection.

    Returns the per-layer report (shapes, parameters, exact relative errors). ``projector``
    swaps in another projection (e.g. activation-aware); ``progress`` is called with each
    layer's name as it is done.
    """
    config = config or MonarchConfig()
    projector = projector or optimal_projector(config)
    planned = plan(model, config, filter_fn)
    before = count_params(model)

    built: list[tuple[PlannedLayer, MonarchLinear, float]] = []
    for item in planned:
        try:
            projection = projector(item.name, dense_weight(item.module), item.layout)
        except NonFiniteWeightError as exc:
            raise NonFiniteWeightError(f"layer '{item.name}': {exc}") from None
        built.append((item, build_layer(projection, item.module), projection.rel_error))
        if progress is not None:
            progress(item.name)

    for item, layer, _ in built:
        replace_module(model, item.name, layer)
    layers = [item.report(rel_error) for item, _, rel_error in built]
    return ConversionReport(layers, before, count_params(model), meta={"recipe": config.to_dict()})
