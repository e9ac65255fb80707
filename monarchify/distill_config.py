"""How fine-tuning learns from a teacher (:mod:`monarchify.distill`), as plain data.

Torch-free on purpose: the command line builds and checks it (and ``FinetuneOptions``, which
holds it) before anything heavy is imported, so ``monarchify finetune --help`` stays quick.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from monarchify.errors import ConfigError


@dataclass
class DistillConfig:
    """How fine-tuning mixes the task loss with the teacher's signals.

    ``loss = (1 - alpha) * task_loss + alpha * logit_loss + hidden_weight * hidden_loss``.
    ``temperature`` softens both distributions for the logit term (its gradient is rescaled
    by ``temperature²`` so the term keeps its weight as the temperature changes).
    ``teacher``: a folder or Hub id of a dense model already fine-tuned on the task.
    """

    teacher: str
    alpha: float = 0.5
    temperature: float = 2.0
    hidden_weight: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"distill.alpha must be between 0 and 1, got {self.alpha}", field="distill.alpha")
        if not self.temperature > 0:
            raise ConfigError(f"distill.temperature must be positive, got {self.temperature}", field="distill.temperature")
        if self.hidden_weight < 0:
            raise ConfigError(f"distill.hidden_weight must not be negative, got {self.hidden_weight}", field="distill.hidden_weight")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
