"""Checks that a teacher fits its student, made before any long run starts.

Two runs learn from a teacher: healing (:mod:`monarchify.hf.heal`) pulls a converted model
towards the dense original it came from, and distillation (:mod:`monarchify.glue.train`) mixes
a dense model already fine-tuned on the task into the loss. Both compare the two models'
outputs (hidden states, logits), which only means something when the models agree on the
config values that shape those outputs. A teacher that does not fit is refused here in one
line, instead of failing with a shape error deep inside training, or worse, training on
meaningless targets.
"""

from __future__ import annotations

from torch import nn
from transformers import AutoModelForSequenceClassification

from monarchify.errors import ConfigError
from monarchify.hf.loading import load_model
from monarchify.monarch import STRUCTURED_LAYERS

DENSE_ORIGINAL_KEYS = ("model_type", "num_hidden_layers", "hidden_size", "vocab_size")
"""What a converted model shares with the dense model it was converted from."""


def has_monarch_layers(model: nn.Module) -> bool:
    """Whether any layer of ``model`` is a Monarch (or low-rank) layer: a converted model."""
    return any(isinstance(module, STRUCTURED_LAYERS) for module in model.modules())


def config_difference(student: nn.Module, teacher: nn.Module, keys: tuple[str, ...]) -> str | None:
    """The first of ``keys`` whose config values differ, as ``"key teacher vs student"`` (or None):
    what a teacher must share with its student for their outputs to be comparable."""
    for key in keys:
        mine, theirs = getattr(student.config, key, None), getattr(teacher.config, key, None)
        if mine != theirs:
            return f"{key} {theirs} vs {mine}"
    return None


def _require_same(student: nn.Module, teacher: nn.Module, keys: tuple[str, ...], refusal: str) -> None:
    """Raise ``refusal: <first difference>`` when the two configs differ on ``keys``."""
    difference = config_difference(student, teacher, keys)
    if difference:
        raise ConfigError(f"{refusal}: {difference}")


def check_dense_original(student: nn.Module, teacher: nn.Module, source: str, teacher_source: str) -> None:
    """Healing's pair: ``student`` (from ``source``) is converted, and ``teacher`` is the dense
    model it was converted from (same architecture and sizes, no Monarch layers)."""
    if not has_monarch_layers(student):
        raise ConfigError(f"'{source}' has no Monarch layers: convert it first (monarchify convert), then heal the result")
    if has_monarch_layers(teacher):
        raise ConfigError(f"teacher '{teacher_source}' has Monarch layers: the teacher is the dense original")
    _require_same(student, teacher, DENSE_ORIGINAL_KEYS, f"teacher '{teacher_source}' is not the dense original of '{source}'")


def load_task_teacher(source: str, student: nn.Module, *, task: str, outputs: int, hidden_states: bool) -> nn.Module:
    """The distillation teacher in ``source``, checked against the task and the student.

    It must carry a classification head fine-tuned on ``task`` with ``outputs`` outputs (its
    logits are the targets) and share the student's vocabulary; with ``hidden_states`` (the
    hidden-state term is on) also its depth and width.
    """
    teacher, info = load_model(source, AutoModelForSequenceClassification, output_loading_info=True)
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise ConfigError(
            f"distillation teacher '{source}' has no fine-tuned classification head ({', '.join(missing)}): "
            f"fine-tune the dense model on {task} first and pass that folder"
        )
    if teacher.config.num_labels != outputs:
        raise ConfigError(f"distillation teacher '{source}' has {teacher.config.num_labels} outputs; {task} needs {outputs}")
    keys = ("vocab_size",) + (("num_hidden_layers", "hidden_size") if hidden_states else ())
    _require_same(student, teacher, keys, f"distillation teacher '{source}' does not fit the model")
    return teacher
