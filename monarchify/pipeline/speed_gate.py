"""The speed gate: keep a layer dense where Monarch is not faster on this device.

Monarch is smaller everywhere but not faster everywhere: on a GPU in bf16 a BERT-base
sized layer can lose to dense at small batches (``docs/performance.md``). A recipe with a
``speed_gate`` (:class:`~monarchify.config.SpeedGateConfig`) has the allocate stage ask this
gate about every layer it would convert, before anything is projected. The gate times
``nn.Linear`` against ``MonarchLinear`` at the layer's shape, dtype and device, for ``tokens``
rows, forward and forward+backward (timings depend on shapes only, so random weights do,
and each distinct shape is timed once). A layer stays dense unless Monarch
wins both; the report says so per layer, with the measured ratios.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from monarchify.bench import layer_benchmark
from monarchify.config import SpeedGateConfig
from monarchify.monarch import MonarchLayout


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
    """Times a layout once per distinct shape, dtype, device and bias, and remembers the verdict."""

    def __init__(self, config: SpeedGateConfig | None = None) -> None:
        self.config = config or SpeedGateConfig()
        self._by_shape: dict[tuple, SpeedVerdict] = {}

    def measure(self, layout: MonarchLayout, dtype: torch.dtype, device: torch.device, bias: bool) -> SpeedVerdict:
        key = (layout.d_in, layout.d_out, layout.nblocks, layout.output_order, dtype, str(device), bias)
        if key not in self._by_shape:
            c = self.config
            result = layer_benchmark(
                layout.d_in, layout.d_out, layout.nblocks, c.tokens, dtype=dtype, device=device, bias=bias,
                backward=c.backward, warmup=c.warmup, repeat=c.repeat, output_order=layout.output_order,
            )
            fb = result.get("forward_backward")
            where = f"{device.type} {str(dtype).removeprefix('torch.')}"
            self._by_shape[key] = SpeedVerdict(result["forward"]["ratio"], fb["ratio"] if fb else None, c.tokens, where)
        return self._by_shape[key]
