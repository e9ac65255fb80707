"""The shipped GLUE metric (an ``evaluate`` module loaded by path) and the Trainer hook."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from monarchify.glue.tasks import GlueTask

METRIC_PATH = Path(__file__).with_name("glue_metric") / "glue_metric.py"


def load_metric(task: GlueTask) -> Any:
    """``evaluate.load`` of the local GLUE metric module for ``task``: works offline."""
    import evaluate

    return evaluate.load(str(METRIC_PATH), config_name=task.name, keep_in_memory=True)


def predictions_from_logits(task: GlueTask, logits: np.ndarray) -> np.ndarray:
    """Class ids (argmax) for classification, the single output for regression (STS-B)."""
    if isinstance(logits, tuple):
        logits = logits[0]
    logits = np.asarray(logits)
    if task.is_regression:
        return logits.reshape(-1).astype(np.float32)
    return logits.argmax(axis=-1)


def compute_metrics_fn(task: GlueTask) -> Callable[[Any], dict[str, float]]:
    """A ``Trainer`` ``compute_metrics`` for ``task``."""
    metric = load_metric(task)

    def compute_metrics(prediction: Any) -> dict[str, float]:
        predictions = predictions_from_logits(task, prediction.predictions)
        references = np.asarray(prediction.label_ids).reshape(-1)
        return metric.compute(predictions=predictions, references=references)

    return compute_metrics
