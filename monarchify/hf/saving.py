"""Writing model folders: weights, the Monarch recipe in ``config.json``, tokenizer and report.

The folder is written atomically (nothing is left half-written) and loads back with stock
``from_pretrained``; a model without Monarch layers is written as a plain Hugging Face folder.

Three writers produce folders: :func:`save_model` (a model in memory, its weights by
``save_pretrained``), the streaming conversion (:mod:`.streaming`, weights written shard by
shard) and ``densify`` (:mod:`.densify`, likewise). Only the weights differ: everything else a
folder holds (``config.json``, the shard index, side files of the source, tokenizer,
sentence-transformers files, the report, extra files) is written by
:func:`write_folder_files`, and a Monarch ``config.json`` entry is built by
:func:`quantization_config`, so the three cannot drift apart.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import transformers

from monarchify.atomic import atomic_output_dir
from monarchify.hf.guard import add_load_guard
from monarchify.hf.loading import sentence_transformers_files
from monarchify.hf.plugin import MonarchQuantizationConfig, module_spec
from monarchify.hf.tensorfiles import write_index
from monarchify.report import ConversionReport
from monarchify.version import __version__

REPORT_FILE = "monarchify_report.json"
DEFAULT_SHARD_SIZE = "2GB"


def monarchify_version() -> str:
    """The version a saved folder records."""
    return __version__


def quantization_config(modules: dict[str, dict[str, Any]], recipe: dict[str, Any] | None) -> MonarchQuantizationConfig:
    """The ``quantization_config`` of a Monarch folder's ``config.json``: its layers
    (name -> :func:`~monarchify.hf.plugin.layer_spec`), the recipe carried out, this version."""
    return MonarchQuantizationConfig(modules=modules, recipe=recipe or {}, monarchify_version=monarchify_version())


def write_folder_files(
    staging: Path,
    *,
    config: transformers.PretrainedConfig | dict[str, Any] | None = None,
    weight_map: dict[str, str] | None = None,
    weights_size: int = 0,
    copy_from: Path | None = None,
    copied: Iterable[str] = (),
    tokenizer: Any | None = None,
    sentence_transformers_from: str | os.PathLike[str] | None = None,
    report: ConversionReport | None = None,
    extra_files: dict[str, str | bytes] | None = None,
) -> None:
    """Write everything of a folder but its weights into ``staging`` (the folder being written).

    ``config``: a transformers config (saved as ``save_pretrained`` saves it), a ``config.json``
    read as a dict (written back as it is, keys sorted), or ``None`` when ``save_pretrained``
    wrote it with the weights. ``weight_map``: tensor -> file of weights written shard by shard;
    their index (with ``weights_size``, the bytes of their data) is written when they span
    several files. ``copied``: names of files beside
    ``copy_from``'s weights to keep (a generation config, a tokenizer, a README...).
    ``sentence_transformers_from``: a folder whose sentence-transformers files
    (:func:`copy_sentence_transformers`) the written folder keeps, so it stays one.
    ``extra_files``: name -> text or bytes (results, pictures), written last."""
    if isinstance(config, dict):
        (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    elif config is not None:
        config.save_pretrained(str(staging))
    if weight_map is not None and len(set(weight_map.values())) > 1:
        write_index(staging, weight_map, weights_size)
    for name in copied:
        if copy_from is not None and (copy_from / name).is_file():
            shutil.copy2(copy_from / name, staging / name)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(staging))
    if sentence_transformers_from is not None:
        copy_sentence_transformers(sentence_transformers_from, staging)
    if report is not None:
        (staging / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
    for name, content in (extra_files or {}).items():
        if isinstance(content, bytes):  # a picture
            (staging / name).write_bytes(content)
        else:
            (staging / name).write_text(content, encoding="utf-8")


def save_model(
    model: transformers.PreTrainedModel,
    out: str | os.PathLike[str],
    *,
    tokenizer: Any | None = None,
    report: ConversionReport | None = None,
    recipe: dict[str, Any] | None = None,
    force: bool = False,
    max_shard_size: str = DEFAULT_SHARD_SIZE,
    extra_files: dict[str, str | bytes] | None = None,
    sentence_transformers_from: str | os.PathLike[str] | None = None,
) -> Path:
    """Write a loadable folder atomically: ``config.json`` with the Monarch recipe (by default
    the one ``report`` recorded),
    safetensors weights (sharded past ``max_shard_size``), tokenizer files, the report, and
    ``extra_files`` (name -> text or bytes, e.g. fine-tuning results and their curves: inside,
    not added afterwards). ``sentence_transformers_from``: a folder whose sentence-transformers
    files (:func:`copy_sentence_transformers`) the written folder keeps, so it stays one.

    A model without Monarch layers is written as a plain Hugging Face folder (no recipe), which
    loads without monarchify; one with Monarch layers carries the guard of :mod:`.guard`, so
    transformers without monarchify refuses it instead of running random layers."""
    if recipe is None and report is not None:  # the recipe the conversion recorded
        recipe = report.meta.get("recipe")
    modules = {name: spec for name, module in model.named_modules() if (spec := module_spec(module)) is not None}
    if modules:
        model.config.quantization_config = quantization_config(modules, recipe)
    elif hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_output_dir(out, force) as staging:
        model.save_pretrained(staging, max_shard_size=max_shard_size)  # config.json, weights and their index
        if modules:  # stock transformers without monarchify must refuse it
            add_load_guard(staging)
        write_folder_files(staging, tokenizer=tokenizer, sentence_transformers_from=sentence_transformers_from,
                           report=report, extra_files=extra_files)
    return Path(out)


def copy_sentence_transformers(source: str | os.PathLike[str], staging: Path) -> list[str]:
    """Copy what makes ``source`` a sentence-transformers model (``modules.json``, its module
    folders such as ``1_Pooling``, ``sentence_bert_config.json``,
    ``config_sentence_transformers.json``) into a folder being written from it; nothing for
    another folder or a Hub id. The weights and tokenizer are the written folder's own."""
    folder = Path(os.fspath(source)).expanduser()
    names = sentence_transformers_files(folder) if folder.is_dir() else []
    for name in names:
        if (folder / name).is_dir():
            shutil.copytree(folder / name, staging / name, dirs_exist_ok=True)
        else:
            shutil.copy2(folder / name, staging / name)
    return names


def recipe_of(model: transformers.PreTrainedModel) -> dict[str, Any]:
    """The Monarch recipe a loaded model was converted with (empty for a dense model)."""
    quant = getattr(model.config, "quantization_config", None)
    recipe = quant.get("recipe") if isinstance(quant, dict) else getattr(quant, "recipe", None)
    return dict(recipe or {})
