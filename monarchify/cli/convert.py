"""``monarchify convert``: project a pretrained checkpoint's linear layers onto Monarch."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from monarchify.cli.options import AllowZeros, Exclude, ForceFlag, Include, JsonFlag, NBlocks, OutDir, Override, build_config
from monarchify.cli.render import SORT_KEYS, err_console, print_json, print_report
from monarchify.errors import ConfigError
from monarchify.hf.convert import ConvertEvents, convert_pretrained


class RichEvents(ConvertEvents):
    """One transient progress line on stderr, so ``--json`` on stdout stays clean and a
    failure leaves only its ``Error:`` line behind."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.task = progress.add_task("starting", total=None)

    def loading(self, source: str) -> None:
        self.progress.update(self.task, description=f"loading {source}")

    def projecting(self, total: int) -> None:
        self.progress.update(self.task, description="projecting", total=total, completed=0)

    def projected(self, name: str) -> None:
        self.progress.update(self.task, advance=1, description=f"projecting {name}")

    def saving(self, out: str) -> None:
        self.progress.update(self.task, description=f"saving {out}")


def convert(
    model: Annotated[str, typer.Argument(help="A local model folder or a Hugging Face Hub id (needs network).")],
    out: OutDir = None,
    nblocks: NBlocks = 4,
    include: Include = None,
    exclude: Exclude = None,
    override: Override = None,
    allow_structural_zeros: AllowZeros = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan (layers, shapes, parameters) and write nothing.")] = False,
    check: Annotated[bool, typer.Option(help="Compare dense and converted outputs on sample sentences.")] = True,
    force: ForceFlag = False,
    sort: Annotated[str, typer.Option(help=f"Table order: {', '.join(SORT_KEYS)}.")] = "model",
    json_out: JsonFlag = False,
) -> None:
    """Replace a checkpoint's linear layers with their optimal Monarch projection and save it.

    \b
    Examples:
      monarchify convert ./bert-folder --nblocks 4 --out bert-monarch
      monarchify convert bert-base-uncased -b 4 --override 'attention\\..*=2' -o out
      monarchify convert gpt2 --include 'mlp\\..*' --dry-run
    """
    if sort not in SORT_KEYS:
        raise ConfigError(f"--sort must be one of {', '.join(SORT_KEYS)}")
    if out is None and not dry_run:
        raise ConfigError("missing --out FOLDER (or use --dry-run to only see the plan)")
    config = build_config(nblocks, include, exclude, override, allow_structural_zeros)
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=err_console, transient=True,
    ) as progress:
        result = convert_pretrained(model, out, config, force=force, dry=dry_run, check=check, events=RichEvents(progress))
    if json_out:
        print_json(result.report.to_dict())
        return
    title = "plan (dry run, nothing written)" if dry_run else f"converted {model}"
    print_report(result.report, sort, title)
    if not dry_run:
        err_console.print(f"saved [bold]{out}[/]")
