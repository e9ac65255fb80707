"""The ``TrainingArguments`` every monarchify ``Trainer`` run shares (GLUE fine-tuning and
training from scratch), and the training core's step timer as a ``Trainer`` callback
(:mod:`monarchify.training` holds the rest of what every run shares), so that the two commands behave alike where they should: linear decay
after warm-up, one checkpoint kept, logging from the first step, one seed for the model and the
data order, mixed precision through ``Trainer``, and no reporting integrations or tqdm bars of
transformers' own (the CLI draws its own progress).

Several processes on CPUs (``torchrun`` on a machine without CUDA) need ``use_cpu``: without it
``Trainer`` (accelerate) sees no accelerator to distribute over and runs every process as a
separate single-process run, each on all the data and each the "main" process (they then raced
to write the same output folder). With it, the processes form one gloo group."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from monarchify import distributed
from monarchify.training import StepTimer


def shared_training_arguments(options: Any, *, progress_bar: bool) -> dict[str, Any]:
    """Keyword arguments for ``TrainingArguments`` from the fields both options classes have
    (``checkpoints``, ``batch_size``, ``eval_batch_size``, ``grad_accum``, ``learning_rate``,
    ``weight_decay``, ``warmup``, ``logging_steps``, ``seed``, ``precision``); each command
    adds its own schedule of steps, evaluation and saving."""
    return {
        "output_dir": str(options.checkpoints),
        "per_device_train_batch_size": options.batch_size,
        "per_device_eval_batch_size": options.eval_batch_size,
        "gradient_accumulation_steps": options.grad_accum,
        "learning_rate": options.learning_rate,
        "weight_decay": options.weight_decay,
        "lr_scheduler_type": "linear",
        "warmup_steps": options.warmup,
        "save_total_limit": 1,
        "logging_strategy": "steps",
        "logging_steps": options.logging_steps,
        "logging_first_step": True,
        "seed": options.seed,
        "data_seed": options.seed,
        "bf16": options.precision == "bf16",
        "fp16": options.precision == "fp16",
        "report_to": "none",
        "disable_tqdm": not progress_bar,
        "dataloader_num_workers": 0,
        "dataloader_pin_memory": torch.cuda.is_available(),
        "use_cpu": distributed.launched() and not torch.cuda.is_available(),
        # Each process's loss is its own batch's mean and DDP averages the gradients: the global
        # batch's mean. Trainer's default instead multiplies the loss by the number of processes,
        # expecting the model to divide by the tokens of all of them; a classifier's loss ignores
        # that count, so under torchrun its loss and gradients came out N times too large.
        "average_tokens_across_devices": False,
        # Trainer lowers the other processes' transformers log to warnings; the main process keeps
        # the level the command set, and so do they (one process speaks).
        "log_level_replica": "passive",
    }


def resuming_line(checkpoint: Path) -> str:
    """What a resumed run says first: the checkpoint it continues and how far that run had got
    (from the checkpoint's own ``trainer_state.json``), so a resume from an older checkpoint
    than expected shows at once."""
    try:
        state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
        return f"resuming from {checkpoint.name} (step {state['global_step']} of {state['max_steps']})"
    except (OSError, ValueError, KeyError, TypeError):
        return f"resuming from {checkpoint.name}"


class StepTimerCallback(TrainerCallback):
    """Times ``Trainer``'s optimisation steps with the training core's :class:`StepTimer`
    (the one the hand-written healing loop uses), so every run's step times mean the same."""

    def __init__(self, timer: StepTimer | None = None) -> None:
        self.timer = timer if timer is not None else StepTimer()

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.timer.begin()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.timer.end()
