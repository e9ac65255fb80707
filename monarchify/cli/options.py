"""Options shared by several commands, defined once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from monarchify.config import MonarchConfig, parse_override

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
    str,
    typer.Option(
        "--budget-objective",
        help="What --budget minimises: layers (the sum of the layers' relative output errors) or output (each "
        "layer's error weighted by how far it moves the model's output, measured on the calibration text: one "
        "forward pass per layer on 128 samples).",
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
