"""``monarchify report``: what a converted checkpoint contains, read from the folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from monarchify.cli.options import JsonFlag
from monarchify.cli.render import SORT_KEYS, print_json, print_report, sort_layers
from monarchify.errors import ConfigError


def report(
    folder: Annotated[Path, typer.Argument(help="A folder written by 'monarchify convert' (or finetune).")],
    sort: Annotated[str, typer.Option(help=f"Order of layers: {', '.join(SORT_KEYS)}.")] = "model",
    json_out: JsonFlag = False,
) -> None:
    """Show the Monarch layers of a saved checkpoint: shapes, blocks, parameters, errors.

    Reads config.json, the safetensors headers and monarchify_report.json; builds no model.

    \b
    Examples:
      monarchify report minilm-monarch
      monarchify report minilm-monarch --sort error --json
    """
    if sort not in SORT_KEYS:
        raise ConfigError(f"--sort must be one of {', '.join(SORT_KEYS)}")
    from monarchify.hf.stored_report import read_report

    result = read_report(folder)
    if json_out:
        result.layers = sort_layers(result.layers, sort)
        print_json(result.to_dict())
    else:
        print_report(result, sort, title=str(folder))
