"""``monarchify report``: what a converted checkpoint contains, read from the folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from monarchify.cli.options import JsonFlag
from monarchify.cli.render import SORT_KEYS, console, err_console, print_json, print_report, sort_layers
from monarchify.errors import ConfigError
from monarchify.report import ConversionReport


def report(
    folder: Annotated[Path, typer.Argument(help="A folder written by 'monarchify convert' (or finetune).")],
    sort: Annotated[str, typer.Option(help=f"Order of layers: {', '.join(SORT_KEYS)}.")] = "model",
    plot: Annotated[
        Path | None,
        typer.Option("--plot", metavar="FILE", help="Also draw each layer's error and share of parameters kept, in model order (.png or .svg; needs matplotlib)."),
    ] = None,
    json_out: JsonFlag = False,
) -> None:
    """Show the Monarch layers of a saved checkpoint: shapes, blocks, parameters, errors.

    Reads config.json, the safetensors headers and monarchify_report.json; builds no model.

    \b
    Examples:
      monarchify report minilm-monarch
      monarchify report minilm-monarch --sort error --json
      monarchify report minilm-monarch --plot layers.png
    """
    if sort not in SORT_KEYS:
        raise ConfigError(f"--sort must be one of {', '.join(SORT_KEYS)}")
    if plot is not None:
        from monarchify.plots import check_picture_path, pyplot

        check_picture_path(plot)
        pyplot()  # matplotlib missing: say so before reading anything
    from monarchify.hf.stored_report import read_report

    result = read_report(folder)
    if plot is not None:
        from monarchify.plots import layers_figure, save_figure

        save_figure(layers_figure(result.layers, title=folder.name), plot)  # always model order
    if json_out:
        result.layers = sort_layers(result.layers, sort)
        print_json(result.to_dict())
    else:
        print_report(result, sort, title=str(folder))
        note = errors_note(folder, result)
        if note:
            console.print(note, style="dim", highlight=False, soft_wrap=True)
    if plot is not None:
        err_console.print(f"saved [bold]{plot}[/]")


def errors_note(folder: Path, report: ConversionReport) -> str | None:
    """Why the error column says what it says, when that is not the conversion's own report.

    The relative error compares a Monarch layer with the dense weight it was projected from,
    measured when converting and kept in ``monarchify_report.json``. ``finetune`` changes the
    weights and has no dense original for the new ones, so a fine-tuned folder has no errors,
    or (converted on the fly) only those measured before training."""
    from monarchify.glue.options import RESULTS_FILE
    from monarchify.hf.saving import REPORT_FILE

    converted = report.converted
    fine_tuned = (folder / RESULTS_FILE).is_file()
    unknown = bool(converted) and all(layer.rel_error is None for layer in converted)
    if unknown and fine_tuned:
        return ("no errors (—): they are measured when converting, against the dense weights each layer was projected "
                "from; this folder was fine-tuned (eval_results.json), and its trained weights have no dense original "
                "to compare with. The folder it was fine-tuned from has them.")
    if unknown and not (folder / REPORT_FILE).is_file():
        return f"no errors (—): this folder has no {REPORT_FILE}, where convert records them"
    if fine_tuned and converted:
        return "errors were measured at conversion, before fine-tuning changed these weights"
    return None
