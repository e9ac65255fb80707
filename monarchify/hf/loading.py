"""Reading Hugging Face model folders and Hub ids, safely.

Weights are read as safetensors only (``use_safetensors=True``: a folder with only
pickle-based ``.bin`` files is refused), ``trust_remote_code`` is never passed, and every
failure a user can cause comes out as a one-line :class:`ModelLoadError`. A checkpoint whose
tensors do not cover the model it describes is refused rather than silently re-initialised.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import transformers
from safetensors import safe_open
from torch import nn

from monarchify.errors import ModelLoadError


def short_error(exc: BaseException) -> str:
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
                f"'{file}' is not a valid safetensors file (corrupt or truncated, {size} bytes): {short_error(exc)}"
            ) from None
    return shapes


def read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise ModelLoadError(f"'{folder}' is not a model folder: it has no config.json")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"'{path}' is not valid JSON: {short_error(exc)}") from None


def local_folder(source: str | os.PathLike[str]) -> Path:
    """``source`` as an existing local folder, else one line saying what it is instead (a
    file, or nothing): for commands that read a folder's files and never the Hub."""
    path = Path(os.fspath(source)).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelLoadError(f"'{source}' is a file; expected a model folder")
    raise ModelLoadError(f"model folder '{source}' does not exist")


def _looks_like_path(source: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else that does not exist is a missing folder."""
    return source.startswith((".", "/", "~")) or source.count("/") > 1 or "\\" in source


SENTENCE_TRANSFORMERS_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")
"""What makes a folder a sentence-transformers model besides the transformer itself (plus the
module folders ``modules.json`` lists, e.g. ``1_Pooling``). Not ``README.md``: its model card
describes the original model's scores, which a converted model does not have."""


def _sentence_transformers_modules(folder: Path) -> list[dict[str, Any]]:
    """``modules.json``'s entries when ``folder`` is a sentence-transformers export whose
    transformer lies in the folder itself; empty otherwise."""
    try:
        modules = json.loads((folder / "modules.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return []
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        return []
    in_root = any(
        str(m.get("type", "")).startswith("sentence_transformers") and str(m.get("type")).endswith("Transformer")
        and m.get("path") in ("", ".")
        for m in modules
    )
    return modules if in_root else []


def sentence_transformers_base(folder: Path, config: dict[str, Any]) -> str | None:
    """The base model class (``BertModel``) of a sentence-transformers export, ``None`` for any
    other folder.

    sentence-transformers saves the base model's weights and loads them with ``AutoModel``,
    whatever ``architectures`` names (often the class the model was pre-trained as, e.g.
    ``BertForMaskedLM``, whose head weights are not there): loading the named class would refuse
    the folder for its missing head."""
    if not _sentence_transformers_modules(folder):
        return None
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    base = MODEL_MAPPING_NAMES.get(config.get("model_type"))
    base = base[0] if isinstance(base, (tuple, list)) else base
    return base if isinstance(base, str) and isinstance(getattr(transformers, base, None), type) else None


def sentence_transformers_note(folder: Path, config: dict[str, Any]) -> str | None:
    """One line when a sentence-transformers export is loaded as another class than its
    ``config.json`` names."""
    base = sentence_transformers_base(folder, config)
    named = [name for name in config.get("architectures") or [] if isinstance(name, str)]
    if base is None or not named or base in named:
        return None
    return (f"sentence-transformers export: loading the base model ({base}), not the {named[0]} its config.json "
            "names, as sentence-transformers does; its sentence-transformers files are kept")


def sentence_transformers_files(folder: Path) -> list[str]:
    """The files and module folders (relative names) that make ``folder`` a sentence-transformers
    model, to be copied into a folder written from it; empty for any other folder."""
    modules = _sentence_transformers_modules(folder)
    names = [name for name in SENTENCE_TRANSFORMERS_FILES if modules and (folder / name).is_file()]
    for module in modules:
        path = module.get("path")
        name = path.strip("/") if isinstance(path, str) else ""
        if name and not name.startswith(".") and "/" not in name and (folder / name).is_dir():  # never outside
            names.append(name)
    return names


def _model_class(config: transformers.PretrainedConfig, model_class: Any) -> Any:
    if model_class is not None:
        return model_class
    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return cls
    return transformers.AutoModel


def empty_model(config: transformers.PretrainedConfig, dtype: Any = None, *, buffers: bool = False) -> nn.Module:
    """The model ``config`` describes, on the meta device: its module names and shapes at no
    memory cost, for the paths that plan, order or lay out a folder without loading it.

    ``buffers=True`` computes the buffers for real (parameters stay on meta): rotary
    frequencies and position ids are not stored in a checkpoint, and a model that runs text
    one block at a time needs them as its constructor computes them.
    """
    import torch

    cls = _model_class(config, None)
    kwargs = {} if dtype is None else {"dtype": dtype}
    with _parameters_on_meta() if buffers else torch.device("meta"):
        return cls._from_config(config, **kwargs) if hasattr(cls, "_from_config") else cls.from_config(config, **kwargs)


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Every parameter created inside goes to the meta device as it is registered; only an
    uninitialised allocation (pages never touched) precedes it, so nothing is resident."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def load_model(
    source: str | os.PathLike[str],
    model_class: Any = None,
    *,
    config_overrides: dict[str, Any] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Load a dense or Monarch model from a local folder or a Hub id.

    The class is the checkpoint's own architecture (so heads are kept) unless
    ``model_class`` (e.g. ``AutoModelForSequenceClassification``) is given; a sentence-transformers
    export loads as its base model (:func:`sentence_transformers_base`). Monarch layers
    load through the plug-in in :mod:`monarchify.hf.plugin`. ``config_overrides`` (e.g.
    ``{"num_labels": 3}``) change the checkpoint's config before the model is built.
    """
    source = os.fspath(source)
    path = Path(source).expanduser()
    new_head_ok = model_class is not None
    if path.is_dir():
        base = sentence_transformers_base(path, read_config(path))
        if model_class is None and base is not None:
            model_class = getattr(transformers, base)
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
        raise ModelLoadError(f"could not load '{source}': {_mismatch(cls, source, config, hub) or short_error(exc)}") from None
    except (OSError, ValueError, KeyError) as exc:
        if path.is_dir():
            raise ModelLoadError(f"could not load local folder '{source}': {short_error(exc)}") from None
        offline = " the Hub is unreachable from here and it is not in the local cache;" if hub else ""
        raise ModelLoadError(
            f"could not load Hugging Face Hub model '{source}':{offline} {short_error(exc)} "
            "(not a local folder either; pass a local folder when offline)"
        ) from None
    _check_loading(model, info, source, new_head_ok=new_head_ok)
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
    stray = [k for k in info.get("unexpected_keys") or [] if k.endswith((".L", ".R", ".U", ".V"))]  # .U/.V: low rank
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
