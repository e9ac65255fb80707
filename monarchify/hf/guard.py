"""Make stock transformers refuse a Monarch folder when monarchify is not there to read it.

Without the plug-in, transformers does not know the folder's ``quant_method`` (a sentence that
names the remedy, :data:`monarchify.hf.plugin.STORED_METHOD`, so the warning it logs first says
what to do), skips the quantizer, builds plain ``nn.Linear`` layers, finds no ``weight`` for them and fills
them with random values, again with only a warning. A model that runs on random layers is worse
than no model, so every saved Monarch layer also gets an empty ``<module>.weight`` tensor: to
stock transformers that is a size mismatch, which it refuses with an error (unless the caller
passes ``ignore_mismatched_sizes=True``, asking for re-initialisation). One more empty tensor,
named by :data:`HINT_KEY`, is listed as unexpected in the load report transformers prints just
above that error, so the report says what to do. The plug-in tells transformers to ignore both,
so loading through monarchify is unchanged and quiet.

The guard costs a few hundred bytes of safetensors header; ``report`` and loading skip it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

HINT_KEY = (
    "MONARCH CHECKPOINT: pip install monarchify and import monarchify before from_pretrained, "
    "or turn it into a plain model with monarchify densify"
)
"""A tensor name written as a sentence: transformers prints unexpected names in its load report."""
INDEX_FILE = "model.safetensors.index.json"


def guard_tensors(factor_keys: list[str], dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The empty tensors that make stock loading fail for the layers whose first factor keys
    are ``factor_keys`` (``<module>.L``, or ``<module>.U`` for a low-rank layer), plus the hint."""
    guards = {key[: -len(".L")] + ".weight": torch.empty(0, dtype=dtype) for key in factor_keys}
    guards[HINT_KEY] = torch.empty(0, dtype=dtype)
    return guards


def is_guard(name: str, shape: list[int] | tuple[int, ...]) -> bool:
    """Whether a stored tensor is part of the guard (an empty ``weight`` or the hint)."""
    return name == HINT_KEY or (name.endswith(".weight") and list(shape) == [0])


def ignore_patterns(modules: list[str]) -> set[str]:
    """Regular expressions for transformers' ``_keys_to_ignore_on_load_unexpected``: the guard of
    each Monarch module (named with or without a base-model prefix) and the hint."""
    patterns = {rf"(^|\.){re.escape(name)}\.weight$" for name in modules}
    patterns.add(f"^{re.escape(HINT_KEY)}$")
    return patterns


def add_load_guard(folder: Path) -> None:
    """Add the guard to a folder ``save_pretrained`` wrote: each shard holding Monarch factors
    is rewritten once with the guards of its own layers (the hint goes with the first)."""
    index_path = folder / INDEX_FILE
    index = json.loads(index_path.read_text(encoding="utf-8")) if index_path.is_file() else None
    files = sorted(set(index["weight_map"].values())) if index else ["model.safetensors"]
    hinted = False
    for name in files:
        path = folder / name
        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
            factors = [k for k in keys if k.endswith(".L") and k[:-2] + ".R" in keys]
            factors += [k for k in keys if k.endswith(".U") and k[:-2] + ".V" in keys and k[:-2] + ".L" not in keys]
            if not factors:
                continue
            tensors = {k: handle.get_tensor(k) for k in keys}
            metadata = handle.metadata() or {"format": "pt"}
        guards = guard_tensors(factors, tensors[factors[0]].dtype)
        if hinted:
            del guards[HINT_KEY]
        hinted = True
        tensors.update(guards)
        save_file(tensors, str(path), metadata=metadata)
        if index:
            index["weight_map"].update(dict.fromkeys(guards, name))
    if index:
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
