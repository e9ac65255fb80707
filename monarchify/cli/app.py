"""The ``monarchify`` application: assembles the commands, nothing else."""

from __future__ import annotations

import os
import sys

import typer

from monarchify.cli import bench, compress, convert, finetune, heal, report
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
app.command()(compress.compress)
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


def main(args: list[str] | None = None) -> int:
    _quiet_transformers()
    return run(app, args)


if __name__ == "__main__":
    sys.exit(main())
