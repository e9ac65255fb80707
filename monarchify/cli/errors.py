"""One place that turns failures into what a person reads.

Known failures (:class:`MonarchifyError`, bad flags) print one ``Error: ...`` line on stderr
and exit non-zero, without a traceback; set ``MONARCHIFY_DEBUG=1`` to see the traceback of
anything. Unexpected exceptions are bugs: they keep a one-line summary plus that hint.
"""

from __future__ import annotations

import os
import re
import sys
import traceback
from typing import Any

import typer

from monarchify.errors import MonarchifyError, NothingToResumeError, OutputNotEmptyError

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
INTERRUPTED = "interrupted; nothing was written (the output folder is as it was)"
_on_interrupt = [INTERRUPTED]
"""What Ctrl-C means for the command running now: a command that leaves something behind
(fine-tuning checkpoints, finished stages) says what through :func:`when_interrupted`."""


def when_interrupted(message: str) -> None:
    """Set the line printed if the running command is interrupted from now on.

    Why commands set it themselves: only the command knows what an interruption leaves
    (nothing for ``convert``; for ``finetune`` nothing before its first checkpoint, a
    resumable checkpoint after it), and a message promising what is not there misleads."""
    _on_interrupt[0] = message


FLAG_HINTS = {OutputNotEmptyError: "pass --force to replace it", NothingToResumeError: "run without --resume to start afresh"}
"""What a library error means on the command line, for errors whose remedy is a flag: the
library names recipe fields, only the CLI knows its flags."""


FIELD_PARAMETERS = {
    "monarch": ("nblocks",),
    "speed_gate": ("only_if_faster",),
    "speed_gate.tokens": ("tokens",),
    "calibration": ("text",),
    "calibration.sweeps": ("refine_sweeps",),
    "distill": ("teacher",),
    "distill.hidden_weight": ("distill_hidden",),
    "steps": ("heal_steps",),
    "lr": ("student_lr",),
    "block_size": ("max_length",),
}
"""Library fields set by a command parameter of another name. Any other field is set by the
parameter of its own name (dots as underscores: ``calibration.samples`` is
``calibration_samples``), which is how every command names its parameters."""


def _with_hint(exc: MonarchifyError) -> str:
    hint = next((text for kind, text in FLAG_HINTS.items() if isinstance(exc, kind)), None)
    return f"{exc} ({hint})" if hint else str(exc)


def command_flags(command: Any) -> dict[str, str]:
    """``{parameter name: the flag that sets it}`` for a Click command's visible options."""
    flags = {}
    for param in command.params:
        names = [name for name in getattr(param, "opts", ()) if name.startswith("--")]
        if param.param_type_name == "option" and names and not getattr(param, "hidden", False):
            flags[param.name] = names[0]
    return flags


def name_flags(message: str, fields: tuple[str, ...], command: Any) -> str:
    """``message`` with each field it names written as the flag of ``command`` that sets that
    field (the library speaks of fields: ``learning_rate must be positive`` is ``--lr must be
    positive`` to someone who typed ``--lr -1``). A field no flag of this command sets stays."""
    flags = command_flags(command)
    for field in sorted(fields, key=len, reverse=True):  # speed_gate.tokens before speed_gate
        candidates = (field, field.replace(".", "_"), *FIELD_PARAMETERS.get(field, ()))
        flag = next((flags[name] for name in candidates if name in flags), None)
        if flag is not None:
            message = re.sub(rf"(?<![\w.-]){re.escape(field)}(?![\w-]|\.\w)", flag, message)
    return message


def invoked_command(group: Any, args: list[str]) -> Any:
    """The (sub)command ``args`` name: the group's options take no values, so the first words
    that are command names lead to it."""
    command = group
    for arg in args:
        sub = getattr(command, "commands", {}).get(arg)
        if sub is not None:
            command = sub
        elif not arg.startswith("-"):
            break
    return command


def _fail(message: str, code: int, *, every_process: bool = False) -> int:
    """Print the one error line. Under torchrun a user's mistake fails the same way in every
    process, so only the main one says it; an unexpected error may be one process's own, so
    each says it, the others naming their rank."""
    from monarchify.distributed import is_main, rank

    first_line = message.strip().splitlines()[0] if message.strip() else "unknown error"
    if is_main():
        print(f"Error: {first_line}", file=sys.stderr)
    elif every_process:
        print(f"Error (process {rank()}): {first_line}", file=sys.stderr)
    return code


def run(app: Any, args: list[str] | None = None) -> int:
    """Run the app (the Click group Typer builds) and map every failure to an exit code.

    Only Typer's public exceptions are used (``TyperException`` is the base of its usage
    errors, with ``exit_code`` and ``format_message``): Typer moved its Click internals
    between releases.
    """
    debug = os.environ.get("MONARCHIFY_DEBUG", "") not in ("", "0")
    when_interrupted(INTERRUPTED)
    try:
        result = app(args=args, standalone_mode=False, prog_name="monarchify")
        if result == EXIT_INTERRUPTED:  # Typer turns Ctrl-C into this return value, silently
            return _fail(_on_interrupt[0], EXIT_INTERRUPTED)
        return result if isinstance(result, int) else 0
    except typer.Exit as exc:
        if exc.exit_code == EXIT_INTERRUPTED:  # Typer's own translation of Ctrl-C
            return _fail(_on_interrupt[0], EXIT_INTERRUPTED)
        return exc.exit_code
    except typer.Abort:
        return _fail("aborted", EXIT_INTERRUPTED)
    except typer.TyperException as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # a bare group: its help, not an error line
            help_text = exc.format_message()  # Rich help has printed itself already, plain help is here
            if help_text.strip():
                sys.stdout.write(help_text.rstrip("\n") + "\n")
            return EXIT_USAGE
        return _fail(f"{exc.format_message()} (see --help)", exc.exit_code or EXIT_USAGE)
    except MonarchifyError as exc:
        if debug:
            traceback.print_exc()
        message = _with_hint(exc)
        if exc.fields:
            message = name_flags(message, exc.fields, invoked_command(app, sys.argv[1:] if args is None else args))
        return _fail(message, EXIT_ERROR)
    except KeyboardInterrupt:
        return _fail(_on_interrupt[0], EXIT_INTERRUPTED)
    except Exception as exc:  # a bug: say so briefly, keep the traceback one variable away
        if debug:
            traceback.print_exc()
            return EXIT_ERROR
        return _fail(
            f"unexpected {type(exc).__name__}: {exc} (set MONARCHIFY_DEBUG=1 for the traceback)", EXIT_ERROR,
            every_process=True,
        )
