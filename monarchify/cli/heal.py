"""``monarchify heal``: pull a converted model back towards its dense original on unlabeled text."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from monarchify.cli.options import ForceFlag, JsonFlag, OutDir, Threads, threads_for_training
from monarchify.cli.render import console, err_console, print_json, progress_bar
from monarchify.heal_config import DEFAULT_HEAL_BATCH, DEFAULT_HEAL_SAMPLES, HealConfig
from monarchify.samples import DEFAULT_MAX_LENGTH


def heal(
    model: Annotated[str, typer.Argument(help="A converted folder (monarchify convert).")],
    teacher: Annotated[str, typer.Option("--teacher", help="The dense model it was converted from (folder or Hub id).")],
    text: Annotated[str, typer.Option("--text", metavar="DATA", help="Unlabeled text: a text file (one sample per line), a GLUE .tsv, a saved datasets folder or hf:NAME[:CONFIG[:SPLIT]].")],
    out: OutDir,
    steps: Annotated[int, typer.Option("--max-steps", help="Optimiser steps.")] = HealConfig.steps,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate (AdamW, linear warm-up then decay).")] = HealConfig.lr,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Samples per step.")] = DEFAULT_HEAL_BATCH,
    samples: Annotated[int, typer.Option("--max-train-samples", metavar="N", help="Samples read from DATA for training (at most); a quarter more are held out to measure the error.")] = DEFAULT_HEAL_SAMPLES,
    max_length: Annotated[int, typer.Option("--max-length", help="Truncate samples to this many tokens.")] = DEFAULT_MAX_LENGTH,
    seed: Annotated[int, typer.Option("--seed", help="Seed for the order of the batches.")] = HealConfig.seed,
    eval_every: Annotated[
        int | None, typer.Option("--eval-steps", metavar="N", help="Also measure the held-out error every N steps (the report keeps the curve).")
    ] = None,
    train: Annotated[str, typer.Option("--train", help="What trains: all (every weight) or converted (only the converted layers).")] = HealConfig.train,
    max_grad_norm: Annotated[float | None, typer.Option("--max-grad-norm", metavar="NORM", help="Scale each step's gradient down to at most this norm (default: never).")] = None,
    threads: Threads = None,
    force: ForceFlag = False,
    json_out: JsonFlag = False,
) -> None:
    """Train a converted model to reproduce its dense original's hidden states, layer by layer.

    Task-agnostic and label-free: run it once after convert, then fine-tune the healed folder
    on any task. The saved folder loads like the input one; its report records the held-out
    hidden-state error before and after.

    \b
    Examples:
      monarchify heal minilm-monarch --teacher ./minilm --text sentences.txt -o minilm-healed
      monarchify heal minilm-monarch --teacher ./minilm --text glue/MRPC/train.tsv --max-steps 300 -o healed
    """
    config = HealConfig(steps=steps, lr=lr, seed=seed, eval_every=eval_every, train=train, max_grad_norm=max_grad_norm)
    busy_check = threads_for_training(threads, on_gpu=False)  # heal runs where the model loads: on the CPU
    # Imported here: torch and transformers take seconds to import, which --help should not pay.
    from monarchify.hf.heal import describe, heal_pretrained

    with progress_bar(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
    ) as progress:
        task = progress.add_task("loading", total=steps)

        def advance(step: int, loss: float) -> None:
            busy_check()  # after the first step: everything is checked by then, and most steps are to come
            progress.update(task, completed=step, description=f"healing  loss {loss:.4f}")

        run = heal_pretrained(model, teacher, text, out, config, samples=samples, batch_size=batch_size,
                              max_length=max_length, force=force, progress=advance)
    if json_out:
        print_json(describe(run))
        return
    info = run.report.meta["heal"]
    console.print(
        f"healed {model} towards {teacher}: {steps} steps on {info['data']['samples']} samples in {info['seconds']:.0f} s; "
        f"held-out hidden-state error {info['heldout_hidden_error_before']:.4f} → {info['heldout_hidden_error_after']:.4f}"
    )
    if eval_every:
        console.print("  by step: " + ", ".join(f"{step} {error:.4f}" for step, error in info["heldout_hidden_error_curve"]))
    err_console.print(f"saved [bold]{Path(out)}[/]")
