"""Losses that pull a converted (student) model back towards the dense (teacher) model it came from.

Two signals, both free once the dense model exists:

* the teacher's **logits** (knowledge distillation): the soft targets say how wrong each wrong
  answer is, which carries more information per example than a hard label; used while
  fine-tuning on a task (``finetune --distill-from``);
* the teacher's **hidden states**, layer by layer: every layer of the student gets told what
  its output should be, which is what a projection that lost accuracy needs most; used during
  task fine-tuning (optionally) and by the task-agnostic healing pass (``monarchify heal``).

Plain tensors in, a scalar out: nothing here knows about transformers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from monarchify.errors import ConfigError


@dataclass
class DistillConfig:
    """How fine-tuning mixes the task loss with the teacher's signals.

    ``loss = (1 - alpha) * task_loss + alpha * logit_loss + hidden_weight * hidden_loss``.
    ``temperature`` softens both distributions for the logit term (its gradient is rescaled
    by ``temperature²`` so the term keeps its weight as the temperature changes).
    """

    teacher: str
    alpha: float = 0.5
    temperature: float = 2.0
    hidden_weight: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"--distill-alpha must be between 0 and 1, got {self.alpha}")
        if not self.temperature > 0:
            raise ConfigError(f"--distill-temperature must be positive, got {self.temperature}")
        if self.hidden_weight < 0:
            raise ConfigError(f"--distill-hidden must not be negative, got {self.hidden_weight}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def logit_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Distillation loss between two batches of logits ``(batch, classes)``.

    Classification: ``T² · KL(softmax(teacher/T) ‖ softmax(student/T))``, averaged over the
    batch. One output (a regression head, STS-B): the squared difference, averaged.
    """
    if student.shape != teacher.shape:
        raise ConfigError(f"student and teacher logits differ in shape: {tuple(student.shape)} vs {tuple(teacher.shape)}")
    teacher = teacher.detach().to(student.dtype)
    if student.shape[-1] == 1:
        return F.mse_loss(student, teacher)
    log_p_student = F.log_softmax(student / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher / temperature, dim=-1)
    return F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="batchmean") * temperature**2


def hidden_state_loss(
    student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean over layers of the relative squared error ``‖h_s − h_t‖² / ‖h_t‖²``.

    ``student``/``teacher``: one ``(batch, tokens, hidden)`` tensor per layer, as models return
    them with ``output_hidden_states=True``. ``mask`` ``(batch, tokens)``: only real tokens count
    (padding carries nothing the model is asked about). Relative, so each layer counts alike
    whatever the scale of its activations, and 0 means the student reproduces the teacher.
    """
    if len(student) != len(teacher):
        raise ConfigError(f"student has {len(student)} hidden states and teacher {len(teacher)}: the architectures differ")
    if not student:
        raise ConfigError("no hidden states to compare")
    losses = []
    for s, t in zip(student, teacher):
        if s.shape != t.shape:
            raise ConfigError(f"student and teacher hidden states differ in shape: {tuple(s.shape)} vs {tuple(t.shape)}")
        t = t.detach().to(s.dtype)
        if mask is not None:
            keep = mask.bool()
            s, t = s[keep], t[keep]
        losses.append((s - t).pow(2).sum() / t.pow(2).sum().clamp_min(torch.finfo(s.dtype).tiny))
    return torch.stack(losses).mean()
