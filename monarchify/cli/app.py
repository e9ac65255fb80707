"""The ``monarchify`` application: assembles the commands, nothing else."""

from __future__ import annotations

import sys

import typer
from transformers.utils import logging as transformers_logging

from monarchify.cli import bench, convert, finetune, heal, report
from monarchify.cli.errors import run

app = typer.Typer(
    name="monarchify",
    help="Make pretrained transformers smaller and faster with Monarch matrices.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command()(convert.convert)
app.command()(report.report)
app.command()(heal.heal)
app.command()(finetune.finetune)
app.add_typer(bench.bench_app)


def main(args: list[str] | None = None) -> int:
    transformers_logging.disable_progress_bar()  # we draw our own progress
    transformers_logging.set_verbosity_error()
    return run(app, args)


if __name__ == "__main__":
    sys.exit(main())
