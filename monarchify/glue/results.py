"""What a fine-tuning run records in ``eval_results.json``, assembled in one place.

The results file is what runs are compared by (``benchmarks/mrpc_table.py``, the tables of
``docs/results.md``), so its keys and their meaning must not drift with changes to how
training is wired. :func:`build_results` is the only place that names them: the training code
hands over what it measured in the small records below, and gets the dictionary back.

Torch-free to import. The machine's record (versions, device, load) is the training core's
(:mod:`monarchify.training`), the same for every run that trains.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from monarchify.training import load_average

if TYPE_CHECKING:
    from monarchify.glue.data import GlueData
    from monarchify.glue.options import FinetuneOptions
    from monarchify.glue.tasks import GlueTask


@dataclass
class Conversion:
    """The Monarch side of the run: converted on the fly or loaded so, with which recipe."""

    on_the_fly: bool
    recipe: dict[str, Any]
    """The recipe of the Monarch layers (empty for a dense model)."""
    seconds: float = 0.0
    """Time the on-the-fly conversion took (0 when there was none)."""


@dataclass
class Earlier:
    """What the sessions before this one spent on a run that resumed from a checkpoint, as of
    that checkpoint (kept in it, :data:`monarchify.glue.train.TIME_FILE`): the time a resumed
    run reports is the whole run's, not only its last session's."""

    seconds: float = 0.0
    step_seconds: float = 0.0
    eval_seconds: float = 0.0
    sessions: int = 0


@dataclass
class Training:
    """What ``Trainer.train`` reported, with the timings it does not separate itself."""

    metrics: dict[str, Any]
    """``Trainer.train``'s own metrics (``train_runtime``, ``train_loss``...)."""
    eval_seconds: float
    """Wall time of the evaluations run inside the training loop (after each epoch)."""
    step_seconds: float
    """Wall time inside optimisation steps only."""
    steps: int
    epochs: float | None
    examples: int
    log_history: list[dict[str, Any]]
    """Trainer's log as it stood when training ended (the final evaluation is not in it)."""
    load_average_at_start: list[float] | None
    resumed_from: str | None = None
    """The checkpoint this session continued (``None``: trained in one session)."""
    resumed_at_step: int = 0
    earlier: Earlier = field(default_factory=Earlier)
    world_size: int = 1
    """Processes that trained together (``torchrun``), each on its share of every step's batch."""
    global_batch: int | None = None
    """Examples per optimisation step over all processes: batch size x accumulation x processes."""


@dataclass
class Evaluation:
    """The final evaluation of every dev split."""

    metrics: dict[str, dict[str, float]]
    """Split -> metric name (without the ``eval_`` prefix) -> value."""
    seconds: float
    examples: dict[str, int]
    baselines: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Split -> the trivial baseline (:func:`monarchify.glue.baseline.trivial_baseline`)."""


def history(log_history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Trainer's log: the training loss every ``logging_steps`` and each evaluation's metrics."""
    drop = ("runtime", "per_second", "total_flos", "grad_norm")
    return [
        {k: v for k, v in entry.items() if not k.endswith(drop) and not k.startswith("train_")}
        for entry in log_history
        if "loss" in entry or any(k.startswith("eval_") for k in entry)
    ]


def _train_section(training: Training) -> dict[str, Any]:
    """Training throughput of the whole run, with the time spent evaluating inside the loop taken
    out. Trainer measures only the session it ran: after a resume, the earlier sessions' time
    is added and the rates are over the whole run."""
    metrics, earlier = training.metrics, training.earlier
    session = metrics.get("train_runtime") or 0.0
    seconds = earlier.seconds + session
    samples_per_second, steps_per_second = metrics.get("train_samples_per_second"), metrics.get("train_steps_per_second")
    if training.resumed_from is not None:
        session_steps = training.steps - training.resumed_at_step
        per_step = (samples_per_second or 0.0) * session / session_steps if session_steps > 0 else None
        samples_per_second = per_step * training.steps / seconds if per_step and seconds > 0 else None
        steps_per_second = training.steps / seconds if seconds > 0 else None
    return {
        "seconds": seconds,
        "seconds_excluding_eval": seconds - earlier.eval_seconds - training.eval_seconds,
        "step_seconds": earlier.step_seconds + training.step_seconds,
        "samples_per_second": samples_per_second,
        "steps_per_second": steps_per_second,
        "steps": training.steps,
        "epochs": training.epochs,
        "examples": training.examples,
        "loss": metrics.get("train_loss"),
        "sessions": earlier.sessions + 1,
        "resumed_from": training.resumed_from,
        "world_size": training.world_size,
        "global_batch": training.global_batch,
    }


def _eval_section(evaluation: Evaluation) -> dict[str, Any]:
    return {
        "seconds": evaluation.seconds,
        "samples_per_second": {split: m.get("samples_per_second") for split, m in evaluation.metrics.items()},
        "examples": evaluation.examples,
    }


def build_results(
    options: FinetuneOptions,
    task: GlueTask,
    data: GlueData,
    *,
    conversion: Conversion,
    params: dict[str, Any],
    training: Training,
    evaluation: Evaluation,
    notes: list[str],
    environment: dict[str, Any],
    argv: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The contents of ``eval_results.json``: what was asked (``arguments``, ``command``), on
    what (data, model, parameters), how it went (metrics, timings, history, notes) and where
    (``environment``, with the machine's load when training started and now)."""
    metrics = evaluation.metrics
    return {
        "task": task.name,
        "model": options.model,
        "monarch": {
            "converted_on_the_fly": conversion.on_the_fly,
            "recipe": conversion.recipe or None,
            "layers": params["monarch_layers"],
            "convert_seconds": round(conversion.seconds, 3),
        },
        "distill": options.distill.to_dict() if options.distill is not None else None,
        "metrics": metrics,
        "main_metric": {split: values.get(task.main_metric) for split, values in metrics.items()},
        "trivial_baseline": evaluation.baselines,
        "train": _train_section(training),
        "eval": _eval_section(evaluation),
        "params": params,
        "data": {"source": data.source, "sizes": {"train": training.examples, **evaluation.examples}, "skipped": data.skipped},
        "history": history(training.log_history),
        "notes": notes,
        "arguments": options.to_dict(),
        "command": list(argv) if argv is not None else list(sys.argv),
        "environment": {
            **environment,
            "load_average_at_start": training.load_average_at_start,
            "load_average_at_end": load_average(),
        },
    }
