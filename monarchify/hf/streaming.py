"""Converting a safetensors folder tensor by tensor: the model is never in memory.

The plan needs only module names and shapes, so the model is built on the ``meta`` device
from ``config.json`` (no weights; :mod:`.checkpoint` opens the folder) and the ordinary plan
and allocate stages run on it. Then
every tensor of the checkpoint is read on its own (:mod:`.tensorfiles`), a selected weight is
projected by the same projector the in-memory path uses (so the factors are the same, bit for
bit) and every other tensor is copied, and output shards are written as they fill. Memory is
bounded by a couple of the largest tensors and their projection's work buffers, whatever the
depth of the model.

Output shards are laid out before any work starts (every output shape follows from the plan),
and written into a staging folder beside the output that survives an interruption: a shard
exists under its final name only once it is complete, and ``resume`` reuses the finished ones
when the source files, the recipe and the device are those of the interrupted run
(:mod:`.stream_state`). Everything but the weights is written by the writer every saved folder
shares (:func:`monarchify.hf.saving.write_folder_files`). The staging folder is renamed to the
output at the very end, so a half-written folder never stands where a finished one should (a
failed rename keeps it, for ``resume`` to finish).

A calibrating recipe streams too: the text runs through one block at a time
(:mod:`.blockwise`), output tensors are laid out block by block, and each block's layers are
projected when the writer reaches them. What needs the whole model stays on the in-memory path
(:func:`streaming_blocker` and :func:`calibration_problem` say why): a budget (it
compares all layers' errors before choosing), the speed gate, Monarch plus low rank, the
low-rank structure, Hub ids,
checkpoints whose tensor names are not the model's own, and calibration of a model whose
selected layers are not all in one list of repeated blocks.
"""

from __future__ import annotations

import copy
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn

from monarchify.atomic import check_output_dir, move_into_place
from monarchify.config import MonarchConfig
from monarchify.errors import ConfigError
from monarchify.hf.blockwise import BlockwiseCalibration, blocks_problem
from monarchify.hf.checkpoint import Checkpoint, open_checkpoint
from monarchify.hf.guard import HINT_KEY, guard_tensors
from monarchify.hf.loading import load_tokenizer
from monarchify.hf.plugin import layer_spec
from monarchify.hf.saving import DEFAULT_SHARD_SIZE, monarchify_version, quantization_config, write_folder_files
from monarchify.hf.stream_state import STATE_FILE, StreamState, fingerprint
from monarchify.hf.tensorfiles import Planned, ShardWriter, pack_shards, parse_size, read_tensor, shard_names
from monarchify.pipeline import calibration_text, count_params
from monarchify.pipeline.allocate import Allocation, allocate
from monarchify.pipeline.observe import Observation
from monarchify.pipeline.plan import PlannedLayer, plan
from monarchify.pipeline.project import Projected, Projector, default_projector
from monarchify.pipeline.report import build_report
from monarchify.report import ConversionReport
from monarchify.samples import TextSamples

STREAM_ABOVE = 2 * 10**9
"""Bytes of weights above which ``convert`` streams on its own (below, the in-memory path is
fast and adds the functional check)."""
SIDE_FILES = ("generation_config.json",)


class StreamEvents:
    """Progress of a streaming run; every method is optional."""

    def streaming(self, total_bytes: int, done_bytes: int) -> None:
        """Work starts: ``total_bytes`` of source tensors, ``done_bytes`` of them in shards a
        resumed run keeps."""

    def streamed(self, name: str, nbytes: int) -> None:
        """One source tensor is converted or copied."""

    def calibrating(self, block: int, blocks: int) -> None:
        """Calibration starts running block ``block`` (0-based) of ``blocks``: minutes pass
        before that block's tensors stream."""

    def note(self, text: str) -> None:
        """Something the user should read (one line)."""


@dataclass
class Unit:
    """One source tensor and what it becomes in the output."""

    source: str
    outputs: list[Planned]
    layer: PlannedLayer | None = None
    nbytes: int = 0
    """Bytes of source data read for it (progress)."""


BLOCKER_FIELDS = ("budget", "speed_gate", "structure")
"""The recipe fields :func:`streaming_blocker`'s reasons name (an error's ``field``)."""


def streaming_blocker(config: MonarchConfig) -> str | None:
    """Why this recipe needs the whole model in memory, or None."""
    if config.budget is not None:
        return "a budget compares every layer's errors before choosing"
    if config.speed_gate is not None:
        return "speed_gate is not available when streaming"
    if config.structure != "monarch":  # the stream writes Monarch factors only
        return f"structure '{config.structure}' is not available when streaming"
    if config.ranks:  # the stream writes L and R only (Monarch plus low rank is not streamed yet)
        return "low-rank terms (ranks) are not available when streaming"
    return None


def calibration_problem(checkpoint: Checkpoint, config: MonarchConfig) -> str | None:
    """Why this checkpoint's calibrating recipe cannot stream, or None."""
    if config.calibration is None:
        return None
    problem = blocks_problem(checkpoint.model, plan(checkpoint.model, config))
    if problem is None:
        return None
    return f"{problem}, and streaming calibrates one block at a time; calibrating this model needs the in-memory path"


def _units(checkpoint: Checkpoint, layers: list[PlannedLayer], allocation: Allocation,
           block_of: Callable[[str], int | None] | None = None) -> list[Unit]:
    """Every source tensor in file order, with the tensors it becomes; with ``block_of``,
    block by block (what lies outside the blocks first), the order calibration produces them."""
    converted = {f"{layer.name}.weight": layer for layer in layers if layer.name in allocation.nblocks}
    missing = [key for key in converted if key not in checkpoint.tensors]
    if missing:  # a tied weight stored under another name: not worth a special case
        raise ConfigError(f"cannot stream: the weight of '{missing[0]}' is not stored under its own name")
    units = []
    names = list(checkpoint.tensors)
    if block_of is not None:
        names.sort(key=lambda name: -1 if (block := block_of(name)) is None else block)
    for name in names:
        stored = checkpoint.tensors[name]
        layer = converted.get(name)
        if layer is None:
            units.append(Unit(name, [Planned(name, checkpoint.dtypes[name], stored.shape)], nbytes=stored.nbytes))
            continue
        layout = allocation.layout(layer)
        dtype = checkpoint.dtypes[name]
        outputs = [Planned(f"{layer.name}.L", dtype, layout.l_shape), Planned(f"{layer.name}.R", dtype, layout.r_shape),
                   Planned(f"{layer.name}.weight", dtype, (0,))]
        units.append(Unit(name, outputs, layer, stored.nbytes))
    first_layer = next((i for i, unit in enumerate(units) if unit.layer is not None), None)
    if first_layer is not None:
        units[first_layer].outputs.append(Planned(HINT_KEY, units[first_layer].outputs[0].dtype, (0,)))
    return units


def _shard_bytes(shard: list[Unit]) -> int:
    return sum(t.nbytes for unit in shard for t in unit.outputs)


class _Projector:
    """Runs the pipeline's projector on a real copy of one meta-device layer, on ``device``."""

    reads_weights = True

    def __init__(self, projector: Projector, allocation: Allocation, device: str) -> None:
        self.projector, self.allocation, self.device = projector, allocation, torch.device(device)

    def __call__(self, layer: PlannedLayer, weight: torch.Tensor, bias: torch.Tensor | None) -> Projected:
        module = copy.deepcopy(layer.module)  # meta tensors: nothing is copied but the structure
        module.weight = nn.Parameter(weight.to(self.device), requires_grad=False)
        if bias is not None:
            module.bias = nn.Parameter(bias.to(self.device), requires_grad=False)
        real = PlannedLayer(layer.name, module, layer.nblocks, layer.pinned)
        return self.projector(real, self.allocation.layout(layer))


class _CalibratedProjector:
    """The factors calibration computed for a layer with the rest of its block (it reads the
    block's weights itself)."""

    reads_weights = False

    def __init__(self, calibration: BlockwiseCalibration) -> None:
        self.calibration = calibration

    def __call__(self, layer: PlannedLayer, weight: Any, bias: Any) -> Projected:
        return self.calibration.projected(layer)


def _read_unit(checkpoint: Checkpoint, unit: Unit, weights: bool = True) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    if unit.layer is not None and not weights:
        return None, None
    tensor = read_tensor(checkpoint.tensors[unit.source]).to(checkpoint.dtypes[unit.source])
    bias = None
    if unit.layer is not None and unit.layer.has_bias:
        key = f"{unit.layer.name}.bias"
        bias = read_tensor(checkpoint.tensors[key]).to(checkpoint.dtypes[key])
    return tensor, bias


def convert_streaming(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    config: MonarchConfig,
    *,
    force: bool = False,
    resume: bool = False,
    device: str = "cpu",
    max_shard_size: int | str = DEFAULT_SHARD_SIZE,
    events: StreamEvents | None = None,
    checkpoint: Checkpoint | None = None,
    samples: TextSamples | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> ConversionReport:
    """Convert the safetensors folder ``source`` into the Monarch folder ``out``, tensor by
    tensor (see the module's docstring). ``device`` is where projections (and calibration's
    blocks) run (``"cuda"`` if there is one; the factors come back to the CPU). ``resume``
    continues an interrupted run into ``out`` from its finished shards. ``samples``: the
    calibration text, when the recipe calibrates."""
    events = events or StreamEvents()
    folder = Path(os.fspath(source)).expanduser()
    blocker = streaming_blocker(config)
    if blocker is not None:
        raise ConfigError(f"cannot stream this conversion: {blocker}", field=BLOCKER_FIELDS)
    check_output_dir(out, force, inputs=(source,))
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device '{device}' was asked for, but torch sees no CUDA device here")
    samples = calibration_text(samples, config)
    checkpoint = checkpoint or open_checkpoint(folder)
    if checkpoint.problem is not None:
        raise ConfigError(f"cannot stream '{source}': {checkpoint.problem}")
    tokenizer = load_tokenizer(folder)  # read now: a broken one fails before the long part
    layers = plan(checkpoint.model, config)
    allocation = allocate(layers, config)
    calibration = None
    if samples is not None:
        problem = calibration_problem(checkpoint, config)
        if problem is not None:
            raise ConfigError(f"cannot stream this conversion: {problem}")
        calibration = BlockwiseCalibration.from_checkpoint(checkpoint, layers, allocation, config, samples, tokenizer, device,
                                           on_block=events.calibrating)
    units = _units(checkpoint, layers, allocation, calibration.block_of if calibration is not None else None)
    shards = pack_shards(units, lambda unit: sum(t.nbytes for t in unit.outputs), parse_size(max_shard_size))
    names = shard_names(len(shards))
    layout = [[t for unit in shard for t in unit.outputs] for shard in shards]
    run = fingerprint(checkpoint, config, layout, monarchify_version(), samples, device)
    state = StreamState.open(Path(out), run, folder, resume, events.note)
    staging = state.staging
    done = state.finished(names)
    if done:
        events.note(f"resuming: {len(done)} of {len(shards)} shards are finished")

    projector: _Projector | _CalibratedProjector = (
        _CalibratedProjector(calibration) if calibration is not None
        else _Projector(default_projector(None, config.allow_structural_zeros), allocation, device)
    )
    total = sum(unit.nbytes for unit in units)
    kept = sum(unit.nbytes for shard, name in zip(shards, names) if name in done for unit in shard)
    events.streaming(total, kept)
    errors: dict[str, Any] = {k: v for shard_errors in done.values() for k, v in shard_errors.items()}
    weight_map: dict[str, str] = {}
    completed = False
    try:
        with ThreadPoolExecutor(1) as reader:  # reads the next tensor while this one projects
            todo = [(shard, name) for shard, name in zip(shards, names) if name not in done]
            queue = [unit for shard, _ in todo for unit in shard]
            read = lambda unit: _read_unit(checkpoint, unit, projector.reads_weights)  # noqa: E731
            pending = reader.submit(read, queue[0]) if queue else None
            position = 0
            for shard, name in todo:
                writer = ShardWriter(staging / name, [t for unit in shard for t in unit.outputs])
                shard_errors: dict[str, Any] = {}
                try:
                    for unit in shard:
                        tensor, bias = pending.result()
                        position += 1
                        pending = reader.submit(read, queue[position]) if position < len(queue) else None
                        _write_unit(writer, unit, tensor, bias, projector, shard_errors)
                        del tensor, bias
                        events.streamed(unit.source, unit.nbytes)
                    writer.close()
                except BaseException:
                    writer.abort()
                    raise
                errors.update(shard_errors)
                state.mark_finished(name, shard_errors)
        for shard, name in zip(shards, names):
            weight_map.update(dict.fromkeys((t.name for unit in shard for t in unit.outputs), name))
        observation = calibration.observation() if calibration is not None else None
        report = _report(checkpoint, layers, allocation, config, errors, folder, observation)
        write_folder_files(  # everything but the weights, as every saved folder gets it
            staging, config=_monarch_config(checkpoint, allocation, layers, report.meta["recipe"]), weight_map=weight_map,
            weights_size=sum(_shard_bytes(shard) for shard in shards), copy_from=checkpoint.folder, copied=SIDE_FILES,
            tokenizer=tokenizer, sentence_transformers_from=checkpoint.folder, report=report,
        )
        move_into_place(staging, out)  # a failed rename keeps the staging folder, and its state, to resume
        (Path(out) / STATE_FILE).unlink(missing_ok=True)
        completed = True
    finally:
        if not completed:
            if any((staging / name).is_file() for name in names):
                events.note(f"finished shards are kept in '{staging}'; run again with resume to continue")
            else:
                shutil.rmtree(staging, ignore_errors=True)
    return report


def _write_unit(writer: ShardWriter, unit: Unit, tensor: torch.Tensor | None, bias: torch.Tensor | None,
                projector: _Projector | _CalibratedProjector, errors: dict[str, Any]) -> None:
    if unit.layer is None:
        writer.write(unit.source, tensor)
        return
    result = projector(unit.layer, tensor, bias)
    errors[unit.layer.name] = [result.rel_error, result.extra]
    for planned, value in zip(unit.outputs, (result.module.L, result.module.R)):
        writer.write(planned.name, value.detach().cpu())
    for planned in unit.outputs[2:]:  # the guard (and the hint) that stock transformers trips on
        writer.write(planned.name, guard_tensors([f"{unit.layer.name}.L"], planned.dtype)[planned.name])


def _report(checkpoint: Checkpoint, layers: list[PlannedLayer], allocation: Allocation, config: MonarchConfig,
            errors: dict[str, Any], folder: Path, observation: Observation | None) -> ConversionReport:
    projected = {name: Projected(nn.Identity(), error, extra) for name, (error, extra) in errors.items()}
    before = count_params(checkpoint.model)
    saved = sum(layer.params_dense - (allocation.layout(layer).weight_params + (layer.d_out if layer.has_bias else 0))
                for layer in layers if layer.name in allocation.nblocks)
    report = build_report(layers, allocation, config, params_before=before, params_after=before - saved,
                          observation=observation, projected=projected)
    report.meta.update({"source": str(folder), "architecture": type(checkpoint.model).__name__, "conversion": "streaming"})
    return report


def _monarch_config(checkpoint: Checkpoint, allocation: Allocation, layers: list[PlannedLayer],
                    recipe: dict[str, Any]) -> transformers.PretrainedConfig:
    """The source's config, with the Monarch layers and the recipe, as the loaded model's would be."""
    modules = {
        layer.name: layer_spec(layer.d_in, layer.d_out, allocation.nblocks[layer.name], layer.has_bias, allocation.output_order)
        for layer in layers if layer.name in allocation.nblocks
    }
    config = copy.deepcopy(checkpoint.config)
    config.quantization_config = quantization_config(modules, recipe)
    config.architectures = [type(checkpoint.model).__name__]
    config.dtype = checkpoint.dtype
    return config
