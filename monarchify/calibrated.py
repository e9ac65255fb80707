"""Activation-aware conversion: calibration statistics in, a :data:`~monarchify.surgery.Projector`
out, and every layer's output error on held-out samples written into the report.

The projector minimises each layer's output error on the calibration activations of the
*dense* model (block-diagonal whitening, then ``sweeps`` of full-covariance refinement; see
:mod:`monarchify.monarch.whitening`). Calibrating layer after layer on the converted
model's own activations (GPTQ-style) was measured and did not pay on MiniLM (worse per-layer
and end-to-end error, and one forward pass per layer group; ``docs/accuracy.md``), so it is
not offered.

For comparison the plain projection's held-out output error is recorded too
(``extra["output_rel_error_plain"]``), next to ``extra["output_rel_error"]``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from monarchify.budget import BudgetPlan, apply_budget
from monarchify.calibration import (
    DEFAULT_MAX_LENGTH,
    CalibrationData,
    InputStatistics,
    collect,
    tokenize,
)
from monarchify.config import MonarchConfig
from monarchify.errors import ConfigError
from monarchify.monarch import MonarchLayout, Projection, project
from monarchify.monarch.whitening import DEFAULT_DAMPING, assemble, output_rel_error, project_whitened, refine_full
from monarchify.report import ConversionReport, LayerReport
from monarchify.selection import FilterFn, select
from monarchify.surgery import in_model_order

DEFAULT_SWEEPS = 2
"""Full-covariance refinement sweeps. On MiniLM at 4 blocks, 2 sweeps take the mean held-out
output error from 0.348 (closed form) to 0.294, 8 sweeps only to 0.286 for 4× the work
(``docs/accuracy.md``)."""


@dataclass
class CalibrationSettings:
    damping: float = DEFAULT_DAMPING
    """Added to each covariance's diagonal, times its mean diagonal (insensitive on MiniLM
    between 0 and 0.1)."""
    sweeps: int = DEFAULT_SWEEPS
    """Full-covariance refinement sweeps; 0 keeps the closed-form block-diagonal whitening."""
    max_length: int = DEFAULT_MAX_LENGTH
    batch_size: int = 32

    def __post_init__(self) -> None:
        if isinstance(self.sweeps, bool) or not isinstance(self.sweeps, int) or self.sweeps < 0:
            raise ConfigError(f"refinement sweeps must be a non-negative integer, got {self.sweeps!r}")
        if not self.damping >= 0:
            raise ConfigError(f"damping must be >= 0, got {self.damping!r}")


@dataclass
class Calibration:
    """Input statistics of the selected layers on fitting and on held-out samples."""

    data: CalibrationData
    fit: InputStatistics
    heldout: InputStatistics
    settings: CalibrationSettings
    tokens: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def describe(self) -> dict[str, Any]:
        """The recipe's record of how the factors were obtained."""
        s = self.settings
        return {
            **self.data.describe(),
            "method": "whitened" + (f"+full-refine x{s.sweeps}" if s.sweeps else " (block-diagonal)"),
            "damping": s.damping, "sweeps": s.sweeps, "max_length": s.max_length,
        }


def calibrate(
    model: nn.Module,
    tokenizer: Any,
    data: CalibrationData,
    modules: dict[str, nn.Module],
    settings: CalibrationSettings | None = None,
) -> Calibration:
    """Run the dense model on the fitting and the held-out samples, collecting the inputs of
    ``modules``."""
    settings = settings or CalibrationSettings()
    start = time.perf_counter()
    stats = {}
    tokens = {}
    max_length = min(settings.max_length, _position_limit(model, tokenizer))
    for part, samples in (("fit", data.fit), ("heldout", data.heldout)):
        batches = tokenize(samples, tokenizer, batch_size=settings.batch_size, max_length=max_length)
        tokens[part] = sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel() for b in batches)
        stats[part] = collect(model, modules, batches)
    return Calibration(data, stats["fit"], stats["heldout"], settings, tokens, time.perf_counter() - start)


def _position_limit(model: nn.Module, tokenizer: Any) -> int:
    """The longest input the model and tokenizer accept (position embeddings run out)."""
    config = getattr(model, "config", None)
    limits = [getattr(config, key, None) for key in ("max_position_embeddings", "n_positions")]
    limits.append(getattr(tokenizer, "model_max_length", None))
    return min([n for n in limits if isinstance(n, int) and n > 0] or [DEFAULT_MAX_LENGTH])


class CalibratedProjector:
    """A surgery projector minimising each layer's output error on the calibration data."""

    def __init__(self, calibration: Calibration, allow_structural_zeros: bool = False) -> None:
        self.calibration = calibration
        self.allow_structural_zeros = allow_structural_zeros
        self.extras: dict[str, dict[str, float]] = {}

    def __call__(self, name: str, weight: torch.Tensor, layout: MonarchLayout) -> Projection:
        settings = self.calibration.settings
        cov = self.calibration.fit.covariance(name)
        result = project_whitened(
            weight, cov, layout.nblocks, damping=settings.damping, allow_structural_zeros=self.allow_structural_zeros
        )
        if settings.sweeps:
            result = refine_full(weight, cov, result, sweeps=settings.sweeps, damping=settings.damping)
        held = self.calibration.heldout.covariance(name)
        plain = project(weight, layout.nblocks, allow_structural_zeros=self.allow_structural_zeros)
        w = weight.detach().to(torch.float64)
        self.extras[name] = {
            "output_rel_error": output_rel_error(w, assemble(result.projection.L, result.projection.R, layout), held),
            "output_rel_error_plain": output_rel_error(w, assemble(plain.L.to(w.dtype), plain.R.to(w.dtype), layout), held),
        }
        return result.projection

    def annotate(self, report: ConversionReport) -> None:
        """Write the held-out output errors into the report's layers."""
        for layer in report.layers:
            layer.extra.update(self.extras.get(layer.name, {}))
        extras = list(self.extras.values())
        if extras:
            report.meta.setdefault("calibration", {}).update({
                "mean_output_rel_error": sum(e["output_rel_error"] for e in extras) / len(extras),
                "mean_output_rel_error_plain": sum(e["output_rel_error_plain"] for e in extras) / len(extras),
            })


# --- both accuracy levers, prepared before surgery ----------------------------------------


@dataclass
class Prepared:
    """What calibration and the budget decided, before any layer is projected."""

    config: MonarchConfig
    """The recipe to record: budget resolved into per-layer block counts, calibration described."""
    calibration: Calibration | None = None
    budget: BudgetPlan | None = None
    kept_rows: list[LayerReport] = field(default_factory=list)
    projector: CalibratedProjector | None = None

    @property
    def surgery_config(self) -> MonarchConfig:
        """The recipe handed to surgery: every layer already pinned, so nothing to re-solve."""
        return replace(self.config, budget=None)

    def finish(self, report: ConversionReport, model: nn.Module) -> ConversionReport:
        """Add what surgery does not know: layers the budget kept dense, held-out output
        errors, and the calibration and budget records."""
        report.meta["recipe"] = self.config.to_dict()
        if self.budget is not None:
            report.layers = in_model_order(model, report.layers + self.kept_rows)
            report.meta["budget"] = self.budget.to_dict()
        if self.calibration is not None:
            report.meta["calibration"] = {
                **self.calibration.describe(),
                "tokens": self.calibration.tokens,
                "collect_seconds": round(self.calibration.seconds, 2),
            }
        if self.projector is not None:
            self.projector.annotate(report)
        return report


def prepare_conversion(
    model: nn.Module,
    tokenizer: Any,
    config: MonarchConfig,
    data: CalibrationData | None = None,
    settings: CalibrationSettings | None = None,
    filter_fn: FilterFn | None = None,
) -> Prepared:
    """Collect calibration statistics (when ``data`` is given) and resolve ``config.budget``
    (activation-weighted when calibrated)."""
    calibration = None
    if data is not None:
        modules = {name: module for name, module, _ in select(model, config, filter_fn)}
        calibration = calibrate(model, tokenizer, data, modules, settings)
        config = replace(config, calibration=calibration.describe())
    covariance = calibration.fit.covariance if calibration is not None else None
    resolved, plan, rows = apply_budget(model, config, filter_fn, covariance=covariance)
    projector = CalibratedProjector(calibration, config.allow_structural_zeros) if calibration else None
    return Prepared(resolved, calibration, plan, rows, projector)
