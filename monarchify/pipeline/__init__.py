"""One conversion pipeline, each stage once and in its own module:

    plan → observe → allocate → project → apply → report

* :mod:`~.plan`: select the layers and their block counts from the recipe;
* :mod:`~.observe`: only when the recipe calibrates, collect each layer's input statistics on
  real text through the dense model (and for ``budget_objective="output"``, how far each
  layer's output errors move the model's output);
* :mod:`~.allocate`: the parameter budget and the speed gate decide each layer's final block
  count, or keep it dense;
* :mod:`~.project`: compute every replacement (plain or activation-aware projection, or any
  other projector);
* :mod:`~.apply`: swap them in, all at once;
* :mod:`~.report`: build the report, in this one place.

:func:`convert` runs them all; :func:`dry_run` stops after allocate. Both know nothing of
transformers or of the command line: :mod:`monarchify.hf.convert` wraps them with loading and
saving, and the CLI wraps that.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from monarchify.config import MonarchConfig
from monarchify.errors import ConfigError
from monarchify.pipeline.allocate import Allocation, allocate, needs_fisher, needs_sensitivity
from monarchify.pipeline.apply import apply
from monarchify.pipeline.observe import Observation, observe
from monarchify.pipeline.plan import FilterFn, PlannedLayer, plan
from monarchify.pipeline.project import Projector, default_projector, project_layers
from monarchify.pipeline.report import build_report
from monarchify.report import ConversionReport
from monarchify.samples import Sample, TextSamples, split_samples

__all__ = ["Events", "FilterFn", "Projector", "convert", "dry_run"]


class Events:
    """Hooks for a front end to show progress; every method is optional."""

    def observing(self, samples: int) -> None:
        """Calibration text starts running through the dense model."""

    def projecting(self, total: int) -> None:
        """Projection starts; :meth:`projected` follows once per planned layer."""

    def projected(self, name: str) -> None:
        """A planned layer is done (projected, or decided to stay dense)."""


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def check_calibration_text(given: bool, config: MonarchConfig) -> None:
    """A calibration text and a calibrating recipe go together. A text the recipe does not
    use is refused rather than dropped: its caller expects an activation-aware conversion and
    would get a plain one without a word."""
    if config.calibration is None and given:
        raise ConfigError("calibration text was given, but the recipe does not calibrate (set its calibration)")
    if config.calibration is not None and not given:
        raise ConfigError("the recipe calibrates, but no calibration samples were given")


def calibration_text(samples: TextSamples | Sequence[Sample] | None, config: MonarchConfig) -> TextSamples | None:
    """The samples a recipe calibrates on (split into fitting and held-out ones), checked
    against whether it calibrates at all."""
    check_calibration_text(samples is not None, config)
    if samples is None:
        return None
    if isinstance(samples, TextSamples):
        return samples
    return split_samples(list(samples), config.calibration.samples, config.calibration.heldout, source="(in memory)")


def _observe(
    model: nn.Module, layers: list[PlannedLayer], config: MonarchConfig, samples: Any, tokenizer: Any, events: Events
) -> Observation | None:
    text = calibration_text(samples, config)
    if text is None:
        return None
    events.observing(len(text.fit) + len(text.heldout))
    return observe(model, {layer.name: layer.module for layer in layers}, text, tokenizer, config.calibration,
                   sensitivity=needs_sensitivity(layers, config), fisher=needs_fisher(layers, config))


def _decide(
    model: nn.Module, config: MonarchConfig, filter_fn: FilterFn | None, samples: Any, tokenizer: Any, events: Events
) -> tuple[list[PlannedLayer], Observation | None, Allocation]:
    """plan → observe → allocate: everything decided before a weight is projected."""
    layers = plan(model, config, filter_fn)
    observation = _observe(model, layers, config, samples, tokenizer, events)
    covariance = observation.fit.covariance if observation is not None else None
    weights = observation.sensitivity if observation is not None else None
    row_weights = observation.fisher if observation is not None else None
    return layers, observation, allocate(layers, config, covariance=covariance, weights=weights, row_weights=row_weights)


def dry_run(
    model: nn.Module,
    config: MonarchConfig | None = None,
    filter_fn: FilterFn | None = None,
    *,
    samples: TextSamples | Sequence[Sample] | None = None,
    tokenizer: Any = None,
    events: Events | None = None,
) -> ConversionReport:
    """What :func:`convert` would do (layers, block counts, parameters), projecting nothing.

    A recipe with a budget is solved, calibrated when it calibrates, and a speed gate times
    the layers: the plan shown is the one a conversion would carry out.
    """
    config = config or MonarchConfig()
    layers, observation, allocation = _decide(model, config, filter_fn, samples, tokenizer, events or Events())
    return build_report(layers, allocation, config, params_before=count_params(model), observation=observation)


def convert(
    model: nn.Module,
    config: MonarchConfig | None = None,
    filter_fn: FilterFn | None = None,
    *,
    samples: TextSamples | Sequence[Sample] | None = None,
    tokenizer: Any = None,
    projector: Projector | None = None,
    events: Events | None = None,
) -> ConversionReport:
    """Replace the selected linear layers of ``model`` by Monarch layers, in place.

    ``config`` is the whole recipe (default: 4 blocks for every linear layer inside the
    repeated blocks). When it calibrates, ``samples`` (a :class:`~monarchify.samples.TextSamples`
    or a list of texts and text pairs) and the model's ``tokenizer`` feed the dense model.
    ``filter_fn(module, name)`` selects layers instead of the default, like torchao's
    ``quantize_``. ``projector`` replaces the default projection (see :mod:`.project`).

    All-or-nothing: every layer is projected before any is swapped in, so a failure (a NaN
    weight, a bad layout) leaves the model as it was. Returns the per-layer report.
    """
    config = config or MonarchConfig()
    events = events or Events()
    if config.calibration is not None and config.calibration.sequential:
        raise ConfigError("sequential calibration runs the model one block at a time: use "
                          "monarchify.hf.blockwise.convert_blockwise (what convert_pretrained runs)")
    layers, observation, allocation = _decide(model, config, filter_fn, samples, tokenizer, events)
    before = count_params(model)
    events.projecting(len(layers))
    projector = projector or default_projector(observation, config.allow_structural_zeros, config.structure)
    projected = project_layers(layers, allocation, projector, events.projected)
    apply(model, {name: result.module for name, result in projected.items()})
    return build_report(
        layers, allocation, config, params_before=before, params_after=count_params(model),
        observation=observation, projected=projected,
    )
