"""``monarchify train`` (a language model from scratch on text: dense, Monarch, or Monarch then
dense) and ``monarchify init`` (a freshly initialised model from a config, saved untrained)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from monarchify.cli.options import (
    AllowZeros, Exclude, ForceFlag, Include, JsonFlag, Override, Threads, build_config, threads_for_training,
)
from monarchify.cli.render import console, err_console, print_json
from monarchify.errors import ConfigError
from monarchify.lm.options import OBJECTIVES, PRECISIONS, PRESETS, RESULTS_FILE, TrainOptions

Arch = Annotated[
    str,
    typer.Option("--arch", "-a", help=f"{' or '.join(PRESETS)} (GPT-2 small / BERT-base shapes, resized by --layers --width --heads), or a config.json or model folder (its config only; no weights are read)."),
]
NBlocksOrDense = Annotated[
    int | None,
    typer.Option("--nblocks", "-b", help="Monarch layers with this many blocks in place of the selected linear layers (default: the dense model)."),
]
Layers = Annotated[int | None, typer.Option("--layers", help="Number of transformer blocks.")]
Width = Annotated[int | None, typer.Option("--width", help="Hidden size (the MLP is 4× wider).")]
Heads = Annotated[int | None, typer.Option("--heads", help="Attention heads (must divide --width).")]


def _recipe(nblocks: int | None, include: Any, exclude: Any, override: Any, zeros: bool) -> Any:
    if nblocks is None:
        if include or exclude or override:
            raise ConfigError("--include/--exclude/--override choose the Monarch layers: pass --nblocks too")
        return None
    return build_config(nblocks, include, exclude, override, zeros)


def train(
    arch: Arch,
    text: Annotated[list[Path], typer.Option("--text", help="Training text: a plain-text file (one document per line) or a TSV file with a header (repeatable).")],
    out: Annotated[Path, typer.Option("--out", "-o", help=f"Output folder: the trained model, its tokenizer and {RESULTS_FILE}.")],
    text_column: Annotated[list[str] | None, typer.Option("--text-column", help="TSV column(s) to read (repeatable; default: the usual sentence columns, e.g. 'sentence', '#1 String').")] = None,
    objective: Annotated[str | None, typer.Option("--objective", help=f"{' or '.join(OBJECTIVES)} LM (default: masked for BERT-like models, causal otherwise).")] = None,
    layers: Layers = None,
    width: Width = None,
    heads: Heads = None,
    block_size: Annotated[int, typer.Option("--max-length", help="Tokens per training sequence (text is packed, no padding).")] = 128,
    nblocks: NBlocksOrDense = None,
    include: Include = None,
    exclude: Exclude = None,
    override: Override = None,
    allow_structural_zeros: AllowZeros = False,
    densify_at: Annotated[float | None, typer.Option("--densify-at", metavar="FRACTION|STEP", help="Sparse-to-dense: after this fraction of the steps (<1) or this step (>=1), multiply every Monarch layer out to dense, exactly, and finish dense (AdamW restarts for those weights).")] = None,
    tokenizer: Annotated[str | None, typer.Option("--tokenizer", help="A tokenizer folder (default: learn a byte-level BPE tokenizer of --vocab-size on the training text).")] = None,
    vocab_size: Annotated[int, typer.Option("--vocab-size", help="Vocabulary of the learned tokenizer.")] = 8192,
    max_lines: Annotated[int | None, typer.Option("--max-lines", help="Use only the first N lines of text.")] = None,
    eval_fraction: Annotated[float, typer.Option("--eval-fraction", help="Share of the lines held out for evaluation (every k-th line).")] = 0.05,
    learning_rate: Annotated[float, typer.Option("--lr", help="Peak learning rate (linear warm-up, then linear decay).")] = 5e-4,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Sequences per step per device.")] = 16,
    eval_batch_size: Annotated[int, typer.Option("--eval-batch-size", help="Evaluation batch size per device.")] = 32,
    epochs: Annotated[float, typer.Option("--epochs", help="Passes over the training text.")] = 1.0,
    max_steps: Annotated[int, typer.Option("--max-steps", help="Stop after this many steps (overrides --epochs; -1: off).")] = -1,
    warmup: Annotated[float, typer.Option("--warmup-steps", help="Warm-up: a fraction of the steps (<1) or a number of steps.")] = 0.05,
    weight_decay: Annotated[float, typer.Option("--weight-decay", help="AdamW weight decay (not on biases and LayerNorm).")] = 0.01,
    grad_accum: Annotated[int, typer.Option("--grad-accum", help="Gradient accumulation steps.")] = 1,
    precision: Annotated[str, typer.Option("--precision", help=f"{', '.join(PRECISIONS)} (mixed precision via Trainer).")] = "fp32",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the initialisation, data order, masking and dropout.")] = 42,
    eval_steps: Annotated[float | None, typer.Option("--eval-steps", help="Evaluate on the held-out text every N steps, or this fraction of the run (<1). Default: a tenth of the run, at least 50 steps apart (the run always ends with one).")] = None,
    save_steps: Annotated[float | None, typer.Option("--save-steps", help="Keep a resumable checkpoint every N steps, or this fraction of the run (<1). Default: as --eval-steps (the last step is always saved).")] = None,
    logging_steps: Annotated[int, typer.Option("--logging-steps", help="Record the training loss every N steps.")] = 10,
    checkpoint_dir: Annotated[Path | None, typer.Option("--checkpoint-dir", help="Where checkpoints go (default: OUT.checkpoints).")] = None,
    keep_checkpoints: Annotated[bool, typer.Option("--keep-checkpoints", help="Do not delete the checkpoints after a successful run.")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Resume from the latest checkpoint (same command; across the switch too).")] = False,
    threads: Threads = None,
    force: ForceFlag = False,
    json_out: JsonFlag = False,
) -> None:
    """Train a language model from scratch on text: dense, Monarch, or Monarch then dense.

    Builds the model from its config (Monarch layers freshly initialised with the dense layer's output variance), trains it with transformers' Trainer, reports perplexity on a held-out part and step times, and saves it (a Monarch folder, or a plain one once densified) with its tokenizer. Several GPUs: run it under torchrun or accelerate launch (the switch to dense needs one process).

    \b
    Examples:
      monarchify train -a gpt2 --layers 4 --width 384 --heads 6 --text corpus.txt --max-steps 2000 -o runs/dense
      monarchify train -a gpt2 --layers 4 --width 384 --heads 6 --text corpus.txt --max-steps 2000 -b 4 -o runs/nb4
      monarchify train -a gpt2 ... -b 4 --densify-at 0.8 -o runs/nb4-dense       # Monarch, then dense
      monarchify train -a bert --layers 4 --width 256 --heads 4 --text glue/SST-2/train.tsv -b 4 -o runs/bert
      monarchify train ... --resume                                # same command: continue a stopped run
    """
    options = TrainOptions(
        arch=arch, text=text, out=out, text_columns=text_column or [], objective=objective, layers=layers, width=width,
        heads=heads, block_size=block_size, vocab_size=vocab_size, tokenizer=tokenizer, max_lines=max_lines,
        eval_fraction=eval_fraction, monarch=_recipe(nblocks, include, exclude, override, allow_structural_zeros),
        densify_at=densify_at, learning_rate=learning_rate, batch_size=batch_size, eval_batch_size=eval_batch_size,
        epochs=epochs, max_steps=max_steps, warmup=warmup, weight_decay=weight_decay, grad_accum=grad_accum,
        precision=precision, seed=seed, eval_steps=eval_steps, save_steps=save_steps, logging_steps=logging_steps,
        checkpoint_dir=checkpoint_dir, keep_checkpoints=keep_checkpoints, resume=resume, force=force,
    )
    busy_check = threads_for_training(threads)
    # Imported here: Trainer takes seconds to import, which no other command should pay.
    from monarchify.cli.errors import when_interrupted
    from monarchify.cli.finetune import INTERRUPTED_AFTER_CHECKPOINT, INTERRUPTED_EARLY, RichEvents
    from monarchify.cli.training_progress import RichProgress
    from monarchify.lm.train import train as run_train

    when_interrupted(INTERRUPTED_AFTER_CHECKPOINT.format(folder=options.checkpoints) if resume else INTERRUPTED_EARLY)
    progress = RichProgress(after_checkpoint=INTERRUPTED_AFTER_CHECKPOINT, at_start=busy_check, heldout=True)
    result = run_train(options, events=RichEvents(), callbacks=[progress], argv=["monarchify", *sys.argv[1:]])
    if json_out:
        print_json({k: v for k, v in result.results.items() if k != "step_seconds"})
        return
    res = result.results
    timing, params = res["train"], res["model"]["params"]
    console.print(f"held-out evaluation after {timing['steps']} steps: perplexity [bold]{res['eval']['perplexity']:.2f}[/], "
                  f"loss {res['eval']['loss']:.4f}")
    line = f"step time: median {timing['median_step_ms']:.0f} ms, {timing['step_seconds_total']:.1f} s in steps"
    if res["switch"]:
        sw = res["switch"]
        line += f" (Monarch {timing['median_step_ms_monarch']:.0f} ms, dense {timing['median_step_ms_dense']:.0f} ms)"
        before, after = sw.get("loss_before"), sw.get("loss_after")
        exact = f": loss on a held-out batch {before:.6f} before, {after:.6f} after" if before is not None and after is not None else ""
        console.print(f"switched {sw['layers']} layers to dense after step {sw['step']}{exact}")
    console.print(line)
    console.print(f"parameters: {params['total'] / 1e6:.2f}M ({params['monarch_layers']} Monarch layers)")
    if timing["stopped_early"]:
        err_console.print("[yellow]note:[/] stopped before the last step: nothing saved; --resume continues from the checkpoints")
    else:
        console.print(f"saved [bold]{out}[/] ({RESULTS_FILE} inside)")


def init(
    arch: Arch,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (written atomically).")],
    layers: Layers = None,
    width: Width = None,
    heads: Heads = None,
    vocab_size: Annotated[int | None, typer.Option("--vocab-size", help="Vocabulary size (default: the config's).")] = None,
    objective: Annotated[str | None, typer.Option("--objective", help=f"{' or '.join(OBJECTIVES)} LM head (default: masked for BERT-like models, causal otherwise).")] = None,
    nblocks: NBlocksOrDense = None,
    include: Include = None,
    exclude: Exclude = None,
    override: Override = None,
    allow_structural_zeros: AllowZeros = False,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the initialisation.")] = 42,
    force: ForceFlag = False,
    json_out: JsonFlag = False,
) -> None:
    """Build a freshly initialised model from a config, its selected layers Monarch, and save it untrained.

    The folder loads with stock from_pretrained (after import monarchify) like a converted model; train it with your own loop, or use monarchify train.

    \b
    Examples:
      monarchify init --arch gpt2 -b 4 --out gpt2-monarch-init
      monarchify init --arch ./my-llama-config.json -b 4 --out llama-monarch-init
    """
    recipe = _recipe(nblocks, include, exclude, override, allow_structural_zeros)
    from monarchify.atomic import check_output_dir

    check_output_dir(out, force, inputs=(arch,))
    from monarchify.lm.build import init_model

    model, report = init_model(arch, recipe, layers=layers, width=width, heads=heads, vocab_size=vocab_size, objective=objective, seed=seed)
    from monarchify.hf.saving import save_model

    save_model(model, out, report=report, recipe=recipe.to_dict() if recipe else None, force=force)
    total = sum(p.numel() for p in model.parameters())
    if json_out:
        print_json({"out": str(out), "model": type(model).__name__, "params": total,
                    "monarch_layers": len(report.converted) if report else 0})
        return
    kind = f"{len(report.converted)} Monarch layers ({recipe.nblocks} blocks)" if report else "dense"
    console.print(f"saved [bold]{out}[/]: {type(model).__name__}, {total / 1e6:.2f}M parameters, {kind}")
