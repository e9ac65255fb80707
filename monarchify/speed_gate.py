"""The speed gate: keep a layer dense where Monarch is not faster on this device.

Monarch is smaller everywhere but not faster everywhere: on a GPU in bf16 a BERT-base
sized layer can lose to dense at small batches (``docs/performance.md``). ``convert
--only-if-faster`` asks this gate about every selected layer before projecting it. The gate
times ``nn.Linear`` against ``MonarchLinear`` at the layer's shape, dtype and device, for
``tokens`` rows, forward and forward+backward (timings depend on shapes only, so random
weights do, and each distinct shape is timed once). A layer stays dense unless Monarch
wins both; the report says so per layer, with the measured ratios.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from monarchify.bench import layer_benchmark
from monarchify.errors import ConfigError
from monarchify.monarch import MonarchLayout
from monarchify.report import ConversionReport
from monarchify.selection import dense_weight


@dataclass(frozen=True)
class SpeedVerdict:
    forward: float
    """dense time / Monarch time, forward only."""
    forward_backward: float | None
    """dense time / Monarch time, forward+backward (None when not measured)."""
    tokens: int
    where: str

    @property
    def faster(self) -> bool:
        return self.forward > 1.0 and (self.forward_backward is None or self.forward_backward > 1.0)

    @property
    def reason(self) -> str | None:
        """Why the layer stays dense (None when Monarch is faster)."""
        if self.faster:
            return None
        return f"not faster on {self.where}, {self.tokens} tokens: {self.describe()}"

    def describe(self) -> str:
        text = f"fwd {self.forward:.2f}×"
        if self.forward_backward is not None:
            text += f", fwd+bwd {self.forward_backward:.2f}×"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {"forward_ratio": self.forward, "forward_backward_ratio": self.forward_backward, "tokens": self.tokens,
                "where": self.where, "faster": self.faster}


class SpeedGate:
    """Callable as ``gate(name, module, layout)``: the reason to keep the layer dense, or None.

    Pass it as ``keep_dense`` to :func:`monarchify.surgery.convert`; afterwards
    :meth:`annotate` copies the measured ratios into the report's layers.
    """

    def __init__(self, tokens: int = 512, *, backward: bool = True, warmup: int = 3, repeat: int = 10) -> None:
        if tokens < 1:
            raise ConfigError(f"--tokens must be a positive integer, got {tokens}")
        self.tokens = tokens
        self.backward = backward
        self.warmup = warmup
        self.repeat = repeat
        self.verdicts: dict[str, SpeedVerdict] = {}
        self._by_shape: dict[tuple, SpeedVerdict] = {}

    def measure(self, layout: MonarchLayout, dtype: torch.dtype, device: torch.device, bias: bool) -> SpeedVerdict:
        key = (layout.d_in, layout.d_out, layout.nblocks, dtype, str(device), bias)
        if key not in self._by_shape:
            result = layer_benchmark(
                layout.d_in, layout.d_out, layout.nblocks, self.tokens, dtype=dtype, device=device, bias=bias,
                backward=self.backward, warmup=self.warmup, repeat=self.repeat,
            )
            fb = result.get("forward_backward")
            where = f"{device.type} {str(dtype).removeprefix('torch.')}"
            self._by_shape[key] = SpeedVerdict(result["forward"]["ratio"], fb["ratio"] if fb else None, self.tokens, where)
        return self._by_shape[key]

    def __call__(self, name: str, module: nn.Module, layout: MonarchLayout) -> str | None:
        weight = dense_weight(module)
        verdict = self.measure(layout, weight.dtype, weight.device, getattr(module, "bias", None) is not None)
        self.verdicts[name] = verdict
        return verdict.reason

    def annotate(self, report: ConversionReport) -> None:
        """Record every layer's measured ratios in ``extra['speed']`` and the settings in ``meta``."""
        for layer in report.layers:
            if layer.name in self.verdicts:
                layer.extra["speed"] = self.verdicts[layer.name].to_dict()
        report.meta["speed_gate"] = {"tokens": self.tokens, "backward": self.backward, "repeat": self.repeat,
                                     "kept_dense": sum(not v.faster for v in self.verdicts.values())}

    def mark_plan(self, report: ConversionReport, model: nn.Module) -> None:
        """Apply the gate to a dry-run plan: layers it would keep dense are marked so."""
        for layer in report.layers:
            if layer.kept_dense:  # already left dense by something else (e.g. a budget)
                continue
            d_out, d_in = layer.shape
            reason = self(layer.name, model.get_submodule(layer.name), MonarchLayout(d_in, d_out, layer.nblocks))
            if reason is not None:
                report.model_params_after += layer.params_dense - layer.params_monarch
                layer.kept_dense, layer.reason, layer.params_monarch = True, reason, layer.params_dense
        self.annotate(report)
