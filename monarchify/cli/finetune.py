"""``monarchify finetune``: fine-tune a dense or Monarch model on a GLUE task."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from monarchify.cli.options import (
    AllowZeros, Exclude, ForceFlag, Include, JsonFlag, Override, Threads, build_config, threads_for_training,
)
from monarchify.cli.render import console, err_console, print_json
from monarchify.distill_config import DistillConfig
from monarchify.errors import ConfigError
from monarchify.glue.options import CURVES_FILE, PRECISIONS, RESULTS_FILE, FinetuneEvents, FinetuneOptions
from monarchify.glue.tasks import TASK_NAMES


class RichEvents(FinetuneEvents):
    def stage(self, message: str) -> None:
        err_console.print(f"[dim]{message}[/]")

    def done(self, message: str) -> None:
        err_console.print(message)

    def note(self, message: str) -> None:
        err_console.print(f"[yellow]note:[/] {message}")

    def converted(self, report: Any) -> None:
        from monarchify.cli.render import blocks_line, summary_lines

        for line in (blocks_line(report), *summary_lines(report)):
            err_console.print(f"  {line}", markup=False, highlight=False, soft_wrap=True)


def _count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1_000_000 else f"{n:,}"


def results_table(results: dict[str, Any]) -> Table:
    table = Table(title=f"{results['task']}: {results['model']}", header_style="bold", show_header=True)
    table.add_column("split")
    names = sorted({k for m in results["metrics"].values() for k in m if not k.endswith(("runtime", "per_second"))})
    for name in names:
        table.add_column(name, justify="right")
    for split, values in results["metrics"].items():
        table.add_row(split, *(f"{values[n]:.4f}" if isinstance(values.get(n), float) else "—" for n in names))
    return table


INTERRUPTED_EARLY = "interrupted before the first checkpoint: nothing was saved (run the same command to start again)"
INTERRUPTED_AFTER_CHECKPOINT = (
    "interrupted; the output folder was not written, the last checkpoint is kept in {folder}: "
    "add --resume to the same command to continue from it"
)
FINETUNE_HINT = "try a higher or lower --lr, more --epochs, or check the data (labels, --max-train-samples)"


def warn_if_trivial(results: dict[str, Any], hint: str = FINETUNE_HINT) -> None:
    """One warning line on stderr for each split where the model scores what a constant answer
    scores (``trivial_baseline`` in the results), with what to try."""
    from monarchify.glue.baseline import baseline_message

    for split, baseline in (results.get("trivial_baseline") or {}).items():
        message = baseline_message(split, baseline)
        if message:
            err_console.print(f"[yellow]warning:[/] {escape(message)}; {escape(hint)}", highlight=False, soft_wrap=True)


def print_results(results: dict[str, Any], out: Path, hint: str = FINETUNE_HINT) -> None:
    console.print(results_table(results))
    train, params = results["train"], results["params"]
    rate = f"{train['samples_per_second']:.1f} samples/s" if train.get("samples_per_second") else "no steps left to time"
    sessions = f" in {train['sessions']} sessions" if train.get("sessions", 1) > 1 else ""
    console.print(
        f"train: {train['seconds']:.1f} s wall{sessions} ({train['step_seconds']:.1f} s in steps), {train['steps']} steps, "
        f"{rate}; eval: {results['eval']['seconds']:.1f} s"
    )
    kind = f"Monarch ({params['monarch_layers']} layers)" if params["monarch_layers"] else "dense"
    console.print(
        f"parameters: {_count(params['monarch'])} {kind}; {_count(params['dense'])} if dense ({params['ratio']:.0%})"
    )
    inside = RESULTS_FILE + (f" and {CURVES_FILE}" if (out / CURVES_FILE).is_file() else "")
    console.print(f"saved [bold]{out}[/] ({inside} inside)")
    warn_if_trivial(results, hint)


def finetune(
    model: Annotated[str, typer.Argument(help="A dense or converted model folder, or a Hub id (needs network).")],
    task: Annotated[str, typer.Option("--task", "-t", help=f"GLUE task: {', '.join(TASK_NAMES)}.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder: the fine-tuned model and eval_results.json.")],
    data_dir: Annotated[
        Path | None,
        typer.Option("--data-dir", help="GLUE TSV folder (<DIR>/MRPC/train.tsv, dev.tsv...). Default: the datasets hub copy (needs network)."),
    ] = None,
    nblocks: Annotated[
        int | None, typer.Option("--nblocks", "-b", help="Convert the model to Monarch with this many blocks before training.")
    ] = None,
    include: Include = None,
    exclude: Exclude = None,
    override: Override = None,
    allow_structural_zeros: AllowZeros = False,
    learning_rate: Annotated[float, typer.Option("--lr", help="Peak learning rate (linear warm-up, then linear decay).")] = 5e-5,
    monarch_lr: Annotated[float | None, typer.Option("--monarch-lr", help="Learning rate of the Monarch factors L, R (default: --lr).")] = None,
    teacher: Annotated[
        str | None,
        typer.Option("--teacher", help="Learn also from this dense model, already fine-tuned on the task (its logits; see --distill-hidden)."),
    ] = None,
    distill_alpha: Annotated[
        float | None, typer.Option("--distill-alpha", help="Weight of the teacher's logits against the labels, 0..1 (default 0.5).")
    ] = None,
    distill_temperature: Annotated[
        float | None, typer.Option("--distill-temperature", help="Softmax temperature of the logit term (default 2).")
    ] = None,
    distill_hidden: Annotated[
        float | None, typer.Option("--distill-hidden", help="Weight of matching the teacher's hidden states, layer by layer (default 0: off).")
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Training batch size per device.")] = 32,
    eval_batch_size: Annotated[int, typer.Option("--eval-batch-size", help="Evaluation batch size per device.")] = 64,
    epochs: Annotated[float, typer.Option("--epochs", help="Training epochs.")] = 3.0,
    max_steps: Annotated[int, typer.Option("--max-steps", help="Stop after this many steps (overrides --epochs; -1: off).")] = -1,
    max_length: Annotated[int, typer.Option("--max-length", help="Truncate inputs to this many tokens (padding is per batch).")] = 128,
    seed: Annotated[int, typer.Option("--seed", help="Seed for the new head, data order and dropout.")] = 42,
    warmup: Annotated[float, typer.Option("--warmup-steps", help="Warm-up: a fraction of the steps (<1) or a number of steps.")] = 0.1,
    weight_decay: Annotated[float, typer.Option("--weight-decay", help="AdamW weight decay (not on biases and LayerNorm).")] = 0.01,
    grad_accum: Annotated[int, typer.Option("--grad-accum", help="Gradient accumulation steps.")] = 1,
    precision: Annotated[str, typer.Option("--precision", help=f"{', '.join(PRECISIONS)} (mixed precision via Trainer).")] = "fp32",
    max_train_samples: Annotated[int | None, typer.Option("--max-train-samples", help="Use only the first N training examples.")] = None,
    max_eval_samples: Annotated[int | None, typer.Option("--max-eval-samples", help="Use only the first N examples of each dev split.")] = None,
    eval_each_epoch: Annotated[bool, typer.Option(help="Evaluate after every epoch (the final evaluation always runs).")] = True,
    save_checkpoints: Annotated[bool, typer.Option(help="Keep a resumable Trainer checkpoint after every epoch.")] = True,
    checkpoint_dir: Annotated[Path | None, typer.Option("--checkpoint-dir", help="Where checkpoints go (default: OUT.checkpoints).")] = None,
    keep_checkpoints: Annotated[bool, typer.Option("--keep-checkpoints", help="Do not delete the checkpoints after a successful run.")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Resume from the latest checkpoint in the checkpoint folder.")] = False,
    tokenizer: Annotated[str | None, typer.Option("--tokenizer", help="Tokenizer folder, if the model folder has none.")] = None,
    gradual: Annotated[float | None, typer.Option("--gradual", metavar="FRACTION", help="Gradual replacement: each Monarch layer stands in for its dense original with a probability that rises to 1 over this share of the steps (the originals: the model before --nblocks, or the --teacher teacher).")] = None,
    gradual_start: Annotated[float, typer.Option("--gradual-start", help="The probability gradual replacement starts at.")] = 0.5,
    augment: Annotated[int, typer.Option("--augment", metavar="N", help="With --teacher: add N variants of every training example (words swapped for words of the task's text) that the teacher labels.")] = 0,
    holdout: Annotated[float | None, typer.Option("--holdout", metavar="FRACTION", help="Hold out this share of the training examples (evenly spread, the same for every seed) and keep the epoch that scores best on them, never on dev. Default: the last epoch.")] = None,
    threads: Threads = None,
    force: ForceFlag = False,
    json_out: JsonFlag = False,
) -> None:
    """Fine-tune a dense or Monarch model on a GLUE task with transformers' Trainer.

    Adds a classification head when the checkpoint has none (and says so), evaluates every dev split with the GLUE metric (offline), and saves the model (same loadable format) with eval_results.json. Several GPUs: run it under torchrun or accelerate launch.

    \b
    Examples:
      monarchify finetune minilm-monarch --task mrpc --data-dir glue --out runs/mrpc
      monarchify finetune ./bert --task mrpc --nblocks 4 --data-dir glue --out runs/mrpc-nb4
      monarchify finetune ./bert --task mrpc --data-dir glue --out runs/mrpc-dense
      monarchify finetune minilm-monarch --task mrpc --teacher runs/mrpc-dense --out runs/mrpc-kd
      torchrun --nproc-per-node 4 -m monarchify.cli.app finetune ./bert --task mnli -b 4 --out runs/mnli
    """
    config = None
    if nblocks is not None:
        config = build_config(nblocks, include, exclude, override, allow_structural_zeros)
    elif include or exclude or override:
        raise ConfigError("--include/--exclude/--override choose layers to convert: pass --nblocks too")
    distill = None
    tuning = {"alpha": distill_alpha, "temperature": distill_temperature, "hidden_weight": distill_hidden}
    if teacher is not None:
        distill = DistillConfig(teacher, **{k: v for k, v in tuning.items() if v is not None})
    elif any(v is not None for v in tuning.values()):
        raise ConfigError("--distill-alpha/--distill-temperature/--distill-hidden tune distillation: pass --teacher too")
    options = FinetuneOptions(
        task=task, model=model, out=out, data_dir=data_dir, tokenizer=tokenizer, monarch=config,
        learning_rate=learning_rate, monarch_lr=monarch_lr, distill=distill, batch_size=batch_size, eval_batch_size=eval_batch_size,
        epochs=epochs, max_steps=max_steps, max_length=max_length, seed=seed, warmup=warmup,
        weight_decay=weight_decay, grad_accum=grad_accum, precision=precision,
        max_train_samples=max_train_samples, max_eval_samples=max_eval_samples, eval_each_epoch=eval_each_epoch,
        save_checkpoints=save_checkpoints, checkpoint_dir=checkpoint_dir, keep_checkpoints=keep_checkpoints,
        resume=resume, force=force, gradual=gradual, gradual_start=gradual_start, holdout=holdout, augment=augment,
    )
    busy_check = threads_for_training(threads)
    # Imported here: Trainer and datasets take seconds to import, which no other command should pay.
    import datasets

    from monarchify.cli.errors import when_interrupted
    from monarchify.cli.training_progress import RichProgress
    from monarchify.glue.train import finetune as run_finetune

    datasets.disable_progress_bars()  # the tokenizing step is quick; our own bar shows training
    when_interrupted(INTERRUPTED_AFTER_CHECKPOINT.format(folder=options.checkpoints) if resume else INTERRUPTED_EARLY)
    progress = RichProgress(after_checkpoint=INTERRUPTED_AFTER_CHECKPOINT, at_start=busy_check)
    result = run_finetune(options, events=RichEvents(), callbacks=[progress], argv=["monarchify", *sys.argv[1:]])
    if json_out:
        print_json(result.results)
        warn_if_trivial(result.results)  # stderr: the JSON on stdout stays clean
    else:
        print_results(result.results, out)
