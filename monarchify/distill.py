"""Losses that pull a converted (student) model back towards the dense (teacher) model it came from.

Two signals, both free once the dense model exists:

* the teacher's **logits** (knowledge distillation): the soft targets say how wrong each wrong
  answer is, which carries more information per example than a hard label; used while
  fine-tuning on a task (``finetune --teacher``);
* the teacher's **hidden states**, layer by layer: every layer of the student gets told what
  its output should be, which is what a projection that lost accuracy needs most; used during
  task fine-tuning (optionally) and by the task-agnostic healing pass (``monarchify heal``).

Plain tensors in, a scalar out: nothing here knows about transformers. The settings,
:class:`DistillConfig`, live in the torch-free :mod:`monarchify.distill_config` (re-exported here).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from monarchify.distill_config import DistillConfig
from monarchify.errors import ConfigError

__all__ = ["DistillConfig", "hidden_state_loss", "logit_loss"]


def logit_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Distillation loss between two batches of logits ``(batch, classes)``.

    Classification: ``T² · KL(softmax(teacher/T) ‖ softmax(student/T))``, averaged over the
    batch. One output (a regression head, STS-B): the squared difference, averaged.
    """
    if student.shape != teacher.shape:
        raise ConfigError(f"student and teacher logits differ in shape: {tuple(student.shape)} vs {tuple(teacher.shape)}")
    if student.dtype in (torch.bfloat16, torch.float16):
        # A half-precision softmax over a language model's vocabulary loses the small
        # probabilities the divergence is made of (bfloat16 gave negative "divergences").
        student = student.float()
    teacher = teacher.detach().to(student.dtype)
    if student.shape[-1] == 1:
        return F.mse_loss(student, teacher)
    log_p_student = F.log_softmax(student / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher / temperature, dim=-1)
    return F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="batchmean") * temperature**2


def hidden_state_loss(
    student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], mask: torch.Tensor | None = None, *, per_token: bool = False
) -> torch.Tensor:
    """Mean over layers of the relative squared error ``‖h_s − h_t‖² / ‖h_t‖²``.

    ``student``/``teacher``: one ``(batch, tokens, hidden)`` tensor per layer, as models return
    them with ``output_hidden_states=True``. ``mask`` ``(batch, tokens)``: only real tokens count
    (padding carries nothing the model is asked about). Relative, so each layer counts alike
    whatever the scale of its activations, and 0 means the student reproduces the teacher.

    ``per_token``: the ratio is taken token by token and then averaged, instead of one ratio of
    sums per layer. Llama-family models put a few hundred times the typical norm on one token
    (SmolLM2: 92–99 % of a middle layer's squared norm sits on the first token of a window), so a
    ratio of sums mostly measures that token; per token, every position counts alike.
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
        tiny = torch.finfo(s.dtype).tiny
        if per_token:
            losses.append(((s - t).pow(2).sum(-1) / t.pow(2).sum(-1).clamp_min(tiny)).mean())
        else:
            losses.append((s - t).pow(2).sum() / t.pow(2).sum().clamp_min(tiny))
    return torch.stack(losses).mean()
