"""The architecture of a from-scratch model: a named preset or a config file, resized.

Shared by ``train`` (which also fits the vocabulary and special tokens to the tokenizer it
learned) and ``init`` (which only builds and saves), so both build the same model from the same
flags.
"""

from __future__ import annotations

from typing import Any

import transformers
from torch import nn

from monarchify.config import MonarchConfig
from monarchify.errors import ConfigError
from monarchify.hf.fresh import build_model, default_objective, model_class_for, read_hf_config
from monarchify.lm.options import PRESETS
from monarchify.report import ConversionReport


def arch_config(arch: str) -> transformers.PretrainedConfig:
    """The preset's config (``gpt2``, ``bert``: GPT-2 small, BERT-base), or the file's."""
    preset = PRESETS.get(arch)
    if preset is None:
        return read_hf_config(arch)
    config = transformers.AutoConfig.for_model(preset["model_type"])
    config.num_hidden_layers, config.hidden_size, config.num_attention_heads = preset["layers"], preset["width"], preset["heads"]
    return config


def sized_config(
    arch: str,
    *,
    layers: int | None = None,
    width: int | None = None,
    heads: int | None = None,
    vocab_size: int | None = None,
    positions: int | None = None,
    tokenizer: Any = None,
) -> transformers.PretrainedConfig:
    """``arch`` resized: ``width`` also sets a 4× MLP where the config names it
    (``intermediate_size``; GPT-2 derives it); a preset gets exactly ``positions`` positions, a
    config file must have at least that many; ``tokenizer`` sets the vocabulary and the ids of
    its special tokens."""
    config = arch_config(arch)
    if layers is not None:
        config.num_hidden_layers = layers
    if heads is not None:
        config.num_attention_heads = heads
    if width is not None:
        config.hidden_size = width
        if hasattr(config, "intermediate_size"):
            config.intermediate_size = 4 * width
    if config.hidden_size % config.num_attention_heads:
        raise ConfigError(f"width {config.hidden_size} is not a multiple of the {config.num_attention_heads} heads")
    if positions is not None:
        if arch in PRESETS:
            config.max_position_embeddings = positions
        elif getattr(config, "max_position_embeddings", positions) < positions:
            raise ConfigError(f"block_size {positions} exceeds the model's {config.max_position_embeddings} positions")
    if tokenizer is not None:
        vocab_size = len(tokenizer)
        ids = {"bos_token_id": tokenizer.bos_token or tokenizer.eos_token or tokenizer.cls_token,
               "eos_token_id": tokenizer.eos_token or tokenizer.sep_token, "pad_token_id": tokenizer.pad_token}
        for name, token in ids.items():
            setattr(config, name, tokenizer.convert_tokens_to_ids(token) if token is not None else None)
    if vocab_size is not None:
        if vocab_size < 1:
            raise ConfigError(f"vocab_size must be at least 1, got {vocab_size}")
        config.vocab_size = vocab_size
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(config, name, None)
            if isinstance(value, int) and value >= vocab_size:
                setattr(config, name, vocab_size - 1)
    return config


def init_model(
    arch: str,
    recipe: MonarchConfig | None,
    *,
    objective: str | None = None,
    seed: int | None = None,
    **sizes: Any,
) -> tuple[nn.Module, ConversionReport | None]:
    """A freshly initialised model of ``arch`` (resized by ``sizes``, see :func:`sized_config`)
    with the LM head of ``objective``, Monarch where ``recipe`` selects."""
    config = sized_config(arch, **sizes)
    model_class = model_class_for(config, objective or default_objective(config))
    return build_model(config, recipe, model_class=model_class, seed=seed)
