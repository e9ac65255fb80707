"""``densify``: a Monarch folder turned back into a plain Hugging Face folder, tensor by tensor.

Runtimes that know nothing of Monarch (vLLM, ONNX export, TGI, llama.cpp converters) and the
paper's reverse-sparsification step after fine-tuning in Monarch form need ordinary dense
weights. Each Monarch layer's factors are read on their own, multiplied out by
:func:`~monarchify.pipeline.densify.dense_linear` (the same product the in-memory
``densify_`` uses) and written as the layer's ``weight``; every other tensor is copied. The
Monarch recipe leaves ``config.json`` (so transformers loads the result without monarchify)
and a small :data:`DENSIFIED` record takes its place, so ``report`` and ``convert`` know what
the folder is. Memory: one layer's factors and its dense product at a time.

A layer's stored tensors are found by :mod:`.stored_layers`' rule, the one ``report`` follows,
and everything but the weights is written by :func:`~monarchify.hf.saving.write_folder_files`,
as for every saved folder.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn

from monarchify.atomic import atomic_output_dir, check_output_dir
from monarchify.errors import ModelLoadError
from monarchify.hf.guard import is_guard
from monarchify.hf.loading import empty_model, local_folder, read_config, short_error
from monarchify.hf.plugin import FORMAT_VERSION, LOWRANK, QUANT_METHODS, check_recipe
from monarchify.hf.saving import DEFAULT_SHARD_SIZE, REPORT_FILE, monarchify_version, write_folder_files
from monarchify.hf.stored_layers import first_factor, stored_layers
from monarchify.hf.tensorfiles import (
    INDEX_FILE, Planned, ShardWriter, StoredTensor, checkpoint_tensors, pack_shards, parse_size, read_tensor, shard_names,
)
from monarchify.monarch import LowRankLinear, MonarchLinear
from monarchify.monarch.layout import INTERLEAVED
from monarchify.pipeline.apply import resolve_name
from monarchify.pipeline.densify import dense_linear
from monarchify.pipeline.plan import is_conv1d

DENSIFIED = "monarchify_densified"
"""The ``config.json`` key recording that a folder was densified, and from what: by ``densify``
from a Monarch folder, or by training's switch to dense (then with a ``switch`` record)."""
FACTORS = ("L", "R", "U", "V")


@dataclass
class DenseLayer:
    """A converted layer of the folder (Monarch or low rank) and where its tensors are stored."""

    name: str
    prefix: str
    """Its stored key prefix (``<prefix>.L`` or ``<prefix>.U``)."""
    spec: dict[str, Any]
    transposed: bool
    """GPT-2's ``Conv1D`` stores its weight as ``(in, out)``."""

    @property
    def lowrank(self) -> bool:
        return self.spec.get("structure") == LOWRANK

    @property
    def first(self) -> str:
        """The stored factor whose place the dense weight takes (``L``, or ``U`` when low rank)."""
        return first_factor(self.spec)


@dataclass
class DensifyResult:
    out: Path
    layers: list[str]
    bytes_written: int


def densified_record(layers: int, recipe: dict[str, Any] | None, *, converted_by: str | None = None,
                     format_version: int = FORMAT_VERSION, switch: dict[str, Any] | None = None) -> dict[str, Any]:
    """The :data:`DENSIFIED` record. ``switch``: ``{"step", "max_steps"}`` of a training run
    that switched to dense, so ``report`` can say the folder was trained, not converted."""
    record = {
        "layers": layers,
        "format_version": format_version,
        "converted_by": converted_by,
        "densified_by": monarchify_version(),
        "recipe": recipe,
    }
    if switch is not None:
        record["switch"] = switch
    return record


def densified_note(source: str | os.PathLike[str], record: dict[str, Any]) -> str:
    """One line saying that a folder is a Monarch model multiplied back out, and how."""
    count = record.get("layers")
    layers = f"{count} Monarch layers" if isinstance(count, int) else "Monarch layers"
    switch = record.get("switch")
    if isinstance(switch, dict):
        of = f" of {switch['max_steps']}" if isinstance(switch.get("max_steps"), int) else ""
        return (f"'{source}' is a densified Monarch model: it was trained with {layers}, switched to dense after "
                f"step {switch.get('step')}{of} (densify_at) and finished dense (monarchify train)")
    return f"'{source}' is a densified Monarch model: its {layers} were multiplied back into dense ones (monarchify densify)"


def _conv1d_names(folder: Path, names: list[str]) -> set[str]:
    """Which Monarch layers replaced a GPT-2 style ``Conv1D`` (its dense weight is stored
    transposed): the dense model is built on the meta device to see."""
    try:
        config = transformers.AutoConfig.from_pretrained(str(folder))
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = empty_model(config)
    except Exception as exc:  # noqa: BLE001 - any failure to build means we cannot know the layout
        raise ModelLoadError(f"could not build the model of '{folder}' from its config.json: {short_error(exc)}") from None
    found = set()
    for name in names:
        resolved = resolve_name(model, name)
        if resolved is None:
            raise ModelLoadError(f"the checkpoint lists Monarch layer '{name}', which its model does not have")
        if is_conv1d(model.get_submodule(resolved)):
            found.add(name)
    return found


def read_monarch_folder(folder: Path) -> tuple[dict[str, Any], dict[str, StoredTensor], list[DenseLayer]]:
    config = read_config(folder)
    quantization = config.get("quantization_config")
    if not isinstance(quantization, dict) or quantization.get("quant_method") not in QUANT_METHODS:
        if isinstance(config.get(DENSIFIED), dict):
            raise ModelLoadError(f"'{folder}' is densified already: it holds no Monarch layers")
        raise ModelLoadError(f"'{folder}' is not a Monarch checkpoint (its config.json has no Monarch recipe)")
    modules = quantization.get("modules")
    check_recipe(modules, quantization.get("format_version", FORMAT_VERSION), quantization.get("padding", "zero"))
    tensors = checkpoint_tensors(folder)
    conv1d = _conv1d_names(folder, list(modules))
    layers = []
    for name, stored in stored_layers(folder, tensors, modules).items():
        second = "V" if modules[name].get("structure") == LOWRANK else "R"
        if stored is None or second not in stored.keys:
            raise ModelLoadError(f"'{folder}': the weights of Monarch layer '{name}' are missing")
        layers.append(DenseLayer(name, stored.prefix, modules[name], name in conv1d))
    return config, tensors, layers


def _monarch(layer: DenseLayer, tensors: dict[str, StoredTensor]) -> MonarchLinear | LowRankLinear:
    spec = layer.spec
    rank = spec.get("rank", 0)
    with torch.device("meta"):
        if layer.lowrank:
            module = LowRankLinear(spec["in_features"], spec["out_features"], rank, bias=False)
        else:
            module = MonarchLinear(
                spec["in_features"], spec["out_features"], spec["nblocks"], bias=False, allow_structural_zeros=True,
                output_order=spec.get("output_order", INTERLEAVED), rank=rank,
            )
    for factor in ("U", "V") if layer.lowrank else FACTORS[: 4 if rank else 2]:
        stored = tensors.get(f"{layer.prefix}.{factor}")
        if stored is None:
            raise ModelLoadError(f"Monarch layer '{layer.name}' has no stored '{factor}'")
        expected = tuple(getattr(module, factor).shape)
        if stored.shape != expected:
            raise ModelLoadError(
                f"Monarch layer '{layer.name}': stored {factor} has shape {list(stored.shape)}, config.json implies {list(expected)}"
            )
        setattr(module, factor, nn.Parameter(read_tensor(stored), requires_grad=False))
    return module


def densify_folder(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    force: bool = False,
    max_shard_size: int | str = DEFAULT_SHARD_SIZE,
    on_tensor: Callable[[str, int, int], None] | None = None,
) -> DensifyResult:
    """Write ``source`` (a Monarch folder) to ``out`` with every Monarch layer multiplied out.

    ``on_tensor(name, done, total)`` reports progress after each stored tensor (bytes read).
    """
    folder = local_folder(source)
    check_output_dir(out, force, inputs=(source,))
    config, tensors, layers = read_monarch_folder(folder)
    by_factor = {f"{layer.prefix}.{factor}": layer for layer in layers for factor in FACTORS}
    by_l = {f"{layer.prefix}.{layer.first}": layer for layer in layers}

    plan: list[tuple[str, Planned, DenseLayer | None]] = []
    for key, stored in tensors.items():
        if is_guard(key, stored.shape):
            continue
        layer = by_l.get(key)
        if layer is not None:
            d_in, d_out = layer.spec["in_features"], layer.spec["out_features"]
            shape = (d_in, d_out) if layer.transposed else (d_out, d_in)
            plan.append((key, Planned(f"{layer.prefix}.weight", stored.dtype, shape), layer))
        elif key not in by_factor:
            plan.append((key, Planned(key, stored.dtype, stored.shape), None))
    shards = pack_shards(plan, lambda item: item[1].nbytes, parse_size(max_shard_size))
    names = shard_names(len(shards))
    total = sum(stored.nbytes for stored in tensors.values())
    done = 0
    weight_map = {}
    with atomic_output_dir(out, force) as staging:
        for shard, file in zip(shards, names):
            writer = ShardWriter(staging / file, [planned for _, planned, _ in shard])
            try:
                for key, planned, layer in shard:
                    if layer is None:
                        writer.write(planned.name, read_tensor(tensors[key]))
                        done += tensors[key].nbytes
                    else:
                        weight = dense_linear(_monarch(layer, tensors)).weight.detach()
                        writer.write(planned.name, weight.t() if layer.transposed else weight)
                        done += sum(tensors[f"{layer.prefix}.{f}"].nbytes for f in FACTORS if f"{layer.prefix}.{f}" in tensors)
                    weight_map[planned.name] = file
                    if on_tensor is not None:
                        on_tensor(planned.name, done, total)
                writer.close()
            except BaseException:
                writer.abort()
                raise
        quantization = config.pop("quantization_config")
        config[DENSIFIED] = densified_record(
            len(layers), quantization.get("recipe"), converted_by=quantization.get("monarchify_version"),
            format_version=quantization.get("format_version", FORMAT_VERSION),
        )
        kept = [item.name for item in folder.iterdir()  # tokenizer, generation config and the like
                if item.is_file() and item.name not in ("config.json", REPORT_FILE, INDEX_FILE) and item.suffix != ".safetensors"]
        write_folder_files(  # the Monarch report describes layers this folder no longer has
            staging, config=config, weight_map=weight_map, weights_size=sum(planned.nbytes for _, planned, _ in plan),
            copy_from=folder, copied=kept, sentence_transformers_from=folder,
        )
    return DensifyResult(Path(out), [layer.name for layer in layers], sum(planned.nbytes for _, planned, _ in plan))
