"""Calibration for a streaming conversion, one transformer block at a time (as GPTQ and
llm-compressor do it): only one block's weights are in memory at once.

The in-memory path runs the calibration text through the whole dense model and records each
selected layer's input statistics. Here the same forward pass is cut at the blocks:

1. the model is built on the meta device, buffers real (rotary frequencies and position ids
   are computed by the constructor, not stored); every module outside the blocks reads its
   tensors from the checkpoint when it is called, so only what runs before the first block
   is read;
2. a stand-in for the first block records its inputs (hidden states and whatever else the
   architecture passes: masks, position embeddings, position ids) for every batch, and stops
   the pass;
3. each block in turn is read from the checkpoint, runs every recorded batch with the observe
   stage's :class:`~monarchify.pipeline.observe.Collector` hooked on its selected layers, and
   its outputs replace the recorded hidden states; its layers are projected by the in-memory
   path's projector; the block goes back to the meta device.

The statistics are those of the dense model, as in memory (the outputs of the dense block feed
the next), so the factors are the in-memory path's. Memory: one block, the recorded inputs of
every batch, and that block's statistics.
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import transformers
from torch import nn

from monarchify.config import MonarchConfig
from monarchify.errors import ConfigError
from monarchify.hf.loading import empty_model, short_error
from monarchify.hf.tensorfiles import read_tensor
from monarchify.pipeline import Events, count_params
from monarchify.pipeline.allocate import Allocation, allocate, needs_fisher
from monarchify.pipeline.apply import apply
from monarchify.pipeline.observe import (
    FISHER_SAMPLES, Collector, InputStatistics, Observation, calibration_batches, first_samples, output_fisher,
)
from monarchify.pipeline.plan import PlannedLayer, block_index, block_list, plan
from monarchify.pipeline.pricing import LayerChoices, price_layer
from monarchify.pipeline.project import Projected, default_projector, project_layers
from monarchify.pipeline.report import build_report
from monarchify.report import ConversionReport
from monarchify.samples import TextSamples


class _Caught(Exception):
    """Raised by the stand-in for the first block once it has recorded its inputs."""

    def __init__(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        super().__init__("first block reached")
        self.args, self.kwargs = args, kwargs


class _Catcher(nn.Module):
    """Takes the first block's place for one forward pass; the model may read the block's
    attributes on the way (an attention type), so they are passed through."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, *args: Any, **kwargs: Any) -> None:
        raise _Caught(args, kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("block"), name)


@dataclass
class _Inputs:
    """One batch at the entrance of the next block to run."""

    args: list[Any]
    kwargs: dict[str, Any]
    mask: torch.Tensor | None
    """The batch's attention mask over tokens: padded positions are left out of the statistics."""

    def hidden(self) -> torch.Tensor:
        return self.args[0] if self.args else self.kwargs["hidden_states"]

    def copy(self) -> _Inputs:
        """The same batch, moving on separately (tensors are replaced, never written to)."""
        return _Inputs(list(self.args), dict(self.kwargs), self.mask)

    def advance(self, output: Any) -> None:
        hidden = output if isinstance(output, torch.Tensor) else output[0]
        if self.args:
            self.args[0] = hidden
        else:
            self.kwargs["hidden_states"] = hidden


def _no_cache(value: Any) -> Any:
    """A key/value cache would keep every block's keys and values of every batch; a block
    reads nothing from an empty one, so it is left out."""
    return None if isinstance(value, transformers.Cache) else value


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


class _Weights:
    """Reads modules' tensors from the checkpoint when needed and puts them back on the meta
    device after, by the names the checkpoint stores them under (tied weights included)."""

    def __init__(self, checkpoint: Any, model: nn.Module, device: torch.device) -> None:
        self.checkpoint, self.device = checkpoint, device
        self.source: dict[str, str] = {}
        aliases: dict[int, list[str]] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            aliases.setdefault(id(param), []).append(name)
        for names in aliases.values():
            stored = next((n for n in names if n in checkpoint.tensors), None)
            self.source.update(dict.fromkeys(names, stored) if stored else {})
        self.source.update({name: name for name, _ in model.named_buffers(remove_duplicate=False) if name in checkpoint.tensors})

    def load(self, module: nn.Module, prefix: str) -> None:
        """``module``'s own tensors (not its children's)."""
        for table in (module._parameters, module._buffers):
            for key, value in table.items():
                stored = self.source.get(prefix + key)
                if value is None or stored is None or not value.is_meta:
                    continue
                tensor = read_tensor(self.checkpoint.tensors[stored]).to(self.checkpoint.dtypes[stored]).to(self.device)
                table[key] = nn.Parameter(tensor, requires_grad=False) if table is module._parameters else tensor

    def drop(self, module: nn.Module, prefix: str) -> None:
        for table in (module._parameters, module._buffers):
            for key, value in table.items():
                if value is not None and not value.is_meta and prefix + key in self.source:
                    empty = torch.empty_like(value, device="meta")
                    table[key] = nn.Parameter(empty, requires_grad=False) if table is module._parameters else empty

    def load_tree(self, root: nn.Module, prefix: str) -> None:
        for name, module in root.named_modules():
            self.load(module, f"{prefix}{name}." if name else prefix)

    def drop_tree(self, root: nn.Module, prefix: str) -> None:
        for name, module in root.named_modules():
            self.drop(module, f"{prefix}{name}." if name else prefix)


def _trim_heap() -> None:
    """Hand freed heap memory back to the system. glibc keeps it: the projections' many
    sub-block buffers fragment the heap, and each block's peak then stacks on what the last
    one left (measured on the 7B-shaped benchmark: 5.2, 7.6, 8.2, 9.5 GB over four blocks)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


class _Release:
    """After each projected layer: drop the statistics no later layer of the block reads,
    so the largest layer's projection does not run next to every other input's matrices."""

    def __init__(self, layers: list[PlannedLayer], stats: dict[str, InputStatistics]) -> None:
        self.stats = list(stats.values())
        self.last = [{s.owner.get(layer.name): layer.name for layer in layers} for s in self.stats]

    def __call__(self, name: str) -> None:
        for stats, last in zip(self.stats, self.last):
            key = stats.owner.get(name)
            if last.get(key) == name:
                stats.drop(key)
        _trim_heap()


def blocks_problem(model: nn.Module, layers: list[PlannedLayer]) -> str | None:
    """Why this model cannot be calibrated one block at a time, or None."""
    try:
        block_list(model, [layer.name for layer in layers])
    except ConfigError as exc:
        return str(exc)
    kinds = sorted(set(map(str, getattr(getattr(model, "config", None), "layer_types", None) or [])))
    if len(kinds) > 1:  # each kind gets its own mask, and only the first block's inputs are recorded
        return f"its blocks are of {len(kinds)} kinds ({', '.join(kinds)}), which take different inputs"
    return None


class _InMemory:
    """The weights of a loaded model: already there, nothing to read or drop."""

    def load(self, module: nn.Module, prefix: str) -> None:
        pass

    drop = load_tree = drop_tree = load


class BlockwiseCalibration:
    """Projects the selected layers block by block, calibrated: of a streamed checkpoint (the
    streaming writer asks for a layer's factors, :meth:`projected`, in block order), or of a
    loaded model (:func:`convert_blockwise`).

    With ``sequential`` calibration two streams of hidden states go through the blocks: the
    dense model's, and the converted model's (each block's converted layers swapped in while
    it runs them); every layer's statistics then pair its dense inputs with its converted ones
    (:class:`~monarchify.pipeline.observe.Collector`'s ``reference``). The two streams agree
    until the first block with converted layers, and only the dense one is run until then.
    """

    def __init__(self, model: nn.Module, layers: list[PlannedLayer], allocation: Allocation, config: MonarchConfig,
                 samples: TextSamples, tokenizer: Any, *, weights: _Weights | _InMemory | None = None,
                 on_block: Callable[[int, int], None] | None = None,
                 price: Callable[[list[PlannedLayer], InputStatistics], None] | None = None) -> None:
        """``price``: instead of projecting a block's layers, hand them (their modules real) and
        their statistics to it: the pricing pass of a budget (:func:`price_blockwise`)."""
        self.model = model.eval()
        self.list_name, self.blocks = block_list(self.model, [layer.name for layer in layers])
        self.config, self.allocation, self.samples = config, allocation, samples
        self.weights = weights or _InMemory()
        self.device = next((p.device for p in model.parameters() if not p.is_meta), torch.device("cpu"))
        self.layers_of: dict[int, list[PlannedLayer]] = {}
        for layer in layers:
            if layer.name in allocation.nblocks:
                self.layers_of.setdefault(block_index(self.list_name, layer.name), []).append(layer)
        self.batches, self.tokens = calibration_batches(self.model, samples, tokenizer, config.calibration)
        self.inputs: dict[str, list[_Inputs]] | None = None
        self.converted: dict[str, list[_Inputs]] | None = None
        """Sequential calibration: the converted model's hidden states, once they differ."""
        self.next_block = 0
        self.seconds = 0.0
        self.done: dict[str, Projected] = {}
        self.on_block = on_block
        self.price = price

    @classmethod
    def from_checkpoint(cls, checkpoint: Any, layers: list[PlannedLayer], allocation: Allocation, config: MonarchConfig,
                        samples: TextSamples, tokenizer: Any, device: str = "cpu",
                        on_block: Callable[[int, int], None] | None = None) -> BlockwiseCalibration:
        """On a checkpoint that is never loaded whole: the model is built on the meta device
        and each block reads its tensors when it runs."""
        try:
            model = empty_model(checkpoint.config, checkpoint.dtype, buffers=True)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"could not build the model to calibrate: {short_error(exc)}") from None
        for module in model.modules():  # the computed buffers go where the blocks run
            for key, value in module._buffers.items():
                if value is not None and not value.is_meta:
                    module._buffers[key] = value.to(device)
        calibration = cls(model, layers, allocation, config, samples, tokenizer,
                          weights=_Weights(checkpoint, model, torch.device(device)), on_block=on_block)
        calibration.device = torch.device(device)
        return calibration

    def block_of(self, name: str) -> int | None:
        return block_index(self.list_name, name)

    def observation(self, fit: InputStatistics | None = None, heldout: InputStatistics | None = None) -> Observation:
        """What the report records of the calibration (with one block's statistics, what the
        projector reads)."""
        return Observation(self.samples, self.config.calibration, fit or InputStatistics(), heldout or InputStatistics(),
                           self.tokens, self.seconds)

    def projected(self, layer: PlannedLayer) -> Projected:
        """``layer``'s projection, computed with the rest of its block when first asked for."""
        index = self.block_of(layer.name)
        while self.next_block <= index:
            self._run_block(self.next_block, project=self.next_block == index)
        return self.done.pop(layer.name)

    @torch.no_grad()
    def _capture(self) -> dict[str, list[_Inputs]]:
        """Every batch's inputs to the first block."""
        first = self.blocks[0]
        outside = [(f"{name}." if name else "", module) for name, module in self.model.named_modules()
                   if module is not self.blocks and not (name + ".").startswith(self.list_name + ".")]
        hooks = [module.register_forward_pre_hook(lambda m, args, prefix=prefix: self.weights.load(m, prefix))
                 for prefix, module in outside]
        self.blocks[0] = _Catcher(first)
        inputs: dict[str, list[_Inputs]] = {}
        try:
            for part, batches in self.batches.items():
                inputs[part] = []
                for batch in batches:
                    batch = {key: value.to(self.device) for key, value in batch.items()}
                    try:
                        self.model(**batch)
                    except _Caught as caught:
                        args = [_no_cache(value) for value in caught.args]
                        kwargs = {key: _no_cache(value) for key, value in caught.kwargs.items()}
                        if "use_cache" in kwargs:
                            kwargs["use_cache"] = False
                        inputs[part].append(_Inputs(args, kwargs, batch.get("attention_mask")))
                    else:
                        raise ConfigError(f"the calibration forward pass of {type(self.model).__name__} never reached "
                                          f"its first block ({self.list_name}.0)")
        finally:
            self.blocks[0] = first
            for hook in hooks:
                hook.remove()
            for prefix, module in outside:
                self.weights.drop(module, prefix)
        if any(t.is_meta for batch in inputs["fit"][:1] for t in _tensors([batch.args, batch.kwargs])):
            raise ConfigError("the forward pass before the first block uses weights it does not read through its own "
                              "modules; calibrate in memory (no streaming)")
        return inputs

    @torch.no_grad()
    def _run_block(self, index: int, project: bool) -> None:
        """Block ``index`` on every recorded batch; with ``project``, its layers' statistics
        and projections too (sequential calibration projects every block: the converted
        stream needs its layers even when a resumed stream wrote them already)."""
        if self.on_block is not None:
            self.on_block(index, len(self.blocks))
        start = time.perf_counter()
        if self.inputs is None:
            self.inputs = self._capture()
        sequential = self.config.calibration.sequential
        block, prefix = self.blocks[index], f"{self.list_name}.{index}."
        layers = self.layers_of.get(index, []) if project or sequential else []
        self.weights.load_tree(block, prefix)
        try:
            modules = {layer.name: self.model.get_submodule(layer.name) for layer in layers}
            if self.converted is None:
                entering = {part: [batch.copy() for batch in batches] for part, batches in self.inputs.items()} \
                    if sequential and layers else None
                stats = {part: self._pass(block, batches, Collector(modules) if layers else None)
                         for part, batches in self.inputs.items()}
            else:
                entering = self.converted
                stats = {part: self._pass_pair(block, batches, self.converted[part], modules)
                         for part, batches in self.inputs.items()}
            self.seconds += time.perf_counter() - start
            if layers and self.price is not None:
                self.price([PlannedLayer(layer.name, modules[layer.name], layer.nblocks, layer.pinned) for layer in layers],
                           stats["fit"])
            elif layers:
                observation = self.observation(stats["fit"], stats["heldout"])
                projector = default_projector(observation, self.config.allow_structural_zeros, self.config.structure)
                real = [PlannedLayer(layer.name, modules[layer.name], layer.nblocks, layer.pinned) for layer in layers]
                results = project_layers(real, self.allocation, projector, _Release(layers, stats))
                if sequential:
                    start = time.perf_counter()
                    self._advance_converted(block, entering, {name: r.module for name, r in results.items()})
                    self.seconds += time.perf_counter() - start
                if project:
                    self.done.update(results)
        finally:
            self.weights.drop_tree(block, prefix)
            _trim_heap()
        self.next_block = index + 1

    def _advance_converted(self, block: nn.Module, inputs: dict[str, list[_Inputs]], converted: dict[str, nn.Module]) -> None:
        """The converted model's hidden states after this block: its converted layers swapped
        in (and out again, so a failure later leaves the model as it was) while it runs."""
        originals = {name: self.model.get_submodule(name) for name in converted}
        apply(self.model, converted)
        try:
            for batches in inputs.values():
                for batch in batches:
                    batch.advance(block(*batch.args, **batch.kwargs))
        finally:
            apply(self.model, originals)
        self.converted = inputs

    @staticmethod
    def _pass(block: nn.Module, batches: list[_Inputs], collector: Collector | None) -> InputStatistics | None:
        """Every batch through ``block``, its outputs becoming the batch's next inputs; the
        collector (hooked for this part of the samples only) records its layers' inputs."""
        try:
            for batch in batches:
                with collector.batch(batch.mask) if collector is not None else nullcontext():
                    batch.advance(block(*batch.args, **batch.kwargs))
        finally:
            if collector is not None:
                collector.close()
        return collector.finish() if collector is not None else None

    @staticmethod
    def _pass_pair(block: nn.Module, dense: list[_Inputs], converted: list[_Inputs],
                   modules: dict[str, nn.Module]) -> InputStatistics | None:
        """Sequential calibration: each batch through the dense ``block`` from the dense and
        from the converted hidden states, the dense run first so its layer inputs pair token by
        token with the converted run's. The dense stream moves on; the converted one moves on
        here only when the block converts nothing (else through the converted block, later)."""
        if not modules:
            for batches in (dense, converted):
                BlockwiseCalibration._pass(block, batches, None)
            return None
        reference = Collector(modules, keep_rows=True)
        collector = Collector(modules, reference=reference)
        try:
            for ours, theirs in zip(dense, converted):
                with reference.batch(ours.mask):
                    ours.advance(block(*ours.args, **ours.kwargs))
                with collector.batch(theirs.mask):
                    block(*theirs.args, **theirs.kwargs)
        finally:
            reference.close()
            collector.close()
        stats = collector.finish()
        stats.dense = reference.finish().sums
        return stats


def price_blockwise(model: nn.Module, layers: list[PlannedLayer], config: MonarchConfig, samples: TextSamples,
                    tokenizer: Any, on_block: Callable[[int, int], None] | None = None) -> dict[str, LayerChoices]:
    """Every layer's budget options priced on its calibration statistics, one block at a time
    (the dense model's inputs, as the in-memory path prices them). A budget must see every
    layer's prices before it chooses any block count; prices are a few numbers a layer, while
    the statistics they come from are a block's worth of ``d_in²`` matrices, so pricing in a
    pass of its own keeps memory at one block's, and the projecting pass runs the blocks again
    (their forward is a small part of the conversion's time). With
    ``budget_objective="fisher"`` the whole model runs forward and backward first, on the first
    fitting samples: the gradients that weigh each layer's outputs come from the head, through
    every block (:func:`~monarchify.pipeline.observe.output_fisher`)."""
    damping = config.calibration.damping
    priced: dict[str, LayerChoices] = {}
    row_weights = None
    if needs_fisher(layers, config):
        batches, _ = calibration_batches(model, samples, tokenizer, config.calibration)
        row_weights = output_fisher(model, {layer.name: layer.module for layer in layers},
                                    first_samples(batches["fit"], FISHER_SAMPLES))

    def price(block_layers: list[PlannedLayer], stats: InputStatistics) -> None:
        release = _Release(block_layers, {"fit": stats})
        for layer in block_layers:
            priced[layer.name] = price_layer(layer, config, stats.covariance(layer.name), damping,
                                             row_weights[layer.name] if row_weights is not None else None)
            release(layer.name)

    everything = Allocation(nblocks={layer.name: layer.nblocks for layer in layers})
    pricing = BlockwiseCalibration(model, layers, everything, config, samples, tokenizer,
                                   on_block=on_block, price=price)
    for index in range(len(pricing.blocks)):
        pricing._run_block(index, project=True)
    return priced


def convert_blockwise(model: nn.Module, config: MonarchConfig, samples: TextSamples, tokenizer: Any,
                      events: Events | None = None) -> ConversionReport:
    """A calibrating conversion of a loaded model, one block at a time (what
    :func:`monarchify.pipeline.convert` does, with only one block's statistics alive at once
    instead of every layer's, and without running the head). The blocks are run on copies of
    the hidden states and the converted layers are swapped in only at the end, so a failure
    leaves the model as it was. With a budget the blocks are run twice: priced, solved, then
    projected (:func:`price_blockwise`)."""
    events = events or Events()
    layers = plan(model, config)
    priced = None
    if config.budget is not None and not all(layer.pinned for layer in layers):
        priced = price_blockwise(model, layers, config, samples, tokenizer, on_block=getattr(events, "calibrating", None))
    allocation = allocate(layers, config, priced=priced)
    events.observing(len(samples.fit) + len(samples.heldout))
    calibration = BlockwiseCalibration(model, layers, allocation, config, samples, tokenizer,
                                       on_block=getattr(events, "calibrating", None))
    before = count_params(model)
    events.projecting(len(layers))
    projected = {}
    for layer in layers:
        if layer.name in allocation.nblocks:
            projected[layer.name] = calibration.projected(layer)
        events.projected(layer.name)
    apply(model, {name: result.module for name, result in projected.items()})
    return build_report(layers, allocation, config, params_before=before, params_after=count_params(model),
                        observation=calibration.observation(), projected=projected)
