"""What a conversion did, layer by layer: the object behind the tables and the JSON.

Plain data: the same report is printed after ``convert``, saved as ``monarchify_report.json``
and read back by ``monarchify report``. A conversion builds it in exactly one place,
:func:`monarchify.pipeline.report.build_report`.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any


def natural_key(name: str) -> list[tuple[int, Any]]:
    """Sort key putting ``layer.2`` before ``layer.10``."""
    return [(0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", name)]


NEARLY_UNCHANGED = 0.99
"""Functional-check cosine from which a converted model's outputs count as nearly unchanged."""
CHANGED_A_LITTLE = 0.9
"""Cosine from which they changed a little; below it, a lot (the model needs fine-tuning)."""


def output_change(cosine: float) -> str:
    """The functional check's cosine (dense vs converted outputs) in words: ``nearly unchanged``,
    ``changed a little`` or ``changed a lot`` (also for a cosine that is not a number)."""
    if cosine >= NEARLY_UNCHANGED:
        return "nearly unchanged"
    if cosine >= CHANGED_A_LITTLE:
        return "changed a little"
    return "changed a lot"


@dataclass
class LayerReport:
    name: str
    kind: str
    """``Linear`` or ``Conv1D``."""
    shape: list[int]
    """``[d_out, d_in]`` of the dense weight."""
    nblocks: int
    """Monarch blocks; 1 for a layer kept dense or made low rank (no blocks)."""
    padded: bool
    bias: bool
    params_dense: int
    """Weight plus bias of the dense layer."""
    params_monarch: int
    """``L`` plus ``R`` plus bias."""
    rel_error: float | None = None
    """``||W - M||_F / ||W||_F``; ``None`` when unknown (e.g. a checkpoint without its report)."""
    kept_dense: bool = False
    """Selected but left dense (e.g. by a speed gate); ``reason`` says why."""
    reason: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    """Further per-layer measurements (output error on calibration data, timings...)."""
    rank: int = 0
    """Rank of the low-rank term added to the Monarch matrix (0: plain Monarch), or of the
    whole layer when ``structure`` is ``"lowrank"``; its ``rank·(d_in + d_out)`` parameters
    are in ``params_monarch`` and so in the FLOPs."""
    structure: str = "monarch"
    """What the layer became: ``"monarch"`` or ``"lowrank"`` (``U V`` alone, the baseline);
    ``params_monarch`` and ``flops_monarch`` are the converted layer's, whichever it is."""

    @property
    def flops_dense(self) -> int:
        """Multiply-adds ×2 per token for the weight."""
        d_out, d_in = self.shape
        return 2 * d_out * d_in

    @property
    def flops_monarch(self) -> int:
        if self.kept_dense:
            return self.flops_dense
        return 2 * (self.params_monarch - (self.shape[0] if self.bias else 0))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if not self.rank:  # reports of plain Monarch layers stay as they were before ranks existed
            del data["rank"]
        if self.structure == "monarch":  # and before low-rank layers existed
            del data["structure"]
        data["flops_dense"] = self.flops_dense
        data["flops_monarch"] = self.flops_monarch
        return data


@dataclass
class ConversionReport:
    layers: list[LayerReport]
    model_params_before: int
    model_params_after: int
    functional_check: dict[str, Any] | None = None
    """Dense vs converted model outputs on sample sentences: ``max_abs_diff``, ``rel_diff``."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Source model, recipe, versions."""

    @property
    def converted(self) -> list[LayerReport]:
        return [layer for layer in self.layers if not layer.kept_dense]

    def totals(self) -> dict[str, Any]:
        """Sums over the converted layers (``params_*``, ``flops_*``) and over every selected
        layer, kept-dense ones included (``selected_*``).

        Why both: a budget that keeps layers dense spends its share on them, so the converted
        layers alone (12 % of their weights, say) understate what the budget kept (37.6 %)."""
        conv = self.converted
        dense = sum(layer.params_dense for layer in conv)
        monarch = sum(layer.params_monarch for layer in conv)
        selected_dense = sum(layer.params_dense for layer in self.layers)
        selected_after = sum(layer.params_dense if layer.kept_dense else layer.params_monarch for layer in self.layers)
        sq_err = [layer for layer in conv if layer.rel_error is not None]
        return {
            "layers": len(conv),
            "kept_dense": len(self.layers) - len(conv),
            "params_dense": dense,
            "params_monarch": monarch,
            "params_ratio": monarch / dense if dense else None,
            "flops_dense": sum(layer.flops_dense for layer in conv),
            "flops_monarch": sum(layer.flops_monarch for layer in conv),
            "selected_layers": len(self.layers),
            "selected_params_dense": selected_dense,
            "selected_params_after": selected_after,
            "selected_params_ratio": selected_after / selected_dense if selected_dense else None,
            "selected_flops_dense": sum(layer.flops_dense for layer in self.layers),
            "selected_flops_after": sum(layer.flops_monarch for layer in self.layers),
            "model_params": self.model_params_after,
            "model_params_before": self.model_params_before,
            "mean_rel_error": (sum(layer.rel_error for layer in sq_err) / len(sq_err)) if sq_err else None,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": [layer.to_dict() for layer in self.layers],
            "totals": self.totals(),
            "functional_check": self.functional_check,
            "meta": self.meta,
        }
