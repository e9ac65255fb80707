"""One place that turns failures into what a person reads.

Known failures (:class:`MonarchifyError`, bad flags) print one ``Error: ...`` line on stderr
and exit non-zero, without a traceback; set ``MONARCHIFY_DEBUG=1`` to see the traceback of
anything. Unexpected exceptions are bugs: they keep a one-line summary plus that hint.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable

import click

from monarchify.errors import MonarchifyError

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _fail(message: str, code: int) -> int:
    first_line = message.strip().splitlines()[0] if message.strip() else "unknown error"
    print(f"Error: {first_line}", file=sys.stderr)
    return code


def run(command: Callable[..., object], args: list[str] | None = None) -> int:
    """Run a Typer/Click command and map every failure to an exit code."""
    debug = os.environ.get("MONARCHIFY_DEBUG", "") not in ("", "0")
    try:
        result = command(args=args, standalone_mode=False, prog_name="monarchify")
        return result if isinstance(result, int) else 0
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.exceptions.Abort:
        return _fail("aborted", EXIT_INTERRUPTED)
    except click.UsageError as exc:
        hint = f" (see 'monarchify {exc.ctx.info_name} --help')" if exc.ctx and exc.ctx.parent else " (see 'monarchify --help')"
        return _fail(exc.format_message() + hint, EXIT_USAGE)
    except click.ClickException as exc:
        return _fail(exc.format_message(), EXIT_ERROR)
    except MonarchifyError as exc:
        if debug:
            traceback.print_exc()
        return _fail(str(exc), EXIT_ERROR)
    except KeyboardInterrupt:
        return _fail("interrupted; nothing was written", EXIT_INTERRUPTED)
    except Exception as exc:  # a bug: say so briefly, keep the traceback one variable away
        if debug:
            traceback.print_exc()
            return EXIT_ERROR
        return _fail(
            f"unexpected {type(exc).__name__}: {exc} (set MONARCHIFY_DEBUG=1 for the traceback)", EXIT_ERROR
        )
