"""Models built from a Hugging Face config, dense or with freshly initialised Monarch layers.

Training from scratch needs no checkpoint: ``AutoModelFor...from_config`` draws the
architecture's own initialisation, and the recipe's selection then swaps in fresh Monarch layers
(:mod:`monarchify.pipeline.fresh`). The result is an ordinary converted model: ``save`` writes a
folder that stock ``from_pretrained`` reads back through the plug-in.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn

from monarchify.config import MonarchConfig
from monarchify.errors import ConfigError, ModelLoadError
from monarchify.hf.loading import read_config, short_error
from monarchify.pipeline import FilterFn, convert
from monarchify.pipeline.fresh import FreshProjector, check_fresh_recipe
from monarchify.report import ConversionReport

OBJECTIVES = {"causal": transformers.AutoModelForCausalLM, "masked": transformers.AutoModelForMaskedLM}


def read_hf_config(source: str | os.PathLike[str], **overrides: Any) -> transformers.PretrainedConfig:
    """A model config from a ``config.json`` file or a folder holding one (never the network,
    never remote code), with ``overrides`` applied."""
    path = Path(os.fspath(source)).expanduser()
    if path.is_dir():
        data = read_config(path)
    elif path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise ModelLoadError(f"'{path}' is not a valid JSON config: {short_error(exc)}") from None
    else:
        raise ModelLoadError(f"model config '{source}' does not exist (a config.json, or a folder holding one)")
    if not isinstance(data, dict) or "model_type" not in data:
        raise ModelLoadError(f"'{source}' has no model_type: not a Hugging Face model config")
    model_type = data.pop("model_type")
    data.pop("quantization_config", None)  # the recipe comes from the MonarchConfig, not from a converted folder
    try:
        return transformers.AutoConfig.for_model(model_type, **{**data, **overrides})
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"'{source}': cannot build a {model_type!r} config: {short_error(exc)}") from None


def model_class_for(hf_config: transformers.PretrainedConfig, objective: str) -> Any:
    """The ``AutoModelFor...`` class of ``objective`` (``causal`` or ``masked``), refused in one
    line when the architecture has no such head."""
    if objective not in OBJECTIVES:
        raise ConfigError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    auto = OBJECTIVES[objective]
    if type(hf_config) not in auto._model_mapping:
        raise ConfigError(f"a {hf_config.model_type} model has no {objective} language-model head in transformers")
    return auto


def default_objective(hf_config: transformers.PretrainedConfig) -> str:
    """``masked`` for encoders (BERT, RoBERTa: they also have a causal head, but are not trained
    that way unless configured as decoders), ``causal`` for decoder-only models."""
    masked = type(hf_config) in transformers.AutoModelForMaskedLM._model_mapping
    causal = type(hf_config) in transformers.AutoModelForCausalLM._model_mapping
    if masked and not getattr(hf_config, "is_decoder", False):
        return "masked"
    if causal:
        return "causal"
    raise ConfigError(f"a {hf_config.model_type} model has no causal or masked language-model head in transformers")


def build_model(
    hf_config: transformers.PretrainedConfig,
    config: MonarchConfig | None = None,
    *,
    model_class: Any = None,
    filter_fn: FilterFn | None = None,
    seed: int | None = None,
) -> tuple[nn.Module, ConversionReport | None]:
    """The model ``hf_config`` describes, freshly initialised, and the report of its Monarch
    layers (``None`` when ``config`` is ``None``: a dense model).

    ``model_class`` defaults to the head of :func:`default_objective`. ``seed`` makes the dense draw and the Monarch draw
    reproducible together.
    """
    if config is not None:
        check_fresh_recipe(config)
    if model_class is None:
        model_class = OBJECTIVES[default_objective(hf_config)]
    if seed is not None:
        transformers.set_seed(seed)
    try:
        model = model_class.from_config(hf_config)
    except (ValueError, KeyError) as exc:
        raise ConfigError(f"cannot build a {hf_config.model_type} model from this config: {short_error(exc)}") from None
    if config is None:
        return model, None
    with torch.no_grad():
        report = convert(model, config, filter_fn, projector=FreshProjector())
    return model, report


def from_config(
    hf_config: transformers.PretrainedConfig | str | os.PathLike[str],
    config: MonarchConfig | None = None,
    *,
    model_class: Any = None,
    filter_fn: FilterFn | None = None,
    seed: int | None = None,
) -> nn.Module:
    """A freshly initialised model whose selected linear layers are Monarch layers.

    ``hf_config`` is a transformers config, a ``config.json`` or a folder; ``config`` the
    recipe (default: 4 blocks, the default selection); the tied output embedding is never
    selected. Save it with :func:`monarchify.save` and it loads with stock ``from_pretrained``.
    """
    if not isinstance(hf_config, transformers.PretrainedConfig):
        hf_config = read_hf_config(hf_config)
    model, _ = build_model(hf_config, config or MonarchConfig(), model_class=model_class, filter_fn=filter_fn, seed=seed)
    return model
