"""What a conversion did, layer by layer: the object behind the tables and the JSON.

Plain data: the same report is printed after ``convert``, saved as ``monarchify_report.json``
and read back by ``monarchify report``. A conversion builds it in exactly one place,
:func:`monarchify.pipeline.report.build_report`.
"""

from __future__ import annotations

import re
from dataclasses import MISSING, asdict, dataclass, field, fields
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

    @classmethod
    def from_dict(cls, data: Any) -> LayerReport:
        """The row :meth:`to_dict` wrote, so ``from_dict(row).to_dict() == row``.

        The FLOPs it adds are derived, so they are dropped; fields that rows written before
        they existed lack (``rank``, ``structure``...) take their defaults. Every field is
        type-checked, because a saved report is a file someone may have edited: a malformed
        row raises ``ValueError`` naming the field instead of surfacing later as a wrong sum."""
        if not isinstance(data, dict):
            raise ValueError("a layer row is not an object")
        values = {}
        for spec in fields(cls):
            if spec.name not in data:
                if spec.default is MISSING and spec.default_factory is MISSING:
                    raise ValueError(f"a layer row has no '{spec.name}'")
                continue
            value = data[spec.name]
            if not _LAYER_FIELDS[spec.name](value):
                raise ValueError(f"layer row '{data.get('name')}' has a malformed '{spec.name}': {value!r}")
            values[spec.name] = value
        return cls(**values)


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

    @classmethod
    def from_dict(cls, data: Any) -> ConversionReport:
        """The report :meth:`to_dict` wrote (``monarchify_report.json``), so
        ``from_dict(d).to_dict() == d``: the totals are recomputed from the rows, and only the
        two model parameter counts, which no row holds, are read from them. Raises
        ``ValueError`` for anything that is not such a report."""
        if not isinstance(data, dict):
            raise ValueError("a report is not an object")
        layers, totals = data.get("layers"), data.get("totals")
        if not isinstance(layers, list) or not isinstance(totals, dict):
            raise ValueError("a report's layers or totals are malformed")
        counts = [totals.get(key) for key in ("model_params_before", "model_params")]
        if not all(_is_int(count) for count in counts):
            raise ValueError("a report's totals have no model parameter counts")
        check, meta = data.get("functional_check"), data.get("meta", {})
        if not isinstance(check, (dict, type(None))) or not isinstance(meta, dict):
            raise ValueError("a report's functional_check or meta are malformed")
        return cls([LayerReport.from_dict(row) for row in layers], counts[0], counts[1], check, meta)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


_LAYER_FIELDS = {
    "name": lambda v: isinstance(v, str),
    "kind": lambda v: isinstance(v, str),
    "shape": lambda v: isinstance(v, list) and len(v) == 2 and all(_is_int(d) for d in v),
    "nblocks": _is_int,
    "padded": lambda v: isinstance(v, bool),
    "bias": lambda v: isinstance(v, bool),
    "params_dense": _is_int,
    "params_monarch": _is_int,
    "rel_error": lambda v: v is None or _is_number(v),
    "kept_dense": lambda v: isinstance(v, bool),
    "reason": lambda v: v is None or isinstance(v, str),
    "extra": lambda v: isinstance(v, dict),
    "rank": _is_int,
    "structure": lambda v: isinstance(v, str),
}
"""What each :class:`LayerReport` field may hold in a saved row."""
