"""Healing: a short pass that trains a converted model to reproduce its dense original's hidden
states on unlabeled text, before any task fine-tuning.

Why: the projection is optimal for each layer on its own, but the errors of 36 layers compound;
the task fine-tuning that follows then spends its few hundred steps repairing the model instead
of learning the task. Matching the teacher layer by layer needs no labels, so it can use any
text, and it leaves a model that is closer to the dense one for every downstream task.

Plain PyTorch over a list of token batches; the teacher and student are any modules that
return ``hidden_states`` when asked (every transformers base model does). The settings,
:class:`HealConfig`, live in the torch-free :mod:`monarchify.heal_config` (re-exported here).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from monarchify import distributed
from monarchify.distill import hidden_state_loss, logit_loss
from monarchify.errors import ConfigError
from monarchify.heal_config import HealConfig
from monarchify.samples import model_device
from monarchify.training import StepTimer, check_resume, median_ms, recorded

__all__ = ["HealConfig", "HealResult", "check_sharding", "heal_", "healing_loss", "hidden_error"]

Batch = dict[str, torch.Tensor]


@dataclass
class HealResult:
    losses: list[float] = field(default_factory=list)
    """Training loss of every step (:func:`healing_loss`)."""
    heldout_before: float | None = None
    heldout_after: float | None = None
    curve: list[tuple[int, float]] = field(default_factory=list)
    """``(step, held-out value)`` from step 0 to the last, every ``config.eval_every`` steps
    (only the two ends without it); empty with nothing to measure."""
    seconds: float = 0.0
    """Wall time of the loop, the held-out measurements left out (a resumed run's: the whole run's)."""
    step_seconds: list[float] = field(default_factory=list)
    """Wall time of every optimisation step (the training core's :class:`StepTimer`)."""

    @property
    def median_step_ms(self) -> float | None:
        return median_ms(self.step_seconds)


def _states(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, ...]:
    # Index 0 is the embedding output: conversion leaves embeddings alone, so it carries no signal.
    return model(**batch, output_hidden_states=True).hidden_states[1:]


@torch.no_grad()
def hidden_error(student: nn.Module, teacher: nn.Module, batches: Iterable[Batch], *, per_token: bool = False) -> float:
    """Mean over batches of :func:`hidden_state_loss` (``per_token`` as there): how far the
    student is from the teacher."""
    was_training = student.training
    student.eval()
    teacher.eval()
    device = model_device(student)
    values = []
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        values.append(float(hidden_state_loss(_states(student, batch), _states(teacher, batch), batch.get("attention_mask"),
                                              per_token=per_token)))
    student.train(was_training)
    if not values:
        raise ConfigError("no batches to measure the hidden-state error on")
    return sum(values) / len(values)


def token_logit_loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None, temperature: float) -> torch.Tensor:
    """:func:`logit_loss` over every real token of ``(batch, tokens, vocabulary)`` logits: a
    language model predicts at every position, and each position is one distribution to match."""
    if mask is not None:
        keep = mask.bool()
        return logit_loss(student[keep], teacher[keep], temperature)
    return logit_loss(student.flatten(0, -2), teacher.flatten(0, -2), temperature)


def healing_loss(student: nn.Module, teacher: nn.Module, batch: Batch, config: HealConfig) -> torch.Tensor:
    """The loss :func:`heal_` minimises on one batch (see :class:`HealConfig`)."""
    hidden = config.hidden_weight > 0
    with torch.no_grad():
        taught = teacher(**batch, output_hidden_states=hidden)
    output = student(**batch, output_hidden_states=hidden)
    mask = batch.get("attention_mask")
    loss = torch.zeros((), device=model_device(student))
    if hidden:
        loss = loss + config.hidden_weight * hidden_state_loss(output.hidden_states[1:], taught.hidden_states[1:], mask,
                                                              per_token=config.per_token_hidden)
    if config.logit_weight > 0:
        if getattr(output, "logits", None) is None:
            raise ConfigError(f"{type(student).__name__} returns no logits to match: heal it with logit_weight 0")
        loss = loss + config.logit_weight * token_logit_loss(output.logits, taught.logits, mask, config.temperature)
    return loss


def _schedule(config: HealConfig) -> Callable[[int], float]:
    warm = max(1, math.ceil(config.warmup * config.steps)) if config.warmup > 0 else 0

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (config.steps - step) / max(1, config.steps - warm))

    return factor


def _tokens(batch: Batch) -> int:
    mask = batch.get("attention_mask")
    if mask is not None:
        return int(mask.sum())
    ids = next(iter(batch.values()))
    return ids.shape[0] * (ids.shape[1] if ids.dim() > 1 else 1)


def share(batch: Batch, rank: int, world: int) -> tuple[Batch, float]:
    """This process's rows of one step's ``batch`` when ``world`` processes heal together, and
    the weight of its loss.

    Why rows of every batch rather than whole batches per process: the global batch (what one
    optimizer step averages over) stays the batch of one process, so the same settings give
    the same training on any number of processes. The weight is ``world`` x this share's real
    tokens / the batch's: DDP averages the processes' gradients, so the step follows the
    token-weighted mean over the whole batch, which is exactly one process's loss for the logit
    term (a mean over tokens) and for windows of text (equal tokens everywhere); the
    hidden-state term, a ratio of sums per layer, comes out close to it but not bit for bit."""
    rows = next(iter(batch.values())).shape[0]
    if rows < world:
        raise ConfigError(f"a batch of {rows} rows cannot be shared by {world} processes: batch_size must be at least the number of processes")
    part = {key: torch.tensor_split(value, world)[rank] for key, value in batch.items()}
    return part, world * _tokens(part) / max(1, _tokens(batch))


def heal_(
    student: nn.Module,
    teacher: nn.Module,
    batches: list[Batch],
    config: HealConfig,
    *,
    heldout: list[Batch] | None = None,
    measure: Callable[[nn.Module], float] | None = None,
    progress: Callable[[int, float], None] | None = None,
    state_dir: Path | None = None,
    measured: Callable[[int, float], None] | None = None,
) -> HealResult:
    """Train ``student`` in place to match ``teacher`` on ``batches`` (cycled), as ``config`` says.

    Dropout stays off (both models in eval mode): the target is the teacher's function itself.
    Every student parameter that requires a gradient trains; the teacher never does.
    ``measure(student)`` is the held-out number recorded before, after, and every
    ``config.eval_every`` steps into ``curve`` (that time is not in ``seconds``); by default
    the hidden-state error on ``heldout`` batches, none without them. ``progress(step,
    loss)`` is called after every step, ``measured(step, value)`` after every measurement (so
    a front end can show the curve as it grows: a long healing run is hours).

    ``state_dir``: where a resumable state is written every ``config.save_every`` steps (the
    trainable weights, AdamW's moments and the record so far, in safetensors and JSON); a
    state found there is continued from, exactly as if the run had not stopped, provided it
    was written with the same settings.

    Under ``torchrun`` (an initialised process group of several processes) the student trains
    wrapped in ``DistributedDataParallel``, each process on its share of every batch
    (:func:`share`); the recorded losses are those of the whole batch, the held-out
    measurements run identically in every process (the models are identical), and only the
    main process writes the state. Launched with accelerate's FSDP configuration
    (:func:`monarchify.distributed.sharded`) it trains a sharded copy instead (:func:`_sharded`):
    each process keeps a share of every weight, gradient and AdamW moment, and the healed
    weights are gathered back into ``student`` at the end.
    """
    if not batches:
        raise ConfigError("healing needs at least one batch of text")
    check_sharding()
    if measure is None and heldout:
        # The held-out error weighs tokens as the loss does: what training lowers is what is measured.
        measure = lambda model: hidden_error(model, teacher, heldout, per_token=config.per_token_hidden)  # noqa: E731
    torch.manual_seed(config.seed)
    teacher.eval().requires_grad_(False)
    student.eval()
    device = model_device(student)
    parallel = distributed.active()
    sharded = parallel and distributed.sharded()
    frozen = _freeze_unconverted(student) if config.train == "converted" else []
    model = _sharded(student, device) if sharded else student  # the module whose parameters train
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([p for _, p in named], lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(config))
    result = HealResult()
    state = HealState(state_dir, config) if state_dir is not None else None
    first = state.restore(named, optimizer, scheduler, result) if state is not None else 0
    trained = model
    if parallel and not sharded:
        from torch.nn.parallel import DistributedDataParallel

        # find_unused_parameters: a hidden-state loss leaves parts of a model unused (a pooler)
        trained = DistributedDataParallel(student, device_ids=[device] if device.type == "cuda" else None,
                                          find_unused_parameters=True)
    rank, world = distributed.rank(), distributed.world_size()
    def record(step: int, value: float) -> float:
        result.curve.append((step, value))
        if measured is not None:
            measured(step, value)
        return value

    if measure is not None and first == 0:
        result.heldout_before = record(0, measure(model))
    measuring = 0.0
    start = time.perf_counter() - result.seconds
    timer = StepTimer(result.step_seconds)
    result.step_seconds = timer.step_seconds  # one list: what a saved state records is the timer's
    generator = torch.Generator().manual_seed(config.seed)
    epochs = (torch.randperm(len(batches), generator=generator).tolist() for _ in itertools.count())
    schedule = itertools.chain.from_iterable(epochs)  # every batch once per pass, reshuffled each pass
    for _ in range(first):
        next(schedule)  # a resumed run sees the batches the uninterrupted one would have
    for step in range(first, config.steps):
        timer.begin()
        batch, weight = batches[next(schedule)], 1.0
        if parallel:
            batch, weight = share(batch, rank, world)
        batch = {k: v.to(device) for k, v in batch.items()}
        loss = healing_loss(trained, teacher, batch, config)
        optimizer.zero_grad(set_to_none=True)
        (loss * weight if parallel else loss).backward()
        if config.max_grad_norm is not None:  # after DDP's all-reduce, or on FSDP's sharded gradients: the whole norm
            torch.nn.utils.clip_grad_norm_([p for _, p in named], config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        result.losses.append(distributed.all_reduce_sum(loss.item() * weight / world) if parallel else loss.item())
        timer.end()
        done = step + 1
        if measure is not None and config.eval_every and done % config.eval_every == 0 and done < config.steps:
            began = time.perf_counter()
            record(done, measure(model))
            measuring += time.perf_counter() - began
        if state is not None and config.save_every and done % config.save_every == 0 and done < config.steps:
            result.seconds = time.perf_counter() - start - measuring
            state.save(done, named, optimizer, result)  # gathered in every process, written by the main one
        if progress is not None:
            progress(done, result.losses[-1])
    result.seconds = time.perf_counter() - start - measuring
    if sharded:
        _gather_into(student, model)
        del trained, model, named, optimizer, scheduler
    for param in frozen:
        param.requires_grad_(True)
    if measure is not None:
        result.heldout_after = record(config.steps, measure(student))
    return result


def _freeze_unconverted(student: nn.Module) -> list[nn.Parameter]:
    """Stop the gradient of every trainable weight outside the converted layers (``HealConfig.train
    = "converted"``) and return those weights, to be released after the run. Not computing their
    gradients is also the cheaper step: a causal LM's output layer is its largest matrix."""
    from monarchify.monarch import STRUCTURED_LAYERS

    converted = {id(p) for m in student.modules() if isinstance(m, STRUCTURED_LAYERS) for p in m.parameters()}
    if not converted:
        raise ConfigError("healing only the converted layers, but the model has none (no Monarch or low-rank layer)")
    frozen = [p for p in student.parameters() if p.requires_grad and id(p) not in converted]
    for param in frozen:
        param.requires_grad_(False)
    return frozen


def check_sharding() -> None:
    """Refuse a sharded launch that would leave the processes but the first without weights.

    accelerate's ``fsdp_cpu_ram_efficient_loading`` makes transformers load the weights in the
    first process of each machine only (the others get empty tensors, which Trainer fills from
    the first); the healing loop shards what each process loaded, and its teacher is never
    sharded, so every process needs the whole models. Called before loading anything."""
    if distributed.sharded() and os.environ.get("FSDP_CPU_RAM_EFFICIENT_LOADING", "").strip().lower() in ("1", "true", "yes"):
        raise ConfigError("healing sharded needs the weights loaded in every process, but accelerate's "
                          "fsdp_cpu_ram_efficient_loading loads them in the first process only: set it to false")


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP shards one by one (each gathered whole only for its own forward and
    backward): the classes accelerate's FSDP configuration names (``FSDP_TRANSFORMER_CLS_TO_WRAP``,
    the ``fsdp_transformer_layer_cls_to_wrap`` of its config file), else the blocks the model
    itself says must stay whole (transformers' ``_no_split_modules``: the decoder layers)."""
    named = os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "")
    classes = {c.strip() for c in named.split(",") if c.strip()} or set(getattr(model, "_no_split_modules", None) or ())
    return [m for m in model.modules() if m is not model and type(m).__name__ in classes]


def _sharded(student: nn.Module, device: torch.device) -> nn.Module:
    """A copy of ``student`` whose parameters FSDP (``fully_shard``) spreads over the processes,
    holding the same values.

    A copy, so that ``student`` stays an ordinary module for what follows the healing (measuring
    it, saving it from the main process alone); built without a second whole copy of the
    weights: the copy's parameters start on the meta device, are sharded there, and each process
    then fills only its own shares. Names are the student's, so a healing state is the same
    files whether it was written sharded or not. The Monarch factors ``L`` and ``R`` are plain
    parameters of their layer and are sharded like any other (along their first dimension)."""
    import copy

    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import fully_shard

    placeholders = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
                    for p in student.parameters()}
    model = copy.deepcopy(student, memo=dict(placeholders))  # tied parameters stay tied: one placeholder each
    for block in reversed(_blocks(model)):  # inner blocks before the blocks around them, as FSDP requires
        fully_shard(block)
    fully_shard(model)
    model.to_empty(device=device)
    with torch.no_grad():
        buffers = dict(student.named_buffers())
        for name, buffer in model.named_buffers():  # to_empty emptied them too; they are not sharded
            buffer.copy_(buffers[name])
    set_model_state_dict(model, student.state_dict(), options=StateDictOptions(full_state_dict=True))
    return model


@torch.no_grad()
def _gather_into(student: nn.Module, model: nn.Module) -> None:
    """The healed values of the sharded copy ``model``, whole, into ``student``'s parameters
    (in every process: each gathers every parameter from the others' shares)."""
    for (name, param), (other, shard) in zip(student.named_parameters(), model.named_parameters(), strict=True):
        assert name == other, (name, other)
        param.copy_(_whole(shard))


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` whole: gathered from every process's share when it is sharded (a DTensor),
    itself otherwise. Every process must ask for the same tensors in the same order."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _like(whole: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``whole`` cut the way ``param`` is (this process's share of it when ``param`` is sharded)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    whole = whole.to(param.device)
    if isinstance(param, DTensor):
        return distribute_tensor(whole, param.device_mesh, param.placements, src_data_rank=None)  # each cuts its own
    return whole


STATE_WEIGHTS, STATE_OPTIMIZER, STATE_RECORD = "heal_weights.safetensors", "heal_optimizer.safetensors", "heal_state.json"
STAGE = "heal"
"""The healing steps, as the state's record of the settings is checked (:func:`monarchify.training.check_resume`)."""


class HealState:
    """The resumable state of a healing run in a folder: weights and AdamW moments as
    safetensors (never pickle) under names carrying their step, and the record so far as JSON,
    replaced last and naming the files it goes with. A run stopped at any moment of a save
    leaves the previous record and its files whole (an earlier layout deleted the record
    before writing, so a stop in those seconds threw away the whole run: seen on a one-hour
    healing run); files no record names are cleared after the next save."""

    def __init__(self, folder: Path, config: HealConfig) -> None:
        self.folder, self.config = Path(folder), config

    def restore(self, named: list[tuple[str, nn.Parameter]], optimizer: torch.optim.Optimizer,
                scheduler: torch.optim.lr_scheduler.LRScheduler, result: HealResult) -> int:
        """Load the state if there is one; the step to continue from (0: none)."""
        record_file = self.folder / STATE_RECORD
        if not record_file.is_file():
            return 0
        from safetensors.torch import load_file

        record = json.loads(record_file.read_text(encoding="utf-8"))
        check_resume(self.folder, STAGE, self.config.to_dict(), what="the healing steps",
                     manifest=recorded(self.folder, STAGE, record.get("config") or {}),
                     advice="heal with the settings they were made with, or remove the state folder to start over")
        files = record.get("files") or {"weights": STATE_WEIGHTS, "optimizer": STATE_OPTIMIZER}  # (older states)
        weights = load_file(self.folder / files["weights"])
        moments = load_file(self.folder / files["optimizer"])
        with torch.no_grad():
            for name, param in named:
                param.copy_(_like(weights[name], param))
        for name, param in named:
            keys = [k for k in ("step", "exp_avg", "exp_avg_sq") if f"{name}::{k}" in moments]
            if keys:  # AdamW's step count is one number, its moments have the parameter's shape (and shares)
                optimizer.state[param] = {k: moments[f"{name}::{k}"] if k == "step" else _like(moments[f"{name}::{k}"], param)
                                          for k in keys}
        step = int(record["step"])
        scheduler.last_epoch = step  # where ``step`` calls of scheduler.step() leave it
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * _schedule(self.config)(step)
        result.losses = list(record["losses"])
        result.heldout_before = record["heldout_before"]
        result.curve = [(int(s), float(v)) for s, v in record["curve"]]
        result.seconds = float(record["seconds"])
        result.step_seconds = [float(s) for s in record.get("step_seconds", [])]  # none in an earlier version's state
        return step

    def save(self, step: int, named: list[tuple[str, nn.Parameter]], optimizer: torch.optim.Optimizer, result: HealResult) -> None:
        """Called in every process (a sharded state is gathered from all of them); the main one writes."""
        from safetensors.torch import save_file

        weights = {name: _whole(p.detach()).contiguous().cpu() for name, p in named}
        moments = {f"{name}::{k}": _whole(v.detach()).contiguous().cpu() for name, p in named
                   for k, v in optimizer.state.get(p, {}).items() if isinstance(v, torch.Tensor)}
        if not distributed.is_main():
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        files = {kind: _step_name(name, step) for kind, name in (("weights", STATE_WEIGHTS), ("optimizer", STATE_OPTIMIZER))}
        record = {"step": step, "config": self.config.to_dict(), "losses": result.losses, "heldout_before": result.heldout_before,
                  "curve": result.curve, "seconds": result.seconds, "step_seconds": result.step_seconds, "files": files}
        for kind, tensors in (("weights", weights), ("optimizer", moments)):
            tmp = self.folder / f".{files[kind]}.tmp"
            save_file(tensors, str(tmp))
            os.replace(tmp, self.folder / files[kind])
        tmp = self.folder / f".{STATE_RECORD}.tmp"
        tmp.write_text(json.dumps(record) + "\n", encoding="utf-8")
        os.replace(tmp, self.folder / STATE_RECORD)  # the moment the new state takes over
        for path in self.folder.glob("*.safetensors"):
            if path.name not in files.values():
                path.unlink(missing_ok=True)


def _step_name(name: str, step: int) -> str:
    """``heal_weights.safetensors`` -> ``heal_weights.step000120.safetensors``."""
    stem, _, ext = name.partition(".")
    return f"{stem}.step{step:06d}.{ext}"
