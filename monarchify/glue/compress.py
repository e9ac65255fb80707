"""The compression recipe: a dense model in, a smaller, faster model fine-tuned on the task out.

Three stages, each a folder of its own under ``<out>.stages/`` so a stopped run resumes at the
stage it stopped (and a fine-tuning stage from its last epoch checkpoint; stage 3's are in
``<out>.checkpoints``):

1. ``1-teacher``: the dense model fine-tuned on the task. Skipped when the model given is
   already fine-tuned on it (a sequence-classification checkpoint with the task's outputs):
   "here is my classifier, make it smaller" is the most common request.
2. ``2-converted``: the fine-tuned dense model converted under the parameter budget, with
   calibration on the task's own training text, so the projection keeps what the *fine-tuned*
   layers do on this task. The task head stays dense.
3. the output: the converted model fine-tuned again, learning from the teacher's logits as
   well as the labels (distillation), which recovers most of what the projection lost.

A stage is reused only when it was made with the options that decide it: ``<out>.stages`` keeps
a run manifest (:mod:`monarchify.manifest`) of each stage's options, and a stage made with
others is made again, with every stage after it (its folder and checkpoints discarded first).

The output folder is like ``finetune``'s (the model and ``eval_results.json``), with a
``compress`` section in the results: the budget, the stages, the parameter counts, and the
dense teacher's score when there is one to compare with.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from monarchify.atomic import check_output_dir
from monarchify.config import DEFAULT_CALIBRATION_SAMPLES, CalibrationConfig, MonarchConfig
from monarchify.distill_config import DistillConfig
from monarchify.errors import ConfigError
from monarchify.glue.options import RESULTS_FILE, FinetuneEvents, FinetuneOptions
from monarchify.glue.tasks import GlueTask, get_task
from monarchify.manifest import RunManifest

TEACHER, CONVERTED = "1-teacher", "2-converted"
STAGES = ("teacher", "convert", "distill")
"""The stages' names in the run manifest, and what ``restart_from`` names."""


@dataclass
class CompressOptions:
    """What the recipe is asked to do.

    ``budget``: the fraction of the selected layers' dense parameters the compressed model
    keeps (as ``MonarchConfig.budget``). ``teacher_lr``/``student_lr``: peak learning rates of
    the dense and the compressed fine-tuning. ``finetuned``: whether ``model`` is already
    fine-tuned on the task (``None``: decided from its ``config.json``). ``finetune`` holds
    the settings both fine-tuning stages share (epochs, batch size, seed...); its task, model
    and output fields are filled in per stage.
    """

    task: str
    model: str
    out: Path
    budget: float
    data_dir: Path | None = None
    teacher_lr: float = 1e-4
    student_lr: float = 5e-5
    calibration_samples: int | None = None
    """Training examples the conversion is fitted on; ``None``: chosen by their tokens
    (:func:`calibration_size`)."""
    distill: dict[str, float] = field(default_factory=lambda: {"alpha": 0.5, "temperature": 2.0, "hidden_weight": 0.0})
    finetuned: bool | None = None
    gradual: float | None = None
    """Stage 3 only: the share of its steps over which the Monarch layers take over from the
    teacher's dense layers (:mod:`monarchify.gradual`)."""
    output_order: str = "blocked"
    """The Monarch layers' output order (``MonarchConfig.output_order``): blocked, the faster
    one. The order does not change which block counts the budget picks (it prices every layer
    in one order), and with the same block counts blocked students trained as well as
    interleaved ones on MRPC (``docs/results.md``)."""
    budget_ranks: list[int] = field(default_factory=list)
    """Ranks of a low-rank term the budget may add to a layer (``MonarchConfig.budget_ranks``)."""
    budget_objective: str | None = None
    """What the budget minimises (``MonarchConfig.budget_objective``); ``None``: ``"fisher"``
    for plain Monarch layers, the errors priced in the fine-tuned model's own loss, and
    ``"layers"`` where fisher does not price (low rank, ranks). On MRPC the summed layer error
    picked, on near-ties, plans whose students landed up to 4 points below their teachers; the
    fisher plans' students landed within 1.5 at three seeds (``docs/results.md``)."""
    budget_solver: str = "exact"
    """How the budget picks its plan (``MonarchConfig.budget_solver``)."""
    structure: str = "monarch"
    """What the converted layers become (``MonarchConfig.structure``): ``"lowrank"`` runs the
    same recipe with the low-rank baseline, the budget choosing ranks."""
    seed: int = 42
    holdout: float | None = None
    """Stage 3 keeps the epoch that scores best on this share of the training examples, held out
    from its training (``FinetuneOptions.holdout``); ``None``: the last epoch."""
    augment: int = 0
    """Stage 3 also trains on this many teacher-labelled variants of every training example
    (``FinetuneOptions.augment``)."""
    finetune: dict[str, Any] = field(default_factory=dict)
    """Other :class:`FinetuneOptions` fields for both fine-tuning stages (``epochs``, ``batch_size``...)."""
    force: bool = False
    """Replace a finished output, and start every stage over (``<out>.stages`` and stage 3's
    checkpoints are discarded)."""
    restart_from: str | None = None
    """Make this stage (one of :data:`STAGES`) and every later one again, even when they were
    made with the same options."""

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.data_dir = Path(self.data_dir) if self.data_dir is not None else None
        reserved = {"task", "model", "out", "data_dir", "learning_rate", "distill", "monarch", "seed", "force", "resume", "gradual",
                    "checkpoint_dir", "holdout", "augment"}
        if reserved & set(self.finetune):
            raise ConfigError(f"finetune settings may not set {', '.join(sorted(reserved & set(self.finetune)))}")
        if self.budget_objective is None:
            plain = self.structure == "monarch" and not self.budget_ranks
            self.budget_objective = "fisher" if plain else "layers"
        if self.restart_from is not None and self.restart_from not in STAGES:
            raise ConfigError(f"restart_from must be one of {', '.join(STAGES)}, got {self.restart_from!r}", field="restart_from")
        for name in ("teacher_lr", "student_lr"):  # checked here to be named: each becomes a stage's learning_rate
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}", field=name)
        # Build each part once so that a bad setting fails here, before any stage runs.
        self.recipe  # noqa: B018 - building the recipe checks the budget
        self.finetune_options(self.model, self.out, self.teacher_lr)
        self.finetune_options(self.model, self.out, self.student_lr, gradual=self.gradual, holdout=self.holdout,
                              augment=self.augment, distill=DistillConfig(str(self.model), **self.distill))

    @property
    def stages(self) -> Path:
        """Where the intermediate folders are kept, beside the output."""
        return self.out.with_name(self.out.name + ".stages")

    @property
    def checkpoints(self) -> Path:
        """Where stage 3 keeps its epoch checkpoints (beside the output, as ``finetune``'s)."""
        return self.finetune_options(self.model, self.out, self.student_lr).checkpoints

    @property
    def recipe(self) -> MonarchConfig:
        return MonarchConfig(
            budget=self.budget, calibration=CalibrationConfig(samples=self.calibration_samples or DEFAULT_CALIBRATION_SAMPLES),
            output_order=self.output_order,
            budget_ranks=list(self.budget_ranks), budget_objective=self.budget_objective, budget_solver=self.budget_solver,
            structure=self.structure,
        )

    def finetune_options(self, model: str, out: Path, lr: float, **extra: Any) -> FinetuneOptions:
        """One fine-tuning stage's options: the shared settings plus the stage's own."""
        return FinetuneOptions(task=self.task, model=model, out=out, data_dir=self.data_dir, learning_rate=lr,
                               seed=self.seed, **self.finetune, **extra)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(out=str(self.out), data_dir=str(self.data_dir) if self.data_dir else None)
        return data


@dataclass
class CompressResult:
    out: Path
    results: dict[str, Any]
    stages: dict[str, str]


def is_finetuned_for(model: str, task: GlueTask) -> bool:
    """Whether a local model folder is a sequence classifier with the task's number of outputs."""
    config_file = Path(model).expanduser() / "config.json"
    if not config_file.is_file():
        return False
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False  # loading it later says what is wrong
    classifier = any(str(name).endswith("ForSequenceClassification") for name in config.get("architectures") or [])
    outputs = 1 if task.is_regression else task.num_labels
    labels = config.get("num_labels", len(config.get("id2label") or {}) or None)
    return classifier and labels == outputs


def _finished(folder: Path, marker: str) -> bool:
    return (folder / marker).is_file()


def _discard(*folders: Path) -> None:
    """Remove what a stage made with other options (its folder, its checkpoints)."""
    import shutil

    for folder in folders:
        if folder.is_dir():
            shutil.rmtree(folder)


def _check(manifest: RunManifest, stage: str, options: dict[str, Any], label: str, redo: str, events: FinetuneEvents) -> str:
    """How ``stage`` stands (:meth:`RunManifest.check`), saying so in one line when it was made
    with other options and is made again."""
    status = manifest.check(stage, options)
    if status == "stale":
        changed = "; ".join(manifest.changes(stage, options)) or "the stage before it changed"
        events.note(f"{label}: changed since the last run: {changed}; {redo}, and redoing the stages after it")
    return status


def _continued(options: FinetuneOptions) -> FinetuneOptions:
    """A fine-tuning stage that stopped after a saved epoch continues from it."""
    if options.checkpoints.is_dir() and any(options.checkpoints.glob("checkpoint-*")):
        return replace(options, resume=True)
    return options


def _results(folder: Path) -> dict[str, Any] | None:
    path = folder / RESULTS_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, ValueError):
        return None


TOKENS_PER_INPUT = 8
"""The automatic calibration size: the fitted examples hold at least this many real tokens per
input dimension of the widest converted layer. A layer's input covariance estimated from few
more tokens than it has dimensions is noisy, and the projection fits the noise: on SST-2
(about 14 tokens a sentence) 256 sentences are 3,500 tokens for MiniLM's 1,536-wide inputs;
1,024 sentences (13,649 tokens) took the held-out output error from 0.232 to 0.217 and the
student from 0.8567 to 0.8612, and 2,048 did no better (``docs/results.md``). 256 MRPC pairs
hold 13,667 tokens: MRPC keeps 256."""
AUTO_MAX_SAMPLES = 8192
"""The automatic size stops growing here (long enough for any sentence task's tokens)."""


def _examples(task: GlueTask, rows: Any) -> list[Any]:
    fields = list(task.text_fields)
    return [row[fields[0]] if len(fields) == 1 else (row[fields[0]], row[fields[1]]) for row in rows]


def _widest_input(model: str, recipe: MonarchConfig) -> int | None:
    """The widest input of the layers the recipe converts in ``model`` (planned on an empty
    model, no weights read), or ``None`` when its config cannot be read here."""
    import transformers

    from monarchify.hf.loading import empty_model
    from monarchify.pipeline.plan import plan

    try:
        config = transformers.AutoConfig.from_pretrained(model)
        return max(layer.d_in for layer in plan(empty_model(config), recipe))
    except (OSError, ValueError, KeyError, ConfigError):
        return None  # loading the model later says what is wrong with it


def calibration_size(task: GlueTask, train: Any, model: str, recipe: MonarchConfig) -> int:
    """How many training examples to calibrate on: 256, doubled until they hold
    :data:`TOKENS_PER_INPUT` tokens per input dimension of the widest converted layer (leaving
    a quarter more for the held-out ones)."""
    from monarchify.hf.loading import load_tokenizer
    from monarchify.samples import samples_for_tokens

    widest, tokenizer = _widest_input(model, recipe), load_tokenizer(model)
    start = min(DEFAULT_CALIBRATION_SAMPLES, max(1, len(train) * 4 // 5))
    if widest is None or tokenizer is None:
        return start
    columns = train[: min(AUTO_MAX_SAMPLES, len(train) * 4 // 5)]  # pairs are tokenised as pairs, as in fine-tuning
    encoded = tokenizer(*(columns[f] for f in task.text_fields), truncation=True, max_length=recipe.calibration.max_length)
    lengths = [len(ids) for ids in encoded["input_ids"]]
    return max(1, samples_for_tokens(lengths, start, TOKENS_PER_INPUT * widest))


def _calibration_text(task: GlueTask, data_dir: Path | None, samples: int | None, model: str, recipe: MonarchConfig) -> Any:
    """The task's own training text (pairs stay pairs), read through the GLUE loader so every
    task's layout works, split into fitting and held-out samples; ``samples=None`` sizes it
    by its tokens."""
    from monarchify.glue.data import load_glue
    from monarchify.samples import default_heldout, split_samples

    data = load_glue(task, data_dir)
    if samples is None:
        samples = calibration_size(task, data.train, model, recipe)
    wanted = samples + default_heldout(samples)
    texts = _examples(task, data.train.select(range(min(wanted, len(data.train)))))
    return split_samples(texts, samples, source=f"{task.name} train ({data.source})", kind="glue", columns=list(task.text_fields))


def compress(
    options: CompressOptions,
    *,
    events: FinetuneEvents | None = None,
    callbacks: Sequence[Any] = (),
    argv: Sequence[str] | None = None,
) -> CompressResult:
    """Run (or resume) the three stages and leave the compressed, fine-tuned model in ``out``.

    Under ``torchrun`` both fine-tuning stages train in every process; the conversion between
    them runs in the main process only, while the others wait for its folder."""
    from monarchify import distributed
    from monarchify.glue.train import finetune
    from monarchify.hf.convert import convert_pretrained

    distributed.init()  # the wait for the conversion needs the group, also when stage 1 is skipped
    events = (events or FinetuneEvents()) if distributed.is_main() else FinetuneEvents()
    task = get_task(options.task)
    inputs = tuple(x for x in (options.model, options.data_dir) if x is not None)
    check_output_dir(options.out, options.force, inputs=inputs)
    check_output_dir(options.stages, force=True, inputs=inputs)
    calibration = _calibration_text(task, options.data_dir, options.calibration_samples, str(options.model), options.recipe)  # also checks the data
    recipe = options.recipe
    recipe = replace(recipe, calibration=replace(recipe.calibration, samples=len(calibration.fit)))
    run = {"callbacks": callbacks, "events": events, "argv": argv}

    if options.force:  # after every check: a mistake in the command deletes nothing
        distributed.on_main(_discard, options.stages, options.checkpoints)
    manifest = RunManifest.load(options.stages)
    if not manifest.stages and options.stages.is_dir() and any(options.stages.iterdir()):
        events.note(f"'{options.stages}' has no record of the options its stages were made with: making them again")
    if options.restart_from is not None:
        manifest.forget(options.restart_from)
    reused: list[str] = []

    finetuned = is_finetuned_for(options.model, task) if options.finetuned is None else options.finetuned
    teacher = Path(options.model) if finetuned else options.stages / TEACHER
    stage = options.finetune_options(options.model, teacher, options.teacher_lr, force=True)  # our own folder
    first = {"given_teacher": str(options.model)} if finetuned else stage.deciding()
    redo = "taking it as the teacher" if finetuned else "fine-tuning the dense model again"
    status = _check(manifest, "teacher", first, "stage 1/3", redo, events)
    if finetuned:
        events.done(f"stage 1/3: '{options.model}' is fine-tuned on {task.name} already: it is the teacher")
        if status != "done":
            manifest.start("teacher", first)
            manifest.finish("teacher")
    elif status in ("done", "started") and _finished(teacher, RESULTS_FILE):
        events.done(f"stage 1/3: done already ({teacher})")
        reused.append("teacher")
        if status == "started":  # finished, but stopped before the manifest said so
            manifest.finish("teacher")
    else:
        if status != "started":
            distributed.on_main(_discard, teacher, stage.checkpoints)
        manifest.start("teacher", first)
        events.stage(f"stage 1/3: fine-tuning the dense model on {task.name} -> {teacher}")
        finetune(_continued(stage), **run)
        manifest.finish("teacher")

    converted = options.stages / CONVERTED
    second = {**recipe.to_dict(), "calibration_text": {"task": task.name, "data_dir": options.data_dir}}
    status = _check(manifest, "convert", second, "stage 2/3", "converting again", events)
    if status == "done" and _finished(converted, "config.json"):
        events.done(f"stage 2/3: done already ({converted})")
        reused.append("convert")
    else:
        distributed.on_main(_discard, converted)
        manifest.start("convert", second)
        events.stage(f"stage 2/3: converting the fine-tuned model at budget {options.budget:g} -> {converted}")
        conversion = distributed.on_main(convert_pretrained, teacher, converted, recipe, calibration_data=calibration, force=True)
        if conversion is not None:  # the main process converted; the others waited for it
            events.converted(conversion.report)
        manifest.finish("convert")

    distill = DistillConfig(str(teacher), **options.distill)
    student = options.finetune_options(str(converted), options.out, options.student_lr, distill=distill,
                                       gradual=options.gradual, holdout=options.holdout, augment=options.augment,
                                       force=options.force)
    status = _check(manifest, "distill", student.deciding(), "stage 3/3", "fine-tuning from the first epoch", events)
    if status != "started":  # checkpoints of a student made with other options, or on another stage 2
        distributed.on_main(_discard, student.checkpoints)
    manifest.start("distill", student.deciding())
    events.stage(f"stage 3/3: fine-tuning the compressed model with distillation -> {options.out}")
    dense = _results(teacher)
    summary = {
        "compress": {
            "options": options.to_dict(),
            "stages": {"teacher": str(teacher), "converted": str(converted)},
            "reused": reused,
            "teacher_trained_here": not finetuned,
            "dense": {"main_metric": dense["main_metric"], "metrics": dense["metrics"], "params": dense["params"]} if dense else None,
        }
    }
    result = finetune(_continued(student), extra_results=summary, **run)
    manifest.finish("distill")
    return CompressResult(options.out, result.results, summary["compress"]["stages"])
