"""What a fine-tuning run is asked to do, and what it reports back: plain data, so the command
line can build and check it without importing ``Trainer`` (which takes seconds to import)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from monarchify.config import MonarchConfig
from monarchify.distill_config import DistillConfig
from monarchify.errors import ConfigError
from monarchify.report import ConversionReport
from monarchify.training import PRECISIONS, RunEvents

if TYPE_CHECKING:
    from torch import nn

RESULTS_FILE = "eval_results.json"
CURVES_FILE = "training_curves.png"
"""Loss and evaluation curves, drawn from the results' history (when matplotlib is installed)."""


NOT_DECIDING = ("out", "force", "resume", "logging_steps", "checkpoint_dir", "keep_checkpoints", "save_checkpoints",
                "eval_each_epoch", "eval_batch_size", "max_eval_samples")
"""Options that change where a run writes, what it prints or how it evaluates, but not the
model it trains: a resume may change them. Every other option (a new one too) decides the run."""


@dataclass
class FinetuneOptions:
    """Everything a fine-tuning run depends on (recorded verbatim in ``eval_results.json``).

    ``monarch``: convert the loaded model with this recipe before training (``None``: train
    the model as loaded, dense or already Monarch). ``monarch_lr``: learning rate of the
    Monarch factors ``L``/``R`` (``None``: same as ``learning_rate``). ``distill``: learn from
    a teacher already fine-tuned on the task (see :mod:`monarchify.distill_config`). ``warmup``: a fraction
    of the training steps (< 1) or a number of steps. ``checkpoint_dir``: where Trainer keeps
    its resumable checkpoints (default ``<out>.checkpoints``, removed after a successful run
    unless ``keep_checkpoints``). ``gradual``: the share of the training steps over which the
    Monarch layers take over from their dense originals (:mod:`monarchify.gradual`), starting
    at probability ``gradual_start``; the originals come from the distillation teacher, or from
    the model itself when it is converted on the fly. ``holdout``: a share of the training
    examples kept out of training (every ``1/holdout``-th one, the same whatever the seed) to
    choose the epoch whose model is kept: the one that scores best on them by the task's main
    metric, never the dev split's score (``None``: the last epoch's). ``augment``: variants of
    every training example added to training, words swapped at ``augment_rate`` and labelled
    by the distillation teacher (:mod:`monarchify.glue.augment`; needs ``distill``).
    """

    task: str
    model: str
    out: Path
    data_dir: Path | None = None
    tokenizer: str | None = None
    monarch: MonarchConfig | None = None
    learning_rate: float = 5e-5
    monarch_lr: float | None = None
    distill: DistillConfig | None = None
    batch_size: int = 32
    eval_batch_size: int = 64
    epochs: float = 3.0
    max_steps: int = -1
    max_length: int = 128
    seed: int = 42
    warmup: float = 0.1
    weight_decay: float = 0.01
    grad_accum: int = 1
    precision: str = "fp32"
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    eval_each_epoch: bool = True
    save_checkpoints: bool = True
    checkpoint_dir: Path | None = None
    keep_checkpoints: bool = False
    resume: bool = False
    logging_steps: int = 10
    force: bool = False
    gradual: float | None = None
    gradual_start: float = 0.5
    holdout: float | None = None
    augment: int = 0
    augment_rate: float = 0.15

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.data_dir = Path(self.data_dir) if self.data_dir is not None else None
        self.checkpoint_dir = Path(self.checkpoint_dir) if self.checkpoint_dir is not None else None
        for name in ("learning_rate", "epochs"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}", field=name)
        if self.monarch_lr is not None and not self.monarch_lr > 0:
            raise ConfigError(f"monarch_lr must be positive, got {self.monarch_lr}", field="monarch_lr")
        for name in ("batch_size", "eval_batch_size", "max_length", "grad_accum", "logging_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}", field=name)
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be at least 1, got {value}", field=name)
        if self.warmup < 0 or self.weight_decay < 0:
            raise ConfigError("warmup and weight_decay must not be negative", field=("warmup", "weight_decay"))
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}", field="precision")
        if self.max_steps != -1 and self.max_steps < 1:
            raise ConfigError(f"max_steps must be at least 1 (or -1 for none), got {self.max_steps}", field="max_steps")
        if self.gradual is not None and not 0 < self.gradual <= 1:
            raise ConfigError(f"gradual must be a fraction of the training steps in (0, 1], got {self.gradual}", field="gradual")
        if self.holdout is not None:
            if isinstance(self.holdout, bool) or not 0 < self.holdout <= 0.5:
                raise ConfigError(f"holdout must be a share of the training examples in (0, 0.5], got {self.holdout}", field="holdout")
            if not (self.eval_each_epoch and self.save_checkpoints):
                raise ConfigError("holdout chooses among the epochs' checkpoints: it needs eval_each_epoch and save_checkpoints",
                                  field=("holdout", "eval_each_epoch", "save_checkpoints"))
        if isinstance(self.augment, bool) or not isinstance(self.augment, int) or self.augment < 0:
            raise ConfigError(f"augment must be a number of variants per example (0: none), got {self.augment!r}", field="augment")
        if self.augment and self.distill is None:
            raise ConfigError("augment adds examples that the teacher labels: it needs distillation (a teacher)",
                              field=("augment", "teacher"))
        if not 0 < self.augment_rate <= 1:
            raise ConfigError(f"augment_rate must be in (0, 1], got {self.augment_rate}", field="augment_rate")
        if not 0 <= self.gradual_start < 1:
            raise ConfigError(f"gradual_start must be in [0, 1), got {self.gradual_start}", field="gradual_start")

    @property
    def checkpoints(self) -> Path:
        return self.checkpoint_dir or self.out.with_name(self.out.name + ".checkpoints")

    def deciding(self) -> dict[str, Any]:
        """The options that decide the trained model (all but :data:`NOT_DECIDING`): what the
        checkpoint folder's run manifest records, and a resume must match."""
        return {name: value for name, value in self.to_dict().items() if name not in NOT_DECIDING}

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key, value in data.items():
            if isinstance(value, Path):
                data[key] = str(value)
        data["monarch"] = self.monarch.to_dict() if self.monarch else None
        return data


class FinetuneEvents(RunEvents):
    """What a fine-tuning run (or ``compress``, which runs three) tells its front end: every
    run's events, and one of its own."""

    def converted(self, report: ConversionReport) -> None:
        """A conversion inside the run finished (``compress``'s stage 2): what it chose and how
        much the outputs changed, which the run's results do not keep."""


@dataclass
class FinetuneResult:
    """What a run returns: the output folder, the results it wrote there (``RESULTS_FILE``)
    and the trained model (``None`` where no model is kept)."""

    out: Path
    results: dict[str, Any]
    model: nn.Module | None = None
