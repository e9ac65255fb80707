"""Convert a Hugging Face checkpoint end to end: load, run the pipeline, check, save.

Everything a person can get wrong is checked before the model loads: the calibration text
is read first and the output folder must be writable. The folder is written atomically at
the end.

Two paths: in memory (load the model, run the pipeline, save) and streaming
(:mod:`monarchify.hf.streaming`, tensor by tensor, for checkpoints that do not fit or should
not be loaded whole). :func:`choose_streaming` decides between them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from monarchify.atomic import check_output_dir
from monarchify.config import MonarchConfig
from monarchify.hf.functional_check import FunctionalCheck
from monarchify.errors import ConfigError
from monarchify.hf.loading import load_model, load_tokenizer, read_config, sentence_transformers_note
from monarchify.hf.plugin import QUANT_METHODS
from monarchify.hf.densify import DENSIFIED, densified_note
from monarchify.hf.saving import save_model
from monarchify.hf.checkpoint import open_checkpoint, weights_bytes
from monarchify.hf.streaming import (
    BLOCKER_FIELDS, STREAM_ABOVE, StreamEvents, calibration_problem, convert_streaming, streaming_blocker,
)
from monarchify.hf.blockwise import blocks_problem, convert_blockwise
from monarchify.pipeline import Events, calibration_text, check_calibration_text, convert, dry_run
from monarchify.pipeline.plan import plan
from monarchify.report import ConversionReport
from monarchify.samples import TextSamples, read_samples


class ConvertEvents(Events, StreamEvents):
    """The pipeline's progress hooks, plus loading, saving and streaming; every method is optional."""

    def loading(self, source: str) -> None:
        """The checkpoint starts loading."""

    def saving(self, out: str) -> None:
        """The converted model starts being written."""


@dataclass
class ConvertResult:
    report: ConversionReport
    model: nn.Module | None = None
    tokenizer: Any = None


def _check_source(source: str | os.PathLike[str], events: ConvertEvents) -> None:
    """A folder converted already is refused at once, before seconds of loading; a densified
    one is converted, and said to be what it is."""
    folder = Path(os.fspath(source)).expanduser()
    if not (folder / "config.json").is_file():
        return  # a Hub id, or a folder that loading will refuse with its own message
    config = read_config(folder)
    quantization = config.get("quantization_config")
    if isinstance(quantization, dict) and quantization.get("quant_method") in QUANT_METHODS:
        raise ConfigError(f"'{source}' is a Monarch checkpoint already: convert the dense model it came from")
    if isinstance(config.get(DENSIFIED), dict):
        events.note(densified_note(source, config[DENSIFIED]))
    note = sentence_transformers_note(folder, config)
    if note is not None:
        events.note(note)


def choose_streaming(
    source: str | os.PathLike[str], config: MonarchConfig, *, stream: bool | None, dry: bool, out: Any
) -> tuple[bool, Any]:
    """``(stream?, opened checkpoint or None)``.

    ``stream=None`` (automatic) streams a local safetensors folder of more than
    :data:`~monarchify.hf.streaming.STREAM_ABOVE` bytes of weights when the recipe allows it
    and the tensors are the model's own (and, when it calibrates, its selected layers lie in
    one list of repeated blocks); ``True`` streams or says why it cannot; ``False`` never
    streams.
    """
    if stream is False:
        return False, None
    folder = Path(os.fspath(source)).expanduser()
    reason = None
    if dry or out is None:
        reason = "a dry run plans on the loaded model"
    elif not (folder / "config.json").is_file():
        reason = "streaming reads local folders only (not Hub ids)"
    else:
        reason = streaming_blocker(config)
    if reason is None and stream is None and weights_bytes(folder) <= STREAM_ABOVE:
        return False, None
    checkpoint = open_checkpoint(folder) if reason is None else None
    reason = reason or checkpoint.problem or calibration_problem(checkpoint, config)
    if reason is not None:
        if stream:
            raise ConfigError(f"cannot stream this conversion: {reason}", field=BLOCKER_FIELDS)
        return False, None
    return True, checkpoint


def blockwise_problem(model: nn.Module, config: MonarchConfig) -> str | None:
    """Why a loaded model's conversion cannot calibrate one block at a time, or None.

    Block by block holds one block's statistics at a time (the whole model's at once took
    5 GB on a 135M-parameter Llama) and never runs the head. A budget prices every layer in a
    first pass over the blocks; weighing its errors by their effect on the model's output
    (``budget_objective="output"``) needs the whole model, so that one runs in memory.
    Sequential calibration only exists block by block."""
    if config.calibration is None:
        return "the recipe does not calibrate"
    problem = ("a budget weighing layers by the model's output runs the whole model"
               if config.budget is not None and config.budget_objective == "output" else None)
    problem = problem or blocks_problem(model, plan(model, config))
    if problem is not None and config.calibration.sequential:
        raise ConfigError(f"sequential calibration runs one block at a time, which this conversion cannot: {problem}")
    return problem


def convert_pretrained(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str] | None,
    config: MonarchConfig,
    *,
    calibration_data: str | os.PathLike[str] | TextSamples | None = None,
    force: bool = False,
    dry: bool = False,
    check: bool = True,
    events: ConvertEvents | None = None,
    stream: bool | None = None,
    resume: bool = False,
    device: str = "cpu",
) -> ConvertResult:
    """Load ``source``, convert it with ``config`` and (unless ``dry``) save it to ``out``.

    ``calibration_data`` (a text or TSV file, a saved dataset or ``hf:NAME``, see
    :mod:`monarchify.samples`, or samples already read) is the text a calibrating recipe runs
    through the dense model: given exactly when ``config.calibration`` is set, else refused.
    ``check`` compares the dense and converted model's outputs on sample sentences (in memory
    only). ``stream``: see :func:`choose_streaming`; ``resume`` continues an interrupted
    streaming run; ``device`` is where a streaming run projects (``"cuda"``).
    """
    events = events or ConvertEvents()
    check_calibration_text(calibration_data is not None, config)
    _check_source(source, events)
    samples = calibration_data if isinstance(calibration_data, TextSamples) else None
    if calibration_data is not None and samples is None:
        samples = read_samples(calibration_data, config.calibration.samples, config.calibration.heldout)
    if (device != "cpu" or resume) and stream is None:  # only the streaming path projects elsewhere, or resumes
        stream = True
    streaming, checkpoint = choose_streaming(source, config, stream=stream, dry=dry, out=out)
    if resume and not streaming:
        raise ConfigError("resuming needs a streaming conversion (a local safetensors folder, a recipe without "
                          "budget or speed gate)")
    if device != "cpu" and not streaming:
        raise ConfigError(f"projecting on '{device}' needs a streaming conversion (the in-memory path projects where the model is)")
    if streaming:
        events.loading(os.fspath(source))
        report = convert_streaming(source, out, config, force=force, resume=resume, device=device,
                                   events=events, checkpoint=checkpoint, samples=samples)
        return ConvertResult(report)
    if out is not None and not dry:
        check_output_dir(out, force, inputs=(source,))
    events.loading(os.fspath(source))
    model = load_model(source)
    tokenizer = load_tokenizer(source) if (samples is not None or not dry) else None
    if dry:
        return ConvertResult(dry_run(model, config, samples=samples, tokenizer=tokenizer, events=events), model)

    functional = FunctionalCheck(model, tokenizer) if check else None
    if blockwise_problem(model, config) is None:
        report = convert_blockwise(model, config, calibration_text(samples, config), tokenizer, events)
    else:
        report = convert(model, config, samples=samples, tokenizer=tokenizer, events=events)
    if functional is not None:
        report.functional_check = functional.result(model)
    report.meta.update({"source": os.fspath(source), "architecture": type(model).__name__})
    if out is not None:
        events.saving(os.fspath(out))
        save_model(model, out, tokenizer=tokenizer, report=report, recipe=report.meta["recipe"], force=force,
                   sentence_transformers_from=source)
    return ConvertResult(report, model, tokenizer)
