"""GLUE fine-tuning: the task table, TSV/Hub data loading, the shipped metric, Trainer wiring.

Imports point one way: ``glue`` uses ``hf``/``surgery``; nothing below it imports ``glue``.
"""

from monarchify.glue.data import DataError, GlueData, load_glue, load_hub, load_test_tsv, load_tsv, read_tsv
from monarchify.glue.metrics import METRIC_PATH, load_metric
from monarchify.glue.tasks import TASK_NAMES, TASKS, GlueTask, get_task
from monarchify.glue.train import FinetuneEvents, FinetuneOptions, FinetuneResult, MonarchTrainer, finetune

__all__ = [
    "METRIC_PATH",
    "TASKS",
    "TASK_NAMES",
    "DataError",
    "FinetuneEvents",
    "FinetuneOptions",
    "FinetuneResult",
    "GlueData",
    "GlueTask",
    "MonarchTrainer",
    "finetune",
    "get_task",
    "load_glue",
    "load_hub",
    "load_metric",
    "load_test_tsv",
    "load_tsv",
    "read_tsv",
]
