"""``monarchify eval``: perplexity of a causal language model folder (dense or Monarch) on text."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from monarchify.cli.options import JsonFlag, Threads, set_threads
from monarchify.cli.render import console, print_json, progress_bar


def evaluate(
    folder: Annotated[Path, typer.Argument(help="A causal language model folder, dense or Monarch.")],
    text: Annotated[
        list[Path],
        typer.Option("--text", metavar="FILE", help="Plain text, one document per line (repeatable; read in order)."),
    ],
    window: Annotated[int, typer.Option("--max-length", help="Tokens per window (perplexities compare only at equal windows).")] = 256,
    stride: Annotated[
        int | None,
        typer.Option("--stride", help="Tokens between window starts; below --max-length, windows overlap and score only their new tokens (default: the window)."),
    ] = None,
    max_tokens: Annotated[int | None, typer.Option("--max-tokens", help="Score only the text's first N tokens.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Windows per forward pass.")] = 8,
    bos: Annotated[
        bool | None,
        typer.Option("--bos/--no-bos", help="Put the BOS token before every window (default: when the tokenizer adds one to text by itself)."),
    ] = None,
    device: Annotated[str, typer.Option("--device", help="auto (the GPU when there is one), cpu, cuda, cuda:N.")] = "auto",
    threads: Threads = None,
    json_out: JsonFlag = False,
) -> None:
    """Perplexity of a causal language model on text files, in fixed windows.

    The text is every line of the files, blank lines included, joined with newlines and
    tokenised once. Without --bos the first token of each non-overlapping window is context
    only; with it every token is scored.

    \b
    Examples:
      monarchify eval smollm2-monarch --text wikitext-2/test.txt --max-tokens 32768
      monarchify eval smollm2 --text test.txt --max-length 1024 --stride 512 --json
    """
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from monarchify.bench import resolve_device
    from monarchify.lm.perplexity import evaluate_folder

    set_threads(threads)
    with progress_bar(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
    ) as progress:
        task = progress.add_task(f"loading {folder}", total=None)
        result = evaluate_folder(
            folder, text, bos=bos, device=resolve_device(device), window=window, stride=stride, max_tokens=max_tokens,
            batch_size=batch_size,
            on_loaded=lambda: progress.update(task, description="scoring windows"),
            on_batch=lambda done, total: progress.update(task, completed=done, total=total),
        )
    if json_out:
        print_json({"source": str(folder), "texts": [str(t) for t in text], **result.to_dict()})
        return
    overlap = f", stride {result.stride}" if result.stride != result.window else ""
    console.print(f"perplexity [bold]{result.perplexity:.3f}[/] (mean NLL {result.nll:.4f} nats) on {result.tokens:,} tokens")
    console.print(
        f"{result.windows} windows of {result.window} tokens{overlap}, {'with' if result.bos else 'no'} BOS; "
        f"{result.text_tokens:,} tokens of text; {result.seconds:.1f} s"
    )
