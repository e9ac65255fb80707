"""``monarchify convert``: project a pretrained checkpoint's linear layers onto Monarch."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated, Any

import typer

from monarchify.cli.options import (
    AllowZeros, BudgetObjective, BudgetSolver, Exclude, ForceFlag, Include, JsonFlag, NBlocks, OutDir, OutputOrder, Override, Structure, Threads,
    build_config, set_threads,
)
from monarchify.cli.render import SORT_KEYS, err_console, print_json, print_report, progress_bar
from monarchify.config import (
    DEFAULT_CALIBRATION_SAMPLES, DEFAULT_SPEED_TOKENS, DEFAULT_SWEEPS, CalibrationConfig, SpeedGateConfig, parse_ranks,
)
from monarchify.errors import ConfigError

if TYPE_CHECKING:
    from rich.progress import Progress


def _events(progress: Progress):
    """The pipeline's progress hooks drawn as one transient line on stderr, so ``--json`` on
    stdout stays clean and a failure leaves only its ``Error:`` line behind."""
    from monarchify.hf.convert import ConvertEvents

    class RichEvents(ConvertEvents):
        def __init__(self) -> None:
            self.task = progress.add_task("starting", total=None)

        def loading(self, source: str) -> None:
            progress.update(self.task, description=f"loading {source}")

        def observing(self, samples: int) -> None:
            progress.update(self.task, description=f"calibrating on {samples} samples")

        def projecting(self, total: int) -> None:
            progress.update(self.task, description="projecting", total=total, completed=0)

        def projected(self, name: str) -> None:
            progress.update(self.task, advance=1, description=f"projecting {name}")

        def saving(self, out: str) -> None:
            progress.update(self.task, description=f"saving {out}")

        def streaming(self, total_bytes: int, done_bytes: int) -> None:  # counted in MB of source tensors
            progress.update(self.task, description="streaming (MB)", total=round(total_bytes / 1e6), completed=round(done_bytes / 1e6))

        def streamed(self, name: str, nbytes: int) -> None:
            progress.update(self.task, advance=nbytes / 1e6, description=f"streaming (MB) {name}")

        def calibrating(self, block: int, blocks: int) -> None:
            progress.update(self.task, description=f"calibrating block {block + 1}/{blocks}")

        def note(self, text: str) -> None:
            progress.console.print(f"[yellow]note:[/] {text}")

    return RichEvents()


@contextmanager
def conversion_progress() -> Iterator[Any]:
    """A conversion's progress line on stderr while the block runs, and its event hooks."""
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    with progress_bar(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
    ) as progress:
        yield _events(progress)


def convert(
    model: Annotated[str, typer.Argument(help="A local model folder or a Hugging Face Hub id (needs network).")],
    out: OutDir = None,
    nblocks: NBlocks = 4,
    include: Include = None,
    exclude: Exclude = None,
    override: Override = None,
    allow_structural_zeros: AllowZeros = False,
    output_order: OutputOrder = "blocked",
    structure: Structure = "monarch",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan (layers, shapes, parameters) and write nothing.")] = False,
    check: Annotated[bool, typer.Option(help="Compare dense and converted outputs on sample sentences.")] = True,
    force: ForceFlag = False,
    only_if_faster: Annotated[bool, typer.Option("--only-if-faster", help="Time every selected layer on this device (dense vs Monarch, forward and forward+backward) and keep it dense unless Monarch wins both.")] = False,
    tokens: Annotated[int | None, typer.Option("--tokens", help=f"Rows per timed call for --only-if-faster (default {DEFAULT_SPEED_TOKENS}).")] = None,
    text: Annotated[str | None, typer.Option("--text", metavar="DATA", help="Calibration text, for activation-aware projection: minimise each layer's output error on its samples (a text file with one per line, a GLUE .tsv, a saved datasets folder or hf:NAME[:CONFIG[:SPLIT]]).")] = None,
    calibration_samples: Annotated[int | None, typer.Option("--calibration-samples", metavar="N", help=f"Samples fitted with --text (default {DEFAULT_CALIBRATION_SAMPLES}); a quarter more are held out to measure the output error.")] = None,
    refine_sweeps: Annotated[int | None, typer.Option("--refine-sweeps", metavar="N", help=f"With --text: sweeps of full-covariance refinement after the closed-form whitened projection (default {DEFAULT_SWEEPS}; 0: closed form only).")] = None,
    sequential: Annotated[bool, typer.Option("--sequential", help="With --text: fit each transformer block on the inputs the already converted blocks before it produce, to reproduce the dense block's outputs (slower; not with --budget; worse perplexity on SmolLM2-135M, see docs/accuracy.md).")] = False,
    budget: Annotated[float | None, typer.Option("--budget", metavar="FRACTION", help="Choose every layer's block count (or keep it dense) to minimise the total error within this fraction of the selected layers' dense parameters; --override pins layers, --nblocks is ignored.")] = None,
    budget_dense: Annotated[bool, typer.Option("--budget-dense/--no-budget-dense", help="Whether --budget may keep a layer dense (error 0, full price).")] = True,
    budget_ranks: Annotated[str | None, typer.Option("--budget-ranks", metavar="K,K,...", help="Monarch plus low rank: --budget may also give a layer a rank-K term (K·(d_in+d_out) parameters, fitted to what Monarch misses) next to its blocks, e.g. 8,16,32. With --structure lowrank: the ranks --budget chooses among (default: those matching each block count).")] = None,
    budget_objective: BudgetObjective = "layers",
    budget_solver: BudgetSolver = "exact",
    stream: Annotated[bool | None, typer.Option("--stream/--no-stream", help="Convert tensor by tensor without loading the model (local safetensors folders; --text runs one block at a time; no budget or speed gate; no functional check). Default: stream folders over 2 GB of weights when the recipe allows.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted streaming conversion into the same --out, keeping its finished shards (implies --stream).")] = False,
    device: Annotated[str, typer.Option("--device", help="Where a streaming conversion projects (and runs --text's blocks): cpu or cuda (cuda implies --stream).")] = "cpu",
    sort: Annotated[str, typer.Option(help=f"Table order: {', '.join(SORT_KEYS)}.")] = "model",
    threads: Threads = None,
    json_out: JsonFlag = False,
) -> None:
    """Replace a checkpoint's linear layers with their optimal Monarch projection and save it.

    \b
    Examples:
      monarchify convert ./bert-folder --nblocks 4 --out bert-monarch
      monarchify convert bert-base-uncased -b 4 --override 'intermediate\\.dense=8' -o out
      monarchify convert gpt2 --include 'mlp\\..*' --dry-run
      monarchify convert ./bert-folder -b 4 --only-if-faster --tokens 4096 -o out
      monarchify convert ./bert-folder -b 4 --text glue/MRPC/train.tsv -o out
      monarchify convert ./llama-folder -b 4 --text wiki.txt --sequential -o out
      monarchify convert ./bert-folder --budget 0.4 --text sentences.txt -o out
      monarchify convert ./bert-folder --budget 0.4 --budget-ranks 8,16,32 --text sentences.txt -o out
      monarchify convert ./bert-folder --structure lowrank -b 4 --text sentences.txt -o out
    """
    if sort not in SORT_KEYS:
        raise ConfigError(f"--sort must be one of {', '.join(SORT_KEYS)}")
    set_threads(threads)
    if out is None and not dry_run:
        raise ConfigError("missing --out FOLDER (or use --dry-run to only see the plan)")
    if budget is None and not budget_dense:
        raise ConfigError("--no-budget-dense needs --budget FRACTION")
    if budget is None and budget_ranks is not None:
        raise ConfigError("--budget-ranks needs --budget FRACTION")
    if budget_objective != "layers" and budget is None:
        raise ConfigError(f"--budget-objective {budget_objective} needs --budget FRACTION")
    if budget_solver != "exact" and budget is None:
        raise ConfigError(f"--budget-solver {budget_solver} needs --budget FRACTION")
    if budget_objective in ("output", "fisher") and text is None:
        raise ConfigError(f"--budget-objective {budget_objective} needs --text DATA (it measures the model's output on it)")
    if text is None and (calibration_samples is not None or refine_sweeps is not None or sequential):
        raise ConfigError("--calibration-samples, --refine-sweeps and --sequential need --text DATA")
    if sequential and budget is not None:
        raise ConfigError("--sequential calibrates one block after another and --budget compares every layer before "
                          "choosing: use one or the other")
    if structure == "lowrank" and only_if_faster:
        raise ConfigError("--only-if-faster times Monarch layers; it does not apply to --structure lowrank")
    if tokens is not None and not only_if_faster:
        raise ConfigError("--tokens sets the timing of --only-if-faster; add that flag or drop --tokens")
    config = build_config(
        nblocks, include, exclude, override, allow_structural_zeros,
        budget=budget, budget_keep_dense=budget_dense, output_order=output_order, structure=structure,
        budget_ranks=parse_ranks(budget_ranks) if budget_ranks is not None else [], budget_objective=budget_objective,
        budget_solver=budget_solver,
        calibration=CalibrationConfig(
            samples=DEFAULT_CALIBRATION_SAMPLES if calibration_samples is None else calibration_samples,
            sweeps=DEFAULT_SWEEPS if refine_sweeps is None else refine_sweeps,
            sequential=sequential,
        ) if text is not None else None,
        speed_gate=SpeedGateConfig(tokens=DEFAULT_SPEED_TOKENS if tokens is None else tokens) if only_if_faster else None,
    )
    if resume and stream is False:
        raise ConfigError("--resume continues a streaming conversion; drop --no-stream")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ConfigError(f"--device must be cpu or cuda, got {device!r}")
    from monarchify.hf.convert import convert_pretrained

    with conversion_progress() as events:
        result = convert_pretrained(model, out, config, calibration_data=text, force=force, dry=dry_run,
                                    check=check, events=events, stream=stream, resume=resume, device=device)
    if json_out:
        print_json(result.report.to_dict())
        return
    title = "plan (dry run, nothing written)" if dry_run else f"converted {model}"
    print_report(result.report, sort, title)
    if not dry_run:
        err_console.print(f"saved [bold]{out}[/]")
