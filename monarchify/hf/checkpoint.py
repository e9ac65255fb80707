"""Reading and writing Hugging Face model folders, safely.

Weights are read and written as safetensors only (``use_safetensors=True``: a folder with
only pickle-based ``.bin`` files is refused), ``trust_remote_code`` is never passed, and
every failure a user can cause comes out as a one-line :class:`ModelLoadError`.
"""

from __future__ import annotations

import json
import os
import socket
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import transformers
from safetensors import safe_open
from torch import nn

from monarchify.atomic import atomic_output_dir
from monarchify.errors import ModelLoadError
from monarchify.hf.plugin import FORMAT_VERSION, QUANT_METHOD, MonarchQuantizationConfig, check_recipe
from monarchify.monarch import MonarchLayout
from monarchify.report import ConversionReport, LayerReport, natural_key

REPORT_FILE = "monarchify_report.json"
DEFAULT_SHARD_SIZE = "2GB"


def _version() -> str:
    from monarchify import __version__

    return __version__


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def tensor_shapes(folder: Path) -> dict[str, list[int]]:
    """Names and shapes of every tensor in the folder's safetensors files, read from their
    headers only; a truncated or corrupt file is reported by name."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"'{folder}' has no .safetensors weight files")
    shapes: dict[str, list[int]] = {}
    for file in files:
        try:
            size = file.stat().st_size
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    shapes[key] = list(handle.get_slice(key).get_shape())
        except Exception as exc:  # safetensors raises its own error types, and OSError
            raise ModelLoadError(
                f"'{file}' is not a valid safetensors file (corrupt or truncated, {size} bytes): {_short(exc)}"
            ) from None
    return shapes


def read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise ModelLoadError(f"'{folder}' is not a model folder: it has no config.json")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"'{path}' is not valid JSON: {_short(exc)}") from None


def _looks_like_path(source: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else that does not exist is a missing folder."""
    return source.startswith((".", "/", "~")) or source.count("/") > 1 or "\\" in source


def _model_class(config: transformers.PretrainedConfig, model_class: Any) -> Any:
    if model_class is not None:
        return model_class
    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return cls
    return transformers.AutoModel


def load_model(
    source: str | os.PathLike[str],
    model_class: Any = None,
    *,
    config_overrides: dict[str, Any] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Load a dense or Monarch model from a local folder or a Hub id.

    The class is the checkpoint's own architecture (so heads are kept) unless
    ``model_class`` (e.g. ``AutoModelForSequenceClassification``) is given. Monarch layers
    load through the plug-in in :mod:`monarchify.hf.plugin`. ``config_overrides`` (e.g.
    ``{"num_labels": 3}``) change the checkpoint's config before the model is built.
    """
    source = os.fspath(source)
    path = Path(source).expanduser()
    if path.is_dir():
        read_config(path)
        tensor_shapes(path)
        source = str(path)
    elif path.exists():
        raise ModelLoadError(f"'{source}' is a file; expected a model folder or a Hub id")
    elif _looks_like_path(source):
        raise ModelLoadError(f"model folder '{source}' does not exist")

    hub = {} if path.is_dir() else _hub_options()
    wants_info = kwargs.pop("output_loading_info", False)
    cls = config = None
    try:
        config = transformers.AutoConfig.from_pretrained(source, **hub, **(config_overrides or {}))
        cls = _model_class(config, model_class)
        model, info = cls.from_pretrained(source, config=config, use_safetensors=True, output_loading_info=True, **hub, **kwargs)
    except ModelLoadError:
        raise
    except RuntimeError as exc:  # transformers' "size mismatch" (its details go to its logger)
        raise ModelLoadError(f"could not load '{source}': {_mismatch(cls, source, config, hub) or _short(exc)}") from None
    except (OSError, ValueError, KeyError) as exc:
        if path.is_dir():
            raise ModelLoadError(f"could not load local folder '{source}': {_short(exc)}") from None
        offline = " the Hub is unreachable from here and it is not in the local cache;" if hub else ""
        raise ModelLoadError(
            f"could not load Hugging Face Hub model '{source}':{offline} {_short(exc)} "
            "(not a local folder either; pass a local folder when offline)"
        ) from None
    _check_loading(model, info, source, new_head_ok=model_class is not None)
    return (model, info) if wants_info else model


def _key_name(entry: Any) -> str:
    """A ``mismatched_keys`` entry is ``(key, saved shape, expected shape)`` or just the key."""
    return str(entry[0] if isinstance(entry, (tuple, list)) else entry)


def mismatched_keys(info: dict[str, Any]) -> list[str]:
    """The sorted names of the tensors ``from_pretrained`` re-initialised for not fitting."""
    return sorted(_key_name(entry) for entry in info.get("mismatched_keys") or [])


def _mismatch(cls: Any, source: str, config: Any, hub: dict[str, Any]) -> str | None:
    """Which tensors do not fit the config, found by loading once more while allowing it."""
    if cls is None:
        return None
    try:
        _, info = cls.from_pretrained(source, config=config, use_safetensors=True, ignore_mismatched_sizes=True,
                                      output_loading_info=True, **hub)
        first = min(info.get("mismatched_keys") or [], key=_key_name)
    except Exception:  # noqa: BLE001 - only a better message was at stake
        return None
    if isinstance(first, (tuple, list)) and len(first) == 3:
        key, saved, expected = first
        return f"tensor '{key}' has shape {list(saved)} but its config.json describes {list(expected)}"
    return f"tensor '{first}' does not have the shape its config.json describes"


def _check_loading(model: nn.Module, info: dict[str, Any], source: str, *, new_head_ok: bool) -> None:
    """Refuse a checkpoint whose tensors do not cover the model it describes.

    ``from_pretrained`` fills missing or misshapen tensors with fresh random values and
    only logs it: a conversion would then project random weights, and fine-tuning would
    train them. Only a task head outside the base model may be new (``new_head_ok``, when
    the caller asked for another head than the checkpoint's own), with the pooler a
    classification head builds on (checkpoints saved without it are common). Monarch factors nobody
    declared mean ``config.json`` and the weights disagree.
    """
    prefix = getattr(model, "base_model_prefix", "") or ""

    def in_head(key: str) -> bool:  # the classifier, and the pooler a classifier may need
        outside = bool(prefix) and hasattr(model, prefix) and not key.startswith(prefix + ".")
        return new_head_ok and (outside or ".pooler." in key)

    missing = [k for k in info.get("missing_keys") or [] if not in_head(k)]
    mismatched = [k for k in mismatched_keys(info) if not in_head(k)]
    stray = [k for k in info.get("unexpected_keys") or [] if k.endswith((".L", ".R"))]
    for problem, keys in (("has no weights for", missing), ("has weights of the wrong shape for", mismatched),
                          ("has Monarch factors its config.json does not declare:", stray)):
        if keys:
            keys = sorted(keys)
            more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
            raise ModelLoadError(f"'{source}' {problem} {', '.join(keys[:3])}{more}")


@lru_cache(maxsize=1)
def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP probe of the Hub endpoint: without it an offline machine spends ~30 s in
    huggingface_hub's retries before failing."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _hub_options() -> dict[str, Any]:
    """Extra ``from_pretrained`` options for a Hub id: the local cache only when offline."""
    return {} if _hub_reachable() else {"local_files_only": True}


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model", "tokenizer.model")
"""A local folder ships a tokenizer only if it has one of these."""
MIN_TOKENIZER_VOCAB = 100
"""Smaller than any real tokenizer: what ``AutoTokenizer`` builds from a bare model type."""


def load_tokenizer(source: str | os.PathLike[str]) -> Any | None:
    """The checkpoint's tokenizer, or ``None`` when it ships none.

    transformers 5 builds an empty tokenizer from the model type for a folder without
    tokenizer files (a GPT-2 tokenizer with one token, a BERT one with five); taking it for
    the real one would encode text to nothing and copy a useless tokenizer into the output.
    So a local folder needs tokenizer files, and a tokenizer with a toy vocabulary is refused.
    """
    path = Path(os.fspath(source))
    local = path.is_dir()
    if local and not any((path / name).is_file() for name in TOKENIZER_FILES):
        return None
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(os.fspath(source), **({} if local else _hub_options()))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    try:
        return tokenizer if len(tokenizer) >= MIN_TOKENIZER_VOCAB else None
    except TypeError:  # a tokenizer object without a length: trust it
        return tokenizer


def save_model(
    model: transformers.PreTrainedModel,
    out: str | os.PathLike[str],
    *,
    tokenizer: Any | None = None,
    report: ConversionReport | None = None,
    recipe: dict[str, Any] | None = None,
    force: bool = False,
    max_shard_size: str = DEFAULT_SHARD_SIZE,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write a loadable folder atomically: ``config.json`` with the Monarch recipe,
    safetensors weights (sharded past ``max_shard_size``), tokenizer files, the report, and
    ``extra_files`` (name -> text, e.g. fine-tuning results: inside, not added afterwards).

    A model without Monarch layers is written as a plain Hugging Face folder (no recipe), which
    loads without monarchify."""
    quantization = MonarchQuantizationConfig.from_model(model, recipe or {}, _version())
    if quantization.modules:
        model.config.quantization_config = quantization
    elif hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_output_dir(out, force) as staging:
        model.save_pretrained(staging, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        if report is not None:
            (staging / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
        for name, text in (extra_files or {}).items():
            (staging / name).write_text(text, encoding="utf-8")
    return Path(out)


def config_difference(student: nn.Module, teacher: nn.Module, keys: tuple[str, ...]) -> str | None:
    """The first of ``keys`` whose config values differ, as ``"key teacher vs student"`` (or None):
    what a teacher must share with its student for their outputs to be comparable."""
    for key in keys:
        mine, theirs = getattr(student.config, key, None), getattr(teacher.config, key, None)
        if mine != theirs:
            return f"{key} {theirs} vs {mine}"
    return None


def recipe_of(model: transformers.PreTrainedModel) -> dict[str, Any]:
    """The Monarch recipe a loaded model was converted with (empty for a dense model)."""
    quant = getattr(model.config, "quantization_config", None)
    recipe = quant.get("recipe") if isinstance(quant, dict) else getattr(quant, "recipe", None)
    return dict(recipe or {})


def read_report(folder: str | os.PathLike[str]) -> ConversionReport:
    """The conversion report of a saved folder, without building the model.

    Layers, shapes and parameters come from ``config.json`` and the safetensors headers
    (so they describe what is really on disk); errors and the functional check come from
    ``monarchify_report.json`` when the folder has it.
    """
    path = Path(folder)
    if not path.is_dir():
        raise ModelLoadError(f"model folder '{folder}' does not exist")
    config = read_config(path)
    recipe = config.get("quantization_config") or {}
    if not isinstance(recipe, dict) or recipe.get("quant_method") != QUANT_METHOD:
        raise ModelLoadError(f"'{folder}' is not a Monarch checkpoint (its config.json has no Monarch recipe)")
    check_recipe(recipe.get("modules"), recipe.get("format_version", FORMAT_VERSION), recipe.get("padding", "zero"))
    shapes = tensor_shapes(path)
    saved = _saved_report(path / REPORT_FILE)
    saved_layers = {layer["name"]: layer for layer in saved.get("layers", [])}

    # Model order when the saved report knows it, else natural name order (layer.2 < layer.10).
    order = {name: i for i, name in enumerate(saved_layers)}
    modules = sorted((recipe.get("modules") or {}).items(), key=lambda item: (order.get(item[0], len(order)), natural_key(item[0])))
    if any(_find_key(shapes, name, "L") is None for name, _ in modules):
        shapes = _as_loaded(path, shapes)
    layers = []
    declared: set[str] = set()
    for name, spec in modules:
        layout = MonarchLayout(spec["in_features"], spec["out_features"], spec["nblocks"])
        keys = {suffix: _find_key(shapes, name, suffix) for suffix in ("L", "R", "bias")}
        declared.update(key for key in (keys["L"], keys["R"]) if key)
        if keys["L"] is None or keys["R"] is None:
            raise ModelLoadError(f"'{folder}': the weights of Monarch layer '{name}' are missing")
        if shapes[keys["L"]] != list(layout.l_shape) or shapes[keys["R"]] != list(layout.r_shape):
            raise ModelLoadError(
                f"'{folder}': config.json says Monarch layer '{name}' is {layout.describe()}, but its factors have "
                f"shapes L {shapes[keys['L']]} and R {shapes[keys['R']]}"
            )
        numel = {s: _numel(shapes[k]) if k else 0 for s, k in keys.items()}
        previous = saved_layers.get(name, {})
        layers.append(
            LayerReport(
                name=name,
                kind=previous.get("kind", "Linear"),
                shape=[layout.d_out, layout.d_in],
                nblocks=layout.nblocks,
                padded=layout.padded,
                bias=numel["bias"] > 0,
                params_dense=layout.d_out * layout.d_in + numel["bias"],
                params_monarch=numel["L"] + numel["R"] + numel["bias"],
                rel_error=previous.get("rel_error"),
                extra=previous.get("extra", {}),
            )
        )
    stray = sorted(key for key in shapes if key.endswith((".L", ".R")) and key not in declared)
    if stray:
        raise ModelLoadError(f"'{folder}' has Monarch factors its config.json does not declare: {', '.join(stray[:3])}")
    after = sum(_numel(shape) for shape in shapes.values())
    # The files also hold persistent buffers (BART's final_logits_bias); the saved report
    # counted parameters only, so it is preferred when it is consistent with the files.
    counted = saved.get("totals", {}).get("model_params")
    if isinstance(counted, int) and 0 < counted <= after:
        after = counted
    saved_dense = sum(layer.params_dense - layer.params_monarch for layer in layers)
    meta = dict(saved.get("meta", {}))
    meta.setdefault("recipe", recipe.get("recipe"))
    meta.setdefault("monarchify_version", recipe.get("monarchify_version"))
    return ConversionReport(layers, after + saved_dense, after, saved.get("functional_check"), meta)


def _saved_report(file: Path) -> dict[str, Any]:
    """The ``monarchify_report.json`` beside the weights ({} if absent), checked for the
    fields :func:`read_report` uses: errors and notes come from it, shapes never do."""
    if not file.is_file():
        return {}
    try:
        saved = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"'{file}' is not valid JSON: {_short(exc)}") from None
    layers = saved.get("layers", []) if isinstance(saved, dict) else None
    valid = (
        isinstance(layers, list)
        and all(isinstance(layer, dict) and isinstance(layer.get("name"), str) for layer in layers)
        and all(isinstance(layer.get("rel_error"), (int, float, type(None))) and not isinstance(layer.get("rel_error"), bool)
                and isinstance(layer.get("extra", {}), dict) for layer in layers)
        and isinstance(saved.get("functional_check"), (dict, type(None)))
        and isinstance(saved.get("meta", {}), dict)
        and isinstance(saved.get("totals", {}), dict)
    )
    if not valid:
        raise ModelLoadError(f"'{file}' is not a monarchify report (its layers, totals, functional_check or meta are malformed)")
    return saved


def _as_loaded(folder: Path, shapes: dict[str, list[int]]) -> dict[str, list[int]]:
    """The saved tensors under the names ``from_pretrained`` loads them as.

    transformers 5 renames the modules of some architectures (ViT's
    ``encoder.layer.0.attention.attention.query`` is ``layers.0.attention.q_proj``) and saves
    under the original names, while the recipe names modules as loaded. The renaming rules
    belong to the model class, so an empty (meta-device) model of it is built to read them.
    Without rules, or where that fails, the names stay as saved.
    """
    try:
        import torch
        from transformers.conversion_mapping import WeightRenaming, get_model_conversion_mapping

        config = transformers.AutoConfig.from_pretrained(str(folder))
        model_class = next((getattr(transformers, name, None) for name in (config.architectures or [])), None)
        with torch.device("meta"):
            model = model_class(config) if model_class is not None else transformers.AutoModel.from_config(config)
        renamings = [rule for rule in get_model_conversion_mapping(model) if isinstance(rule, WeightRenaming)]
    except Exception:  # noqa: BLE001 - an older transformers, an unknown architecture: keep the names
        return shapes
    renamed = {}
    for key, shape in shapes.items():
        for rule in renamings:
            key, _ = rule.rename_source_key(key)
        renamed[key] = shape
    return renamed


def _numel(shape: list[int]) -> int:
    n = 1
    for dim in shape:
        n *= dim
    return n


def _find_key(shapes: dict[str, list[int]], module: str, suffix: str) -> str | None:
    """The tensor key of ``module.suffix``, allowing for a base-model prefix on either side."""
    wanted = f"{module}.{suffix}"
    if wanted in shapes:
        return wanted
    for key in shapes:
        if key.endswith("." + wanted) or wanted.endswith("." + key):
            return key
    return None
