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
from monarchify.hf.plugin import QUANT_METHOD, MonarchQuantizationConfig
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
    try:
        config = transformers.AutoConfig.from_pretrained(source, **hub, **(config_overrides or {}))
        cls = _model_class(config, model_class)
        return cls.from_pretrained(source, config=config, use_safetensors=True, **hub, **kwargs)
    except ModelLoadError:
        raise
    except (OSError, ValueError, KeyError) as exc:
        if path.is_dir():
            raise ModelLoadError(f"could not load local folder '{source}': {_short(exc)}") from None
        offline = " the Hub is unreachable from here and it is not in the local cache;" if hub else ""
        raise ModelLoadError(
            f"could not load Hugging Face Hub model '{source}':{offline} {_short(exc)} "
            "(not a local folder either; pass a local folder when offline)"
        ) from None


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


def load_tokenizer(source: str | os.PathLike[str]) -> Any | None:
    """The checkpoint's tokenizer, or ``None`` when it ships none."""
    try:
        local = Path(os.fspath(source)).is_dir()
        return transformers.AutoTokenizer.from_pretrained(os.fspath(source), **({} if local else _hub_options()))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def save_model(
    model: transformers.PreTrainedModel,
    out: str | os.PathLike[str],
    *,
    tokenizer: Any | None = None,
    report: ConversionReport | None = None,
    recipe: dict[str, Any] | None = None,
    force: bool = False,
    max_shard_size: str = DEFAULT_SHARD_SIZE,
) -> Path:
    """Write a loadable folder atomically: ``config.json`` with the Monarch recipe,
    safetensors weights (sharded past ``max_shard_size``), tokenizer files, and the report.

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
    if recipe.get("quant_method") != QUANT_METHOD:
        raise ModelLoadError(f"'{folder}' is not a Monarch checkpoint (its config.json has no Monarch recipe)")
    shapes = tensor_shapes(path)

    saved: dict[str, Any] = {}
    report_path = path / REPORT_FILE
    if report_path.is_file():
        try:
            saved = json.loads(report_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelLoadError(f"'{report_path}' is not valid JSON: {_short(exc)}") from None
    saved_layers = {layer["name"]: layer for layer in saved.get("layers", [])}

    # Model order when the saved report knows it, else natural name order (layer.2 < layer.10).
    order = {name: i for i, name in enumerate(saved_layers)}
    modules = sorted(recipe.get("modules", {}).items(), key=lambda item: (order.get(item[0], len(order)), natural_key(item[0])))
    layers = []
    for name, spec in modules:
        layout = MonarchLayout(spec["in_features"], spec["out_features"], spec["nblocks"])
        keys = {suffix: _find_key(shapes, name, suffix) for suffix in ("L", "R", "bias")}
        if keys["L"] is None or keys["R"] is None:
            raise ModelLoadError(f"'{folder}': the weights of Monarch layer '{name}' are missing")
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
    after = sum(_numel(shape) for shape in shapes.values())
    saved_dense = sum(layer.params_dense - layer.params_monarch for layer in layers)
    meta = dict(saved.get("meta", {}))
    meta.setdefault("recipe", recipe.get("recipe"))
    meta.setdefault("monarchify_version", recipe.get("monarchify_version"))
    return ConversionReport(layers, after + saved_dense, after, saved.get("functional_check"), meta)


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
