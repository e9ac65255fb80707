"""Writing model folders: weights, the Monarch recipe in ``config.json``, tokenizer and report.

The folder is written atomically (nothing is left half-written) and loads back with stock
``from_pretrained``; a model without Monarch layers is written as a plain Hugging Face folder.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import transformers

from monarchify.atomic import atomic_output_dir
from monarchify.hf.guard import add_load_guard
from monarchify.hf.loading import sentence_transformers_files
from monarchify.hf.plugin import MonarchQuantizationConfig
from monarchify.report import ConversionReport
from monarchify.version import __version__

REPORT_FILE = "monarchify_report.json"
DEFAULT_SHARD_SIZE = "2GB"


def monarchify_version() -> str:
    """The version a saved folder records."""
    return __version__


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
    quantization = MonarchQuantizationConfig.from_model(model, recipe or {}, monarchify_version())
    if quantization.modules:
        model.config.quantization_config = quantization
    elif hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_output_dir(out, force) as staging:
        model.save_pretrained(staging, max_shard_size=max_shard_size)
        if quantization.modules:  # stock transformers without monarchify must refuse it
            add_load_guard(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        if report is not None:
            (staging / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
        if sentence_transformers_from is not None:
            copy_sentence_transformers(sentence_transformers_from, staging)
        for name, content in (extra_files or {}).items():
            if isinstance(content, bytes):  # a picture
                (staging / name).write_bytes(content)
            else:
                (staging / name).write_text(content, encoding="utf-8")
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
