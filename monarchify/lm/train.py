"""Train a language model from scratch on text, dense, Monarch, or Monarch then dense.

``train(options)`` is what the CLI calls. It reads the text and holds out a part, gets a
tokenizer (given, or learned on the training text), builds the model from its config with fresh
Monarch layers where the recipe selects them (:mod:`monarchify.hf.fresh`), trains with stock
``Trainer`` (so ``torchrun``/``accelerate launch`` spread it over GPUs and machines), switches to
dense at ``densify_at`` (:mod:`monarchify.lm.switch`), and saves the model, its tokenizer and
``train_results.json`` (perplexity on the held-out part, step times, the loss against time).
Under several processes the switch happens in each of them, the same way
(:mod:`monarchify.lm.switch`).

Checkpoints resume, across the switch too: the checkpoint folder keeps the run's options and
tokenizer, each checkpoint keeps the step times and the switch record, and a checkpoint without
Monarch factors is loaded into a densified model (the switch happened before it was written).
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import transformers
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.trainer_utils import get_last_checkpoint

from monarchify import distributed
from monarchify.atomic import check_output_dir
from monarchify.errors import ConfigError, ModelLoadError, OutputExistsError
from monarchify.hf.densify import DENSIFIED, densified_record
from monarchify.hf.fresh import build_model, default_objective, model_class_for
from monarchify.hf.loading import load_tokenizer, tensor_shapes
from monarchify.hf.saving import save_model
from monarchify.hf.training_arguments import StepTimerCallback, resuming_line, shared_training_arguments
from monarchify.lm.build import arch_config, sized_config
from monarchify.lm.options import RESULTS_FILE, SAME_RUN, TrainOptions, perplexity, same_run
from monarchify.manifest import MANIFEST_FILE, RunManifest
from monarchify.lm.switch import DensifyCallback, monarch_layers
from monarchify.lm.text import Blocks, Collator, fixed_masking, pack, read_lines, train_tokenizer
from monarchify.pipeline.densify import densify_
from monarchify.report import ConversionReport
from monarchify.training import (
    RunEvents, StepTimer, check_precision, check_resume, load_average, median_ms, record_run, recorded, run_environment,
)

STAGE = "train"
"""The run's one stage in the checkpoint folder's run manifest (:mod:`monarchify.manifest`),
which records the options a resume must match (:data:`~monarchify.lm.options.SAME_RUN`)."""
LOG_FILE = "monarchify_log.json"
"""In each checkpoint: step times, the loss against time and the switch record up to it."""
TOKENIZER_DIR = "tokenizer"


# ---------------------------------------------------------------------------------- callbacks


class RunLog(StepTimerCallback):
    """Wall time of every optimisation step (the training core's :class:`StepTimer`), the loss
    against that time, and the switch.

    Only time inside steps counts (evaluation and checkpointing are left out), so a curve of
    loss against this time compares how fast each variant trains, not how often it evaluated.
    """

    def __init__(self, densify: DensifyCallback | None = None) -> None:
        super().__init__()
        self.curve: list[dict[str, float]] = []
        self.densify = densify

    @property
    def step_seconds(self) -> list[float]:
        return self.timer.step_seconds

    @property
    def seconds(self) -> float:
        return self.timer.seconds

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        if logs and "loss" in logs:
            self.curve.append({"step": state.global_step, "seconds": self.seconds, "loss": float(logs["loss"])})

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict[str, float] | None = None, **kwargs: Any) -> None:
        evaluated = [e for e in self.curve if "eval_loss" in e]
        if evaluated and evaluated[-1]["step"] == state.global_step:
            return  # the closing evaluation of a run that has just evaluated: the same point
        if metrics and "eval_loss" in metrics:
            self.curve.append({"step": state.global_step, "seconds": self.seconds, "eval_loss": float(metrics["eval_loss"])})

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and folder.is_dir():
            (folder / LOG_FILE).write_text(json.dumps(self.to_dict()) + "\n", encoding="utf-8")

    def to_dict(self) -> dict[str, Any]:
        switch = self.densify.record if self.densify is not None else None
        return {"step_seconds": self.step_seconds, "curve": self.curve, "switch": switch}

    def restore(self, checkpoint: Path) -> None:
        """Carry on the record of the run a resume continues (nothing if it wrote none)."""
        path = checkpoint / LOG_FILE
        if not path.is_file():
            return
        data = json.loads(path.read_text(encoding="utf-8"))
        self.timer = StepTimer(data.get("step_seconds", []))
        self.curve = list(data.get("curve", []))
        if self.densify is not None and data.get("switch"):
            self.densify.record = data["switch"]


# ---------------------------------------------------------------------------------- pieces


def _check_request(options: TrainOptions) -> None:
    """Everything the options alone show to be impossible, before any text is read."""
    check_precision(options.precision)
    if options.densify_at is not None and distributed.sharded():
        raise ConfigError(
            "the switch to dense (densify_at) cannot run on a sharded (FSDP) model: each process holds only pieces of "
            "the Monarch factors; train with copies of the model (DistributedDataParallel, the default) or densify the "
            "result afterwards"
        )
    inputs = (*options.text, *((options.tokenizer,) if options.tokenizer else ()), options.arch)
    if options.resume:
        if check_resume(options.checkpoints, STAGE, same_run(options), manifest=_manifest(options.checkpoints)) == "new":
            raise ConfigError(f"resume: '{options.checkpoints}' holds no checkpoints of a training run")
        return
    check_output_dir(options.out, options.force, inputs=inputs)
    folder = check_output_dir(options.checkpoints, options.force, inputs=inputs)
    if folder.is_dir() and any(folder.iterdir()):  # only with force (check_output_dir refused it otherwise)
        if STAGE not in _manifest(folder).stages:
            raise OutputExistsError(f"'{folder}' is not the checkpoint folder of a training run; it is not replaced")
        distributed.barrier()  # under torchrun: every process has looked before the main one deletes
        if distributed.is_main():
            shutil.rmtree(folder)


def _manifest(folder: Path) -> RunManifest:
    """The checkpoint folder's run manifest. Earlier versions kept the run's options themselves
    in the same file: such a folder reads as this run's stage, begun with them."""
    try:
        return RunManifest.load(folder)
    except ConfigError:
        try:
            saved = json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            saved = None
        if not isinstance(saved, dict) or "arch" not in saved:
            raise
        return recorded(folder, STAGE, {name: saved[name] for name in SAME_RUN if name in saved})


def _tokenizer(options: TrainOptions, train_lines: Sequence[str], objective: str) -> tuple[Any, str]:
    """The run's tokenizer and where it came from: the checkpoint folder's on a resume (the
    exact one the checkpoints were trained with), the one given, or one learned here."""
    if options.resume:
        source = options.checkpoints / TOKENIZER_DIR
        return transformers.PreTrainedTokenizerFast.from_pretrained(str(source)), f"{options.tokenizer or 'learned'} (from the checkpoints)"
    if options.tokenizer is not None:
        tokenizer = load_tokenizer(options.tokenizer)
        if tokenizer is None:
            raise ModelLoadError(f"'{options.tokenizer}' has no tokenizer files")
        return tokenizer, options.tokenizer
    return train_tokenizer(train_lines, options.vocab_size, objective), f"byte-level BPE learned on the training text ({options.vocab_size} tokens)"


@dataclass
class _Data:
    train: Blocks
    heldout: Blocks
    collator: Collator
    lines: tuple[int, int]


def _data(options: TrainOptions, lines: Any, tokenizer: Any, objective: str) -> _Data:
    collator = Collator(tokenizer, objective, options.mlm_probability)
    if objective == "masked" and tokenizer.mask_token is None:
        raise ConfigError("a masked language model needs a tokenizer with a mask token")
    train_ids = pack(lines.train, tokenizer, options.block_size)
    held_ids = pack(lines.heldout, tokenizer, options.block_size)
    heldout = Blocks(*fixed_masking(held_ids, collator, options.seed)) if objective == "masked" else Blocks(held_ids)
    return _Data(Blocks(train_ids), heldout, collator, (len(lines.train), len(lines.heldout)))


def _max_steps(options: TrainOptions, n_train: int) -> int:
    if options.max_steps > 0:
        return options.max_steps
    per_step = options.batch_size * options.grad_accum * distributed.world_size()
    return max(1, math.ceil(options.epochs * math.ceil(n_train / per_step)))


def _training_arguments(options: TrainOptions, max_steps: int, progress_bar: bool) -> TrainingArguments:
    return TrainingArguments(
        **shared_training_arguments(options, progress_bar=progress_bar),
        max_steps=max_steps,
        eval_strategy="steps",
        eval_steps=options.every(options.eval_steps, max_steps),
        save_strategy="steps",
        save_steps=options.every(options.save_steps, max_steps),
        remove_unused_columns=False,
    )


def _phases(step_seconds: list[float], switch: dict[str, Any] | None) -> dict[str, Any]:
    """Median step time of the whole run and, with a switch, of each side of it."""
    timing: dict[str, Any] = {"median_step_ms": median_ms(step_seconds)}
    if switch is not None:
        cut = switch["step"]
        timing["median_step_ms_monarch"] = median_ms(step_seconds[:cut])
        timing["median_step_ms_dense"] = median_ms(step_seconds[cut:])
    return timing


def _count(model: nn.Module) -> dict[str, Any]:
    layers = monarch_layers(model).values()
    total = sum(p.numel() for p in model.parameters())
    saved = sum(m.in_features * m.out_features - m.L.numel() - m.R.numel() for m in layers)
    return {"total": total, "if_dense": total + saved, "monarch_layers": len(layers)}


# ---------------------------------------------------------------------------------- train


@dataclass
class TrainResult:
    out: Path
    results: dict[str, Any]
    model: nn.Module


def train(
    options: TrainOptions,
    *,
    events: RunEvents | None = None,
    callbacks: Sequence[TrainerCallback] = (),
    progress_bar: bool = True,
    argv: Sequence[str] | None = None,
) -> TrainResult:
    """Train ``options.arch`` from scratch on ``options.text`` and save it with its results.

    ``callbacks`` replace Trainer's tqdm bar (a front end passes its own); they are also how a
    caller stops a run early (``control.should_training_stop``), e.g. to test resuming.
    """
    distributed.init()  # the main process prepares the checkpoint folder while the others wait
    events = (events or RunEvents()) if distributed.is_main() else RunEvents()  # one process speaks
    environment = run_environment()
    _check_request(options)
    distributed.barrier()  # every process has checked the folders before the main one writes into them
    lines = read_lines(options.text, options.text_columns, max_lines=options.max_lines, eval_fraction=options.eval_fraction)
    objective = options.objective or default_objective(arch_config(options.arch))
    tokenizer, tokenizer_source = _tokenizer(options, lines.train, objective)
    hf_config = sized_config(options.arch, layers=options.layers, width=options.width, heads=options.heads,
                             positions=options.block_size, tokenizer=tokenizer)
    model_class = model_class_for(hf_config, objective)
    data = _data(options, lines, tokenizer, objective)
    max_steps = _max_steps(options, len(data.train))
    switch_step = options.densify_step(max_steps)
    if switch_step is not None and switch_step >= max_steps:
        raise ConfigError(f"densify_at is step {switch_step}, but the run has only {max_steps} steps")
    model, report = build_model(hf_config, options.monarch, model_class=model_class, seed=options.seed)
    events.done(
        f"data: {data.lines[0]} lines for training, {data.lines[1]} held out; {len(data.train)} blocks of "
        f"{options.block_size} tokens ({len(data.heldout)} held out); tokenizer: {tokenizer_source}"
    )
    counts = _count(model)
    kind = f"Monarch ({counts['monarch_layers']} layers, {options.monarch.nblocks} blocks)" if options.monarch else "dense"
    events.done(f"model: {type(model).__name__}, {counts['total'] / 1e6:.2f}M parameters, {kind}, {objective} LM")

    densify = DensifyCallback(switch_step, data.collator([data.heldout[i] for i in range(min(4, len(data.heldout)))])) if switch_step else None
    log = RunLog(densify)

    checkpoint = None
    if options.resume:
        found = get_last_checkpoint(str(options.checkpoints))
        if found is None:
            raise ConfigError(f"resume: no checkpoint to resume from in '{options.checkpoints}'")
        checkpoint = Path(found)
        if monarch_layers(model) and not any(k.endswith((".L", ".R")) for k in tensor_shapes(checkpoint)):
            densify_(model)  # written after the switch: the checkpoint holds the dense layers
        log.restore(checkpoint)
        events.note(resuming_line(checkpoint))
    elif distributed.is_main():
        options.checkpoints.mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(str(options.checkpoints / TOKENIZER_DIR))
        record_run(options.checkpoints, STAGE, same_run(options))

    trainer = Trainer(
        model=model,
        args=_training_arguments(options, max_steps, progress_bar and not callbacks),
        train_dataset=data.train,
        eval_dataset=data.heldout,
        data_collator=data.collator,
        callbacks=[log, *((densify,) if densify else ()), *callbacks],
    )
    if densify is not None:
        densify.wrapped = lambda: trainer.model_wrapped  # under several processes, the wrapper rebuilt at the switch
    trainer.remove_callback(PrinterCallback)
    if callbacks:
        trainer.remove_callback(ProgressCallback)

    events.stage("training" + (f" (switch to dense after step {switch_step})" if switch_step else ""))
    load_at_start = load_average()
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    stopped_early = trainer.state.global_step < max_steps
    events.stage("evaluating")
    metrics = trainer.evaluate()
    switch = densify.record if densify is not None else None
    results = {
        "command": list(argv) if argv else None,
        "options": options.to_dict(),
        "objective": objective,
        "model": {"type": type(model).__name__, "config": hf_config.to_diff_dict(), "params": _count(trainer.model),
                  "params_at_start": counts},
        "data": {"sources": lines.sources, "train_lines": data.lines[0], "heldout_lines": data.lines[1],
                 "train_blocks": len(data.train), "heldout_blocks": len(data.heldout), "tokenizer": tokenizer_source,
                 "vocab_size": len(tokenizer)},
        "train": {"steps": trainer.state.global_step, "max_steps": max_steps, "stopped_early": stopped_early,
                  "step_seconds_total": log.seconds, **_phases(log.step_seconds, switch),
                  "load_average_at_start": load_at_start, "world_size": trainer.args.world_size,
                  "global_batch": options.batch_size * options.grad_accum * trainer.args.world_size},
        "switch": switch,
        "eval": {"loss": metrics["eval_loss"], "perplexity": perplexity(metrics["eval_loss"])},
        "curve": log.curve,
        "step_seconds": log.step_seconds,
        "environment": environment,
    }
    if distributed.is_main() and not stopped_early:
        events.stage(f"saving to {options.out}")
        _save(options, trainer.model, tokenizer, report if monarch_layers(trainer.model) else None, results)
    distributed.barrier()  # the others end (or go on) once the folder is there
    return TrainResult(options.out, results, trainer.model)


def _save(options: TrainOptions, model: nn.Module, tokenizer: Any, report: ConversionReport | None, results: dict[str, Any]) -> None:
    """The model (a Monarch folder, or a plain one once densified), its tokenizer and results,
    atomically; then the checkpoints go, unless kept."""
    recipe = options.monarch.to_dict() if options.monarch is not None and monarch_layers(model) else None
    started_monarch = results["model"]["params_at_start"]["monarch_layers"]
    if started_monarch and not monarch_layers(model):  # switched: a plain folder that says what it was
        switch = {"step": (results["switch"] or {}).get("step", options.densify_step(results["train"]["max_steps"])),
                  "max_steps": results["train"]["max_steps"]}
        setattr(model.config, DENSIFIED, densified_record(started_monarch, options.monarch.to_dict(), switch=switch))
    save_model(model, options.out, tokenizer=tokenizer, report=report, recipe=recipe, force=options.force or options.resume,
               extra_files={RESULTS_FILE: json.dumps(results, indent=2, default=str) + "\n"})
    if not options.keep_checkpoints and options.checkpoints.is_dir():
        shutil.rmtree(options.checkpoints, ignore_errors=True)
