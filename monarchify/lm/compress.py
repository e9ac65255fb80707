"""Compress a causal language model on plain text: convert under a budget, heal, measure.

The recipe for a model whose task *is* its text. Two stages, each kept under ``<out>.stages/``
and recorded in the run manifest (:mod:`monarchify.manifest`), so the same command after a
stop resumes where it stopped, and a changed option redoes exactly the stages it decides:

1. ``convert``: the dense model converted under the parameter budget, calibrated on the
   training text (the whitened projection fits each layer's output on these activations).
2. ``heal``: the converted model trained to reproduce the dense model's next-token
   distributions on the training text (:func:`monarchify.heal.heal_` with the logit term:
   per token, the KL between the two output distributions), with the held-out perplexity
   measured along the way and a resumable state every ``save_every`` steps. Without healing
   settings it only measures (the training-free result).

The output folder holds the healed model and ``eval_results.json``: the dense and compressed
perplexity on held-out text (every ``round(1/eval_fraction)``-th line of the text files, never
trained or calibrated on), before and after healing, parameters, tokens used, times and peak memory.

The options are plain data (this module imports torch only inside the functions that run).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from contextlib import AbstractContextManager as ContextManager
from contextlib import nullcontext
from typing import Any, Callable

from monarchify.config import CalibrationConfig, MonarchConfig
from monarchify.errors import ConfigError
from monarchify.heal_config import HealConfig
from monarchify.samples import default_heldout

RESULTS_FILE = "eval_results.json"
CONVERTED, HEALED_STATE = "1-converted", "2-heal-state"
GENERATED = "2-generated.safetensors"
"""The windows the dense model wrote for healing (``generate``), kept so a resumed run reuses them."""
UNIFORM = "1-uniform"
"""Where a budgeted conversion's uniform rival is converted (and, when it loses, deleted)."""
KINDS = "1-kinds"
"""Where ``by_kind`` converts each candidate block count uniformly to measure the kinds (deleted after)."""
KIND_CANDIDATES = (2, 3, 4)
"""The block counts each kind of layer is measured at (besides dense): 2 keeps 69 % of a
576 x 1536 matrix, 4 keeps 34 %; at 4 SmolLM2's MLP kinds alone already cost 2-14x perplexity."""
KIND_WINDOWS = 16
"""Held-out windows each kind is scored on: enough to rank kinds whose costs differ by tens of
percent, at a third of the full held-out scoring's time per measurement."""
CALIBRATION_HELDOUT = 8
"""Held-out calibration windows, beside the fitted ones: their statistics give each layer's
output error on unseen text in the report. Convert's default quarter (32 windows at the 128
fitted here) was a fifth of the conversion's forward passes; this recipe judges by the model's
own held-out perplexity, and 2,048 tokens still show whether a layer's fit carries to new text."""
ALLOCATION_FILE = "allocation.json"
"""In the converted stage: the budget's plan against the uniform one, on the held-out text."""
STAGES = ("convert", "heal")

HEAL_STEPS, HEAL_BATCH_SIZE, HEAL_LR, HEAL_MAX_GRAD_NORM = 400, 4, 5e-4, 1.0
"""The healing schedule that healed SmolLM2-135M best of those measured (docs/language-models.md):
4 windows a step at peak rate 5e-4 (the three-quarter-size runs; the half-size ones used 6e-4),
every gradient clipped to norm 1. Without the clip whitened low rank diverged at such rates, and
Monarch healed 2 points of test perplexity worse."""


def default_heal() -> HealConfig:
    return HealConfig(steps=HEAL_STEPS, lr=HEAL_LR, hidden_weight=0.0, logit_weight=1.0, save_every=50,
                      hidden_norm="token", max_grad_norm=HEAL_MAX_GRAD_NORM)


@dataclass
class TextCompressOptions:
    """What language-model compression is asked to do.

    ``budget``: the fraction of the selected layers' dense parameters kept
    (``MonarchConfig.budget``); ``recipe``: anything else of the conversion recipe (its
    ``budget`` and ``calibration`` are set from the fields here). ``block_size``: tokens per
    training and evaluation window. ``calibration_samples``: windows of text the conversion is
    fitted on. ``heal``: the healing settings (``None``: no healing); ``batch_size``: windows per
    healing step. ``generate``: windows the dense model writes (:mod:`monarchify.lm.generate`),
    healed on next to the text's own. ``eval_fraction``: the held-out share of the text lines.
    ``by_kind``: allocate ``budget`` by layer kind, each kind's cost measured on held-out text
    (:mod:`monarchify.lm.kinds`) rather than priced layer by layer.
    """

    model: str
    text: list[Path]
    out: Path
    budget: float | None = None
    recipe: dict[str, Any] = field(default_factory=dict)
    block_size: int = 256
    calibration_samples: int = 128
    heal: HealConfig | None = field(default_factory=default_heal)
    batch_size: int = HEAL_BATCH_SIZE
    generate: int = 0
    eval_fraction: float = 0.05
    max_heldout_windows: int = 64
    seed: int = 0
    force: bool = False
    restart_from: str | None = None
    by_kind: bool = False

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.text = [Path(p) for p in self.text]
        if not self.text:
            raise ConfigError("text needs at least one file", field="text")
        for name in ("block_size", "calibration_samples", "batch_size", "max_heldout_windows"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}", field=name)
        if isinstance(self.generate, bool) or not isinstance(self.generate, int) or self.generate < 0:
            raise ConfigError(f"generate must be a number of windows (0: none), got {self.generate!r}", field="generate")
        if self.generate and self.heal is None:
            raise ConfigError("generate writes text to heal on: it needs healing steps", field="generate")
        if self.generate and self.block_size < 2:
            raise ConfigError("generate continues the first tokens of a window: it needs windows of 2 tokens or more", field="generate")
        if not 0 < self.eval_fraction <= 0.5:
            raise ConfigError(f"eval_fraction must be in (0, 0.5], got {self.eval_fraction}", field="eval_fraction")
        if self.by_kind and self.budget is None:
            raise ConfigError("by_kind allocates a budget: it needs budget", field="by_kind")
        if self.by_kind and (self.recipe.get("overrides") or self.recipe.get("budget_ranks") or self.recipe.get("structure", "monarch") != "monarch"):
            raise ConfigError("by_kind chooses every kind's block count itself: it takes no overrides, budget ranks or other "
                              "structure", field="by_kind")
        if self.restart_from is not None and self.restart_from not in STAGES:
            raise ConfigError(f"restart_from must be one of {', '.join(STAGES)}, got {self.restart_from!r}", field="restart_from")
        self.conversion  # noqa: B018 - building the recipe checks it before any stage runs

    @property
    def stages(self) -> Path:
        return self.out.with_name(self.out.name + ".stages")

    @property
    def conversion(self) -> MonarchConfig:
        recipe = {"keep_dense_if_not_smaller": True, **self.recipe}
        if self.budget is not None:
            recipe["budget"] = self.budget
        calibration = dict(recipe.get("calibration") or {})
        calibration.update(samples=self.calibration_samples, max_length=self.block_size,
                           heldout=min(CALIBRATION_HELDOUT, default_heldout(self.calibration_samples)))
        recipe["calibration"] = CalibrationConfig.from_dict(calibration)
        return MonarchConfig(**recipe)

    def stage_options(self) -> dict[str, dict[str, Any]]:
        """Per stage, the options that decide its output (what the manifest fingerprints)."""
        text = {"files": [str(p) for p in self.text], "eval_fraction": self.eval_fraction, "block_size": self.block_size}
        return {
            "convert": {"model": str(self.model), "recipe": self.conversion.to_dict(), **text, **({"by_kind": True} if self.by_kind else {})},
            "heal": {**(self.heal.to_dict() if self.heal else {"steps": 0}), "batch_size": self.batch_size, "seed": self.seed, **text,
                     **({"generate": self.generate} if self.generate else {})},
        }

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(out=str(self.out), text=[str(p) for p in self.text])
        return data


@dataclass
class TextCompressEvents:
    """Hooks for a front end; every method is optional."""

    stage: Callable[[str], None] = lambda message: None
    done: Callable[[str], None] = lambda message: None
    note: Callable[[str], None] = lambda message: None
    heal_step: Callable[[int, int, float], None] = lambda step, steps, loss: None
    generating: Callable[[int, int], None] = lambda done, total: None
    """``done`` of ``total`` windows written by the dense model (``generate``)."""
    heal_measured: Callable[[int, int, float], None] = lambda step, steps, perplexity: None
    """Held-out perplexity after ``step`` of ``steps`` healing steps (0: before healing)."""
    converting: Callable[[], ContextManager[Any]] = nullcontext
    """A context for the conversion, yielding its progress hooks (``ConvertEvents``) or ``None``."""


@dataclass
class TextCompressResult:
    out: Path
    results: dict[str, Any]


# ------------------------------------------------------------------------------------- text


@dataclass
class TextData:
    """The training windows, the held-out windows, and the calibration samples, all from the
    same lines: calibration and healing see the training lines only."""

    train: Any  # (n, block_size) token ids
    heldout: Any
    calibration: Any  # TextSamples
    lines: dict[str, int]


def _chunks(lines: list[str], characters: int) -> list[str]:
    """Consecutive lines joined until each chunk holds ``characters``: calibration samples
    that fill a window, as the training windows do, rather than one short line each."""
    chunks, current, size = [], [], 0
    for line in lines:
        current.append(line)
        size += len(line) + 1
        if size >= characters:
            chunks.append("\n".join(current))
            current, size = [], 0
    if current:
        chunks.append("\n".join(current))
    return chunks


def load_text(options: TextCompressOptions, tokenizer: Any) -> TextData:
    from monarchify.lm.text import pack, read_lines
    from monarchify.samples import split_samples

    lines = read_lines(options.text, eval_fraction=options.eval_fraction)
    train = pack(lines.train, tokenizer, options.block_size)
    heldout = pack(lines.heldout, tokenizer, options.block_size)[: options.max_heldout_windows]
    # about four characters a token in English: a chunk of 4 x block_size characters fills a window
    chunks = _chunks(lines.train, 4 * options.block_size)
    settings = options.conversion.calibration
    calibration = split_samples(chunks, settings.samples, settings.heldout, source=", ".join(map(str, options.text)), kind="text")
    return TextData(train, heldout, calibration, {"train": len(lines.train), "heldout": len(lines.heldout)})


# ---------------------------------------------------------------------------- measurement


def window_perplexity(model: Any, windows: Any, batch_size: int = 8) -> float:
    """Perplexity of ``model`` on ``(n, block)`` token windows, every predicted token weighted
    alike (the first token of each window is context only): :func:`monarchify.lm.perplexity.perplexity`
    on the windows laid end to end."""
    from monarchify.lm.perplexity import perplexity

    return perplexity(model, windows.reshape(-1), window=windows.shape[1], batch_size=batch_size).perplexity


def parameters(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------- stages


def uniform_rival(report: Any, budget: float) -> int | None:
    """The block count whose uniform conversion keeps the most parameters within the budget
    (from the budget plan's ``uniform`` table), or None when none fits."""
    plan = report.meta.get("budget") or {}
    fits = {int(b): v["params"] for b, v in (plan.get("uniform") or {}).items() if v["params"] <= plan.get("params_budget", 0)}
    return max(fits, key=lambda b: (fits[b], -b)) if fits else None


def check_against_uniform(options: TextCompressOptions, converted: Path, data: TextData, events: TextCompressEvents) -> dict[str, Any]:
    """Convert the uniform recipe the budget's parameters allow too, measure both on the
    held-out text, and keep the better one in ``converted``.

    Why: the budget minimises a sum of per-layer errors, and on a real LLM that sum does not
    predict what the model loses (SmolLM2 at budget 0.5: the budget's plan 1,344 held-out
    perplexity, uniform 3 blocks at fewer parameters 748). A budget is a ceiling on
    parameters; the allocation is only a means, so the command keeps whichever plan the model's
    own output prefers, and says which. One binary choice made on the held-out windows, which
    the report then measures: the test text says what it is worth."""
    from monarchify.hf.convert import convert_pretrained
    from monarchify.hf.stored_report import read_report

    blocks = uniform_rival(read_report(str(converted)), options.budget)
    if blocks is None:
        return {"chosen": "budget", "uniform": None}
    rival = converted.with_name(UNIFORM)
    _reset([rival])
    recipe = replace(options.conversion, budget=None, nblocks=blocks, budget_objective="layers", budget_solver="exact", budget_ranks=[],
                     budget_keep_dense=True)
    events.note(f"stage 1/2: converting uniform {blocks} blocks too, to check the budget's plan against it")
    with events.converting() as convert_events:
        convert_pretrained(options.model, rival, recipe, calibration_data=data.calibration, force=True, check=False,
                           events=convert_events)
    chosen, scores = _keep_better("budget", "the budget plan", converted, rival, blocks, options, data, events)
    return {"chosen": chosen, "uniform": {"nblocks": blocks}, "perplexity": scores}


def _keep_better(plan: str, described: str, converted: Path, rival: Path, blocks: int, options: TextCompressOptions,
                 data: TextData, events: TextCompressEvents) -> tuple[str, dict[str, float]]:
    """Score the plan in ``converted`` and the uniform conversion in ``rival`` on the held-out
    text, leave the better one in ``converted`` (the other is deleted) and say which: ``plan`` or
    ``"uniform"``, and both perplexities under those names."""
    scores = {name: window_perplexity(_load_measured(folder), data.heldout, options.batch_size)
              for name, folder in ((plan, converted), ("uniform", rival))}
    chosen = "uniform" if scores["uniform"] < scores[plan] else plan
    if chosen == "uniform":  # a stop in between leaves the stage unfinished in the manifest: it is redone
        shutil.rmtree(converted)
        rival.rename(converted)
    else:
        shutil.rmtree(rival)
    events.done(f"held-out perplexity: {described} {scores[plan]:.2f}, uniform {blocks} blocks {scores['uniform']:.2f}: "
                f"keeping {'the uniform conversion' if chosen == 'uniform' else described}")
    return chosen, scores


def allocate_by_kind(options: TextCompressOptions, converted: Path, data: TextData, events: TextCompressEvents) -> dict[str, Any]:
    """Convert under the budget allocated by layer kind (:mod:`monarchify.lm.kinds`) into
    ``converted``, and keep it only if it beats the uniform block count the budget allows (the
    guard of :func:`check_against_uniform`). Costs one conversion per candidate count and one
    more for the plan; the candidates are deleted after."""
    from monarchify.hf.convert import convert_pretrained
    from monarchify.hf.stored_report import read_report
    from monarchify.lm.kinds import KindOption, choose, group_by_kind, kind_pattern, measure

    base = replace(options.conversion, budget=None, budget_objective="layers", budget_solver="exact", budget_ranks=[])
    folders: dict[int, Path] = {}
    for nblocks in KIND_CANDIDATES:
        folder = options.stages / f"{KINDS}-{nblocks}"
        _reset([folder])
        events.note(f"stage 1/2: converting uniform {nblocks} blocks, to measure each kind of layer at {nblocks}")
        try:
            with events.converting() as convert_events:
                convert_pretrained(options.model, folder, replace(base, nblocks=nblocks), calibration_data=data.calibration,
                                   force=True, check=False, events=convert_events)
        except ConfigError as exc:  # e.g. layers too small for this count
            events.note(f"stage 1/2: {nblocks} blocks left out: {exc}")
            _reset([folder])
            continue
        folders[nblocks] = folder
    if not folders:
        raise ConfigError(f"no candidate block count ({', '.join(map(str, KIND_CANDIDATES))}) converts this model")
    layers = {b: {layer.name: layer for layer in read_report(str(f)).layers} for b, f in folders.items()}
    selected = {name: layer.params_dense for name, layer in next(iter(layers.values())).items()}
    kinds = group_by_kind(selected)
    budget_params = int(options.budget * sum(selected.values()))
    windows = data.heldout[:KIND_WINDOWS]

    def nll(model: Any) -> float:
        return math.log(window_perplexity(model, windows, options.batch_size))

    dense = _load_measured(options.model)
    dense_nll = nll(dense)
    sources = {b: _load_measured(f) for b, f in folders.items()}
    events.stage(f"stage 1/2: measuring {len(kinds)} kinds of layer at {', '.join(map(str, folders))} blocks on "
                 f"{len(windows)} held-out windows")
    measured = measure(dense, sources, kinds, nll, lambda kind, b, value: events.done(
        f"{kind} at {b} blocks, the rest dense: held-out perplexity x{math.exp(value - dense_nll):.3f}"))
    del sources, dense
    choices = {kind: [KindOption(None, sum(selected[n] for n in names), 0.0)]
               + [KindOption(b, sum(layers[b][n].params_monarch for n in names), measured[kind, b] - dense_nll)
                  for b in folders if (kind, b) in measured]
               for kind, names in kinds.items()}
    plan = choose(choices, budget_params)
    counts = [option.nblocks for option in plan.values() if option.nblocks is not None]
    nblocks = max(sorted(set(counts)), key=counts.count) if counts else base.nblocks
    recipe = replace(base, nblocks=nblocks,
                     exclude=[*base.exclude, *(kind_pattern(k) for k, o in plan.items() if o.nblocks is None)],
                     overrides={kind_pattern(k): o.nblocks for k, o in plan.items() if o.nblocks not in (None, nblocks)})
    described = ", ".join(f"{k} {'dense' if o.nblocks is None else o.nblocks}" for k, o in plan.items())
    events.stage(f"stage 1/2: converting by kind ({described}) -> {converted}")
    with events.converting() as convert_events:
        convert_pretrained(options.model, converted, recipe, calibration_data=data.calibration, force=True, check=False,
                           events=convert_events)

    def uniform_params(b: int) -> int:
        return sum(layer.params_dense if layer.kept_dense else layer.params_monarch for layer in layers[b].values())

    record: dict[str, Any] = {
        "objective": "kinds", "windows": len(windows), "dense_perplexity": math.exp(dense_nll),
        "measured": [{"kind": kind, "nblocks": b, "perplexity": math.exp(value)} for (kind, b), value in measured.items()],
        "plan": {k: "dense" if o.nblocks is None else o.nblocks for k, o in plan.items()},
        "params": {"budget": budget_params, "plan": sum(o.params for o in plan.values())},
        "chosen": "kinds", "uniform": None,
    }
    fits = [b for b in folders if uniform_params(b) <= budget_params]
    if fits:
        rival = max(fits, key=uniform_params)
        chosen, scores = _keep_better("kinds", "the plan by kind", converted, folders.pop(rival), rival, options, data, events)
        record.update(uniform={"nblocks": rival}, perplexity=scores, chosen=chosen)
    _reset(list(folders.values()))
    return record


def _stored_dtype(folder: Path) -> Any:
    """The floating-point dtype a model folder's config says its weights are stored in, or None."""
    import torch

    from monarchify.hf.loading import read_config

    config = read_config(folder)
    name = config.get("dtype") or config.get("torch_dtype")
    value = getattr(torch, name, None) if isinstance(name, str) else None
    return value if isinstance(value, torch.dtype) and value.is_floating_point else None


def _load_measured(source: str | Path) -> Any:
    """A model as this recipe measures and heals it: in float32 whatever the checkpoint stores.
    AdamW's small steps vanish in bfloat16 weights (a step of 1e-4 relative is below its
    resolution), CPUs multiply half precision slowly, and every perplexity the run compares
    (dense, budget plan, uniform rival, healed) is then taken the same way."""
    import torch

    from monarchify.hf.loading import load_model

    return load_model(str(source), dtype=torch.float32)


def _generated(options: TextCompressOptions, dense: Any, data: TextData, events: TextCompressEvents) -> Any:
    """The windows the dense model writes for healing: read back when an earlier start of this
    stage wrote them already (with the same options), else written now by the main process and
    read by the others."""
    from monarchify import distributed
    from monarchify.lm.generate import PROMPT_TOKENS, TOP_P, load_windows, prompts, save_windows, write_windows

    path = options.stages / GENERATED
    fingerprint = json.dumps({"generate": options.generate, "seed": options.seed, "block_size": options.block_size, "top_p": TOP_P,
                              "files": [str(p) for p in options.text], "eval_fraction": options.eval_fraction,
                              "model": str(options.model)}, sort_keys=True)  # what the prompts and the sampling depend on
    windows = load_windows(path, fingerprint)
    if windows is not None and len(windows) == options.generate:
        events.done(f"text written by the dense model: {len(windows)} windows, written already ({path})")
        return windows
    written = None
    if distributed.is_main():
        events.stage(f"the dense model writes {options.generate} windows of {options.block_size} tokens to heal on")
        starts = prompts(data.train, options.generate, options.seed, length=min(PROMPT_TOKENS, options.block_size // 2))
        written = write_windows(dense, starts, options.block_size, seed=options.seed, progress=events.generating)
        save_windows(path, written, fingerprint)
    distributed.barrier()
    return written if written is not None else load_windows(path, fingerprint)


def _reset(paths: list[Path]) -> None:
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path)


def compress_text(options: TextCompressOptions, events: TextCompressEvents | None = None,
                  argv: list[str] | None = None) -> TextCompressResult:
    """Run (or resume) the stages and leave the healed model and its results in ``options.out``."""
    import torch

    from monarchify.atomic import atomic_write_text, check_output_dir
    from monarchify.heal import check_sharding, heal_
    from monarchify.hf.convert import convert_pretrained
    from monarchify.hf.loading import load_tokenizer
    from monarchify.hf.saving import recipe_of, save_model
    from monarchify.hf.stored_report import read_report
    from monarchify.manifest import RunManifest
    from monarchify.training import peak_rss_mib, run_environment

    from monarchify import distributed

    # Under torchrun: every process checks, reads the text and heals (each on its share of every
    # batch); only the main one converts, writes the stages, the manifest and the output, and
    # speaks, while the others wait for it at each hand-over.
    distributed.init()
    events = (events or TextCompressEvents()) if distributed.is_main() else TextCompressEvents()
    if options.heal is not None:
        check_sharding()
    environment = run_environment()
    inputs = (options.model, *options.text)
    check_output_dir(options.out, options.force, inputs=inputs)
    check_output_dir(options.stages, force=True, inputs=inputs)
    distributed.barrier()  # every process has checked before the main one changes anything
    if options.force and distributed.is_main():
        _reset([options.stages])
    tokenizer = load_tokenizer(options.model)
    if tokenizer is None:
        raise ConfigError(f"'{options.model}' has no tokenizer files; language-model compression reads text with it")
    data = load_text(options, tokenizer)
    events.done(f"text: {data.lines['train']} lines -> {len(data.train)} windows of {options.block_size} tokens for "
                f"calibration and healing; {len(data.heldout)} held-out windows ({data.lines['heldout']} lines)")

    stage_options = options.stage_options()
    converted, state_dir = options.stages / CONVERTED, options.stages / HEALED_STATE
    times: dict[str, float] = {}
    memory: dict[str, float | None] = {}
    if distributed.is_main():  # the stages' bookkeeping and the conversion
        manifest = RunManifest.load(options.stages)
        if options.restart_from is not None:
            manifest.forget(options.restart_from)

        status = manifest.check("convert", stage_options["convert"])
        if status == "done" and (converted / "config.json").is_file():
            events.done(f"stage 1/2: converted already ({converted})")
        else:
            if status == "stale":
                changed = manifest.changes("convert", stage_options["convert"])
                events.note(f"stage 1/2: {', '.join(changed) or 'an earlier stage'} changed: converting again")
            _reset([converted, state_dir])
            manifest.start("convert", stage_options["convert"])
            size = f"budget {options.budget}" if options.budget is not None else f"{options.conversion.nblocks} blocks"
            events.stage(f"stage 1/2: converting at {size} with calibration on "
                         f"{len(data.calibration.fit)} text samples -> {converted}")
            began = time.perf_counter()
            if options.by_kind:
                allocation = allocate_by_kind(options, converted, data, events)
            else:
                with events.converting() as convert_events:
                    convert_pretrained(options.model, converted, options.conversion, calibration_data=data.calibration, force=True,
                                       check=False, events=convert_events)
                if options.budget is not None:
                    allocation = check_against_uniform(options, converted, data, events)
            if options.budget is not None:
                atomic_write_text(converted / ALLOCATION_FILE, json.dumps(allocation, indent=2) + "\n")
            times["convert_seconds"] = time.perf_counter() - began
            memory["convert_peak_rss_mib"] = peak_rss_mib()
            manifest.finish("convert")

        status = manifest.check("heal", stage_options["heal"])
        if status == "stale":
            changed = manifest.changes("heal", stage_options["heal"])
            events.note(f"stage 2/2: {', '.join(changed) or 'the conversion'} changed: healing again")
            _reset([state_dir])
        elif status == "started" and (state_dir / "heal_state.json").is_file():
            step = json.loads((state_dir / "heal_state.json").read_text(encoding="utf-8"))["step"]
            events.note(f"stage 2/2: resuming healing from step {step} of {options.heal.steps if options.heal else 0}")
        if status != "started":
            manifest.start("heal", stage_options["heal"])
    distributed.barrier()  # the converted stage and a reset healing state are there for every process

    torch.manual_seed(options.seed)
    dense = _load_measured(options.model)
    dense_ppl, dense_params = window_perplexity(dense, data.heldout, options.batch_size), parameters(dense)
    events.done(f"dense perplexity on the held-out text: {dense_ppl:.2f}")
    heal = options.heal
    if heal is None:  # only healing needs the dense model beside the converted one
        del dense
    student = _load_measured(converted)
    stored = _stored_dtype(converted)  # the output is written back in the stored precision
    report = read_report(str(converted))
    result_heal: dict[str, Any] = {"steps": 0}
    if heal is not None:
        windows = data.train
        if options.generate:
            began = time.perf_counter()
            windows = torch.cat([windows, _generated(options, dense, data, events)])
            times["generate_seconds"] = time.perf_counter() - began
        events.stage(f"stage 2/2: healing {heal.steps} steps of {options.batch_size} x {options.block_size} tokens "
                     f"towards the dense model -> {options.out}")
        generator = torch.Generator().manual_seed(options.seed)
        order = torch.randperm(len(windows), generator=generator)
        batches = [{"input_ids": windows[order[i: i + options.batch_size]]} for i in range(0, len(windows), options.batch_size)]
        batches = [b for b in batches if len(b["input_ids"]) == options.batch_size] or batches[:1]

        def measure(model: Any) -> float:
            return window_perplexity(model, data.heldout, options.batch_size)

        healed = heal_(student, dense, batches, heal, measure=measure, state_dir=state_dir,
                       progress=lambda step, loss: events.heal_step(step, heal.steps, loss),
                       measured=lambda step, perplexity: events.heal_measured(step, heal.steps, perplexity))
        tokens_per_step = options.batch_size * options.block_size
        result_heal = {
            **heal.to_dict(), "batch_size": options.batch_size, "tokens": heal.steps * tokens_per_step,
            "windows": {"text": len(data.train), "generated": options.generate},
            "perplexity_before": healed.heldout_before, "perplexity_after": healed.heldout_after,
            "curve": [{"step": s, "tokens": s * tokens_per_step, "perplexity": v} for s, v in healed.curve],
            "seconds": round(healed.seconds, 2), "median_step_ms": healed.median_step_ms, "final_loss": healed.losses[-1] if healed.losses else None,
            "world_size": distributed.world_size(), "global_batch": options.batch_size, "sharded": distributed.sharded(),
        }
        compressed_ppl = healed.heldout_after
        before = healed.heldout_before
    else:
        compressed_ppl = before = window_perplexity(student, data.heldout, options.batch_size)
    report.meta["heal"] = {"teacher": str(options.model), **result_heal}
    results = {
        "model": str(options.model),
        "text": [str(p) for p in options.text],
        "perplexity": {"dense": dense_ppl, "converted": before, "compressed": compressed_ppl,
                       "ratio": compressed_ppl / dense_ppl},
        "params": {"dense": dense_params, "compressed": parameters(student), "ratio": parameters(student) / dense_params},
        "heldout": {"windows": len(data.heldout), "tokens_scored": len(data.heldout) * (options.block_size - 1),
                    "window": options.block_size},
        "tokens": {"calibration_samples": len(data.calibration.fit), "healing": result_heal.get("tokens", 0),
                   "generated": options.generate * options.block_size},
        **({"allocation": json.loads((converted / ALLOCATION_FILE).read_text(encoding="utf-8"))}
           if (converted / ALLOCATION_FILE).is_file() else {}),
        "heal": result_heal,
        "times": {k: round(v, 2) for k, v in times.items()},
        "memory": {**memory, "peak_rss_mib": peak_rss_mib()},
        "dtype": {"measured_and_healed": "float32", "saved": str(stored or torch.float32).removeprefix("torch.")},
        "recipe": recipe_of(student),
        "options": options.to_dict(),
        "environment": environment,
        "command": argv,
    }
    results["options"]["heal"] = heal.to_dict() if heal else None
    if distributed.is_main():
        events.stage(f"saving to {options.out}")
        if stored is not None and stored != torch.float32:
            student = student.to(stored)
        save_model(student, options.out, tokenizer=tokenizer, report=report, force=options.force,
                   extra_files={RESULTS_FILE: json.dumps(results, indent=2, default=str) + "\n"})
        manifest.finish("heal")
    distributed.barrier()
    return TextCompressResult(options.out, results)
