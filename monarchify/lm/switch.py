"""The sparse-to-dense switch in the middle of a ``Trainer`` run.

At the chosen step every Monarch layer is multiplied out into the ``nn.Linear`` it computes
(:func:`monarchify.pipeline.densify.densify_`), so the loss right after the switch equals the
loss right before, up to float rounding. Training then continues dense.

The optimizer is changed in place, not rebuilt: ``Trainer`` and accelerate hold it (and the
learning-rate scheduler holds it too), and swapping the object under them mid-loop would leave
one of them stepping the old parameters. In each parameter group the Monarch factors ``R``,
``L`` give way to the new dense weight (at the first factor's position, which is where a fresh
optimizer over the dense model would put it, so a checkpoint written after the switch reloads
into one). The state of the factors is dropped: AdamW's moments of ``L`` and ``R`` say nothing
about the moments of their product, so the dense weight starts with fresh moments (step 0,
zeros), which is what restarting AdamW for those weights means. A bias is the same parameter
before and after, so its moments carry over.

Under several processes every process densifies its identical copy the same way at the same
step and changes its optimizer the same way; the main process's dense weights are then sent to
the others (equal already, now equal by fact), and the DistributedDataParallel wrapper Trainer
trains through is rebuilt around the new parameters (:func:`monarchify.distributed.rebuild_ddp`):
it would otherwise go on averaging the gradients of the factors only. A sharded (FSDP) model is
not switched: its factors are pieces spread over the processes, and the wrapper owns them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from monarchify import distributed
from monarchify.monarch import MonarchLinear
from monarchify.pipeline.densify import densify_


def monarch_layers(model: nn.Module) -> dict[str, MonarchLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, MonarchLinear)}


def _inner(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer under accelerate's wrapper (which shares its groups and state)."""
    return getattr(optimizer, "optimizer", optimizer)


def swap_parameters(optimizer: Any, replaced: dict[nn.Parameter, nn.Parameter | None], carried: set[nn.Parameter]) -> None:
    """In every group of ``optimizer``: each key of ``replaced`` becomes its value (``None``:
    removed); the state of ``carried`` parameters moves to their replacement, other replaced
    parameters lose theirs."""
    opt = _inner(optimizer)
    for group in opt.param_groups:
        params = []
        for p in group["params"]:
            if p not in replaced:
                params.append(p)
                continue
            new = replaced[p]
            state = opt.state.pop(p, None)
            if new is not None:
                params.append(new)
                if p in carried and state is not None:
                    opt.state[new] = state
        group["params"] = params


def densify_training(model: nn.Module, optimizer: Any | None) -> list[str]:
    """Densify every Monarch layer of ``model`` in place and point ``optimizer`` (if any) at the
    new parameters, as the module docstring says; the layers densified, in model order."""
    before = monarch_layers(model)
    names = densify_(model)
    if optimizer is None:
        return names
    replaced: dict[nn.Parameter, nn.Parameter | None] = {}
    carried: set[nn.Parameter] = set()
    for name, old in before.items():
        new = model.get_submodule(name)
        # Whichever factor the groups list first takes the weight's place; the other goes.
        order = [p for group in _inner(optimizer).param_groups for p in group["params"] if p is old.R or p is old.L]
        if order:
            replaced[order[0]] = new.weight
            for other in order[1:]:
                replaced[other] = None
        if old.bias is not None:
            replaced[old.bias] = new.bias
            carried.add(old.bias)
    swap_parameters(optimizer, replaced, carried)
    return names


@torch.no_grad()
def probe_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> float:
    """The model's loss on ``batch`` in evaluation mode (no dropout), restoring its mode."""
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        return float(model(**{k: v.to(device) for k, v in batch.items()}).loss)
    finally:
        model.train(was_training)


class DensifyCallback(TrainerCallback):
    """At the end of step ``step``, densify the model and its optimizer; record the switch.

    ``probe``: a fixed batch whose loss is measured right before and right after (the record
    shows the switch was exact). ``record`` receives ``{"step", "layers", "loss_before",
    "loss_after"}``. A run resumed past the switch starts from a dense checkpoint, and the
    model was densified before training: nothing is left to do then.

    ``wrapped``: how to reach the module Trainer trains through (``lambda: trainer.model_wrapped``),
    rebuilt after the switch when it is a DistributedDataParallel wrapper.
    """

    def __init__(self, step: int, probe: dict[str, torch.Tensor] | None = None,
                 wrapped: Callable[[], nn.Module] | None = None) -> None:
        self.step = step
        self.probe = probe
        self.wrapped = wrapped
        self.record: dict[str, Any] | None = None

    def on_step_end(self, args: Any, state: Any, control: Any, model: nn.Module | None = None,
                    optimizer: Any = None, **kwargs: Any) -> None:
        if model is None or state.global_step < self.step or not monarch_layers(model):
            return
        before = probe_loss(model, self.probe) if self.probe is not None else None
        names = densify_training(model, optimizer)
        distributed.broadcast_from_main([p for name in names for p in model.get_submodule(name).parameters()])
        self._rewrap(model)
        after = probe_loss(model, self.probe) if self.probe is not None else None
        self.record = {"step": state.global_step, "layers": len(names), "loss_before": before, "loss_after": after}

    def _rewrap(self, model: nn.Module) -> None:
        wrapper = self.wrapped() if self.wrapped is not None else None
        if wrapper is None or wrapper is model:
            return  # one process: Trainer calls the model itself
        from torch.nn.parallel import DistributedDataParallel

        if not isinstance(wrapper, DistributedDataParallel) or wrapper.module is not model:
            raise RuntimeError(f"the switch to dense cannot change the parameters of a model wrapped in {type(wrapper).__name__}")
        distributed.rebuild_ddp(wrapper)
