"""Stage 5, apply: swap the projected modules into the model, in place.

Runs only once every layer is projected, and cannot fail half-way (``setattr`` on modules that
the plan found), so a conversion is all-or-nothing.
"""

from __future__ import annotations

from torch import nn


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule ``name`` is."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def apply(model: nn.Module, modules: dict[str, nn.Module]) -> None:
    """Swap every ``name -> module`` of ``modules`` into ``model``."""
    for name, module in modules.items():
        replace_module(model, name, module)
