"""Healing: a short pass that trains a converted model to reproduce its dense original's hidden
states on unlabeled text, before any task fine-tuning.

Why: the projection is optimal for each layer on its own, but the errors of 36 layers compound;
the task fine-tuning that follows then spends its few hundred steps repairing the model instead
of learning the task. Matching the teacher layer by layer needs no labels, so it can use any
text, and it leaves a model that is closer to the dense one for every downstream task.

Plain PyTorch over a list of token batches; the teacher and student are any modules that
return ``hidden_states`` when asked (every transformers base model does). The settings,
:class:`HealConfig`, live in the torch-free :mod:`monarchify.heal_config` (re-exported here).
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from monarchify.distill import hidden_state_loss
from monarchify.errors import ConfigError
from monarchify.heal_config import HealConfig
from monarchify.samples import model_device

__all__ = ["HealConfig", "HealResult", "heal_", "hidden_error"]

Batch = dict[str, torch.Tensor]


@dataclass
class HealResult:
    losses: list[float] = field(default_factory=list)
    """Training loss of every step (hidden-state relative error, mean over layers)."""
    heldout_before: float | None = None
    heldout_after: float | None = None
    curve: list[tuple[int, float]] = field(default_factory=list)
    """``(step, held-out error)`` from step 0 to the last, every ``config.eval_every`` steps
    (only the two ends without it); empty without held-out batches."""
    seconds: float = 0.0


def _states(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, ...]:
    # Index 0 is the embedding output: conversion leaves embeddings alone, so it carries no signal.
    return model(**batch, output_hidden_states=True).hidden_states[1:]


@torch.no_grad()
def hidden_error(student: nn.Module, teacher: nn.Module, batches: Iterable[Batch]) -> float:
    """Mean over batches of :func:`hidden_state_loss`: how far the student is from the teacher."""
    was_training = student.training
    student.eval()
    teacher.eval()
    device = model_device(student)
    values = []
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        values.append(float(hidden_state_loss(_states(student, batch), _states(teacher, batch), batch.get("attention_mask"))))
    student.train(was_training)
    if not values:
        raise ConfigError("no batches to measure the hidden-state error on")
    return sum(values) / len(values)


def _schedule(config: HealConfig) -> Callable[[int], float]:
    warm = max(1, math.ceil(config.warmup * config.steps)) if config.warmup > 0 else 0

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (config.steps - step) / max(1, config.steps - warm))

    return factor


def heal_(
    student: nn.Module,
    teacher: nn.Module,
    batches: list[Batch],
    config: HealConfig,
    *,
    heldout: list[Batch] | None = None,
    progress: Callable[[int, float], None] | None = None,
) -> HealResult:
    """Train ``student`` in place to match ``teacher``'s hidden states on ``batches`` (cycled).

    Dropout stays off (both models in eval mode): the target is the teacher's function itself.
    Every student parameter that requires a gradient trains; the teacher never does.
    ``heldout`` batches measure the error before and after (and every ``config.eval_every``
    steps, into ``curve``; that time is not in ``seconds``). ``progress(step, loss)`` is called
    after every step.
    """
    if not batches:
        raise ConfigError("healing needs at least one batch of text")
    torch.manual_seed(config.seed)
    teacher.eval().requires_grad_(False)
    student.eval()
    device = model_device(student)
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(config))
    result = HealResult()
    if heldout:
        result.heldout_before = hidden_error(student, teacher, heldout)
        result.curve.append((0, result.heldout_before))
    measuring = 0.0
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(config.seed)
    epochs = (torch.randperm(len(batches), generator=generator).tolist() for _ in itertools.count())
    schedule = itertools.chain.from_iterable(epochs)  # every batch once per pass, reshuffled each pass
    for step in range(config.steps):
        batch = {k: v.to(device) for k, v in batches[next(schedule)].items()}
        with torch.no_grad():
            target = _states(teacher, batch)
        loss = hidden_state_loss(_states(student, batch), target, batch.get("attention_mask"))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        result.losses.append(loss.item())
        if progress is not None:
            progress(step + 1, result.losses[-1])
        done = step + 1
        if heldout and config.eval_every and done % config.eval_every == 0 and done < config.steps:
            began = time.perf_counter()
            result.curve.append((done, hidden_error(student, teacher, heldout)))
            measuring += time.perf_counter() - began
    result.seconds = time.perf_counter() - start - measuring
    if heldout:
        result.heldout_after = hidden_error(student, teacher, heldout)
        result.curve.append((config.steps, result.heldout_after))
    return result
