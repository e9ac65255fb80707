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
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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

from monarchify.atomic import check_output_dir
from monarchify.distill import DistillConfig, hidden_state_loss, logit_loss
from monarchify.errors import ConfigError, ModelLoadError
from monarchify.glue.data import GlueData, load_glue
from monarchify.glue.metrics import compute_metrics_fn
from monarchify.glue.options import RESULTS_FILE, FinetuneEvents, FinetuneOptions, FinetuneResult
from monarchify.glue.tasks import GlueTask, get_task
from monarchify.hf.checkpoint import config_difference, load_model, load_tokenizer, mismatched_keys, recipe_of, save_model
from monarchify.monarch import MonarchLinear
from monarchify.report import ConversionReport
from monarchify.surgery import convert, dry_run

# ---------------------------------------------------------------------------------- trainer


def monarch_factor_names(model: nn.Module) -> set[str]:
    """Qualified names of every Monarch factor (``L``, ``R``) parameter of ``model``."""
    names = set()
    for module_name, module in model.named_modules():
        if isinstance(module, MonarchLinear):
            prefix = f"{module_name}." if module_name else ""
            names.update({prefix + "L", prefix + "R"})
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


class StepTimer(TrainerCallback):
    """Wall time inside optimisation steps only (forward, backward, optimizer step)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._start: float | None = None

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._start = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._start is not None:
            self.seconds += time.perf_counter() - self._start
            self._start = None


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
    layers = [m for m in model.modules() if isinstance(m, MonarchLinear)]
    saved = sum(m.in_features * m.out_features - m.L.numel() - m.R.numel() for m in layers)
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


def _inputs(options: FinetuneOptions) -> tuple[str | Path, ...]:
    """The folders a run reads, which its output must never replace."""
    teacher = (options.distill.teacher,) if options.distill is not None else ()
    data = (options.data_dir,) if options.data_dir is not None else ()
    return (options.model, *((options.tokenizer,) if options.tokenizer else ()), *data, *teacher)


def _check_precision(precision: str) -> None:
    """Mixed precision needs a GPU (Trainer would refuse later, after loading everything)."""
    if precision == "fp32":
        return
    if not torch.cuda.is_available():
        raise ConfigError(f"--precision {precision} needs a CUDA GPU; this machine has none (use fp32)")
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise ConfigError("--precision bf16 needs a GPU with bf16 support (use fp16 or fp32)")


def _load(options: FinetuneOptions, task: GlueTask) -> tuple[nn.Module, list[str]]:
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


def load_teacher(distill: DistillConfig, task: GlueTask, student: nn.Module) -> nn.Module:
    """The fine-tuned teacher, checked against the task and the student before training starts."""
    teacher, info = load_model(distill.teacher, AutoModelForSequenceClassification, output_loading_info=True)
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise ConfigError(
            f"--distill-from '{distill.teacher}' has no fine-tuned classification head ({', '.join(missing)}): "
            f"fine-tune the dense model on {task.name} first and pass that folder"
        )
    outputs = 1 if task.is_regression else task.num_labels
    if teacher.config.num_labels != outputs:
        raise ConfigError(
            f"--distill-from '{distill.teacher}' has {teacher.config.num_labels} outputs; {task.name} needs {outputs}"
        )
    keys = ("vocab_size",) + (("num_hidden_layers", "hidden_size") if distill.hidden_weight > 0 else ())
    difference = config_difference(student, teacher, keys)
    if difference:
        raise ConfigError(f"--distill-from '{distill.teacher}' does not fit the model: {difference}")
    return teacher


def source_fingerprint() -> str:
    """A hash of monarchify's own source files: which code produced a result, even uncommitted."""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _environment() -> dict[str, Any]:
    from monarchify import __version__

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
    return {
        "monarchify": __version__,
        "monarchify_source_sha256": source_fingerprint(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": device,
        "cuda_devices": torch.cuda.device_count(),
        "cpu_threads": torch.get_num_threads(),
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
    }


def _history(log_history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Trainer's log: the training loss every ``logging_steps`` and each evaluation's metrics."""
    drop = ("runtime", "per_second", "total_flos", "grad_norm")
    return [
        {k: v for k, v in entry.items() if not k.endswith(drop) and not k.startswith("train_")}
        for entry in log_history
        if "loss" in entry or any(k.startswith("eval_") for k in entry)
    ]


def training_arguments(options: FinetuneOptions, *, progress_bar: bool) -> TrainingArguments:
    checkpoints = options.checkpoints
    return TrainingArguments(
        output_dir=str(checkpoints),
        per_device_train_batch_size=options.batch_size,
        per_device_eval_batch_size=options.eval_batch_size,
        gradient_accumulation_steps=options.grad_accum,
        learning_rate=options.learning_rate,
        weight_decay=options.weight_decay,
        num_train_epochs=options.epochs,
        max_steps=options.max_steps,
        lr_scheduler_type="linear",
        warmup_steps=options.warmup,
        eval_strategy="epoch" if options.eval_each_epoch else "no",
        save_strategy="epoch" if options.save_checkpoints else "no",
        save_total_limit=1,
        logging_strategy="steps",
        logging_steps=options.logging_steps,
        logging_first_step=True,
        seed=options.seed,
        data_seed=options.seed,
        bf16=options.precision == "bf16",
        fp16=options.precision == "fp16",
        report_to="none",
        disable_tqdm=not progress_bar,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
    )


# ---------------------------------------------------------------------------------- finetune


def finetune(
    options: FinetuneOptions,
    *,
    events: FinetuneEvents | None = None,
    callbacks: Sequence[TrainerCallback] = (),
    progress_bar: bool = True,
    argv: Sequence[str] | None = None,
) -> FinetuneResult:
    """Fine-tune ``options.model`` on ``options.task`` and save it with its results.

    ``callbacks`` replace Trainer's own tqdm progress bar (a front end passes its own bar
    here); ``progress_bar=False`` shows none. ``argv`` is recorded as the command.
    """
    events = events or FinetuneEvents()
    environment = _environment()  # now: the source hash must describe the code this run imported
    task = get_task(options.task)
    _check_precision(options.precision)
    if not options.resume:
        check_output_dir(options.out, options.force, inputs=_inputs(options))
    checkpoints_existed = options.checkpoints.exists()
    if options.resume and not checkpoints_existed:
        raise ConfigError(f"--resume: checkpoint folder '{options.checkpoints}' does not exist")

    data = load_glue(task, options.data_dir)
    _subsample(data, options.max_train_samples, options.max_eval_samples)

    transformers.set_seed(options.seed)  # before the head is initialised
    model, notes = _load(options, task)
    if options.monarch is not None and any(isinstance(m, MonarchLinear) for m in model.modules()):
        raise ConfigError(f"'{options.model}' already has Monarch layers: drop --nblocks, or start from the dense model")
    if options.monarch is not None:
        dry_run(model, options.monarch)  # a pattern that matches nothing fails here, before any output
    tokenizer = load_tokenizer(options.tokenizer or options.model)
    if tokenizer is None:
        raise ModelLoadError(f"'{options.tokenizer or options.model}' has no tokenizer files; pass --tokenizer FOLDER")
    teacher = load_teacher(options.distill, task, model) if options.distill is not None else None
    # Everything the user passed has been checked: from here on, progress is worth printing.
    sizes = ", ".join(f"{n} {split}" for split, n in data.sizes().items())
    events.done(f"data: {task.name} from {data.source}: {sizes}")
    for split, count in data.skipped.items():
        events.note(f"skipped {count} malformed row(s) of the {split} file")
    events.done(f"model: {options.model} ({type(model).__name__}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters)")
    for note in notes:
        events.note(note)
    if options.distill is not None:
        events.done(f"teacher: {options.distill.teacher} (alpha {options.distill.alpha}, temperature {options.distill.temperature}, hidden {options.distill.hidden_weight})")

    report: ConversionReport | None = None
    convert_seconds = 0.0
    if options.monarch is not None:
        start = time.perf_counter()
        report = convert(model, options.monarch)
        convert_seconds = time.perf_counter() - start
        events.note(
            f"converted {len(report.converted)} layers on the fly: {report.model_params_before / 1e6:.2f}M -> "
            f"{report.model_params_after / 1e6:.2f}M parameters"
        )
    recipe = options.monarch.to_dict() if options.monarch is not None else recipe_of(model)
    params = parameter_counts(model)

    train_ds, eval_ds = tokenize(data, tokenizer, options.max_length)

    args = training_arguments(options, progress_bar=progress_bar and not callbacks)
    timer = StepTimer()
    trainer = MonarchTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds if options.eval_each_epoch else None,
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=compute_metrics_fn(task),
        callbacks=[timer, *callbacks],
        monarch_lr=options.monarch_lr,
        teacher=teacher,
        distill=options.distill,
    )
    trainer.remove_callback(PrinterCallback)  # never print raw log dicts; the history is in the results
    if callbacks:
        trainer.remove_callback(ProgressCallback)

    events.stage("training")
    load_at_start = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    try:
        train_output = trainer.train(resume_from_checkpoint=True if options.resume else None)
    except ValueError as exc:
        if options.resume and "checkpoint" in str(exc).lower():
            raise ConfigError(f"--resume: no checkpoint to resume from in '{options.checkpoints}'") from None
        raise
    in_loop_eval = trainer.eval_seconds
    history = _history(trainer.state.log_history)

    events.stage("evaluating")
    metrics: dict[str, dict[str, float]] = {}
    eval_seconds = 0.0
    for split, ds in eval_ds.items():
        result = trainer.evaluate(eval_dataset=ds, metric_key_prefix="eval")
        eval_seconds += result.get("eval_runtime", 0.0)
        metrics[split] = {k.removeprefix("eval_"): v for k, v in result.items() if k not in ("epoch",)}

    train_metrics = train_output.metrics
    samples = len(train_ds)
    results = {
        "task": task.name,
        "model": options.model,
        "monarch": {
            "converted_on_the_fly": report is not None,
            "recipe": recipe or None,
            "layers": params["monarch_layers"],
            "convert_seconds": round(convert_seconds, 3),
        },
        "distill": options.distill.to_dict() if options.distill is not None else None,
        "metrics": metrics,
        "main_metric": {split: values.get(task.main_metric) for split, values in metrics.items()},
        "train": {
            "seconds": train_metrics.get("train_runtime"),
            "seconds_excluding_eval": (train_metrics.get("train_runtime") or 0.0) - in_loop_eval,
            "step_seconds": timer.seconds,
            "samples_per_second": train_metrics.get("train_samples_per_second"),
            "steps_per_second": train_metrics.get("train_steps_per_second"),
            "steps": trainer.state.global_step,
            "epochs": trainer.state.epoch,
            "examples": samples,
            "loss": train_metrics.get("train_loss"),
        },
        "eval": {
            "seconds": eval_seconds,
            "samples_per_second": {split: m.get("samples_per_second") for split, m in metrics.items()},
            "examples": {split: len(ds) for split, ds in eval_ds.items()},
        },
        "params": params,
        "data": {"source": data.source, "sizes": {"train": samples, **{k: len(v) for k, v in eval_ds.items()}}, "skipped": data.skipped},
        "history": history,
        "notes": notes,
        "arguments": options.to_dict(),
        "command": list(argv) if argv is not None else list(sys.argv),
        "environment": {
            **environment,
            "load_average_at_start": load_at_start,
            "load_average_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        },
    }

    if trainer.is_world_process_zero():
        events.stage(f"saving to {options.out}")
        final = trainer.model
        save_model(final, options.out, tokenizer=tokenizer, report=report, recipe=recipe, force=options.force or options.resume,
                   extra_files={RESULTS_FILE: json.dumps(results, indent=2, default=str) + "\n"})
        if not options.keep_checkpoints and (not checkpoints_existed or options.resume) and options.checkpoints.is_dir():
            shutil.rmtree(options.checkpoints, ignore_errors=True)
    return FinetuneResult(options.out, results, trainer.model)
