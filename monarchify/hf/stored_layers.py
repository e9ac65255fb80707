"""Which stored tensors of a saved Monarch folder belong to each of its converted layers.

``config.json`` names a layer as the loaded model names its module; the safetensors files may
store it under a base-model prefix (``bert.encoder...`` for ``encoder...``, or the reverse) or,
for architectures transformers 5 renames on load (ViT), under the original module names. One
rule finds a layer's tensors for everything that reads a folder without loading it (``report``
and ``densify``), so both accept and refuse the same folders: the layer's first factor
(``L``, or ``U`` for a low-rank layer) fixes its stored prefix, and its other factors and its
bias are read under that prefix.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import transformers

from monarchify.hf.loading import empty_model
from monarchify.hf.plugin import LOWRANK

PARTS = ("L", "R", "U", "V", "bias")


@dataclass(frozen=True)
class StoredLayer:
    """One converted layer's stored tensors."""

    name: str
    """The module name ``config.json`` gives it."""
    prefix: str
    """Its key prefix in the files: ``<prefix>.L`` (or ``<prefix>.U``) is stored."""
    keys: dict[str, str]
    """``L``, ``R``, ``U``, ``V``, ``bias`` -> stored key, for those stored."""


def first_factor(spec: dict[str, Any]) -> str:
    """The factor that fixes a layer's prefix, and whose place its dense weight takes."""
    return "U" if spec.get("structure") == LOWRANK else "L"


def stored_prefix(keys: Iterable[str], name: str, first: str = "L") -> str | None:
    """The prefix under which module ``name``'s ``first`` factor is stored: ``name`` itself, or
    ``name`` with a base-model prefix added or removed."""
    keys = keys if isinstance(keys, (set, dict)) else list(keys)
    if f"{name}.{first}" in keys:
        return name
    for key in keys:
        if key.endswith(f".{first}"):
            prefix = key[: -len(first) - 1]
            if prefix.endswith("." + name) or name.endswith("." + prefix):
                return prefix
    return None


def _find(names: dict[str, str], modules: dict[str, dict[str, Any]]) -> dict[str, StoredLayer | None]:
    """``names``: key as matched -> stored key."""
    found: dict[str, StoredLayer | None] = {}
    for name, spec in modules.items():
        prefix = stored_prefix(names, name, first_factor(spec))
        found[name] = None if prefix is None else StoredLayer(
            name, names[f"{prefix}.{first_factor(spec)}"][: -len(first_factor(spec)) - 1],
            {part: names[f"{prefix}.{part}"] for part in PARTS if f"{prefix}.{part}" in names},
        )
    return found


def stored_layers(folder: Path, keys: Iterable[str], modules: dict[str, dict[str, Any]]) -> dict[str, StoredLayer | None]:
    """Every layer of ``modules`` (``config.json``'s recipe) -> its stored tensors, or ``None``
    when its first factor is not stored. Where a layer is not found under the stored names, the
    names ``from_pretrained`` loads them as are tried (:func:`loaded_names`)."""
    keys = list(keys)
    found = _find({key: key for key in keys}, modules)
    if any(layer is None for layer in found.values()):
        loaded = loaded_names(folder, keys)
        if loaded is not None:
            found = _find(loaded, modules)
    return found


def undeclared_factors(keys: Iterable[str], layers: Iterable[StoredLayer | None]) -> list[str]:
    """Stored Monarch factors (``.L``, ``.R``) that no declared layer claims, sorted."""
    claimed = {key for layer in layers if layer is not None for key in layer.keys.values()}
    return sorted(key for key in keys if key.endswith((".L", ".R")) and key not in claimed)


def meta_model(folder: Path) -> Any:
    """An empty model of the folder's architecture on the meta device (no weights, no memory),
    or ``None`` where transformers cannot build one."""
    try:
        return empty_model(transformers.AutoConfig.from_pretrained(str(folder)))
    except Exception:  # noqa: BLE001 - an unknown architecture, a config it cannot read: no model
        return None


def loaded_names(folder: Path, keys: list[str]) -> dict[str, str] | None:
    """Name as ``from_pretrained`` loads it -> stored key, or ``None`` without renaming rules.

    transformers 5 renames the modules of some architectures (ViT's
    ``encoder.layer.0.attention.attention.query`` is ``layers.0.attention.q_proj``) and saves
    under the original names, while the recipe names modules as loaded. The renaming rules
    belong to the model class, so an empty (meta-device) model of it is built to read them.
    """
    model = meta_model(folder)
    if model is None:
        return None
    try:
        from transformers.conversion_mapping import WeightRenaming, get_model_conversion_mapping

        renamings = [rule for rule in get_model_conversion_mapping(model) if isinstance(rule, WeightRenaming)]
    except Exception:  # noqa: BLE001 - an older transformers: keep the names
        return None
    renamed = {}
    for stored in keys:
        key = stored
        for rule in renamings:
            key, _ = rule.rename_source_key(key)
        renamed[key] = stored
    return renamed
