"""More inputs for distillation: the training sentences with words swapped, labelled by the teacher.

Why: a small GLUE task (MRPC: 3,668 pairs) shows the student the teacher's function at a few
thousand points, and which of the student's many near-equal fits it ends at depends on the seed.
Near each training sentence the teacher still answers, and every answer it gives is a target the
student can match: task-distillation work (TinyBERT) grows small tasks this way. Here a variant
replaces each word, with probability ``rate``, by a word drawn from the task's own training text
(as often as it occurs there), at least one word per variant; sentence pairs change in each
sentence independently. No masked-LM model is needed (none ships offline with a sentence
encoder), and the teacher, not the original label, says what a variant is: its arg-max class, or
its score for a regression task, so that the task loss and the distillation loss agree on it.

Deterministic for a seed: the same options give the same variants on any machine.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from monarchify.errors import ConfigError
from monarchify.samples import model_device

DEFAULT_RATE = 0.15
"""The share of words a variant replaces (at least one)."""


def vocabulary(rows: Sequence[Sequence[str]]) -> list[str]:
    """Every word of the rows' texts, as often as it occurs: sampling from it draws words by
    their frequency in the task's text."""
    return [word for row in rows for text in row for word in text.split()]


def variant(text: str, words: Sequence[str], rate: float, rng: random.Random) -> str:
    """``text`` with each word replaced by a draw from ``words`` with probability ``rate``, and
    at least one replaced (a variant equal to its source teaches nothing new)."""
    tokens = text.split()
    if not tokens:
        return text
    chosen = [i for i in range(len(tokens)) if rng.random() < rate] or [rng.randrange(len(tokens))]
    for i in chosen:
        tokens[i] = rng.choice(words)
    return " ".join(tokens)


def variants(rows: Sequence[Sequence[str]], copies: int, rate: float = DEFAULT_RATE, seed: int = 0) -> list[tuple[str, ...]]:
    """``copies`` variants of every row (a row: the example's text fields), row by row."""
    if isinstance(copies, bool) or not isinstance(copies, int) or copies < 1:
        raise ConfigError(f"augment must be a positive number of variants per example, got {copies!r}", field="augment")
    if not 0 < rate <= 1:
        raise ConfigError(f"augment_rate must be in (0, 1], got {rate}", field="augment_rate")
    words = vocabulary(rows)
    if not words:
        raise ConfigError("the training text has no words to draw variants from", field="augment")
    rng = random.Random(seed)
    return [tuple(variant(text, words, rate, rng) for text in row) for row in rows for _ in range(copies)]


@torch.no_grad()
def teacher_labels(teacher: nn.Module, tokenizer: Any, rows: Sequence[Sequence[str]], *, regression: bool,
                   max_length: int, batch_size: int = 64) -> list[float] | list[int]:
    """The teacher's answer for each row: its arg-max class, or its score (one output)."""
    was_training = teacher.training
    teacher.eval()
    device = model_device(teacher)
    labels: list[Any] = []
    try:
        for start in range(0, len(rows), batch_size):
            batch = rows[start:start + batch_size]
            columns = list(zip(*batch))
            encoded = tokenizer(*columns, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
            logits = teacher(**{k: v.to(device) for k, v in encoded.items()}).logits
            labels.extend(logits[:, 0].tolist() if regression else logits.argmax(-1).tolist())
    finally:
        teacher.train(was_training)
    return labels
