"""Gradual replacement: fine-tune with each Monarch layer standing in for its dense original only
some of the time at first, and all of the time by the end.

Swapping every layer at once hands fine-tuning a model whose errors compound through the
whole stack. BERT-of-Theseus (Xu et al., 2020) replaces whole layers with a probability that
rises during training, so each replacement learns to work with real neighbours before it must
work with replaced ones. Here the unit is one linear layer: every step, each
:class:`GradualLinear` runs its Monarch layer with probability ``p`` and its frozen dense
original otherwise; :class:`Schedule` raises ``p`` linearly to 1 over a set share of the steps.
Evaluation always runs the Monarch layer (what will be saved), and :func:`unwrap` drops the
dense originals before anything is saved.

Torch only.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from monarchify.errors import ConfigError
from monarchify.monarch import STRUCTURED_LAYERS, MonarchLinear
from monarchify.pipeline.apply import replace_module, resolve_name


class GradualLinear(nn.Module):
    """A Monarch layer and the frozen dense layer it replaces; ``p`` is the chance a training
    step goes through the Monarch one (chosen anew each call)."""

    def __init__(self, monarch: MonarchLinear, dense: nn.Module, p: float = 0.0) -> None:
        super().__init__()
        self.monarch = monarch
        self.dense = dense.requires_grad_(False)
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p >= 1.0 or float(torch.rand(())) < self.p:
            return self.monarch(x)
        return self.dense(x)


def wrap(model: nn.Module, originals: nn.Module, p: float = 0.0) -> list[str]:
    """Pair every ``MonarchLinear`` of ``model`` with a frozen copy of the same-named layer of
    ``originals`` (the dense model it was converted from); returns the names wrapped.

    Names may differ by the base-model prefix (a ``BertModel`` teacher for a classifier)."""
    wrapped = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, STRUCTURED_LAYERS):
            continue
        original = resolve_name(originals, name)
        match = originals.get_submodule(original) if original is not None else None
        weight = getattr(match, "weight", None)
        if weight is None or weight.numel() != module.in_features * module.out_features:
            raise ConfigError(f"gradual replacement: the dense model has no layer '{name}' of the same shape")
        replace_module(model, name, GradualLinear(module, copy.deepcopy(match).to(next(module.parameters()).device), p))
        wrapped.append(name)
    if not wrapped:
        raise ConfigError("gradual replacement needs a model with Monarch layers")
    return wrapped


def unwrap(model: nn.Module) -> int:
    """Put every wrapped Monarch layer back in its place, dropping the dense originals."""
    names = [name for name, module in model.named_modules() if isinstance(module, GradualLinear)]
    for name in names:
        replace_module(model, name, model.get_submodule(name).monarch)
    return len(names)


@dataclass
class Schedule:
    """``p`` rises linearly from ``start`` to 1 over the first ``fraction`` of ``total`` steps."""

    total: int
    fraction: float
    start: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 < self.fraction <= 1.0:
            raise ConfigError(f"gradual fraction must be in (0, 1], got {self.fraction}")
        if not 0.0 <= self.start < 1.0:
            raise ConfigError(f"gradual start must be in [0, 1), got {self.start}")

    def p(self, step: int) -> float:
        ramp = max(1, round(self.fraction * self.total))
        return min(1.0, self.start + (1.0 - self.start) * step / ramp)


def set_p(model: nn.Module, p: float) -> None:
    for module in model.modules():
        if isinstance(module, GradualLinear):
            module.p = p
