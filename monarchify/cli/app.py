"""The ``monarchify`` application: assembles the commands, nothing else."""

from __future__ import annotations

import os
import shutil
import sys
from typing import Annotated

import typer

from monarchify import __version__
from monarchify.cli import bench, compress, convert, densify, finetune, heal, report, train
from monarchify.cli import eval as eval_command  # not to shadow the builtin
from monarchify.cli.errors import run
from monarchify.cli.options import add_deprecated_aliases

RICH_HELP_MIN_COLUMNS = 100
"""Narrower than this, help is Click's plain two-column layout: Typer's Rich panels give every
option its own four name columns and cut long names (``--allow-structura…``) at 80 columns."""

app = typer.Typer(
    name="monarchify",
    help="Make pretrained transformers smaller and faster with Monarch matrices.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},  # inherited by every subcommand
)


def _print_version(value: bool) -> None:
    if value:
        print(f"monarchify {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", is_eager=True, callback=_print_version, help="Print the version and exit."),
    ] = False,
) -> None:
    """Make pretrained transformers smaller and faster with Monarch matrices."""


app.command()(convert.convert)
app.command()(report.report)
app.command()(densify.densify)
app.command()(heal.heal)
app.command()(finetune.finetune)
app.command()(compress.compress)
app.command()(train.train)
app.command()(train.init)
app.command("eval")(eval_command.evaluate)
app.add_typer(bench.bench_app)


def _quiet_transformers() -> None:
    """No progress bars of transformers' own (we draw ours), and errors only in its log.

    Set through the environment it reads when it loads, so that commands that never load it
    (``--help``) do not pay for importing it; directly when it is already loaded."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    if "transformers" in sys.modules:
        from transformers.utils import logging

        logging.disable_progress_bar()
        logging.set_verbosity_error()


def help_markup_mode(columns: int | None = None) -> str | None:
    """Rich help panels on a terminal at least ``RICH_HELP_MIN_COLUMNS`` wide, else Click's
    plain layout (``None``), which wraps the descriptions and never cuts an option's name.
    The width is what Rich would use: ``COLUMNS``, else the terminal's, else 80."""
    if columns is None:
        columns = shutil.get_terminal_size().columns
    return "rich" if columns >= RICH_HELP_MIN_COLUMNS else None


def main(args: list[str] | None = None) -> int:
    _quiet_transformers()
    app.rich_markup_mode = help_markup_mode()  # read when Typer builds the commands, on each call
    return run(add_deprecated_aliases(typer.main.get_command(app)), args)


if __name__ == "__main__":
    sys.exit(main())
