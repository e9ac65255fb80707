"""Which layers of a model get converted, and with how many blocks.

The rules, each tested as a table in ``tests/test_selection.py``:

* A pattern ``P`` matches a qualified module name ``N`` when ``N`` ends with whole dotted
  components that ``P`` matches completely: ``re.fullmatch(r"(?:.*\\.)?(?:P)", N)``.
  So ``query`` matches ``encoder.layer.0.attention.self.query``, ``layer\\.1\\..*`` never
  matches ``layer.10.output.dense``, and ``.*attention.*`` matches anything with
  ``attention`` in it.
* Convertible modules are ``nn.Linear`` and GPT-2 style ``Conv1D`` (weight stored
  transposed).
* Without ``include``, the default is every convertible module inside the model's repeated
  blocks (below an ``nn.ModuleList``): attention and MLP projections, never embeddings,
  poolers, classifier or LM heads. ``include`` replaces that default, so a head can be
  converted by naming it. ``exclude`` then removes layers.
* ``overrides`` give some layers another block count; the last matching one wins.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn

from monarchify.config import MonarchConfig
from monarchify.errors import NoMatchError

FilterFn = Callable[[nn.Module, str], bool]


@lru_cache(maxsize=512)
def _anchored(pattern: str) -> re.Pattern[str]:
    return re.compile(rf"(?:.*\.)?(?:{pattern})")


def name_matches(pattern: str, name: str) -> bool:
    """Whether ``pattern`` matches whole trailing dotted components of ``name``."""
    return _anchored(pattern).fullmatch(name) is not None


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's ``Conv1D``: a linear layer whose weight is stored as ``(in, out)``.

    Recognised by shape rather than by importing transformers, so this module stays free of it.
    """
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__ == "Conv1D"
        and isinstance(weight, torch.Tensor)
        and weight.ndim == 2
        and tuple(weight.shape) == (getattr(module, "nx", None), getattr(module, "nf", None))
    )


def is_convertible(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The ``(d_out, d_in)`` weight of a convertible module."""
    return module.weight.t() if is_conv1d(module) else module.weight


@dataclass(frozen=True)
class Candidate:
    name: str
    module: nn.Module
    in_block: bool
    """Whether the module sits inside a repeated block (below an ``nn.ModuleList``)."""


def candidates(model: nn.Module) -> Iterator[Candidate]:
    """Every convertible module, with whether it lives inside a repeated block."""

    def walk(module: nn.Module, prefix: str, in_block: bool) -> Iterator[Candidate]:
        for child_name, child in module.named_children():
            name = f"{prefix}.{child_name}" if prefix else child_name
            if is_convertible(child):
                yield Candidate(name, child, in_block)
            else:
                yield from walk(child, name, in_block or isinstance(module, nn.ModuleList))

    yield from walk(model, "", False)


def _output_embedding(model: nn.Module) -> nn.Module | None:
    getter = getattr(model, "get_output_embeddings", None)
    try:
        return getter() if callable(getter) else None
    except (AttributeError, NotImplementedError):
        return None


def _examples(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def select(
    model: nn.Module, config: MonarchConfig, filter_fn: FilterFn | None = None
) -> list[tuple[str, nn.Module, int]]:
    """``(name, module, nblocks)`` for every layer the recipe converts, in model order.

    ``filter_fn(module, name)``, when given, replaces the default selection (like
    torchao's ``quantize_``); ``include``/``exclude`` still apply on top of it.
    """
    found = list(candidates(model))
    all_names = [c.name for c in found]
    if not found:
        raise NoMatchError("the model has no linear layers to convert")

    for pattern in config.include:
        if not any(name_matches(pattern, n) for n in all_names):
            raise NoMatchError(
                f"--include {pattern!r} matches no linear layer; layers that exist: {_examples(all_names)}"
            )

    head = _output_embedding(model)
    chosen = []
    for cand in found:
        if config.include:
            keep = any(name_matches(p, cand.name) for p in config.include)
        elif filter_fn is not None:
            keep = filter_fn(cand.module, cand.name)
        else:
            keep = cand.in_block and cand.module is not head
        if keep and any(name_matches(p, cand.name) for p in config.exclude):
            keep = False
        if keep:
            chosen.append(cand)

    if not chosen:
        raise NoMatchError(
            "the selection matches no layer (after --exclude); layers that exist: " + _examples(all_names)
        )
    chosen_names = [c.name for c in chosen]
    for pattern in config.overrides:
        if not any(name_matches(pattern, n) for n in chosen_names):
            raise NoMatchError(
                f"override {pattern!r} matches no selected layer; selected: {_examples(chosen_names)}"
            )
    return [(c.name, c.module, nblocks_for(c.name, config)) for c in chosen]


def nblocks_for(name: str, config: MonarchConfig) -> int:
    nblocks = config.nblocks
    for pattern, value in config.overrides.items():
        if name_matches(pattern, name):
            nblocks = value
    return nblocks
