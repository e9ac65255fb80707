"""monarchify: make pretrained transformers smaller and faster with Monarch matrices.

>>> import monarchify
>>> report = monarchify.convert(model, monarchify.MonarchConfig(nblocks=4))
>>> monarchify.save(model, "out/")                  # loads back with stock from_pretrained
>>> model = monarchify.load("out/")

Importing the package is cheap: names load on first use (torch and transformers only when a
name needs them), and the transformers plug-in that lets stock ``from_pretrained`` read
Monarch folders is registered when transformers loads its quantizers
(:mod:`monarchify.hf.registration`).
"""

from __future__ import annotations

import importlib
from typing import Any

from monarchify.hf.registration import register_when_needed
from monarchify.version import __version__

_EXPORTS = {
    "CalibrationConfig": ("monarchify.config", "CalibrationConfig"),
    "ConversionReport": ("monarchify.report", "ConversionReport"),
    "MonarchConfig": ("monarchify.config", "MonarchConfig"),
    "LowRankLinear": ("monarchify.monarch", "LowRankLinear"),
    "MonarchLinear": ("monarchify.monarch", "MonarchLinear"),
    "MonarchifyError": ("monarchify.errors", "MonarchifyError"),
    "Projection": ("monarchify.monarch", "Projection"),
    "SpeedGateConfig": ("monarchify.config", "SpeedGateConfig"),
    "convert": ("monarchify.pipeline", "convert"),
    "dry_run": ("monarchify.pipeline", "dry_run"),
    "from_config": ("monarchify.hf.fresh", "from_config"),
    "load": ("monarchify.hf.loading", "load_model"),
    "project": ("monarchify.monarch", "project"),
    "read_report": ("monarchify.hf.stored_report", "read_report"),
    "read_samples": ("monarchify.samples", "read_samples"),
    "save": ("monarchify.hf.saving", "save_model"),
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'monarchify' has no attribute {name!r}")
    module, attribute = _EXPORTS[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


register_when_needed()
