"""Rich tables for people, JSON for programs."""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console
from rich.table import Table

from monarchify.distributed import is_main
from monarchify.report import CHANGED_A_LITTLE, NEARLY_UNCHANGED, ConversionReport, LayerReport, natural_key, output_change

# Under torchrun every process runs the command: only the main one prints (the others would
# repeat each line, and their progress bars would overwrite each other).
console = Console(quiet=not is_main())
if not console.is_terminal:  # piped or captured: wide enough that layer names are not folded
    console.width = max(console.width, 140)
err_console = Console(stderr=True, quiet=not is_main())

SORT_KEYS = ("model", "name", "error")


def progress_bar(*columns: Any) -> Any:
    """A transient progress bar on stderr, drawn only where someone watches it live.

    Why not on a pipe or a log file: a transient bar shows nothing there, yet rich ends it with
    an empty line, so the output (an ``Error:`` line above all) would start with a blank one.
    Imported late: rich's progress module is not needed by ``--help``."""
    from rich.progress import Progress

    return Progress(*columns, console=err_console, transient=True, disable=not err_console.is_interactive)


def print_json(data: Any) -> None:
    if not is_main():  # under torchrun, one copy of the answer
        return
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


def sort_layers(layers: list[LayerReport], key: str) -> list[LayerReport]:
    if key == "name":
        return sorted(layers, key=lambda layer: natural_key(layer.name))
    if key == "error":
        return sorted(layers, key=lambda layer: -1.0 if layer.rel_error is None else layer.rel_error, reverse=True)
    return list(layers)


def _count(n: int) -> str:
    if n >= 1_000_000:
        return f"{n / 1e6:.2f}M"
    if n >= 10_000:
        return f"{n / 1e3:.1f}K"
    return str(n)


def _err(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def report_table(report: ConversionReport, sort: str = "model", title: str | None = None) -> Table:
    has_output_err = any("output_rel_error" in layer.extra for layer in report.layers)
    table = Table(title=title, show_footer=True, header_style="bold")
    totals = report.totals()
    kept = f" ({totals['kept_dense']} dense)" if totals["kept_dense"] else ""
    table.add_column("layer", footer=f"{totals['selected_layers']} layers{kept}")
    table.add_column("shape (in→out)", justify="right")
    table.add_column("blocks", justify="right")
    lowrank = any(layer.structure == "lowrank" for layer in report.layers)  # the baseline structure
    table.add_column(f"params dense → {'low rank' if lowrank else 'monarch'}", justify="right",
                     footer=f"{_count(totals['selected_params_dense'])} → {_count(totals['selected_params_after'])}")
    ratio = totals["selected_params_ratio"]
    table.add_column("kept", justify="right", footer="—" if ratio is None else f"{ratio:.0%}")
    table.add_column("rel. error", justify="right", footer=f"mean {_err(totals['mean_rel_error'])}")
    if has_output_err:
        table.add_column("output error", justify="right")
    has_plain_err = any("output_rel_error_plain" in layer.extra for layer in report.layers)
    if has_plain_err:  # calibrated: the plain projection's output error, for comparison
        table.add_column("plain proj. output error", justify="right")
    for layer in sort_layers(report.layers, sort):
        d_out, d_in = layer.shape
        shape = f"{d_in}→{d_out}" + (" (padded)" if layer.padded else "")
        if layer.kept_dense:
            row = [layer.name, shape, "dense", _count(layer.params_dense), "100%", layer.reason or "kept dense"]
        else:
            row = [
                layer.name,
                shape,
                f"rank {layer.rank}" if layer.structure == "lowrank"
                else str(layer.nblocks) + (f"+r{layer.rank}" if layer.rank else ""),  # Monarch plus low rank
                f"{_count(layer.params_dense)} → {_count(layer.params_monarch)}",
                f"{layer.params_monarch / layer.params_dense:.0%}",
                _err(layer.rel_error),
            ]
        if has_output_err:
            row.append(_err(layer.extra.get("output_rel_error")))
        if has_plain_err:
            row.append(_err(layer.extra.get("output_rel_error_plain")))
        table.add_row(*row)
    return table


def print_report(report: ConversionReport, sort: str = "model", title: str | None = None) -> None:
    console.print(report_table(report, sort, title))
    for line in summary_lines(report):
        console.print(line, markup=False)
    print_budget_warning(report)


def summary_lines(report: ConversionReport) -> list[str]:
    """What a conversion did, below its table: model parameters, the selected layers' totals,
    calibration, budget and healing, and the functional check. ``compress`` prints the same
    after its conversion stage (with :func:`blocks_line`, standing in for the table)."""
    totals = report.totals()
    return [
        f"model parameters: {_count(totals['model_params_before'])} → {_count(totals['model_params'])}"
        f" ({totals['model_params'] / max(totals['model_params_before'], 1):.0%})",
        *totals_lines(totals),
        *accuracy_lever_lines(report),
        *functional_check_lines(report.functional_check),
    ]


def blocks_line(report: ConversionReport) -> str:
    """How many layers got each block count (with its low-rank term) and how many stayed
    dense: a budget's choice in one line."""
    counts: dict[tuple[int, int], int] = {}
    for layer in report.layers:
        key = (0, 0) if layer.kept_dense else (layer.nblocks, layer.rank)
        counts[key] = counts.get(key, 0) + 1
    parts = [f"{b} blocks" + (f" + rank {r}" if r else "") + f" ×{n}" for (b, r), n in sorted(counts.items()) if b]
    if (0, 0) in counts:
        parts.append(f"kept dense ×{counts[(0, 0)]}")
    return f"blocks chosen for {len(report.layers)} layers: " + (", ".join(parts) or "none")


def functional_check_lines(check: dict[str, Any] | None) -> list[str]:
    if check and check.get("skipped"):
        return [f"functional check skipped: {check['skipped']}"]
    if not check:
        return []
    inputs = "sample sentences" if check.get("inputs", "tokenizer") == "tokenizer" else "random token sequences"
    return [
        f"functional check on {check['sentences']} {inputs}: output relative difference "
        f"{check['rel_diff']:.3f}, cosine {check['cosine']:.3f}, max abs {check['max_abs_diff']:.3g}",
        output_verdict(check["cosine"]),
    ]


def _share(after: int, dense: int) -> str:
    return f"{_count(dense)} → {_count(after)} ({after / dense:.1%})" if dense else "none"


def totals_lines(totals: dict[str, Any]) -> list[str]:
    """Parameters and FLOPs per token of the selected layers, and, when some were kept dense,
    of the converted ones alone: with layers kept dense the two differ (a 37.6 % budget is
    12 % on the converted layers), and either alone misleads."""
    if not totals["selected_params_dense"]:
        return []
    if not totals["kept_dense"]:
        return [f"FLOPs per token in these layers: {_share(totals['selected_flops_after'], totals['selected_flops_dense'])}"]
    return [
        f"selected layers ({totals['selected_layers']}, {totals['kept_dense']} kept dense): parameters "
        f"{_share(totals['selected_params_after'], totals['selected_params_dense'])}, FLOPs per token "
        f"{_share(totals['selected_flops_after'], totals['selected_flops_dense'])}",
        f"converted layers only ({totals['layers']}): parameters {_share(totals['params_monarch'], totals['params_dense'])}, "
        f"FLOPs per token {_share(totals['flops_monarch'], totals['flops_dense'])}",
    ]


UNCALIBRATED_BUDGET = (
    "--budget without --text weighs every layer by its weight error alone, which says little about the "
    "model's outputs (on MiniLM at 0.376 the outputs changed more than with 4 blocks everywhere: relative "
    "difference 1.03 against 0.96); add --text DATA (text like the task's) so the budget weighs what "
    "each layer does to them"
)


def budget_warning(report: ConversionReport) -> str | None:
    """The warning for a budget chosen without calibration data, else ``None``."""
    budget = report.meta.get("budget")
    calibrated = bool(report.meta.get("calibration")) or bool((report.meta.get("recipe") or {}).get("calibration"))
    return UNCALIBRATED_BUDGET if budget and not calibrated else None


OUTPUT_CHANGE_ADVICE = "fine-tune it (monarchify finetune / compress), or use fewer blocks, --text or a larger --budget"


def output_verdict(cosine: float) -> str:
    """The functional check in words, with what to do when the outputs changed a lot."""
    verdict = output_change(cosine)
    line = f"the model's outputs are {verdict} (cosine {cosine:.3f}; >= {NEARLY_UNCHANGED} nearly unchanged, >= {CHANGED_A_LITTLE} a little)"
    return f"{line}: {OUTPUT_CHANGE_ADVICE}" if verdict == "changed a lot" else line


def accuracy_lever_lines(report: ConversionReport) -> list[str]:
    """One line each for calibration, the parameter budget and healing, when they were used."""
    lines = []
    calib = report.meta.get("calibration") or {}
    if "mean_output_rel_error" in calib:
        lines.append(
            f"calibrated on {calib.get('samples')} samples of {calib.get('source')} ({calib.get('method')}): "
            f"mean output error on {calib.get('heldout')} held-out samples {calib['mean_output_rel_error']:.3f} "
            f"(plain projection {calib['mean_output_rel_error_plain']:.3f})"
        )
    budget = report.meta.get("budget")
    if budget:
        kept = len(budget.get("kept_dense", []))
        line = (
            f"budget {budget['fraction']:g}: {budget['params_used'] / budget['params_dense']:.1%} of the selected layers' "
            f"parameters{f', {kept} kept dense' if kept else ''}; total {budget['error_kind']} error {budget['total_error']:.3f}"
        )
        closest = min(budget.get("uniform", {}).items(), default=None,  # ties as BudgetPlan.compare_uniform breaks them
                      key=lambda item: (abs(item[1]["params"] - budget["params_used"]), int(item[0])))
        if closest:
            line += f" (uniform {closest[0]} blocks: {closest[1]['fraction']:.1%}, error {closest[1]['error']:.3f})"
        lines.append(line)
        if budget.get("moved"):
            lines.append(moved_line(budget["moved"]))
    heal = report.meta.get("heal")
    if heal:
        lines.append(
            f"healed {heal['steps']} steps towards {heal['teacher']} on {heal['data']['samples']} samples of "
            f"{heal['data']['source']}: held-out hidden-state error {heal['heldout_hidden_error_before']:.4f} → "
            f"{heal['heldout_hidden_error_after']:.4f}"
        )
    return lines


def moved_line(moved: dict[str, dict[str, Any]], names: int = 2) -> str:
    """What the budget changed against the nearest uniform plan, grouped by what the layers
    became: how many, the parameters they took (+) or gave up (-) and the error that bought or
    cost, with the first ``names`` of each group. The groups that took parameters come first:
    they are why the others gave some up."""
    uniform = next(iter(moved.values()))["uniform_nblocks"]
    groups: dict[tuple[int, int], list[str]] = {}
    for name, move in moved.items():
        groups.setdefault((move["nblocks"] or 0, move["rank"]), []).append(name)

    def label(key: tuple[int, int]) -> str:
        nblocks, rank = key
        return "kept dense" if not nblocks else f"at {nblocks} blocks" + (f" + rank {rank}" if rank else "")

    parts = []
    for key, members in sorted(groups.items(), key=lambda item: -sum(moved[n]["params_change"] for n in item[1])):
        params = sum(moved[n]["params_change"] for n in members)
        error = sum(moved[n]["error"] - moved[n]["uniform_error"] for n in members)
        shown = ", ".join(sorted(members, key=natural_key)[:names]) + (", ..." if len(members) > names else "")
        parts.append(f"{len(members)} {label(key)} ({'+' if params >= 0 else '-'}{_count(abs(params))} params, "
                     f"error {error:+.3f}: {shown})")
    return (f"against uniform {uniform} blocks the budget changed {len(moved)} layers: " + "; ".join(parts)
            + " (every layer: monarchify_report.json, budget.moved)")


def print_budget_warning(report: ConversionReport) -> None:
    warning = budget_warning(report)
    if warning:
        err_console.print(f"[yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)
