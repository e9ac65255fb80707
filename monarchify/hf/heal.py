"""``heal_pretrained``: load a converted folder and its dense original, heal the converted one on
unlabeled text (:mod:`monarchify.heal`), and save it in the same loadable format."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from monarchify import distributed
from monarchify.atomic import check_output_dir
from monarchify.errors import ConfigError
from monarchify.heal import HealResult, check_sharding, heal_
from monarchify.heal_config import DEFAULT_HEAL_BATCH, DEFAULT_HEAL_SAMPLES, HealConfig
from monarchify.hf.loading import load_model, load_tokenizer
from monarchify.hf.saving import recipe_of, save_model
from monarchify.hf.stored_report import read_report
from monarchify.hf.teacher import check_dense_original
from monarchify.report import ConversionReport
from monarchify.samples import DEFAULT_MAX_LENGTH, read_samples, tokenize


@dataclass
class HealRun:
    result: HealResult
    report: ConversionReport
    model: nn.Module


def heal_pretrained(
    source: str | os.PathLike[str],
    teacher: str | os.PathLike[str],
    data: str | os.PathLike[str],
    out: str | os.PathLike[str],
    config: HealConfig,
    *,
    samples: int = DEFAULT_HEAL_SAMPLES,
    batch_size: int = DEFAULT_HEAL_BATCH,
    max_length: int = DEFAULT_MAX_LENGTH,
    force: bool = False,
    progress: Callable[[int, float], None] | None = None,
) -> HealRun:
    """Heal the converted model in ``source`` towards ``teacher`` on ``data`` and save it to ``out``.

    ``data`` is read like calibration data (:func:`monarchify.samples.read_samples`: text file,
    GLUE TSV, datasets folder, ``hf:``): ``samples`` for training and a quarter more held out to measure the hidden-state error
    before and after. Everything is checked before the long part starts; ``out`` is written
    atomically at the end with the conversion report, whose ``meta.heal`` records the run.

    Under ``torchrun`` every process loads both models and heals on its share of every batch
    (``batch_size`` stays the batch of one step over all of them); only the main process
    writes ``out``, and the others wait until it has.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}", field="batch_size")
    distributed.init()
    check_sharding()
    text = read_samples(data, samples)
    check_output_dir(out, force, inputs=(source, teacher))
    source, teacher_source = os.fspath(source), os.fspath(teacher)
    report = read_report(source)  # also refuses a folder that is not a Monarch checkpoint
    student = load_model(source)
    dense = load_model(teacher_source)
    check_dense_original(student, dense, source, teacher_source)
    tokenizer = load_tokenizer(source) or load_tokenizer(teacher_source)
    batches = tokenize(text.fit, tokenizer, batch_size=batch_size, max_length=max_length)
    heldout = tokenize(text.heldout, tokenizer, batch_size=batch_size, max_length=max_length)

    result = heal_(student, dense, batches, config, heldout=heldout, progress=progress)
    report.meta["heal"] = {
        "teacher": teacher_source,
        "data": text.describe(),
        "batch_size": batch_size,
        "max_length": max_length,
        **config.to_dict(),
        "heldout_hidden_error_before": result.heldout_before,
        "heldout_hidden_error_after": result.heldout_after,
        "heldout_hidden_error_curve": [[step, error] for step, error in result.curve],
        "seconds": round(result.seconds, 2),
        "median_step_ms": result.median_step_ms,
        "cpu_threads": torch.get_num_threads(),  # a slow run on a busy machine explains itself
        "world_size": distributed.world_size(),
        "global_batch": batch_size,
        "sharded": distributed.sharded(),
    }
    distributed.on_main(save_model, student, out, tokenizer=tokenizer, report=report, recipe=recipe_of(student), force=force,
                        sentence_transformers_from=source)
    return HealRun(result, report, student)


def describe(run: HealRun) -> dict[str, Any]:
    """What a program reading ``heal --json`` needs."""
    heal = run.report.meta["heal"]
    return {"heal": heal, "losses": run.result.losses}
