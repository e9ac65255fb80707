"""A local safetensors folder opened without loading it: its config, the model on the meta
device, and where each tensor lies.

What a streaming conversion reads before any work starts (:mod:`.streaming`), and what
``convert`` asks to decide whether to stream (:func:`weights_bytes`, :attr:`Checkpoint.problem`):
the plan needs only module names and shapes, so the model is built on the ``meta`` device
from ``config.json``, and the tensors' headers are checked against it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from torch import nn

from monarchify.errors import ModelLoadError
from monarchify.hf.loading import empty_model, read_config, sentence_transformers_base, short_error
from monarchify.hf.tensorfiles import StoredTensor, checkpoint_tensors


@dataclass
class Checkpoint:
    """A local safetensors folder, opened for streaming: its config and the meta-device model."""

    folder: Path
    config: transformers.PretrainedConfig
    model: nn.Module
    dtype: torch.dtype
    tensors: dict[str, StoredTensor]
    problem: str | None = None
    """Why streaming cannot convert it (tensor names that are not the model's), or None."""
    dtypes: dict[str, torch.dtype] = field(default_factory=dict)
    """The dtype each tensor has once loaded, as ``from_pretrained`` would cast it."""


def weights_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def _model_dtype(config: transformers.PretrainedConfig, tensors: dict[str, StoredTensor]) -> torch.dtype:
    """The dtype ``from_pretrained`` loads in (its default ``dtype="auto"``): the config's, else
    the first floating tensor's."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if isinstance(dtype, torch.dtype):
        return dtype
    return next((t.dtype for t in tensors.values() if t.dtype.is_floating_point), torch.float32)


def open_checkpoint(folder: Path) -> Checkpoint:
    """Read the config and the tensor headers, build the model on the meta device, and check
    that the tensors are the model's own."""
    base = sentence_transformers_base(folder, read_config(folder))
    tensors = checkpoint_tensors(folder)
    try:
        config = transformers.AutoConfig.from_pretrained(str(folder))
        if base is not None:  # its weights are the base model's (see load_model)
            config.architectures = [base]
        dtype = _model_dtype(config, tensors)
        model = empty_model(config, dtype)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"could not build the model of '{folder}' from its config.json: {short_error(exc)}") from None
    model.eval()
    checkpoint = Checkpoint(folder, model.config, model, dtype, tensors)
    checkpoint.problem = _match(checkpoint)
    return checkpoint


def _match(checkpoint: Checkpoint) -> str | None:
    """Whether every stored tensor is a tensor of the model under the same name, and every
    parameter is stored (under one of its tied names); records their loaded dtypes."""
    model, tensors = checkpoint.model, checkpoint.tensors
    state = model.state_dict()
    foreign = [name for name in tensors if name not in state]
    if foreign:
        return f"its tensor names are not the model's own (e.g. '{foreign[0]}')"
    names_of: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(param), []).append(name)
    missing = sorted(names[0] for names in names_of.values() if not any(n in tensors for n in names))
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ModelLoadError(f"'{checkpoint.folder}' has no weights for {', '.join(missing[:3])}{more}")
    for name, stored in tensors.items():
        wanted = state[name].dtype
        checkpoint.dtypes[name] = wanted if stored.dtype.is_floating_point and wanted.is_floating_point else stored.dtype
        if tuple(state[name].shape) != stored.shape:
            raise ModelLoadError(
                f"could not load '{checkpoint.folder}': tensor '{name}' has shape {list(stored.shape)} "
                f"but its config.json describes {list(state[name].shape)}"
            )
    return None
