"""``monarchify compress --text``: the language-model recipe's front end (convert on text, heal,
measure perplexity), :mod:`monarchify.lm.compress` underneath."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from monarchify.cli.render import console, err_console, print_json, progress_bar


class _Bar:
    """A progress bar (what, done of total, elapsed, time left) started on the first update, so
    that the lines before it (loading, converting) stay readable."""

    def __init__(self) -> None:
        self.progress: Progress | None = None
        self.task: Any = None

    def show(self, description: str, done: int, total: int, first: int = 0) -> float:
        """Move the bar to ``done`` of ``total``; the seconds since it started."""
        if self.progress is None:
            self.progress = progress_bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                         TextColumn("eta"), TimeRemainingColumn())
            self.progress.start()
            self.task = self.progress.add_task(description, total=total, completed=first)
        self.progress.update(self.task, completed=done, description=description)
        return self.progress.tasks[0].elapsed or 0.0

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


class HealBar(_Bar):
    """The healing progress bar (steps, loss, elapsed, time left); ``at_start`` runs with the
    first step (the busy-machine check)."""

    def __init__(self, at_start: Callable[[], None] = lambda: None) -> None:
        super().__init__()
        self.at_start = at_start

    def __call__(self, step: int, steps: int, loss: float) -> None:
        if self.progress is None:
            self.at_start()
        elapsed = self.show(f"healing  loss {loss:.4f}", step, steps, first=step - 1)
        if not err_console.is_interactive and (step % max(1, steps // 20) == 0 or step == steps):
            # a log file gets a line now and then instead of a bar
            err_console.print(f"healing step {step}/{steps}  loss {loss:.4f}  {elapsed:.0f} s")
        if step >= steps:
            self.stop()

    def measured(self, step: int, steps: int, perplexity: float) -> None:
        when = "before healing" if step == 0 else f"after step {step}/{steps}"
        err_console.print(f"held-out perplexity {when}: {perplexity:.2f}")  # above the bar while it runs


class WriteBar(_Bar):
    """The progress of the windows the dense model writes (``--generate``): minutes of work."""

    def __call__(self, done: int, total: int) -> None:
        elapsed = self.show("writing", done, total)
        if not err_console.is_interactive:
            err_console.print(f"written {done}/{total} windows  {elapsed:.0f} s")
        if done >= total:
            self.stop()


def results_table(results: dict[str, Any]) -> Table:
    ppl, params = results["perplexity"], results["params"]
    table = Table(title=f"held-out perplexity ({results['heldout']['tokens_scored']:,} tokens, "
                        f"windows of {results['heldout']['window']})", header_style="bold")
    for column in ("model", "parameters", "perplexity", "× dense"):
        table.add_column(column, justify="right" if column != "model" else "left")
    table.add_row("dense", f"{params['dense'] / 1e6:.1f}M", f"{ppl['dense']:.2f}", "1.00")
    heal = results["heal"]
    if heal.get("steps"):
        table.add_row("converted", f"{params['compressed'] / 1e6:.1f}M", f"{ppl['converted']:.2f}", f"{ppl['converted'] / ppl['dense']:.2f}")
        table.add_row(f"healed ({heal['steps']} steps, {heal['tokens']:,} tokens)", f"{params['compressed'] / 1e6:.1f}M",
                      f"{ppl['compressed']:.2f}", f"{ppl['ratio']:.2f}")
    else:
        table.add_row("compressed (no healing)", f"{params['compressed'] / 1e6:.1f}M", f"{ppl['compressed']:.2f}", f"{ppl['ratio']:.2f}")
    return table


def run_text_compress(options: Any, *, json_out: bool, argv: list[str], busy_check: Callable[[], None] = lambda: None) -> None:
    from monarchify.cli.convert import conversion_progress
    from monarchify.cli.errors import when_interrupted
    from monarchify.cli.finetune import RichEvents
    from monarchify.lm.compress import TextCompressEvents, compress_text

    rich = RichEvents()
    bar, writing = HealBar(busy_check), WriteBar()
    events = TextCompressEvents(stage=rich.stage, done=rich.done, note=rich.note, heal_step=bar, generating=writing,
                                heal_measured=bar.measured, converting=conversion_progress)
    when_interrupted(f"interrupted; {options.stages} keeps the finished stages and the last healing state: "
                     "the same command again resumes from there")
    try:
        result = compress_text(options, events, argv=argv)
    finally:
        bar.stop()
        writing.stop()
    if json_out:
        print_json(result.results)
        return
    console.print(results_table(result.results))
    curve = result.results["heal"].get("curve") or []
    if len(curve) > 2:
        console.print("  held-out perplexity by healing tokens: " + ", ".join(f"{p['tokens']:,} {p['perplexity']:.2f}" for p in curve))
    err_console.print(f"saved [bold]{Path(options.out)}[/] (eval_results.json holds every number)")
