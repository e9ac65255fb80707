"""The exceptions a user can cause.

Everything a person can get wrong (a missing model, a bad flag, a corrupt file) raises a
subclass of :class:`MonarchifyError` with a message written for them. The CLI turns exactly
these into a one-line ``Error: ...`` and a non-zero exit; anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations


class MonarchifyError(Exception):
    """A failure caused by the input, explained in one line.

    ``field``: the setting (a recipe or option field, e.g. ``"learning_rate"``, or dotted,
    ``"speed_gate.tokens"``), or several, that the message names as written. The library
    speaks of fields; a front end that knows which of its own flags sets each field can name
    that flag instead (the CLI does), which it could not do by guessing from the text.
    """

    def __init__(self, *args: object, field: str | tuple[str, ...] | None = None) -> None:
        super().__init__(*args)
        self.fields: tuple[str, ...] = (field,) if isinstance(field, str) else tuple(field or ())

    @property
    def field(self) -> str | None:
        """The first field the message names, or None."""
        return self.fields[0] if self.fields else None


class ConfigError(MonarchifyError, ValueError):
    """A conversion recipe that cannot be carried out (bad block count, bad pattern...)."""


class NoMatchError(ConfigError):
    """A selection pattern matched no layer."""


class NothingToResumeError(ConfigError):
    """Resuming was asked for, but no checkpoint was saved (a run stopped before its first one)."""


class ModelLoadError(MonarchifyError):
    """A model, checkpoint or weight file that cannot be read."""


class OutputExistsError(MonarchifyError):
    """An output folder that cannot be written where it was asked for."""


class OutputNotEmptyError(OutputExistsError):
    """An output folder that already holds something; replacing it must be asked for (``force``)."""


class NonFiniteWeightError(MonarchifyError, ValueError):
    """A weight with NaN or Inf: its projection would be meaningless."""
