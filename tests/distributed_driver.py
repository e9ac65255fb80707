"""Run several monarchify commands one after the other in each process of one ``torchrun``
launch (``tests/test_distributed.py``): starting the processes and importing transformers
costs far more than these tiny runs, so one launch serves every command.

``python -m torch.distributed.run --standalone --nproc-per-node N tests/distributed_driver.py PLAN``
where ``PLAN`` is a JSON list of ``{"name", "args", "stop"}``: each command runs through the
real command line (``monarchify.cli.app.main``); its stdout and stderr in this process go to
``<folder of PLAN>/<name>.rank<R>.out`` / ``.err``, its exit code to ``<name>.rank<R>.rc``.
``stop``: ``{"train": k}`` stops Trainer after step k (as a stopped run would), ``{"heal": k}``
interrupts healing after step k (Ctrl-C reaches every process of a launch). ``env``: environment
variables set for that command only (``ACCELERATE_USE_FSDP``). ``shards``: true to write, for a
sharded healing run, each parameter's shape in this process and whole
(``<name>.rank<R>.shards.json``), the evidence that it was sharded.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path


@contextlib.contextmanager
def stopping(stop: dict | None):
    if not stop:
        yield
        return
    import monarchify.heal
    from monarchify.cli import training_progress

    saved_heal, saved_step_end = monarchify.heal.heal_, training_progress.RichProgress.on_step_end
    if "heal" in stop:
        def heal_(*args, progress=None, **kwargs):
            def interrupting(step, loss):
                if progress is not None:
                    progress(step, loss)
                if step >= stop["heal"]:
                    raise KeyboardInterrupt
            return saved_heal(*args, progress=interrupting, **kwargs)

        monarchify.heal.heal_ = heal_
    if "train" in stop:
        def on_step_end(self, args, state, control, **kwargs):
            saved_step_end(self, args, state, control, **kwargs)
            if state.global_step >= stop["train"]:
                control.should_training_stop = True

        training_progress.RichProgress.on_step_end = on_step_end
    try:
        yield
    finally:
        monarchify.heal.heal_, training_progress.RichProgress.on_step_end = saved_heal, saved_step_end


@contextlib.contextmanager
def environment(values: dict | None):
    saved = {key: os.environ.get(key) for key in values or {}}
    os.environ.update({key: str(value) for key, value in (values or {}).items()})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def recording_shards(path: Path | None):
    if path is None:
        yield
        return
    import monarchify.heal

    saved = monarchify.heal._sharded

    def sharded(student, device):
        model = saved(student, device)
        path.write_text(json.dumps({name: [list(p.to_local().shape), list(p.shape)] for name, p in model.named_parameters()}))
        return model

    monarchify.heal._sharded = sharded
    try:
        yield
    finally:
        monarchify.heal._sharded = saved


def main(plan_file: str) -> None:
    from monarchify.cli.app import main as cli

    folder = Path(plan_file).parent
    rank = int(os.environ.get("RANK", "0"))
    # One stream object each for the whole launch, pointed at each command's files in turn:
    # logging handlers made during one command keep the stream they saw, and must not find it closed.
    stdout, stderr = Switch(), Switch()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        for command in json.loads(Path(plan_file).read_text()):
            name = f"{command['name']}.rank{rank}"
            with open(folder / f"{name}.out", "w") as out, open(folder / f"{name}.err", "w") as err:
                stdout.target, stderr.target = out, err
                shards = folder / f"{name}.shards.json" if command.get("shards") else None
                with stopping(command.get("stop")), environment(command.get("env")), recording_shards(shards):
                    code = cli([str(a) for a in command["args"]])
                stdout.target = stderr.target = None
            (folder / f"{name}.rc").write_text(str(code))


class Switch:
    """A text stream writing to ``target`` (nothing while it is ``None``)."""

    def __init__(self) -> None:
        self.target = None

    def write(self, text: str) -> int:
        return self.target.write(text) if self.target is not None else len(text)

    def flush(self) -> None:
        if self.target is not None:
            self.target.flush()

    def isatty(self) -> bool:
        return False


if __name__ == "__main__":
    main(sys.argv[1])
