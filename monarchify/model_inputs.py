"""Random inputs shaped like what a model reads, for timing it and for checking it when no
tokenizer can make real ones.

Token ids for text models, images or audio features for vision and speech models (sizes from
the model's config); encoder-decoder models also get the same ids as decoder inputs, so both
stacks run. Seeded, so two calls with the same seed give the same batch.
"""

from __future__ import annotations

import torch
from torch import nn

from monarchify.errors import ConfigError

POSITION_LIMITS = ("max_position_embeddings", "n_positions", "max_target_positions")


def position_limit(model: nn.Module) -> int | None:
    """The longest sequence the model's position embeddings allow (None: no stated limit)."""
    config = getattr(model, "config", None)
    limits = [getattr(config, attr, None) for attr in POSITION_LIMITS]
    return min((n for n in limits if isinstance(n, int) and n > 0), default=None)


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` predicts the next token from the ones before it (a ``*ForCausalLM``):
    it can generate and has no separate encoder. Duck-typed, so torch-only code can ask."""
    can_generate = getattr(model, "can_generate", None)
    config = getattr(model, "config", None)
    return callable(can_generate) and bool(can_generate()) and not getattr(config, "is_encoder_decoder", False)


def random_inputs(model: nn.Module, batch: int, seq_len: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random batch of ``model``'s main input (``seq_len`` sets only the decoder's length for
    vision and speech models), with an all-ones attention mask for token ids."""
    config = getattr(model, "config", None)
    limit = position_limit(model)
    if limit is not None and limit < seq_len:
        raise ConfigError(f"sequence length {seq_len} is longer than the model's {limit} positions")
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, getattr(config, "vocab_size", None) or 1000, (batch, seq_len), generator=gen)
    main = getattr(model, "main_input_name", "input_ids")
    if main == "input_ids":
        inputs = {"input_ids": ids, "attention_mask": torch.ones(batch, seq_len, dtype=torch.long)}
    elif main == "pixel_values" and getattr(config, "image_size", None):
        size = config.image_size if isinstance(config.image_size, int) else tuple(config.image_size)
        size = (size, size) if isinstance(size, int) else size
        inputs = {main: torch.randn(batch, getattr(config, "num_channels", 3), *size, generator=gen)}
    elif main == "input_features" and getattr(config, "num_mel_bins", None) and getattr(config, "max_source_positions", None):
        inputs = {main: torch.randn(batch, config.num_mel_bins, 2 * config.max_source_positions, generator=gen)}
    else:
        raise ConfigError(f"cannot make inputs for {type(model).__name__}: it reads {main!r}")
    if getattr(config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = ids
    return inputs
