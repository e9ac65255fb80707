"""``monarchify densify``: multiply a Monarch folder's layers back out into a plain model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from monarchify.cli.options import ForceFlag, JsonFlag
from monarchify.cli.render import err_console, print_json, progress_bar


def densify(
    folder: Annotated[Path, typer.Argument(help="A Monarch folder (written by convert, finetune or compress).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the dense folder.")],
    force: ForceFlag = False,
    json_out: JsonFlag = False,
) -> None:
    """Turn every Monarch layer back into a dense one; the result loads with stock transformers, without monarchify.

    For runtimes that know nothing of Monarch (vLLM, ONNX export, TGI, llama.cpp converters),
    and after fine-tuning in Monarch form. Streams tensor by tensor: memory stays at about one
    layer, whatever the model's size.

    \b
    Examples:
      monarchify densify bert-monarch -o bert-dense
      monarchify densify bert-monarch -o bert-dense --json
    """
    from rich.progress import BarColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from monarchify.hf.densify import densify_folder

    with progress_bar(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), TimeRemainingColumn()) as progress:
        task = progress.add_task("densifying", total=None)

        def on_tensor(name: str, done: int, total: int) -> None:
            progress.update(task, total=total, completed=done, description=f"densifying {name}")

        result = densify_folder(folder, out, force=force, on_tensor=on_tensor)
    if json_out:
        print_json({"source": str(folder), "out": str(out), "layers": result.layers, "bytes_written": result.bytes_written})
        return
    err_console.print(
        f"densified {len(result.layers)} Monarch layers; saved [bold]{out}[/] "
        f"({result.bytes_written / 1e6:,.1f} MB of weights, loads without monarchify)"
    )
