"""``monarchify compress``: the whole recipe in one command, dense model in, compressed
fine-tuned model out (:mod:`monarchify.glue.compress`)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from monarchify.cli.finetune import RichEvents, print_results, warn_if_trivial
from monarchify.cli.options import (BudgetObjective, BudgetSolver, Exclude, Include, JsonFlag, OutputOrder, Override, Structure, Threads,
                                    threads_for_training)
from monarchify.cli.render import console, print_json
from monarchify.config import parse_override, parse_ranks
from monarchify.errors import ConfigError
from monarchify.glue.tasks import TASK_NAMES, get_task
from monarchify.lm.compress import HEAL_BATCH_SIZE, HEAL_LR, HEAL_MAX_GRAD_NORM, HEAL_STEPS


def compress(
    model: Annotated[str, typer.Argument(help="A dense model folder (or Hub id): for --task pretrained or already fine-tuned on it; for --text a causal language model.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder: the compressed model and eval_results.json. Stages go to OUT.stages.")],
    budget: Annotated[float | None, typer.Option("--budget", metavar="FRACTION", help="Fraction of the converted linears' dense parameters to keep (0.376 is MiniLM's count of 4 blocks everywhere; 0.5 is 4 blocks on square layers). Required with --task; with --text, --budget or --nblocks.")] = None,
    task: Annotated[str | None, typer.Option("--task", "-t", help=f"GLUE task: {', '.join(TASK_NAMES)}. Give --task or --text.")] = None,
    text: Annotated[list[Path] | None, typer.Option("--text", metavar="FILE", help="Language-model compression: plain-text files (one document per line; repeatable) to calibrate and heal on; every 20th line is held out to measure perplexity.")] = None,
    data_dir: Annotated[Path | None, typer.Option("--data-dir", help="GLUE TSV folder (<DIR>/MRPC/train.tsv...). Default: the datasets hub copy (needs network).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of both fine-tuning stages.")] = 42,
    teacher_lr: Annotated[float, typer.Option("--teacher-lr", help="Peak learning rate of the dense fine-tuning (stage 1).")] = 1e-4,
    student_lr: Annotated[float | None, typer.Option("--student-lr", help="Peak learning rate of the compressed model's training: stage 3 with --task (default 5e-5), healing with --text (default 5e-4).")] = None,
    epochs: Annotated[float, typer.Option("--epochs", help="Epochs of each fine-tuning stage.")] = 3.0,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Training batch size (default 32 with --task; 4 windows with --text).")] = None,
    max_length: Annotated[int | None, typer.Option("--max-length", help="Truncate inputs to this many tokens (default 128); with --text, the window of tokens trained and scored (default 256).")] = None,
    calibration_samples: Annotated[int | None, typer.Option("--calibration-samples", metavar="N", help="Examples the conversion is calibrated on. --task: default 256, doubled until they hold 8 tokens per input of the widest converted layer (SST-2 on MiniLM: 1024 sentences; MRPC: 256 pairs). --text: windows of text, default 128.")] = None,
    nblocks: Annotated[int | None, typer.Option("--nblocks", "-b", help="--text: every selected layer at this block count instead of a --budget.")] = None,
    include: Include = None,
    exclude: Exclude = None,
    override: Override = None,
    sequential: Annotated[bool, typer.Option("--sequential", help="--text with --nblocks: calibrate each block on the inputs the already converted blocks produce (see convert --sequential).")] = False,
    heal_steps: Annotated[int, typer.Option("--heal-steps", metavar="N", help="--text: healing steps after the conversion (0: none, the training-free result).")] = HEAL_STEPS,
    eval_every: Annotated[int | None, typer.Option("--eval-steps", metavar="N", help="--text: also measure held-out perplexity every N healing steps (default: four times in the run).")] = None,
    generate: Annotated[int, typer.Option("--generate", metavar="N", help="--text: the dense model also writes N windows of text to heal on (sampled from its own next-token distribution, each from a few tokens of the text): more varied text than a small file holds.")] = 0,
    heal_train: Annotated[str, typer.Option("--heal-train", help="--text: what healing trains: all (every weight) or converted (only the converted layers; embeddings, norms and the layers kept dense stay the dense model's, and a step is cheaper).")] = "all",
    save_every: Annotated[int, typer.Option("--save-steps", metavar="N", help="--text: keep a resumable healing state every N steps.")] = 50,
    max_grad_norm: Annotated[float | None, typer.Option("--max-grad-norm", metavar="NORM", help="--text: scale each healing step's gradient down to at most this norm (default 1; 0: never). It keeps the default rate stable (low rank diverged without it) and healed Monarch better too.")] = None,
    distill_alpha: Annotated[float, typer.Option("--distill-alpha", help="Weight of the teacher's logits against the labels in stage 3, 0..1.")] = 0.5,
    distill_temperature: Annotated[float, typer.Option("--distill-temperature", help="Softmax temperature of the logit term.")] = 2.0,
    distill_hidden: Annotated[float, typer.Option("--distill-hidden", help="Weight of matching the teacher's hidden states, layer by layer (0: off): in stage 3 with --task, in healing with --text (next to the logit term).")] = 0.0,
    output_order: OutputOrder = "blocked",
    budget_ranks: Annotated[str | None, typer.Option("--budget-ranks", metavar="K,K,...", help="Monarch plus low rank: --budget may also give a layer a rank-K term next to its blocks, e.g. 8,16,32.")] = None,
    budget_objective: BudgetObjective = None,
    budget_solver: BudgetSolver = "exact",
    structure: Structure = "monarch",
    augment: Annotated[int, typer.Option("--augment", metavar="N", help="Stage 3 also trains on N variants of every training example (words swapped for words of the task's text), labelled by the dense teacher.")] = 0,
    holdout: Annotated[float | None, typer.Option("--holdout", metavar="FRACTION", help="Stage 3 keeps the epoch that scores best on this share of the training examples, held out from its training (never chosen on dev). Default: the last epoch.")] = None,
    gradual: Annotated[float | None, typer.Option("--gradual", metavar="FRACTION", help="Stage 3: Monarch layers take over from the teacher's dense layers gradually, over this share of the steps.")] = None,
    finetuned: Annotated[bool | None, typer.Option("--finetuned/--pretrained", help="Whether MODEL is already fine-tuned on the task (default: read from its config.json).")] = None,
    max_train_samples: Annotated[int | None, typer.Option("--max-train-samples", help="Use only the first N training examples in both fine-tuning stages.")] = None,
    max_eval_samples: Annotated[int | None, typer.Option("--max-eval-samples", help="Use only the first N examples of each dev split.")] = None,
    threads: Threads = None,
    restart_from: Annotated[str | None, typer.Option("--restart-from", metavar="STAGE", help="Make this stage and every later one again: teacher, convert or distill (with --text: convert or heal). A stage made with other options is made again anyway.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace a finished OUT, and start every stage over (OUT.stages and OUT.checkpoints are discarded).")] = False,
    json_out: JsonFlag = False,
) -> None:
    """Compress a model for a GLUE task (fine-tune dense, convert under a budget, distil) or a language model on text (convert under a budget, heal, measure perplexity).

    With --task: stage 1 fine-tunes the dense model on the task (skipped when it is fine-tuned already); stage 2 converts that model under --budget, calibrated on the task's training text (the task head stays dense); stage 3 fine-tunes the compressed model learning from the dense one (distillation). Intermediate folders stay in OUT.stages (stage 3's checkpoints in OUT.checkpoints); the same command again resumes at the stage it stopped, and redoes a stage (and the later ones) whose options changed.

    With --text (a causal language model): stage 1 converts it under --budget, calibrated on windows of the text; stage 2 heals it, training it to reproduce the dense model's next-token distributions on the text, with held-out perplexity measured along the way. OUT/eval_results.json holds the dense and compressed perplexity on the held-out lines. Ctrl-C keeps the last healing state: the same command resumes.

    \b
    Examples:
      monarchify compress ./minilm --task mrpc --budget 0.376 --data-dir glue --out runs/mrpc-small
      monarchify compress runs/sst2-dense --task sst2 --budget 0.5 --data-dir glue --out runs/sst2-small
      monarchify compress ./smollm2 --text wiki.valid.txt --budget 0.75 --heal-steps 400 --out runs/smol-75
    """
    if (task is None) == (text is None):
        raise ConfigError("give --task (a GLUE task) or --text (language-model compression), one of the two")
    by_kind = budget_objective == "kinds"
    if by_kind and text is None:
        raise ConfigError("--budget-objective kinds measures a language model on text: it needs --text")
    recipe = {"output_order": output_order, "budget_objective": "layers" if by_kind else budget_objective or "layers", "budget_solver": budget_solver,
              "structure": structure,
              "budget_ranks": parse_ranks(budget_ranks) if budget_ranks is not None else []}
    if text is not None:
        if (budget is None) == (nblocks is None):
            raise ConfigError("--text compression needs --budget FRACTION or --nblocks N, one of the two")
        if nblocks is not None:
            recipe["nblocks"] = nblocks
        recipe.update(include=include or [], exclude=exclude or [], overrides=dict(parse_override(o) for o in override or []))
        if sequential:
            recipe["calibration"] = {"sequential": True}
        _refuse_task_flags(teacher_lr=teacher_lr != 1e-4, epochs=epochs != 3.0, data_dir=data_dir is not None,
                           distill_alpha=distill_alpha != 0.5, distill_temperature=distill_temperature != 2.0,
                           holdout=holdout is not None, augment=augment != 0, gradual=gradual is not None, finetuned=finetuned is not None,
                           max_train_samples=max_train_samples is not None, max_eval_samples=max_eval_samples is not None)
        from monarchify.cli.compress_text import run_text_compress
        from monarchify.heal_config import HealConfig
        from monarchify.lm.compress import TextCompressOptions

        if heal_steps < 0:
            raise ConfigError(f"--heal-steps must not be negative, got {heal_steps}")
        clip = HEAL_MAX_GRAD_NORM if max_grad_norm is None else (max_grad_norm or None)  # 0: no clipping
        heal = HealConfig(steps=heal_steps, lr=HEAL_LR if student_lr is None else student_lr, seed=seed, hidden_weight=distill_hidden,
                          logit_weight=1.0, save_every=save_every, eval_every=eval_every or max(1, heal_steps // 4), train=heal_train,
                          hidden_norm="token", max_grad_norm=clip) if heal_steps else None
        options = TextCompressOptions(model=model, text=list(text), out=out, budget=budget, recipe=recipe, seed=seed,
                                      block_size=max_length or 256, calibration_samples=calibration_samples or 128,
                                      batch_size=batch_size or HEAL_BATCH_SIZE, heal=heal, generate=generate, force=force, restart_from=restart_from,
                                      by_kind=by_kind)
        run_text_compress(options, json_out=json_out, argv=["monarchify", *sys.argv[1:]],
                          busy_check=threads_for_training(threads, on_gpu=False))
        return
    if budget is None or nblocks is not None or sequential or heal_train != "all" or generate or max_grad_norm is not None:
        raise ConfigError("--task compression needs --budget FRACTION (--nblocks, --sequential, --heal-train, --generate and "
                          "--max-grad-norm are for --text)")
    if include or exclude or override:
        raise ConfigError("--include, --exclude and --override choose the layers of --text compression; --task converts every "
                          "layer of the encoder")
    from monarchify.glue.compress import CompressOptions

    shared = {"epochs": epochs, "batch_size": batch_size or 32, "max_length": max_length or 128,
              "max_train_samples": max_train_samples, "max_eval_samples": max_eval_samples}
    options = CompressOptions(
        task=task, model=model, out=out, budget=budget, data_dir=data_dir, teacher_lr=teacher_lr, student_lr=5e-5 if student_lr is None else student_lr,
        calibration_samples=calibration_samples, seed=seed, finetuned=finetuned, gradual=gradual, holdout=holdout, augment=augment, force=force, output_order=output_order,
        distill={"alpha": distill_alpha, "temperature": distill_temperature, "hidden_weight": distill_hidden},
        finetune=shared, budget_ranks=parse_ranks(budget_ranks) if budget_ranks is not None else [],
        budget_objective=budget_objective, budget_solver=budget_solver, restart_from=restart_from, structure=structure,
    )
    busy_check = threads_for_training(threads)
    import datasets

    from monarchify.cli.errors import when_interrupted
    from monarchify.cli.training_progress import RichProgress
    from monarchify.glue.compress import compress as run_compress

    datasets.disable_progress_bars()
    when_interrupted(f"interrupted; {options.stages} keeps the finished stages (and stage 1's epoch checkpoints), "
                     f"{options.checkpoints} stage 3's epoch checkpoints: the same command again resumes from there")
    result = run_compress(options, events=RichEvents(), callbacks=[RichProgress(at_start=busy_check)], argv=["monarchify", *sys.argv[1:]])
    hint = "try a higher or lower --student-lr, more --epochs, or check the data (labels, --max-train-samples)"
    if json_out:
        print_json(result.results)
        warn_if_trivial(result.results, hint)  # stderr: the JSON on stdout stays clean
        return
    print_results(result.results, out, hint)
    dense = result.results["compress"]["dense"]
    if dense:
        for line in teacher_comparison(result.results, dense):
            console.print(line)


def teacher_comparison(results: dict[str, Any], dense: dict[str, Any]) -> list[str]:
    """The task's main metric of the dense teacher and of the compressed model, named, per
    split both were scored on; the difference in points (hundredths), as GLUE tables give it."""
    metric = get_task(results["task"]).main_metric
    lines = []
    for split, score in results["main_metric"].items():
        teacher = dense["main_metric"].get(split)
        if isinstance(score, float) and isinstance(teacher, float):
            lines.append(f"{metric} on {split}: dense teacher {teacher:.4f}, compressed {score:.4f} "
                         f"({100 * (score - teacher):+.2f} points)")
    return lines


def _refuse_task_flags(**given: bool) -> None:
    """The GLUE recipe's flags mean nothing to language-model compression: say so rather than
    ignore them."""
    used = [name for name, value in given.items() if value]
    if used:
        flags = ", ".join("--" + name.replace("_", "-") for name in used)
        raise ConfigError(f"{flags} belong to --task compression; --text compression does not use them")
