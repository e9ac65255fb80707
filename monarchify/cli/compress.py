"""``monarchify compress``: the whole recipe in one command, dense model in, compressed
fine-tuned model out (:mod:`monarchify.glue.compress`)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from monarchify.cli.finetune import RichEvents, print_results, warn_if_trivial
from monarchify.cli.options import BudgetObjective, ForceFlag, JsonFlag, OutputOrder, Structure
from monarchify.cli.render import console, print_json
from monarchify.config import parse_ranks
from monarchify.glue.tasks import TASK_NAMES


def compress(
    task: Annotated[str, typer.Option("--task", "-t", help=f"GLUE task: {', '.join(TASK_NAMES)}.")],
    model: Annotated[str, typer.Option("--model", "-m", help="A dense model folder (or Hub id), pretrained or already fine-tuned on the task.")],
    budget: Annotated[float, typer.Option("--budget", metavar="FRACTION", help="Fraction of the encoder linears' dense parameters to keep (0.376 is the count of 4 blocks everywhere).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder: the compressed fine-tuned model and eval_results.json. Stages go to OUT.stages.")],
    data_dir: Annotated[Path | None, typer.Option("--data-dir", help="GLUE TSV folder (<DIR>/MRPC/train.tsv...). Default: the datasets hub copy (needs network).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of both fine-tuning stages.")] = 42,
    teacher_lr: Annotated[float, typer.Option("--teacher-lr", help="Peak learning rate of the dense fine-tuning (stage 1).")] = 1e-4,
    student_lr: Annotated[float, typer.Option("--student-lr", help="Peak learning rate of the compressed fine-tuning (stage 3).")] = 5e-5,
    epochs: Annotated[float, typer.Option("--epochs", help="Epochs of each fine-tuning stage.")] = 3.0,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Training batch size.")] = 32,
    max_length: Annotated[int, typer.Option("--max-length", help="Truncate inputs to this many tokens.")] = 128,
    calibration_samples: Annotated[int | None, typer.Option("--calibration-samples", metavar="N", help="Training examples of the task the conversion is calibrated on. Default: 256, doubled until they hold 8 tokens per input of the widest converted layer (SST-2 on MiniLM: 1024 sentences; MRPC: 256 pairs).")] = None,
    distill_alpha: Annotated[float, typer.Option("--distill-alpha", help="Weight of the teacher's logits against the labels in stage 3, 0..1.")] = 0.5,
    distill_temperature: Annotated[float, typer.Option("--distill-temperature", help="Softmax temperature of the logit term.")] = 2.0,
    distill_hidden: Annotated[float, typer.Option("--distill-hidden", help="Weight of matching the teacher's hidden states in stage 3 (0: off).")] = 0.0,
    output_order: OutputOrder = "blocked",
    budget_ranks: Annotated[str | None, typer.Option("--budget-ranks", metavar="K,K,...", help="Monarch plus low rank: --budget may also give a layer a rank-K term next to its blocks, e.g. 8,16,32.")] = None,
    budget_objective: BudgetObjective = "layers",
    structure: Structure = "monarch",
    gradual: Annotated[float | None, typer.Option("--gradual", metavar="FRACTION", help="Stage 3: Monarch layers take over from the teacher's dense layers gradually, over this share of the steps.")] = None,
    finetuned: Annotated[bool | None, typer.Option("--finetuned/--pretrained", help="Whether MODEL is already fine-tuned on the task (default: read from its config.json).")] = None,
    max_train_samples: Annotated[int | None, typer.Option("--max-train-samples", help="Use only the first N training examples in both fine-tuning stages.")] = None,
    max_eval_samples: Annotated[int | None, typer.Option("--max-eval-samples", help="Use only the first N examples of each dev split.")] = None,
    force: ForceFlag = False,
    json_out: JsonFlag = False,
) -> None:
    """Compress a model for a GLUE task: fine-tune dense, convert under a budget, distil.

    Stage 1 fine-tunes the dense model on the task (skipped when it is fine-tuned already); stage 2 converts that model under --budget, calibrated on the task's training text (the task head stays dense); stage 3 fine-tunes the compressed model learning from the dense one (distillation). Intermediate folders stay in OUT.stages; the same command again resumes at the stage it stopped.

    \b
    Examples:
      monarchify compress --task mrpc --model ./minilm --budget 0.376 --data-dir glue --out runs/mrpc-small
      monarchify compress --task sst2 --model runs/sst2-dense --budget 0.5 --data-dir glue --out runs/sst2-small
    """
    from monarchify.glue.compress import CompressOptions

    shared = {"epochs": epochs, "batch_size": batch_size, "max_length": max_length,
              "max_train_samples": max_train_samples, "max_eval_samples": max_eval_samples}
    options = CompressOptions(
        task=task, model=model, out=out, budget=budget, data_dir=data_dir, teacher_lr=teacher_lr, student_lr=student_lr,
        calibration_samples=calibration_samples, seed=seed, finetuned=finetuned, gradual=gradual, force=force, output_order=output_order,
        distill={"alpha": distill_alpha, "temperature": distill_temperature, "hidden_weight": distill_hidden},
        finetune=shared, budget_ranks=parse_ranks(budget_ranks) if budget_ranks is not None else [],
        budget_objective=budget_objective, structure=structure,
    )
    import datasets

    from monarchify.cli.errors import when_interrupted
    from monarchify.cli.training_progress import RichProgress
    from monarchify.glue.compress import compress as run_compress

    datasets.disable_progress_bars()
    when_interrupted(f"interrupted; {options.stages} keeps the finished stages and epoch checkpoints: "
                     "the same command again resumes from there")
    result = run_compress(options, events=RichEvents(), callbacks=[RichProgress()], argv=["monarchify", *sys.argv[1:]])
    hint = "try a higher or lower --student-lr, more --epochs, or check the data (labels, --max-train-samples)"
    if json_out:
        print_json(result.results)
        warn_if_trivial(result.results, hint)  # stderr: the JSON on stdout stays clean
        return
    print_results(result.results, out, hint)
    dense = result.results["compress"]["dense"]
    if dense:
        split = next(iter(result.results["main_metric"]))
        console.print(f"dense teacher on {split}: {dense['main_metric'][split]:.4f}; compressed: "
                      f"{result.results['main_metric'][split]:.4f}")
