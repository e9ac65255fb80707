"""The conversion recipe: what to convert and how, as small validated dataclasses.

One :class:`MonarchConfig` is the whole recipe: the layers and block counts, the parameter
budget, activation-aware calibration (:class:`CalibrationConfig`) and the speed gate
(:class:`SpeedGateConfig`). Only the calibration *text* stays outside it, as an argument of
:func:`monarchify.convert`. The same object drives the Python API and the CLI (which only
maps flags onto it), and is recorded in every saved checkpoint so a conversion can be
repeated from its ``config.json``.

Torch-free on purpose: the command line builds its help and checks its flags from here
without importing torch.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from monarchify.errors import ConfigError
from monarchify.version import __version__

RECIPE_VERSION = 2
"""Version of the recipe dictionary (``MonarchConfig.to_dict``), not of the weight format.

A recipe that gains a field gains a version, and a reader refuses fields and versions it does
not know: an older monarchify re-applying a newer recipe without its new fields would carry out
a weaker one (no low-rank terms, another budget objective) and say nothing.

1: ``output_order``, ``budget_ranks``, ``ranks`` and ``budget_objective`` were added under it
without a bump, so a version-1 recipe may lack them: a missing ``output_order`` means
``"interleaved"`` (the only order before the field existed), the others their defaults.
2: the fields of the last version-1 writer, every one known to every version-2 reader."""
READS_RECIPE_VERSIONS = (1, 2)
CALIBRATION_RECORDS = ("source", "kind", "columns", "method")
"""Keys a saved recipe's ``calibration`` carries as a record of the run (where the text came
from, the method used), not as settings: read and dropped."""
OUTPUT_ORDERS = ("blocked", "interleaved")
"""How a Monarch layer orders its outputs (:class:`monarchify.monarch.layout.MonarchLayout`)."""
BUDGET_OBJECTIVES = ("layers", "output", "even", "fisher")
"""What a budget minimises (``MonarchConfig.budget_objective``)."""
BUDGET_SOLVERS = ("exact", "nested")
"""How a budget picks its plan (``MonarchConfig.budget_solver``)."""
STRUCTURES = ("monarch", "lowrank")
"""What a converted layer becomes (``MonarchConfig.structure``)."""
DEFAULT_CALIBRATION_SAMPLES = 256
DEFAULT_SWEEPS = 2
"""Full-covariance refinement sweeps. On MiniLM at 4 blocks, 2 sweeps take the mean held-out
output error from 0.348 (closed form) to 0.294, 8 sweeps only to 0.286 for 4× the work
(``docs/accuracy.md``)."""
DEFAULT_DAMPING = 0.01
DEFAULT_MAX_LENGTH = 128
DEFAULT_SPEED_TOKENS = 512


def _positive_int(value: Any, what: str) -> int:
    """``value`` if it is a positive integer; else an error naming it by ``what``, carried as
    its field when ``what`` is a field's name (``nblocks``, ``speed_gate.tokens``)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{what} must be a positive integer, got {value!r}",
                          field=what if what.replace(".", "_").isidentifier() else None)
    return value


def _check_pattern(pattern: str, what: str) -> None:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"{what} {pattern!r} is not a valid regular expression: {exc}") from None


def _upgrade_hint() -> str:
    return f"this monarchify ({__version__}), which reads recipe versions {', '.join(map(str, READS_RECIPE_VERSIONS))}: upgrade monarchify"


def _check_version(version: Any) -> None:
    if isinstance(version, bool) or not isinstance(version, int):
        raise ConfigError(f"recipe version {version!r} is not a version number")
    if version not in READS_RECIPE_VERSIONS:
        raise ConfigError(f"recipe version {version} is unknown to {_upgrade_hint()}")


def _fields_of(cls: type, data: Any, what: str, records: tuple[str, ...] = ()) -> dict[str, Any]:
    """``data``'s settings for ``cls``, refusing any other key: a field this version does not
    know is one a newer recipe relies on, and dropping it would carry out another recipe."""
    if not isinstance(data, dict):
        raise ConfigError(f"{what} must be a mapping of field names to values, got {type(data).__name__}")
    names = {f.name for f in fields(cls)}
    unknown = sorted(str(k) for k in data if k not in names and k not in records)
    if unknown:
        raise ConfigError(f"{what} field {', '.join(map(repr, unknown))} is unknown to {_upgrade_hint()}")
    return {k: v for k, v in data.items() if k in names}


@dataclass
class CalibrationConfig:
    """Activation-aware projection: fit each layer's *output* on real text instead of its weight.

    * ``samples``: samples fitted; ``heldout`` more (default: a quarter) measure the output
      error on text the projection did not see.
    * ``damping``: added to each input covariance's diagonal, times its mean diagonal
      (insensitive on MiniLM between 0 and 0.1; a rank-deficient covariance needs some).
    * ``sweeps``: full-covariance refinement sweeps after the closed-form block-diagonal
      whitening (0: closed form only).
    * ``max_length``, ``batch_size``: how the samples are tokenised and batched.
    * ``sequential``: calibrate each block on the inputs the *converted* earlier blocks produce
      and fit it to reproduce the dense block's outputs (``||W X_denseᵀ - M X_convertedᵀ||``),
      so each block makes up for the errors before it; ``False``: every layer fits the dense
      model's own inputs. Runs block by block, so not with a budget.
    """

    samples: int = DEFAULT_CALIBRATION_SAMPLES
    heldout: int | None = None
    damping: float = DEFAULT_DAMPING
    sweeps: int = DEFAULT_SWEEPS
    max_length: int = DEFAULT_MAX_LENGTH
    batch_size: int = 32
    sequential: bool = False

    def __post_init__(self) -> None:
        _positive_int(self.samples, "calibration.samples")
        if not isinstance(self.sequential, bool):
            raise ConfigError(f"calibration.sequential must be true or false, got {self.sequential!r}", field="calibration.sequential")
        if self.heldout is not None:
            _positive_int(self.heldout, "calibration.heldout")
        if isinstance(self.sweeps, bool) or not isinstance(self.sweeps, int) or self.sweeps < 0:
            raise ConfigError(f"calibration.sweeps must be a non-negative integer, got {self.sweeps!r}", field="calibration.sweeps")
        if isinstance(self.damping, bool) or not isinstance(self.damping, (int, float)) or not self.damping >= 0:
            raise ConfigError(f"calibration.damping must be >= 0, got {self.damping!r}", field="calibration.damping")
        _positive_int(self.max_length, "calibration.max_length")
        _positive_int(self.batch_size, "calibration.batch_size")

    @property
    def method(self) -> str:
        return "whitened" + (f"+full-refine x{self.sweeps}" if self.sweeps else " (block-diagonal)")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CalibrationConfig:
        """Read the settings of a calibration, ignoring what a saved recipe records about the run."""
        return cls(**_fields_of(cls, data, "calibration", CALIBRATION_RECORDS))


@dataclass
class SpeedGateConfig:
    """Keep dense every selected layer that Monarch does not make faster on this device.

    Each distinct layer shape is timed (``nn.Linear`` against ``MonarchLinear``) on ``tokens``
    rows, forward and, with ``backward``, forward+backward; a layer converts only when
    Monarch wins every measure.
    """

    tokens: int = DEFAULT_SPEED_TOKENS
    backward: bool = True
    warmup: int = 3
    repeat: int = 10

    def __post_init__(self) -> None:
        _positive_int(self.tokens, "speed_gate.tokens")
        _positive_int(self.repeat, "speed_gate.repeat")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise ConfigError(f"speed_gate.warmup must be a non-negative integer, got {self.warmup!r}", field="speed_gate.warmup")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SpeedGateConfig:
        return cls(**_fields_of(cls, data, "speed_gate"))


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
      error under it (:mod:`monarchify.pipeline.allocate`); ``overrides`` then pin layers.
    * ``budget_keep_dense``: whether the budget may keep a layer dense (one of its options).
    * ``budget_ranks``: ranks of a low-rank term the budget may add to a layer next to its
      Monarch blocks (Monarch plus low rank, :mod:`monarchify.monarch.lowrank`), priced at
      ``rank·(d_in + d_out)``; empty: plain Monarch only.
    * ``budget_objective``: what the budget minimises: ``"layers"``, the sum of the layers'
      relative errors, or ``"output"``, each layer's error weighted by how far the model's
      output moves per unit of it (measured on the calibration text, so it needs
      ``calibration``). Two plans whose layer sums are near-equal can train very differently;
      the output weighting tells apart the layers whose errors the rest of the model amplifies.
      ``"even"``: the sum of the squared relative errors, which spreads the errors over the
      layers: errors compound through a deep stack, and the plain sum lets a few layers take
      far more than the rest when their calibrated error looks small. ``"fisher"``: each
      option's error in the model's own loss, every output channel of a layer weighted by the
      squared gradient the model's output distribution puts on it (one backward pass over the
      calibration text; :func:`monarchify.pipeline.observe.output_fisher`): the layers' errors
      in one unit, summed as the estimated divergence from the dense model. Needs calibration;
      plain Monarch options only.
    * ``budget_solver``: how the budget picks its plan: ``"exact"``, the least summed error
      that fits (:func:`monarchify.pipeline.knapsack.solve`), or ``"nested"``, layers moved up
      their error-per-parameter curves in one order while steps fit
      (:func:`~monarchify.pipeline.knapsack.solve_nested`): nearby budgets then give nearby
      plans (on MiniLM 0.8 layers change per 0.0005 of budget, against 2.7 for the exact
      plan, which reshuffles layers for a few thousand parameters more), for at most 0.6 %
      more summed error there.
    * ``ranks``: ``{regex: rank}``, a low-rank term for matching layers (last wins; 0 removes
      it). A budgeted checkpoint records its choices here, as exact names.
    * ``keep_dense_if_not_smaller``: a layer whose Monarch form would hold no fewer weights than
      its dense one (a square layer at two blocks holds exactly as many) stays dense instead of
      only gaining error, unless an override named its block count. Language-model
      ``compress`` turns it on; off, ``nblocks`` converts every selected layer as asked.
    * ``calibration``: project on real activations (the text is an argument of ``convert``).
    * ``speed_gate``: time every layer shape and keep dense those Monarch does not speed up.
    * ``structure``: what a converted layer becomes: ``"monarch"``, or ``"lowrank"``, the
      baseline to compare Monarch against: ``U V`` alone (the truncated SVD, whitened when
      calibrating, as SVD-LLM does) with as many parameters as Monarch at the layer's block
      count would keep (``rank·(d_in + d_out)`` at most that; so ``nblocks=4`` means "the
      parameters of 4 blocks"). ``ranks`` then sets a layer's rank directly, and a budget
      chooses ranks: by default those matching each candidate block count, or
      ``budget_ranks``. The speed gate times Monarch layers only.
    * ``output_order``: ``"blocked"`` (each block's outputs contiguous: no copy in the forward
      pass) or ``"interleaved"`` (the paper's output permutation). Same parameters, FLOPs and
      error; blocked is faster (``docs/performance.md``).

    Patterns match whole trailing components of a qualified name (see
    :func:`monarchify.pipeline.plan.name_matches`), so ``query`` matches ``...self.query`` and
    ``layer\\.1\\..*`` does not match ``layer.10.output``.
    """

    nblocks: int = 4
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    overrides: dict[str, int] = field(default_factory=dict)
    allow_structural_zeros: bool = False
    budget: float | None = None
    budget_keep_dense: bool = True
    budget_ranks: list[int] = field(default_factory=list)
    budget_objective: str = "layers"
    budget_solver: str = "exact"
    ranks: dict[str, int] = field(default_factory=dict)
    keep_dense_if_not_smaller: bool = False
    calibration: CalibrationConfig | None = None
    speed_gate: SpeedGateConfig | None = None
    output_order: str = "blocked"
    structure: str = "monarch"
    version: int = RECIPE_VERSION

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
            raise ConfigError(f"budget must be a fraction between 0 and 1 (exclusive), got {self.budget!r}", field="budget")
        if not self.budget_keep_dense and self.budget is None:
            raise ConfigError("budget_keep_dense=False only means something with a budget", field=("budget_keep_dense", "budget"))
        self.budget_ranks = sorted({_positive_int(rank, "budget rank") for rank in self.budget_ranks})
        if self.structure not in STRUCTURES:
            raise ConfigError(f"structure must be one of {', '.join(STRUCTURES)}, got {self.structure!r}", field="structure")
        if self.structure == "lowrank" and self.speed_gate is not None:
            raise ConfigError("speed_gate times Monarch layers; it is not available with structure 'lowrank'",
                              field=("speed_gate", "structure"))
        if self.budget_ranks and self.budget is None:
            raise ConfigError("budget_ranks only means something with a budget", field=("budget_ranks", "budget"))
        if self.budget_objective == "kinds":
            raise ConfigError("budget_objective 'kinds' scores a language model on held-out text: only the text recipe "
                              "measures it (monarchify.lm.compress, by_kind)", field="budget_objective")
        if self.budget_objective not in BUDGET_OBJECTIVES:
            raise ConfigError(f"budget_objective must be one of {', '.join(BUDGET_OBJECTIVES)}, got {self.budget_objective!r}",
                              field="budget_objective")
        if self.budget_solver not in BUDGET_SOLVERS:
            raise ConfigError(f"budget_solver must be one of {', '.join(BUDGET_SOLVERS)}, got {self.budget_solver!r}",
                              field="budget_solver")
        if self.budget_solver != "exact" and self.budget is None:
            raise ConfigError(f"budget_solver '{self.budget_solver}' picks a budget's plan: it needs a budget",
                              field=("budget_solver", "budget"))
        if isinstance(self.calibration, dict):
            self.calibration = CalibrationConfig.from_dict(self.calibration)
        if self.calibration is not None and self.calibration.sequential and self.budget is not None:
            raise ConfigError("sequential calibration runs block by block, and a budget compares every layer's errors "
                              "before any is projected: use one or the other", field=("calibration.sequential", "budget"))
        if self.budget_objective in ("output", "fisher") and self.budget is None:
            raise ConfigError(f"budget_objective '{self.budget_objective}' weighs a budget's layers: it needs a budget "
                              "(and calibration)", field="budget_objective")
        if self.budget_objective == "fisher" and (self.structure != "monarch" or self.budget_ranks):
            raise ConfigError("budget_objective 'fisher' prices plain Monarch block counts: not with structure "
                              f"'{self.structure}' or budget_ranks", field=("budget_objective", "budget_ranks"))
        self.ranks = dict(self.ranks)
        for pattern, rank in self.ranks.items():
            _check_pattern(pattern, "rank pattern")
            if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
                raise ConfigError(f"rank of {pattern!r} must be a non-negative integer, got {rank!r}")
        if isinstance(self.speed_gate, dict):
            self.speed_gate = SpeedGateConfig.from_dict(self.speed_gate)
        if self.output_order not in OUTPUT_ORDERS:
            raise ConfigError(f"output_order must be one of {', '.join(OUTPUT_ORDERS)}, got {self.output_order!r}",
                              field="output_order")
        if self.version != RECIPE_VERSION:
            _check_version(self.version)  # a newer one: upgrade
            raise ConfigError(f"a version-{self.version} recipe is read with MonarchConfig.from_dict, which gives its "
                              f"fields the meaning they had then")

    def to_dict(self) -> dict[str, Any]:
        """The recipe as plain data; ``speed_gate``, ``budget_ranks``, ``budget_objective``,
        ``budget_solver``, ``ranks``, ``structure``, ``keep_dense_if_not_smaller`` and calibration's ``sequential``
        appear only when set (recipes
        written before they existed stay byte-identical)."""
        data = asdict(self)
        if data["structure"] == "monarch":
            del data["structure"]
        for name in ("speed_gate", "budget_ranks", "ranks"):
            if not data[name]:
                del data[name]
        if data["budget_objective"] == "layers":
            del data["budget_objective"]
        if data["budget_solver"] == "exact":
            del data["budget_solver"]
        if not data["keep_dense_if_not_smaller"]:
            del data["keep_dense_if_not_smaller"]
        if data["calibration"] is not None and not data["calibration"]["sequential"]:
            del data["calibration"]["sequential"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MonarchConfig:
        """Read a recipe of any version this monarchify knows (a saved ``meta.recipe`` or
        ``quantization_config.recipe``; no ``version`` means the current one) as the current
        version; an unknown field or a newer version is refused (see :data:`RECIPE_VERSION`)."""
        settings = _fields_of(cls, data, "recipe")
        version = settings.pop("version", RECIPE_VERSION)
        _check_version(version)
        if version == 1 and "output_order" not in settings:
            settings["output_order"] = "interleaved"  # written before the blocked order existed
        return cls(**settings)


def parse_override(text: str) -> tuple[str, int]:
    """Parse an override written ``REGEX=NBLOCKS`` (the regex may itself contain ``=``)."""
    pattern, sep, value = text.rpartition("=")
    if not sep or not pattern:
        raise ConfigError(f"override {text!r} must look like REGEX=NBLOCKS, e.g. 'intermediate\\.dense=8'")
    try:
        nblocks = int(value)
    except ValueError:
        raise ConfigError(f"override {text!r}: {value!r} is not an integer") from None
    return pattern, _positive_int(nblocks, f"nblocks of override {pattern!r}")


def parse_ranks(text: str) -> list[int]:
    """Parse a comma-separated list of ranks, e.g. ``8,16,32``."""
    ranks = []
    for part in text.split(","):
        try:
            ranks.append(int(part.strip()))
        except ValueError:
            raise ConfigError(f"ranks {text!r} must be positive integers separated by commas, e.g. '8,16,32'") from None
    return [_positive_int(rank, "budget rank") for rank in ranks]
