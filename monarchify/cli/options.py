"""Options shared by several commands, defined once, and applying the ones that act on the process
(``--threads``)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from monarchify.config import MonarchConfig, parse_override
from monarchify.errors import ConfigError

JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON for programs instead of tables.")]
ForceFlag = Annotated[bool, typer.Option("--force", help="Replace the output folder if it exists and is not empty.")]
NBlocks = Annotated[
    int,
    typer.Option("--nblocks", "-b", help="Blocks per Monarch layer: a square layer keeps 2/b of its weights (4 keeps 50%, 8 keeps 25%; 2 keeps 100% and saves nothing)."),
]
Include = Annotated[
    list[str] | None,
    typer.Option(
        "--include",
        help="Regex of module names to convert (repeatable). Matches whole trailing name components, "
        "e.g. 'query', 'attention\\..*', 'layer\\.[0-5]\\..*'. Default: every linear layer inside the repeated blocks.",
    ),
]
Exclude = Annotated[list[str] | None, typer.Option("--exclude", help="Regex of module names to keep dense (repeatable).")]
Override = Annotated[
    list[str] | None,
    typer.Option("--override", help="REGEX=NBLOCKS: another block count for matching layers (repeatable; last wins)."),
]
AllowZeros = Annotated[
    bool,
    typer.Option(
        "--allow-structural-zeros",
        help="Accept nblocks² > min(d_in, d_out), where some blocks of the matrix are forced to zero.",
    ),
]
OutputOrder = Annotated[
    str,
    typer.Option(
        "--output-order",
        help="How each Monarch layer orders its outputs: blocked (contiguous blocks, no copy: faster) or "
        "interleaved (the paper's permutation). Same parameters, the same error on real weights, and a budget "
        "picks the same block counts for both.",
    ),
]
BudgetObjective = Annotated[
    str | None,
    typer.Option(
        "--budget-objective",
        help="What --budget minimises: layers (the sum of the layers' relative output errors), even (the sum of "
        "their squares: spreads the errors, no layer compressed far harder than the rest) or output (each "
        "layer's error weighted by how far it moves the model's output, measured on the calibration text: one "
        "forward pass per layer on 128 samples) or fisher (every layer's error in the model's own loss: each output "
        "weighted by the gradient the model's output distribution puts on it, one forward and backward pass on 64 "
        "samples; the sum is the estimated divergence from the dense model), or kinds (compress --text only: each kind "
        "of layer, e.g. every mlp.up_proj, converted alone at 2, 3 and 4 blocks and the model scored on held-out "
        "text; the kinds then take the counts whose summed loss is least). Default: layers; compress --task "
        "uses fisher for plain Monarch layers.",
    ),
]
BudgetSolver = Annotated[
    str,
    typer.Option(
        "--budget-solver",
        help="How --budget picks its plan: exact (the least summed error that fits; a budget a few thousand "
        "parameters larger can reshuffle many layers) or nested (layers move up their error-per-parameter curves "
        "in one order while steps fit: nearby budgets give nearby plans, for a fraction of a percent more error).",
    ),
]
Structure = Annotated[
    str,
    typer.Option(
        "--structure",
        help="What converted layers become: monarch, or lowrank, the baseline to compare Monarch against: U·V "
        "alone (a truncated SVD, whitened when calibrating), at the rank whose parameters match the block "
        "count's (never more); a budget chooses ranks instead of block counts.",
    ),
]
OutDir = Annotated[Path, typer.Option("--out", "-o", help="Output folder (written atomically).")]
Threads = Annotated[
    int | None,
    typer.Option(
        "--threads",
        metavar="N",
        help="CPU threads for torch (default: torch's own choice, usually one per core). A warning says when other "
        "work keeps the machine busy; fewer threads are then often many times faster.",
    ),
]


MODEL = None
"""In :data:`DEPRECATED`: the old flag now is the command's first argument, ``MODEL``."""

DEPRECATED: dict[str, dict[str, str | None]] = {
    "convert": {"--calibrate": "--text"},
    "heal": {"--data": "--text", "--samples": "--max-train-samples", "--steps": "--max-steps", "--eval-every": "--eval-steps"},
    "finetune": {"--model": MODEL, "-m": MODEL, "--distill-from": "--teacher", "--warmup": "--warmup-steps"},
    "compress": {"--model": MODEL, "-m": MODEL, "--eval-every": "--eval-steps", "--save-every": "--save-steps"},
    "train": {"-t": "--text", "--block-size": "--max-length", "--warmup": "--warmup-steps"},
    "eval": {"--window": "--max-length"},
    "bench model": {"--batch": "--batch-size", "--gen-batch": "--gen-batch-size"},
}
"""Old spellings that still work for one release, per command: ``{old: new}`` (docs/cli.md's
vocabulary table has the words). They are hidden (no help lists them) and each use prints one
``warning:`` line naming the new spelling. Rewritten before Click parses, so a command sees
only its own options, and an old spelling that is another command's current one (``--warmup``,
untimed calls in ``bench``) means what it means there."""


def replace_deprecated(args: list[str], aliases: dict[str, str | None], command: str) -> list[str]:
    """``args`` with every old spelling of ``aliases`` replaced by the new one (``--old=V`` and
    ``-oV`` included; nothing after ``--``), warning once per old spelling used."""
    out: list[str] = []
    warned: set[str] = set()
    for index, arg in enumerate(args):
        if arg == "--":
            out += args[index:]
            break
        old, value = arg, None
        if arg.startswith("--") and "=" in arg:
            old, value = arg.split("=", 1)
        elif len(arg) > 2 and arg[0] == "-" and arg[1] != "-" and arg[:2] in aliases:
            old, value = arg[:2], arg[2:]
        if old not in aliases:
            out.append(arg)
            continue
        new = aliases[old]
        if old not in warned:
            warned.add(old)
            _warn_deprecated(old, f"give the model as the first argument: monarchify {command} MODEL ..." if new is MODEL
                             else f"use {new}")
        if new is MODEL:
            out += [] if value is None else [value]  # the value that follows becomes the argument
        else:
            out.append(new if value is None else f"{new}={value}")
    return out


def _warn_deprecated(old: str, instead: str) -> None:
    from monarchify.distributed import is_main

    if is_main():
        print(f"warning: {old} is deprecated and will be removed in the next release; {instead}", file=sys.stderr)


def add_deprecated_aliases(group: Any, path: tuple[str, ...] = ()) -> Any:
    """Make the old spellings of :data:`DEPRECATED` work in ``group``'s commands (a Click group
    as Typer builds it), by rewriting each command's own arguments before it parses them."""
    for name, command in group.commands.items():
        if hasattr(command, "commands"):
            add_deprecated_aliases(command, (*path, name))
            continue
        where = " ".join((*path, name))
        aliases = DEPRECATED.get(where)
        if aliases:
            parse = command.parse_args
            command.parse_args = lambda ctx, args, parse=parse, aliases=aliases, where=where: parse(
                ctx, replace_deprecated(args, aliases, where))
    return group


def build_config(
    nblocks: int,
    include: list[str] | None,
    exclude: list[str] | None,
    override: list[str] | None,
    allow_structural_zeros: bool,
    **recipe: Any,
) -> MonarchConfig:
    """The recipe the layer-selection flags describe; ``recipe`` adds the other fields."""
    return MonarchConfig(
        nblocks=nblocks,
        include=include or [],
        exclude=exclude or [],
        overrides=dict(parse_override(text) for text in override or []),
        allow_structural_zeros=allow_structural_zeros,
        **recipe,
    )


def set_threads(threads: int | None) -> int:
    """Apply ``--threads`` (``None``: leave torch's default) and return the count torch now
    uses: what the busy check and the results record."""
    if threads is not None and threads < 1:
        raise ConfigError("--threads must be >= 1")
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def warn_if_busy(load: float | None, threads: int, consequence: str) -> None:
    """One line on stderr when other work is running (:func:`monarchify.bench.is_busy`: the
    load average is above what ``threads`` account for). It matters more than a fair share
    of the cores: torch's threads wait for each other at every operation, so one of them
    held up by other work holds up all of them."""
    from monarchify.bench import is_busy, plural
    from monarchify.cli.render import err_console

    if is_busy(load, threads):
        err_console.print(
            f"warning: load average {load:.2f} with {plural(threads, 'thread')}: other work is running on this "
            f"machine, so {consequence}",
            markup=False, highlight=False, soft_wrap=True,
        )


def threads_for_training(threads: int | None, *, on_gpu: bool | None = None) -> Callable[[], None]:
    """Apply ``--threads`` for a training command now, and return the busy check to run once
    training starts (later calls do nothing): after the command's own checks, so a refused
    command still prints its one ``Error:`` line alone, and before the long part, not after it.
    ``on_gpu`` (default: whether CUDA is there, which is where Trainer runs): a busy CPU does
    not slow GPU training down that way, so no warning then."""
    count = set_threads(threads)
    checked: list[bool] = []

    def check() -> None:
        if checked:
            return
        checked.append(True)
        import torch

        from monarchify.bench import load_average

        if on_gpu if on_gpu is not None else torch.cuda.is_available():
            return
        fewer = " (try fewer --threads, e.g. --threads 1)" if count > 1 else ""
        warn_if_busy(load_average(), count, f"training may run many times slower than on an idle machine{fewer}")

    return check
