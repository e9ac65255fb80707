"""The settings of a healing run (:mod:`monarchify.heal`), as plain data.

Torch-free on purpose: the command line takes its defaults from here and checks the values
before anything heavy is imported, so ``monarchify heal --help`` stays quick.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from monarchify.errors import ConfigError

DEFAULT_HEAL_SAMPLES = 2048
"""Text samples read for training; a quarter more are held out to measure the result."""
DEFAULT_HEAL_BATCH = 16
"""Samples per optimiser step."""
TRAINED = ("all", "converted")
"""What a healing run trains: every weight of the student, or only its converted layers."""
HIDDEN_NORMS = ("layer", "token")
"""How the hidden-state term weighs tokens (:func:`monarchify.distill.hidden_state_loss`): one
relative error per layer (a ratio of sums), or one per token, then averaged."""


@dataclass
class HealConfig:
    """``steps`` optimiser steps of AdamW at peak ``lr`` (linear warm-up over ``warmup`` of
    the steps, then linear decay to zero). ``eval_every``: also measure the held-out error
    every that many steps (``None``: before and after only), to see whether longer healing
    still pays.

    What the student is pulled towards: ``hidden_weight`` times the teacher's hidden states,
    layer by layer, plus ``logit_weight`` times its output distribution (KL at
    ``temperature``, per token). Hidden states suit an encoder that will be fine-tuned on a
    task anyway; a language model's next-token distribution *is* the task, so healing a
    causal LM matches its logits. ``save_every``: write a resumable state every that many
    steps (where the caller gives a folder for it).

    ``train``: ``"all"`` trains every weight of the student; ``"converted"`` only the converted
    layers (Monarch or low-rank factors), the rest (embeddings, norms, layers kept dense) staying
    the dense model's. Healing text is small next to what a model was trained on: the embeddings
    and the dense layers are not what the conversion damaged, and retraining them on a few
    hundred thousand tokens bends them towards that text.

    ``hidden_norm``: ``"layer"`` takes the hidden-state term's relative error over all of a
    layer's tokens at once; ``"token"`` token by token, so that a language model's few
    massive-activation tokens do not stand for the whole window.

    ``max_grad_norm``: scale each step's gradient down to at most this norm (all trained
    weights together); ``None``: never. A whitened low-rank model healed at the rate a Monarch
    one heals best at diverged without it (``docs/language-models.md``)."""

    steps: int = 200
    lr: float = 1e-4
    warmup: float = 0.1
    weight_decay: float = 0.0
    seed: int = 0
    eval_every: int | None = None
    hidden_weight: float = 1.0
    logit_weight: float = 0.0
    temperature: float = 1.0
    save_every: int | None = None
    train: str = "all"
    hidden_norm: str = "layer"
    max_grad_norm: float | None = None

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"steps must be at least 1, got {self.steps}", field="steps")
        if self.eval_every is not None and (isinstance(self.eval_every, bool) or not isinstance(self.eval_every, int) or self.eval_every < 1):
            raise ConfigError(f"eval_every must be a positive number of steps, got {self.eval_every!r}", field="eval_every")
        if not self.lr > 0:
            raise ConfigError(f"lr must be positive, got {self.lr}", field="lr")
        if not 0 <= self.warmup < 1:
            raise ConfigError(f"warmup must be a fraction in [0, 1), got {self.warmup}", field="warmup")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must not be negative, got {self.weight_decay}", field="weight_decay")
        if self.hidden_weight < 0 or self.logit_weight < 0 or not self.hidden_weight + self.logit_weight > 0:
            raise ConfigError(f"hidden_weight and logit_weight must not be negative, and one must be positive "
                              f"(got {self.hidden_weight} and {self.logit_weight})")
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be positive, got {self.temperature}", field="temperature")
        if self.save_every is not None and (isinstance(self.save_every, bool) or not isinstance(self.save_every, int) or self.save_every < 1):
            raise ConfigError(f"save_every must be a positive number of steps, got {self.save_every!r}", field="save_every")

        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ConfigError(f"max_grad_norm must be positive, got {self.max_grad_norm}", field="max_grad_norm")
        if self.hidden_norm not in HIDDEN_NORMS:
            raise ConfigError(f"hidden_norm must be one of {', '.join(HIDDEN_NORMS)}, got {self.hidden_norm!r}", field="hidden_norm")
        if self.train not in TRAINED:
            raise ConfigError(f"train must be one of {', '.join(TRAINED)}, got {self.train!r}", field="train")

    @property
    def per_token_hidden(self) -> bool:
        """Whether the hidden-state term (and its held-out measure) is taken token by token."""
        return self.hidden_norm == "token"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        # The defaults: fingerprints of runs made before these fields stay valid.
        if self.train == "all":
            del data["train"]
        if self.hidden_norm == "layer" or self.hidden_weight == 0:  # or when it has nothing to weigh
            del data["hidden_norm"]
        if self.max_grad_norm is None:
            del data["max_grad_norm"]
        return data
