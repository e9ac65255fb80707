"""GLUE fine-tuning: the task table, TSV/Hub data loading, the shipped metric, Trainer wiring.

Imports point one way: ``glue`` uses ``hf``/``pipeline``; nothing below it imports ``glue``.
Names are loaded on first use, so ``monarchify.glue.tasks`` stays cheap to import (the command
line builds its help from it) while ``datasets`` and ``Trainer`` load only when needed.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "DataError": "data", "GlueData": "data", "load_glue": "data", "load_hub": "data",
    "load_test_tsv": "data", "load_tsv": "data", "read_tsv": "data",
    "METRIC_PATH": "metrics", "load_metric": "metrics",
    "TASK_NAMES": "tasks", "TASKS": "tasks", "GlueTask": "tasks", "get_task": "tasks",
    "FinetuneEvents": "options", "FinetuneOptions": "options", "FinetuneResult": "options",
    "MonarchTrainer": "train", "finetune": "train",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'monarchify.glue' has no attribute {name!r}")
    return getattr(importlib.import_module(f"monarchify.glue.{home}"), name)
