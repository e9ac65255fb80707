"""Stage 5, apply: swap the projected modules into the model, in place.

Runs only once every layer is projected, and cannot fail half-way (``setattr`` on modules that
the plan found), so a conversion is all-or-nothing.
"""

from __future__ import annotations

from torch import nn


def resolve_name(model: nn.Module, name: str) -> str | None:
    """``name`` as ``model`` spells it, or None: a base model (``BertModel``) and the same model
    with a head (``BertForSequenceClassification``) name their layers with and without the
    base-model prefix, and either may be asked about the other's names."""
    names = dict(model.named_modules())
    prefix = getattr(model, "base_model_prefix", "")
    return next((option for option in (name, f"{prefix}.{name}", name.removeprefix(f"{prefix}.")) if option in names), None)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule ``name`` is."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def apply(model: nn.Module, modules: dict[str, nn.Module]) -> None:
    """Swap every ``name -> module`` of ``modules`` into ``model``."""
    for name, module in modules.items():
        replace_module(model, name, module)
