"""Fine-tune a dense or Monarch model on a GLUE task with ``transformers.Trainer``.

``finetune(options)`` is the function the CLI calls. It loads the data (TSV folder or Hub),
loads the model with a sequence-classification head (adding one when the checkpoint has
none), optionally converts it to Monarch on the fly, trains with :class:`MonarchTrainer`,
evaluates every dev split with the shipped GLUE metric, and writes the fine-tuned model
(same loadable format: a Monarch folder, or a plain Hugging Face folder for a dense model)
plus ``eval_results.json`` to the output folder.

Mixed precision, gradient accumulation, resuming and multi-GPU (``torchrun`` /
``accelerate launch``) come from ``Trainer``. :class:`MonarchTrainer` is the one place that
changes how training works (a separate learning rate for the Monarch factors, and the
distillation loss from a fine-tuned dense teacher in its ``compute_loss``).

``finetune`` itself only sequences named steps (check the request, load data, load the models,
convert, build the Trainer, train, evaluate, save); the contents of ``eval_results.json`` are
assembled by :mod:`monarchify.glue.results`.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
import transformers
from torch import nn
from transformers import (
    AutoModelForSequenceClassification,
    DataCollatorWithPadding,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.trainer_utils import get_last_checkpoint

from monarchify import distributed
from monarchify.atomic import check_output_dir
from monarchify.distill import DistillConfig, hidden_state_loss, logit_loss
from monarchify.errors import ConfigError, ModelLoadError, NothingToResumeError
from monarchify.glue.data import GlueData, load_glue
from monarchify.glue.baseline import trivial_baseline
from monarchify.glue.metrics import compute_metrics_fn, predictions_from_logits
from monarchify.glue.options import CURVES_FILE, RESULTS_FILE, FinetuneEvents, FinetuneOptions, FinetuneResult
from monarchify.glue.results import Conversion, Earlier, Evaluation, Training, build_results
from monarchify.glue.tasks import GlueTask, get_task
from monarchify.hf.loading import load_model, load_tokenizer, mismatched_keys
from monarchify.hf.saving import recipe_of, save_model
from monarchify.hf.teacher import has_monarch_layers, load_task_teacher
from monarchify.hf.training_arguments import StepTimerCallback, resuming_line, shared_training_arguments
from monarchify.monarch import STRUCTURED_LAYERS, LowRankLinear, MonarchLinear
from monarchify.pipeline import convert, dry_run
from monarchify.report import ConversionReport
from monarchify.training import StepTimer, check_precision, check_resume, load_average, record_run, run_environment

STAGE = "finetune"
"""The run's one stage in the checkpoint folder's run manifest (:mod:`monarchify.manifest`)."""
TIME_FILE = "monarchify_time.json"
"""In each checkpoint: the training time of the run up to it (:class:`RunClock`)."""

# ---------------------------------------------------------------------------------- trainer


def monarch_factor_names(model: nn.Module) -> set[str]:
    """Qualified names of every Monarch factor (``L``, ``R``) parameter of ``model``, and of
    the factors (``U``, ``V``) of low-rank layers, which stand where Monarch layers would."""
    names = set()
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        if isinstance(module, MonarchLinear):
            names.update({prefix + "L", prefix + "R"})
        elif isinstance(module, LowRankLinear):
            names.update({prefix + "U", prefix + "V"})
    return names


class MonarchTrainer(Trainer):
    """``Trainer`` with what Monarch fine-tuning needs, in one place.

    * ``monarch_lr``: the Monarch factors get their own learning rate (the linear schedule
      scales every group alike); weight decay follows Trainer's own rules.
    * ``teacher`` + ``distill``: while training, the loss mixes the task loss with the
      teacher's logits (and hidden states); evaluation reports the plain task loss.
    * ``eval_seconds``: wall time spent in ``evaluate`` (so training time can exclude it).

    Everything else stays stock ``Trainer``.
    """

    def __init__(
        self,
        *args: Any,
        monarch_lr: float | None = None,
        teacher: nn.Module | None = None,
        distill: DistillConfig | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if (teacher is None) != (distill is None):
            raise ValueError("a teacher needs a DistillConfig and the other way round")
        self.monarch_lr = monarch_lr
        self.distill = distill
        self.teacher = teacher.to(self.args.device).eval().requires_grad_(False) if teacher is not None else None
        self.eval_seconds = 0.0
        self._evaluating = False

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        opt_model = self.model if model is None else model
        if self.monarch_lr is None or self.optimizer is not None:
            return super().create_optimizer(model)
        factors = monarch_factor_names(opt_model)
        decay = set(self.get_decay_parameter_names(opt_model))
        groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
        for name, param in opt_model.named_parameters():
            if param.requires_grad:
                groups.setdefault((name in factors, name in decay), []).append(param)
        param_groups = [
            {
                "params": params,
                "weight_decay": self.args.weight_decay if is_decay else 0.0,
                "lr": self.monarch_lr if is_factor else self.args.learning_rate,
            }
            for (is_factor, is_decay), params in sorted(groups.items())
        ]
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        optimizer_kwargs.pop("lr", None)
        self.optimizer = optimizer_cls(param_groups, lr=self.args.learning_rate, **optimizer_kwargs)
        return self.optimizer

    def compute_loss(
        self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        if self.teacher is None or self.distill is None or not model.training:
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        cfg = self.distill
        hidden = cfg.hidden_weight > 0
        outputs = model(**inputs, output_hidden_states=hidden)
        with torch.no_grad():
            taught = self.teacher(**{k: v for k, v in inputs.items() if k != "labels"}, output_hidden_states=hidden)
        loss = (1 - cfg.alpha) * outputs.loss + cfg.alpha * logit_loss(outputs.logits, taught.logits, cfg.temperature)
        if hidden:  # index 0 is the embedding output, which the conversion does not touch
            states = hidden_state_loss(outputs.hidden_states[1:], taught.hidden_states[1:], inputs.get("attention_mask"))
            loss = loss + cfg.hidden_weight * states
        return (loss, outputs) if return_outputs else loss

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        # Trainer evaluates a dict of datasets by calling evaluate once per dataset: time the outer call only.
        outer = not self._evaluating
        self._evaluating = True
        start = time.perf_counter()
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            if outer:
                self._evaluating = False
                self.eval_seconds += time.perf_counter() - start


class RunClock(TrainerCallback):
    """The whole run's training time, kept in every checkpoint (:data:`TIME_FILE`).

    Why: Trainer times only the session it runs, so a run resumed near its end would report
    a few seconds of training and a throughput many times the real one. Each checkpoint keeps
    what the run spent up to it (wall time since training began, inside steps, evaluating, and
    the number of sessions); a resume starts from that (:meth:`restore`). ``eval_seconds``
    reads the Trainer's evaluation time (set once the Trainer exists)."""

    def __init__(self, timer: StepTimer) -> None:
        self.timer = timer
        self.earlier = Earlier()
        self.eval_seconds: Any = lambda: 0.0
        self._start: float | None = None

    def restore(self, checkpoint: Path) -> None:
        path = checkpoint / TIME_FILE
        if path.is_file():  # a checkpoint of an earlier version keeps none: its time is unknown
            self.earlier = Earlier(**json.loads(path.read_text(encoding="utf-8")))

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._start = time.perf_counter()

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not state.is_world_process_zero or not folder.is_dir() or self._start is None:
            return
        so_far = Earlier(
            seconds=self.earlier.seconds + time.perf_counter() - self._start,
            step_seconds=self.earlier.step_seconds + self.timer.seconds,
            eval_seconds=self.earlier.eval_seconds + self.eval_seconds(),
            sessions=self.earlier.sessions + 1,
        )
        (folder / TIME_FILE).write_text(json.dumps(asdict(so_far)) + "\n", encoding="utf-8")


class NoEvaluationAtTheEnd(TrainerCallback):
    """Skips the per-epoch evaluation when the epoch that ends is the last one.

    Why: after training, :func:`_evaluate` evaluates the final model on every split anyway
    (and needs the predictions, which an evaluation does not keep); the epoch-end evaluation
    of the same model would only repeat it. A run cut by ``max_steps`` ends its epoch early,
    so this covers it too."""

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step >= state.max_steps and not args.load_best_model_at_end:  # the last epoch is a candidate too
            control.should_evaluate = False


# ---------------------------------------------------------------------------------- pieces


def label_config(task: GlueTask) -> dict[str, Any]:
    """Config overrides giving the model the task's head size, loss and label names."""
    if task.is_regression:
        return {"num_labels": 1, "problem_type": "regression", "id2label": {0: "score"}, "label2id": {"score": 0}}
    return {
        "num_labels": task.num_labels,
        "problem_type": "single_label_classification",
        "id2label": dict(enumerate(task.label_names)),
        "label2id": {name: i for i, name in enumerate(task.label_names)},
    }


def parameter_counts(model: nn.Module) -> dict[str, Any]:
    """Parameters as they are, and as they would be with every Monarch layer dense."""
    total = sum(p.numel() for p in model.parameters())
    layers = [m for m in model.modules() if isinstance(m, STRUCTURED_LAYERS)]
    saved = sum(m.in_features * m.out_features - sum(p.numel() for n, p in m.named_parameters() if n != "bias") for m in layers)
    return {"monarch": total, "dense": total + saved, "ratio": total / (total + saved), "monarch_layers": len(layers)}


def _subsample(data: GlueData, max_train: int | None, max_eval: int | None) -> None:
    if max_train is not None and data.train is not None and len(data.train) > max_train:
        data.train = data.train.select(range(max_train))
    if max_eval is not None:
        data.eval = {k: ds.select(range(min(max_eval, len(ds)))) for k, ds in data.eval.items()}


def tokenize(data: GlueData, tokenizer: Any, max_length: int) -> tuple[Any, dict[str, Any]]:
    """Token ids (truncated to ``max_length``, unpadded: the collator pads per batch)."""
    fields = list(data.task.text_fields)

    def encode(batch: dict[str, list]) -> Any:
        return tokenizer(*(batch[f] for f in fields), truncation=True, max_length=max_length)

    def run(ds: Any) -> Any:
        drop = [c for c in ds.column_names if c in (*fields, "idx")]
        return ds.map(encode, batched=True, remove_columns=drop, desc="tokenizing", load_from_cache_file=False)

    return run(data.train), {name: run(ds) for name, ds in data.eval.items()}


HOLDOUT = "train_holdout"
"""The evaluation split that ``holdout`` cuts from the training examples."""


def split_holdout(train: Any, share: float) -> tuple[Any, Any]:
    """(the training examples left, those held out): ``floor(n·share)`` of them, evenly spread
    (example ``i`` is held out when ``⌊(i+1)·share⌋`` passes an integer). Evenly rather than at
    random so that every seed of a recipe chooses its epoch on the same examples."""
    held = [i for i in range(len(train)) if int((i + 1) * share) > int(i * share)]
    if not held or len(held) == len(train):
        raise ConfigError(f"holdout {share:g} of {len(train)} training examples leaves no examples to "
                          f"{'hold out' if not held else 'train on'}", field="holdout")
    kept = sorted(set(range(len(train))) - set(held))
    return train.select(kept), train.select(held)


def training_arguments(options: FinetuneOptions, *, progress_bar: bool, main_metric: str | None = None) -> TrainingArguments:
    """``main_metric``: with ``holdout``, the metric the kept epoch is chosen by."""
    choose = {}
    if options.holdout is not None:
        choose = {"load_best_model_at_end": True, "metric_for_best_model": f"{HOLDOUT}_{main_metric}", "greater_is_better": True}
    return TrainingArguments(
        **shared_training_arguments(options, progress_bar=progress_bar),
        num_train_epochs=options.epochs,
        max_steps=options.max_steps,
        eval_strategy="epoch" if options.eval_each_epoch else "no",
        save_strategy="epoch" if options.save_checkpoints else "no",
        **choose,
    )



# ------------------------------------------------------------------------- steps of finetune


def _inputs(options: FinetuneOptions) -> tuple[str | Path, ...]:
    """The folders a run reads, which its output must never replace."""
    teacher = (options.distill.teacher,) if options.distill is not None else ()
    data = (options.data_dir,) if options.data_dir is not None else ()
    return (options.model, *((options.tokenizer,) if options.tokenizer else ()), *data, *teacher)


def _check_request(options: FinetuneOptions) -> tuple[GlueTask, bool]:
    """The task, and whether the checkpoint folder existed before this run.

    Why first: whatever the options alone show to be impossible (an unknown task, mixed
    precision without a GPU, an output folder that would be overwritten, nothing to resume)
    must fail in one line before minutes go into loading data and models. Whether the
    checkpoint folder existed decides later whether this run may delete it.
    """
    task = get_task(options.task)
    check_precision(options.precision)
    if not options.resume:
        check_output_dir(options.out, options.force, inputs=_inputs(options))
    checkpoints_existed = options.checkpoints.exists()
    if options.resume and not checkpoints_existed:
        raise NothingToResumeError(f"resume: checkpoint folder '{options.checkpoints}' does not exist")
    if options.resume and not _has_checkpoint(options.checkpoints):
        raise NothingToResumeError(
            f"resume: checkpoint folder '{options.checkpoints}' holds no checkpoint (the run stopped before its first one)"
        )
    if options.resume:
        check_resume(options.checkpoints, STAGE, options.deciding())
    return task, checkpoints_existed


def _resume_point(options: FinetuneOptions) -> Path | None:
    """The checkpoint a resume continues: the latest Trainer would pick, found here so the run
    can say which it is and carry on its time (:class:`RunClock`)."""
    if not options.resume:
        return None
    found = get_last_checkpoint(str(options.checkpoints))
    if found is None:  # checkpoint-like names that are not Trainer's (checkpoint-final)
        raise NothingToResumeError(f"resume: no checkpoint to resume from in '{options.checkpoints}'")
    return Path(found)


def _record_run(options: FinetuneOptions) -> None:
    """Write the options that decide this run into the checkpoint folder's run manifest, so
    a later resume can check it continues the same run (:func:`_check_request`). A resume of
    checkpoints an earlier version wrote (no manifest) records them now."""
    if options.save_checkpoints:
        record_run(options.checkpoints, STAGE, options.deciding())


def _has_checkpoint(folder: Path) -> bool:
    return folder.is_dir() and any(child.is_dir() and child.name.startswith("checkpoint-") for child in folder.iterdir())


def _drop_if_empty(folder: Path) -> None:
    """Remove a checkpoint folder this run created but saved no checkpoint into.

    Why: Trainer creates the folder when it starts; a run stopped before its first save would
    leave it empty, and an empty folder reads as something to resume from."""
    if folder.is_dir() and not _has_checkpoint(folder):
        shutil.rmtree(folder, ignore_errors=True)


def _load_data(options: FinetuneOptions, task: GlueTask) -> GlueData:
    """The task's splits, cut to ``max_train_samples``/``max_eval_samples``.

    Why before the model: a bad data folder (missing files, unknown labels) is the most
    common mistake, and reading TSV files is quick next to loading a model.
    """
    data = load_glue(task, options.data_dir)
    _subsample(data, options.max_train_samples, options.max_eval_samples)
    if options.holdout is not None and data.train is not None:
        data.train, held = split_holdout(data.train, options.holdout)
        data.eval = {**data.eval, HOLDOUT: held}
    return data


def _load_student(options: FinetuneOptions, task: GlueTask) -> tuple[nn.Module, list[str]]:
    """The model with a head of the task's size, and notes on any head it had to add or replace.

    A base checkpoint has no head, and a head fine-tuned on another task has the wrong size:
    both are normal starting points, so they are re-initialised and said, not refused.
    """
    model, info = load_model(
        options.model,
        AutoModelForSequenceClassification,
        config_overrides=label_config(task),
        output_loading_info=True,
        ignore_mismatched_sizes=True,
    )
    notes = []
    missing = sorted(info.get("missing_keys") or [])
    mismatched = mismatched_keys(info)
    if missing:
        notes.append(
            f"the checkpoint has no {task.num_labels}-output classification head: added a new one, "
            f"randomly initialised ({', '.join(missing)})"
        )
    if mismatched:
        notes.append(
            f"the checkpoint's head does not fit {task.name} ({task.num_labels} outputs): "
            f"re-initialised {', '.join(mismatched)}"
        )
    return model, notes


@dataclass
class _Models:
    """Everything loaded from model folders for one run."""

    model: nn.Module
    tokenizer: Any
    teacher: nn.Module | None
    notes: list[str]


def _load_models(options: FinetuneOptions, task: GlueTask) -> _Models:
    """The student (with its task head), its tokenizer and the distillation teacher, checked.

    Why together, and before any output: each can be wrong in its own way (a model that is
    already Monarch but asked to be converted again, a recipe matching no layer, no tokenizer
    files, a teacher that does not fit), and every such mistake must surface before training.
    The seed is set first because the new head is initialised while loading.
    """
    transformers.set_seed(options.seed)
    model, notes = _load_student(options, task)
    if options.monarch is not None:
        if has_monarch_layers(model):
            raise ConfigError(
                f"'{options.model}' already has Monarch layers: fine-tune it without a Monarch recipe (monarch), "
                "or start from the dense model", field="monarch",
            )
        dry_run(model, options.monarch)  # a pattern that matches nothing fails here, before any output
    tokenizer = load_tokenizer(options.tokenizer or options.model)
    if tokenizer is None:
        raise ModelLoadError(
            f"'{options.tokenizer or options.model}' has no tokenizer files; pass a tokenizer folder (tokenizer)"
        )
    teacher = _load_teacher(options.distill, task, model) if options.distill is not None else None
    return _Models(model, tokenizer, teacher, notes)


def _load_teacher(distill: DistillConfig, task: GlueTask, student: nn.Module) -> nn.Module:
    """The distillation teacher: its head must have the task's outputs (one for regression)."""
    outputs = 1 if task.is_regression else task.num_labels
    return load_task_teacher(distill.teacher, student, task=task.name, outputs=outputs, hidden_states=distill.hidden_weight > 0)


def _announce(events: FinetuneEvents, options: FinetuneOptions, task: GlueTask, data: GlueData, models: _Models) -> None:
    """Say what was loaded. Only now: everything the user passed has been checked, so an
    error still ends with a single line, and from here on progress is worth printing."""
    sizes = ", ".join(f"{n} {split}" for split, n in data.sizes().items())
    events.done(f"data: {task.name} from {data.source}: {sizes}")
    for split, count in data.skipped.items():
        events.note(f"skipped {count} malformed row(s) of the {split} file")
    model = models.model
    events.done(f"model: {options.model} ({type(model).__name__}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters)")
    for note in models.notes:
        events.note(note)
    if options.distill is not None:
        distill = options.distill
        events.done(f"teacher: {distill.teacher} (alpha {distill.alpha}, temperature {distill.temperature}, hidden {distill.hidden_weight})")


def _convert(options: FinetuneOptions, model: nn.Module, events: FinetuneEvents) -> tuple[ConversionReport | None, Conversion]:
    """Convert the model to Monarch when a recipe was given, and what the run records about it.

    The report (``None`` without a conversion) is saved with the model; the recipe is the one
    given, or for a model loaded already converted, the one it was converted with.
    """
    if options.monarch is None:
        return None, Conversion(on_the_fly=False, recipe=recipe_of(model))
    start = time.perf_counter()
    report = convert(model, options.monarch)
    seconds = time.perf_counter() - start
    events.note(
        f"converted {len(report.converted)} layers on the fly: {report.model_params_before / 1e6:.2f}M -> "
        f"{report.model_params_after / 1e6:.2f}M parameters"
    )
    return report, Conversion(on_the_fly=True, recipe=options.monarch.to_dict(), seconds=seconds)


class GradualCallback(TrainerCallback):
    """Raises the chance each Monarch layer is used, step by step (:mod:`monarchify.gradual`)."""

    def __init__(self, fraction: float, start: float) -> None:
        self.fraction, self.start = fraction, start
        self.schedule: Any = None

    def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any) -> None:
        from monarchify.gradual import Schedule

        self.schedule = Schedule(state.max_steps, self.fraction, self.start)

    def on_step_begin(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any) -> None:
        from monarchify.gradual import set_p

        if model is not None and self.schedule is not None:
            set_p(model, self.schedule.p(state.global_step))


def _gradual(options: FinetuneOptions, models: _Models, originals: nn.Module | None) -> list[TrainerCallback]:
    """With ``gradual``: wrap every Monarch layer with its frozen dense original, and the
    callback that hands training over to the Monarch layers. The originals are the model's own
    layers before an on-the-fly conversion, else the distillation teacher's."""
    if options.gradual is None:
        return []
    from monarchify.gradual import wrap

    originals = originals if originals is not None else models.teacher
    if originals is None:
        raise ConfigError("gradual replacement needs the dense originals: convert on the fly (monarch) or distil from the dense model",
                          field="monarch")
    wrap(models.model, originals, options.gradual_start)
    return [GradualCallback(options.gradual, options.gradual_start)]


def _build_trainer(
    options: FinetuneOptions,
    task: GlueTask,
    models: _Models,
    datasets: tuple[Any, dict[str, Any]],
    callbacks: Sequence[TrainerCallback],
    progress_bar: bool,
    internal: Sequence[TrainerCallback] = (),
) -> tuple[MonarchTrainer, RunClock]:
    """The Trainer, and the clock of the run (its optimisation steps, and its earlier sessions).

    Why its own step: this is where the run's options meet Trainer's. Trainer's raw log
    printer is removed (the history goes into the results instead), and a front end's own
    progress callbacks replace Trainer's tqdm bar; ``internal`` callbacks (gradual
    replacement) change training, not what is shown.
    """
    train_ds, eval_ds = datasets
    timer = StepTimerCallback()
    clock = RunClock(timer.timer)
    trainer = MonarchTrainer(
        model=models.model,
        args=training_arguments(options, progress_bar=progress_bar and not callbacks, main_metric=task.main_metric),
        train_dataset=train_ds,
        eval_dataset=eval_ds if options.eval_each_epoch else None,
        processing_class=models.tokenizer,
        data_collator=DataCollatorWithPadding(models.tokenizer),
        compute_metrics=compute_metrics_fn(task),
        callbacks=[timer, clock, NoEvaluationAtTheEnd(), *internal, *callbacks],
        monarch_lr=options.monarch_lr,
        teacher=models.teacher,
        distill=options.distill,
    )
    trainer.remove_callback(PrinterCallback)  # never print raw log dicts; the history is in the results
    if callbacks:
        trainer.remove_callback(ProgressCallback)
    clock.eval_seconds = lambda: trainer.eval_seconds
    return trainer, clock


def _train(trainer: MonarchTrainer, clock: RunClock, checkpoint: Path | None) -> Training:
    """Train (or resume from ``checkpoint``), and collect what the results report about it.

    Why the machine's load is taken here: training time is only comparable between runs on
    an equally busy machine. A resumed run's time and throughput are the whole run's: the
    sessions before it are in the checkpoint (:class:`RunClock`).
    """
    load_at_start = load_average()
    resumed_at = 0
    if checkpoint is not None:
        clock.restore(checkpoint)
        resumed_at = int(checkpoint.name.rsplit("-", 1)[1])
    output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint is not None else None)
    return Training(
        metrics=output.metrics,
        eval_seconds=trainer.eval_seconds,
        step_seconds=clock.timer.seconds,
        steps=trainer.state.global_step,
        epochs=trainer.state.epoch,
        examples=len(trainer.train_dataset),
        log_history=list(trainer.state.log_history),
        load_average_at_start=load_at_start,
        resumed_from=checkpoint.name if checkpoint is not None else None,
        resumed_at_step=resumed_at,
        earlier=clock.earlier,
        world_size=trainer.args.world_size,
        global_batch=trainer.args.per_device_train_batch_size * trainer.args.gradient_accumulation_steps * trainer.args.world_size,
    )


def _evaluate(trainer: MonarchTrainer, eval_ds: dict[str, Any], task: GlueTask) -> Evaluation:
    """Evaluate every dev split once more with the final model, next to the trivial baseline.

    Why always, even after per-epoch evaluation: the saved model is the final one, and the
    results must describe exactly that model on every split (MNLI has two). ``predict`` rather
    than ``evaluate``: the same metrics, plus the predictions, which say whether the model
    learned anything at all (:mod:`monarchify.glue.baseline`).
    """
    metrics: dict[str, dict[str, float]] = {}
    baselines: dict[str, dict[str, Any]] = {}
    seconds = 0.0
    for split, ds in eval_ds.items():
        output = trainer.predict(ds, metric_key_prefix="eval")
        result = output.metrics
        seconds += result.get("eval_runtime", 0.0)
        metrics[split] = {k.removeprefix("eval_"): v for k, v in result.items() if k not in ("epoch",)}
        if output.label_ids is not None:
            predictions = predictions_from_logits(task, output.predictions).tolist()
            references = np.asarray(output.label_ids).reshape(-1).tolist()
            baselines[split] = trivial_baseline(task, references, predictions)
    return Evaluation(metrics, seconds, {split: len(ds) for split, ds in eval_ds.items()}, baselines)


def _augment(options: FinetuneOptions, task: GlueTask, data: GlueData, models: _Models, events: FinetuneEvents) -> dict[str, Any] | None:
    """Add ``options.augment`` teacher-labelled variants of every training example (after the
    held-out examples left: those are never trained on, nor are their variants)."""
    if not options.augment or data.train is None:
        return None
    from monarchify.glue.augment import teacher_labels, variants

    start = time.perf_counter()
    fields = list(task.text_fields)
    rows = list(zip(*(data.train[f] for f in fields)))
    extra = variants(rows, options.augment, options.augment_rate, seed=options.seed)
    labels = teacher_labels(models.teacher, models.tokenizer, extra, regression=task.is_regression, max_length=options.max_length)
    columns = {f: [row[i] for row in extra] for i, f in enumerate(fields)}
    columns.update(label=labels, idx=[-1] * len(extra))
    original = len(data.train)
    added = datasets.Dataset.from_dict(columns, features=data.train.features)
    data.train = datasets.concatenate_datasets([data.train, added])
    seconds = time.perf_counter() - start
    events.note(f"augmented: {len(extra):,} variants of the {original:,} training examples, labelled by the teacher ({seconds:.0f} s)")
    return {"variants": len(extra), "per_example": options.augment, "rate": options.augment_rate, "seconds": round(seconds, 2)}


def _chosen_epoch(trainer: MonarchTrainer, task: GlueTask, examples: int) -> dict[str, Any]:
    """Which epoch's model ``holdout`` kept (Trainer loaded it at the end), and its score."""
    step = int(Path(trainer.state.best_model_checkpoint).name.rsplit("-", 1)[1])
    key = f"eval_{HOLDOUT}_{task.main_metric}"
    scores = {entry["step"]: entry for entry in trainer.state.log_history if key in entry}
    return {"step": step, "epoch": scores[step]["epoch"], "metric": task.main_metric, "value": trainer.state.best_metric,
            "examples": examples, "by_epoch": {f"{entry['epoch']:g}": entry[key] for entry in scores.values()}}


def _curves(results: dict[str, Any], events: FinetuneEvents) -> dict[str, bytes]:
    """The run's loss and evaluation curves as a picture for the output folder, or nothing
    (with a note) where matplotlib is missing: a picture is never worth failing a run for."""
    from monarchify.plots import figure_bytes, pyplot, training_figure

    try:
        pyplot()
    except ConfigError as exc:
        events.note(f"no {CURVES_FILE}: {exc}")
        return {}
    split = next(iter(results["metrics"]), None)
    score = results["main_metric"].get(split) if split else None
    model = "/".join(Path(str(results["model"])).parts[-2:])  # a folder's name, not its whole path
    title = f"{results['task']}: {model}" + (f" ({split} {score:.4f})" if isinstance(score, float) else "")
    try:
        return {CURVES_FILE: figure_bytes(training_figure(results["history"], title=title))}
    except Exception as exc:  # noqa: BLE001 - after a whole training run, the model and results come first
        events.note(f"no {CURVES_FILE}: drawing it failed ({type(exc).__name__}: {exc})")
        return {}


def _history_entry(trainer: MonarchTrainer, evaluation: Evaluation) -> dict[str, Any]:
    """The final evaluation as Trainer would have logged it (``eval_<split>_<metric>``), so
    the history ends with the model that was saved, as it did when the last epoch evaluated."""
    entry: dict[str, Any] = {"epoch": trainer.state.epoch, "step": trainer.state.global_step}
    for split, values in evaluation.metrics.items():
        entry.update({f"eval_{split}_{name}": value for name, value in values.items()})
    return entry


def _save(
    options: FinetuneOptions,
    trainer: MonarchTrainer,
    models: _Models,
    report: ConversionReport | None,
    conversion: Conversion,
    results: dict[str, Any],
    checkpoints_existed: bool,
    events: FinetuneEvents,
) -> None:
    """Write the output folder (model, tokenizer, report and results, atomically), then drop
    the checkpoints this run made: a finished run needs them no more. A checkpoint folder
    that was there before is kept, unless this run resumed from it."""
    files: dict[str, str | bytes] = {RESULTS_FILE: json.dumps(results, indent=2, default=str) + "\n"}
    files.update(_curves(results, events))
    save_model(trainer.model, options.out, tokenizer=models.tokenizer, report=report, recipe=conversion.recipe,
               force=options.force or options.resume, extra_files=files)
    if not options.keep_checkpoints and (not checkpoints_existed or options.resume) and options.checkpoints.is_dir():
        shutil.rmtree(options.checkpoints, ignore_errors=True)


# ---------------------------------------------------------------------------------- finetune


def finetune(
    options: FinetuneOptions,
    *,
    events: FinetuneEvents | None = None,
    callbacks: Sequence[TrainerCallback] = (),
    progress_bar: bool = True,
    argv: Sequence[str] | None = None,
    extra_results: dict[str, Any] | None = None,
) -> FinetuneResult:
    """Fine-tune ``options.model`` on ``options.task`` and save it with its results.

    ``callbacks`` replace Trainer's own tqdm progress bar (a front end passes its own bar
    here); ``progress_bar=False`` shows none. ``argv`` is recorded as the command.
    ``extra_results`` are added to ``eval_results.json`` (a recipe that ran this fine-tuning
    as one of its stages records itself there, inside the atomic write).
    """
    events = (events or FinetuneEvents()) if distributed.is_main() else FinetuneEvents()  # one process speaks
    environment = run_environment()  # now: the source hash must describe the code this run imported
    task, checkpoints_existed = _check_request(options)
    data = _load_data(options, task)
    models = _load_models(options, task)
    _announce(events, options, task, data, models)

    originals = copy.deepcopy(models.model) if options.gradual is not None and options.monarch is not None else None
    augmented = _augment(options, task, data, models, events)
    report, conversion = _convert(options, models.model, events)
    params = parameter_counts(models.model)
    gradual = _gradual(options, models, originals)
    del originals
    train_ds, eval_ds = tokenize(data, models.tokenizer, options.max_length)
    trainer, clock = _build_trainer(options, task, models, (train_ds, eval_ds), callbacks, progress_bar, gradual)

    checkpoint = _resume_point(options)
    if trainer.is_world_process_zero():
        _record_run(options)
    if checkpoint is not None:
        events.note(resuming_line(checkpoint))
    events.stage("training")
    try:
        training = _train(trainer, clock, checkpoint)
    except BaseException:  # Ctrl-C too: an interrupted run leaves no empty checkpoint folder
        if not checkpoints_existed and distributed.is_main():
            _drop_if_empty(options.checkpoints)
        raise
    if gradual:
        from monarchify.gradual import unwrap

        unwrap(trainer.model)  # the dense originals are never evaluated as the result, nor saved
    events.stage("evaluating")
    evaluation = _evaluate(trainer, eval_ds, task)
    training.log_history.append(_history_entry(trainer, evaluation))
    results = build_results(
        options, task, data, conversion=conversion, params=params, training=training, evaluation=evaluation,
        notes=models.notes, environment=environment, argv=argv,
    )
    if augmented is not None:
        results["data"]["augmented"] = augmented
    if options.holdout is not None:
        chosen = results["train"]["chosen"] = _chosen_epoch(trainer, task, len(eval_ds[HOLDOUT]))
        events.note(f"kept the model of epoch {chosen['epoch']:g} (step {chosen['step']}): the best {task.main_metric} "
                    f"on {chosen['examples']} held-out training examples, {chosen['value']:.4f}")
    results.update(extra_results or {})

    # Under torchrun every process gets here with the same model; the main one writes the
    # folder and deletes the checkpoints, the others wait, so none ends (and none goes on to a
    # next stage that reads the folder) before it is there.
    if distributed.is_main():
        events.stage(f"saving to {options.out}")
        _save(options, trainer, models, report, conversion, results, checkpoints_existed, events)
    distributed.barrier()
    return FinetuneResult(options.out, results, trainer.model)
