"""The fine-tuning progress bar: a ``TrainerCallback`` drawn with rich (its own module, because
importing ``transformers``' trainer machinery is slow and only ``finetune`` needs it)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from transformers import TrainerCallback

from monarchify.cli.render import progress_bar


class RichProgress(TrainerCallback):
    """A progress bar over optimisation steps, with the running loss and each evaluation."""

    def __init__(self, after_checkpoint: str | None = None, at_start: Callable[[], None] | None = None, *,
                 heldout: bool = False) -> None:
        """``after_checkpoint``: what Ctrl-C means once a checkpoint is saved (``{folder}`` is
        the checkpoint folder); until then the command's own message stands. ``at_start``
        runs when training begins, before the bar is drawn (the busy-machine check).

        ``heldout``: the evaluations run on text held out of the training text (``train``).
        Their only metric is a loss, which beside the training loss would read as one: they
        are labelled held-out and given their perplexity."""
        self.after_checkpoint = after_checkpoint
        self.at_start = at_start
        self.heldout = heldout
        self.progress = progress_bar(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("eta"), TimeRemainingColumn(),
        )
        self.task: Any = None
        self.loss: float | None = None

    def _describe(self, state: Any) -> str:
        epoch = f"epoch {state.epoch:.2f}" if state.epoch is not None else "training"
        return epoch + (f"  training loss {self.loss:.4f}" if self.loss is not None else "")

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            if self.at_start is not None:
                self.at_start()
            self.progress.start()
            self.task = self.progress.add_task("training", total=state.max_steps, completed=state.global_step)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.task is not None:
            self.progress.update(self.task, completed=state.global_step, description=self._describe(state))

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        if self.task is not None and logs and "loss" in logs:
            self.loss = float(logs["loss"])
            self.progress.update(self.task, description=self._describe(state))
            if not self.progress.console.is_terminal:  # a log file gets a line per logging step instead of a bar
                elapsed = self.progress.tasks[0].elapsed or 0.0
                self.progress.console.print(
                    f"step {state.global_step}/{state.max_steps}  {self._describe(state)}  "
                    f"lr {logs.get('learning_rate', 0.0):.3g}  {elapsed:.0f} s"
                )

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.after_checkpoint is not None:
            from monarchify.cli.errors import when_interrupted

            when_interrupted(self.after_checkpoint.format(folder=args.output_dir))

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict[str, float] | None = None, **kwargs: Any) -> None:
        if self.task is None or not metrics:
            return
        shown = ", ".join(
            f"{k.split('_', 1)[1]} {v:.4f}" for k, v in metrics.items()
            if isinstance(v, float) and not k.endswith(("runtime", "per_second", "epoch"))
        )
        if self.heldout and isinstance(metrics.get("eval_loss"), float):
            from monarchify.lm.options import perplexity

            loss = metrics["eval_loss"]
            self.progress.console.print(
                f"step {state.global_step}/{state.max_steps}  held-out evaluation: loss {loss:.4f}, perplexity {perplexity(loss):.2f}"
            )
            return
        epoch = f"epoch {state.epoch:.2f}" if state.epoch is not None else "eval"
        self.progress.console.print(f"{epoch} evaluation: {shown}")

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.task is not None:
            self.progress.stop()
            self.task = None
