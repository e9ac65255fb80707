"""What a from-scratch language-model training run is asked to do: plain data, torch-free, so the
command line can check it before importing ``Trainer``.

The three runs of the paper's speed results are one set of options apart: ``monarch=None``
trains dense; a recipe trains Monarch from initialisation; a recipe plus ``densify_at`` trains
Monarch and then multiplies every Monarch layer out to dense and finishes dense.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from monarchify.config import MonarchConfig
from monarchify.errors import ConfigError
from monarchify.training import PRECISIONS

RESULTS_FILE = "train_results.json"
PRESETS = {
    "gpt2": {"model_type": "gpt2", "layers": 12, "width": 768, "heads": 12},
    "bert": {"model_type": "bert", "layers": 12, "width": 768, "heads": 12},
}
"""Named architectures: GPT-2 small and BERT-base shapes, resized by ``layers``/``width``/``heads``."""
OBJECTIVES = ("causal", "masked")
DEFAULT_EVALUATIONS = 10
"""By default a run evaluates and checkpoints this many times (every tenth of it)..."""
MIN_DEFAULT_INTERVAL = 50
"""...but at least this many steps apart. Each evaluation runs the whole held-out part and
each checkpoint writes the model and its optimizer state: in a 30-step run, ten of each would
cost more than the training and show nothing three steps cannot. Runs of 500 steps or more
keep one per tenth; shorter ones get one every 50 steps, and runs of 50 steps or fewer only the
closing evaluation and checkpoint (a run that short is quicker to redo than to resume)."""


def perplexity(loss: float) -> float:
    """``exp(loss)``, capped where a diverged run's loss would overflow it."""
    return math.exp(min(loss, 50.0))


@dataclass
class TrainOptions:
    """Everything a run depends on (recorded in ``train_results.json``, and compared on resume).

    * ``arch``: ``gpt2``, ``bert``, or a ``config.json`` / model folder (its config only: the
      weights are never read). ``layers``, ``width``, ``heads`` resize it.
    * ``text``: plain-text files (one document per line) or TSV files with a header, whose
      ``text_columns`` are read (default: the usual sentence columns, e.g. ``sentence``).
    * ``eval_fraction``: every ``round(1/eval_fraction)``-th line is held out for evaluation.
    * ``tokenizer``: a tokenizer folder; without one, a byte-level BPE tokenizer of
      ``vocab_size`` is trained on the training lines and saved with the model.
    * ``monarch``: the recipe of the Monarch layers (``None``: dense).
    * ``densify_at``: switch to dense after this step (>= 1) or this fraction of the steps (< 1).
    * ``eval_steps``/``save_steps``: every N steps (>= 1) or this fraction of the run (< 1);
      ``None``: a tenth of the run, at least :data:`MIN_DEFAULT_INTERVAL` steps apart.
    """

    arch: str
    text: list[Path]
    out: Path
    text_columns: list[str] = field(default_factory=list)
    objective: str | None = None
    layers: int | None = None
    width: int | None = None
    heads: int | None = None
    block_size: int = 128
    vocab_size: int = 8192
    tokenizer: str | None = None
    max_lines: int | None = None
    eval_fraction: float = 0.05
    mlm_probability: float = 0.15
    monarch: MonarchConfig | None = None
    densify_at: float | None = None
    learning_rate: float = 5e-4
    batch_size: int = 16
    eval_batch_size: int = 32
    epochs: float = 1.0
    max_steps: int = -1
    warmup: float = 0.05
    weight_decay: float = 0.01
    grad_accum: int = 1
    precision: str = "fp32"
    seed: int = 42
    eval_steps: float | None = None
    save_steps: float | None = None
    logging_steps: int = 10
    checkpoint_dir: Path | None = None
    keep_checkpoints: bool = False
    resume: bool = False
    force: bool = False

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.text = [Path(p) for p in self.text]
        self.checkpoint_dir = Path(self.checkpoint_dir) if self.checkpoint_dir is not None else None
        self.text_columns = list(self.text_columns)
        if not self.text:
            raise ConfigError("no training text: give at least one text or TSV file")
        if self.objective is not None and self.objective not in OBJECTIVES:
            raise ConfigError(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}", field="objective")
        for name in ("layers", "width", "heads", "max_lines"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be at least 1, got {value}", field=name)
        for name in ("block_size", "batch_size", "eval_batch_size", "grad_accum", "logging_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}", field=name)
        if self.vocab_size < 256 + 8:
            raise ConfigError(f"vocab_size must be at least 264 (256 bytes and the special tokens), got {self.vocab_size}", field="vocab_size")
        for name in ("learning_rate", "epochs", "eval_steps", "save_steps"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}", field=name)
        if not 0 < self.eval_fraction <= 0.5:
            raise ConfigError(f"eval_fraction must be in (0, 0.5], got {self.eval_fraction}", field="eval_fraction")
        if not 0 < self.mlm_probability < 1:
            raise ConfigError(f"mlm_probability must be in (0, 1), got {self.mlm_probability}", field="mlm_probability")
        if self.warmup < 0 or self.weight_decay < 0:
            raise ConfigError("warmup and weight_decay must not be negative", field=("warmup", "weight_decay"))
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}", field="precision")
        if self.max_steps != -1 and self.max_steps < 1:
            raise ConfigError(f"max_steps must be at least 1 (or -1 for none), got {self.max_steps}", field="max_steps")
        for name in ("eval_steps", "save_steps"):
            value = getattr(self, name)
            if value is not None and value >= 1 and value != int(value):
                raise ConfigError(f"{name} must be a fraction below 1 or a whole number of steps, got {value}", field=name)
        if self.densify_at is not None:
            if self.monarch is None:
                raise ConfigError("densify_at switches Monarch layers to dense: train with a Monarch recipe (monarch)",
                                  field=("densify_at", "monarch"))
            if not self.densify_at > 0 or (self.densify_at >= 1 and self.densify_at != int(self.densify_at)):
                raise ConfigError(f"densify_at must be a fraction in (0, 1) or a whole step number, got {self.densify_at}", field="densify_at")
        if self.monarch is not None and (self.monarch.budget is not None or self.monarch.calibration is not None):
            raise ConfigError("a budget or calibration needs trained weights; a model trained from scratch has none")

    @property
    def checkpoints(self) -> Path:
        return self.checkpoint_dir or self.out.with_name(self.out.name + ".checkpoints")

    def densify_step(self, max_steps: int) -> int | None:
        """The step after which the model is dense (``None``: never), for a run of ``max_steps``.

        A fraction rounds to the nearest step, at least 1: the switch happens after a real
        optimisation step, never before the first."""
        if self.densify_at is None:
            return None
        if self.densify_at >= 1:
            return int(self.densify_at)
        return max(1, round(self.densify_at * max_steps))

    def every(self, value: float | None, max_steps: int) -> int:
        """``eval_steps``/``save_steps`` in steps: a fraction of the run, a number, or (``None``)
        the default of :data:`MIN_DEFAULT_INTERVAL`."""
        if value is None:
            return max(MIN_DEFAULT_INTERVAL, math.ceil(max_steps / DEFAULT_EVALUATIONS))
        return int(value) if value >= 1 else max(1, math.ceil(value * max_steps))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key, value in data.items():
            if isinstance(value, Path):
                data[key] = str(value)
        data["text"] = [str(p) for p in self.text]
        data["monarch"] = self.monarch.to_dict() if self.monarch else None
        return data


SAME_RUN = (
    "arch", "text", "text_columns", "objective", "layers", "width", "heads", "block_size", "vocab_size", "tokenizer",
    "max_lines", "eval_fraction", "monarch", "densify_at", "batch_size", "epochs", "max_steps", "grad_accum", "seed",
)
"""The options a resumed run must share with the run that wrote the checkpoints: they decide the
model, the data and the step count (a learning rate or a checkpoint interval may change). They
are what the checkpoint folder's run manifest (:mod:`monarchify.manifest`) records."""


def same_run(options: TrainOptions) -> dict[str, Any]:
    """The options of :data:`SAME_RUN`, as the run manifest records them."""
    data = options.to_dict()
    return {name: data[name] for name in SAME_RUN}
