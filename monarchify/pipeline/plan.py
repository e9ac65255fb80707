"""Stage 1, plan: which layers of a model the recipe converts, and their block counts.

The rules, each tested as a table in ``tests/test_selection.py``:

* A pattern ``P`` matches a qualified module name ``N`` when ``N`` ends with whole dotted
  components that ``P`` matches completely: ``re.fullmatch(r"(?:.*\\.)?(?:P)", N)``.
  So ``query`` matches ``encoder.layer.0.attention.self.query``, ``layer\\.1\\..*`` never
  matches ``layer.10.output.dense``, and ``.*attention.*`` matches anything with
  ``attention`` in it.
* Convertible modules are ``nn.Linear`` and GPT-2 style ``Conv1D`` (weight stored
  transposed).
* Without ``include`` or a ``filter_fn``, the default is every convertible module inside the
  model's repeated blocks (below an ``nn.ModuleList``): attention and MLP projections, never
  embeddings, poolers, classifier or LM heads. ``include`` and ``filter_fn`` each replace that
  default (so a head can be converted by naming it); given both, a layer must pass both.
  ``exclude`` then removes layers.
* ``overrides`` give some layers another block count (the last matching one wins), and pin
  it: a budget never changes a pinned layer's block count.

Planning touches nothing and runs once per conversion.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn

from monarchify.config import MonarchConfig
from monarchify.errors import ConfigError, NoMatchError

FilterFn = Callable[[nn.Module, str], bool]
"""``filter_fn(module, qualified_name) -> bool``, as torchao's ``quantize_`` takes it."""


@lru_cache(maxsize=512)
def _anchored(pattern: str) -> re.Pattern[str]:
    return re.compile(rf"(?:.*\.)?(?:{pattern})")


def name_matches(pattern: str, name: str) -> bool:
    """Whether ``pattern`` matches whole trailing dotted components of ``name``."""
    return _anchored(pattern).fullmatch(name) is not None


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's ``Conv1D``: a linear layer whose weight is stored as ``(in, out)``.

    Recognised by shape rather than by importing transformers, so the pipeline stays free of it.
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


@dataclass
class PlannedLayer:
    """One selected layer: what it is, and the block count the recipe gives it."""

    name: str
    module: nn.Module
    nblocks: int
    pinned: bool
    """An override fixed ``nblocks``: the budget must keep it."""

    @property
    def weight(self) -> torch.Tensor:
        return dense_weight(self.module)

    @property
    def d_out(self) -> int:
        return self.weight.shape[0]

    @property
    def d_in(self) -> int:
        return self.weight.shape[1]

    @property
    def kind(self) -> str:
        return "Conv1D" if is_conv1d(self.module) else "Linear"

    @property
    def has_bias(self) -> bool:
        return getattr(self.module, "bias", None) is not None

    @property
    def params_dense(self) -> int:
        return self.d_out * self.d_in + (self.d_out if self.has_bias else 0)


def _output_embedding(model: nn.Module) -> nn.Module | None:
    getter = getattr(model, "get_output_embeddings", None)
    try:
        return getter() if callable(getter) else None
    except (AttributeError, NotImplementedError):
        return None


def _examples(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _nothing_to_convert(model: nn.Module, problem: str) -> NoMatchError:
    """``problem``, unless the reason is that the model was converted already."""
    from monarchify.monarch import STRUCTURED_LAYERS

    if any(isinstance(m, STRUCTURED_LAYERS) for m in model.modules()):
        return NoMatchError("the model's layers are already Monarch layers: convert the dense model instead")
    return NoMatchError(problem)


def plan(model: nn.Module, config: MonarchConfig, filter_fn: FilterFn | None = None) -> list[PlannedLayer]:
    """Every layer the recipe converts, in model order, with its block count.

    Every pattern must match something: a typo fails here, naming what exists, before any
    work is done.
    """
    found = list(candidates(model))
    if not found:
        raise _nothing_to_convert(model, "the model has no linear layers to convert")
    all_names = [c.name for c in found]
    for pattern in config.include:
        if not any(name_matches(pattern, n) for n in all_names):
            raise NoMatchError(f"include pattern {pattern!r} matches no linear layer; layers that exist: {_examples(all_names)}")

    head = _output_embedding(model)
    chosen = []
    for cand in found:
        keep = True
        if config.include:
            keep = any(name_matches(p, cand.name) for p in config.include)
        if filter_fn is not None:
            keep = keep and bool(filter_fn(cand.module, cand.name))
        if not config.include and filter_fn is None:
            keep = cand.in_block and cand.module is not head
        if keep and any(name_matches(p, cand.name) for p in config.exclude):
            keep = False
        if keep:
            chosen.append(cand)

    if not chosen:
        raise _nothing_to_convert(
            model, "the selection (include, filter and exclude) matches no layer; layers that exist: " + _examples(all_names)
        )
    chosen_names = [c.name for c in chosen]
    for pattern in config.overrides:
        if not any(name_matches(pattern, n) for n in chosen_names):
            raise NoMatchError(f"override {pattern!r} matches no selected layer; selected: {_examples(chosen_names)}")
    return [PlannedLayer(c.name, c.module, *_blocks_for(c.name, config)) for c in chosen]


def _blocks_for(name: str, config: MonarchConfig) -> tuple[int, bool]:
    """``(nblocks, pinned)``: the last matching override wins."""
    nblocks, pinned = config.nblocks, False
    for pattern, value in config.overrides.items():
        if name_matches(pattern, name):
            nblocks, pinned = value, True
    return nblocks, pinned


def block_list(model: nn.Module, names: list[str]) -> tuple[str, nn.ModuleList]:
    """The one list of repeated blocks (the outermost ``nn.ModuleList`` above a layer, as the
    default selection reads "repeated blocks") that holds every layer in ``names``: what a
    conversion calibrated one block at a time walks through."""
    lists = sorted(((n, m) for n, m in model.named_modules() if n and isinstance(m, nn.ModuleList)),
                   key=lambda item: item[0].count("."))
    if not lists:
        raise ConfigError(f"{type(model).__name__} has no list of repeated blocks (nn.ModuleList)")
    owners: dict[str, nn.ModuleList] = {}
    for name in names:
        owner = next(((n, m) for n, m in lists if name.startswith(n + ".")), None)
        if owner is None:
            raise ConfigError(f"layer '{name}' is outside the repeated blocks")
        owners.setdefault(*owner)
    if len(owners) > 1:
        raise ConfigError(f"the selected layers lie in {len(owners)} lists of blocks ({', '.join(owners)})")
    return next(iter(owners.items()))


def block_index(list_name: str, name: str) -> int | None:
    """Which block of the list ``list_name`` the module ``name`` belongs to, or None."""
    if not name.startswith(list_name + "."):
        return None
    head = name[len(list_name) + 1:].split(".", 1)[0]
    return int(head) if head.isdigit() else None
