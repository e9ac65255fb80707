"""``MonarchConfig``: what to convert and how, as a small validated dataclass.

The same object drives the Python API, the CLI flags and the recipe recorded in a saved
checkpoint, so a conversion can be repeated from its ``config.json`` alone.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from monarchify.errors import ConfigError

FORMAT_VERSION = 1


def _positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{what} must be a positive integer, got {value!r}")
    return value


def _check_pattern(pattern: str, what: str) -> None:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"{what} {pattern!r} is not a valid regular expression: {exc}") from None


@dataclass
class MonarchConfig:
    """A conversion recipe.

    * ``nblocks``: blocks for every selected layer unless an override says otherwise.
    * ``include``: regexes of module names to convert; empty means the default (every
      linear layer inside the model's repeated blocks).
    * ``exclude``: regexes of module names to keep dense, applied after ``include``.
    * ``overrides``: ``{regex: nblocks}``; when several match a layer, the last one wins.
    * ``allow_structural_zeros``: accept ``nblocks² > min(d_in, d_out)`` layouts.
    * ``budget``: a fraction of the selected layers' dense parameters; when set, every
      selected layer's block count (or keeping it dense) is chosen to minimise the total
      error under it (:mod:`monarchify.budget`); ``overrides`` then pin layers.
    * ``budget_keep_dense``: whether the budget may keep a layer dense (one of its options).
    * ``calibration``: how activation-aware projection was calibrated (source, samples,
      method), recorded so the recipe says how its factors were obtained.

    Patterns match whole trailing components of a qualified name (see
    :func:`monarchify.selection.name_matches`), so ``query`` matches ``...self.query`` and
    ``layer\\.1\\..*`` does not match ``layer.10.output``.
    """

    nblocks: int = 4
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    overrides: dict[str, int] = field(default_factory=dict)
    allow_structural_zeros: bool = False
    budget: float | None = None
    budget_keep_dense: bool = True
    calibration: dict[str, Any] | None = None
    version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        _positive_int(self.nblocks, "nblocks")
        self.include = list(self.include)
        self.exclude = list(self.exclude)
        self.overrides = dict(self.overrides)
        for pattern in self.include:
            _check_pattern(pattern, "include pattern")
        for pattern in self.exclude:
            _check_pattern(pattern, "exclude pattern")
        for pattern, nblocks in self.overrides.items():
            _check_pattern(pattern, "override pattern")
            _positive_int(nblocks, f"nblocks of override {pattern!r}")
        if self.budget is not None and (
            isinstance(self.budget, bool) or not isinstance(self.budget, (int, float)) or not 0 < self.budget < 1
        ):
            raise ConfigError(f"budget must be a fraction between 0 and 1 (exclusive), got {self.budget!r}")
        if self.version != FORMAT_VERSION:
            raise ConfigError(f"unsupported recipe version {self.version} (this monarchify reads {FORMAT_VERSION})")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MonarchConfig:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def parse_override(text: str) -> tuple[str, int]:
    """Parse a CLI override ``REGEX=NBLOCKS`` (the regex may itself contain ``=``)."""
    pattern, sep, value = text.rpartition("=")
    if not sep or not pattern:
        raise ConfigError(f"override {text!r} must look like REGEX=NBLOCKS, e.g. 'attention\\..*=2'")
    try:
        nblocks = int(value)
    except ValueError:
        raise ConfigError(f"override {text!r}: {value!r} is not an integer") from None
    return pattern, _positive_int(nblocks, f"nblocks of override {pattern!r}")
