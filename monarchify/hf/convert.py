"""Convert a Hugging Face checkpoint end to end: load, run the pipeline, check, save.

Everything a person can get wrong is checked before the model loads: the calibration text
is read first and the output folder must be writable. The folder is written atomically at
the end.
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
from monarchify.hf.loading import load_model, load_tokenizer, read_config
from monarchify.hf.plugin import QUANT_METHOD
from monarchify.hf.saving import save_model
from monarchify.pipeline import Events, convert, dry_run
from monarchify.report import ConversionReport
from monarchify.samples import TextSamples, read_samples


class ConvertEvents(Events):
    """The pipeline's progress hooks, plus loading and saving; every method is optional."""

    def loading(self, source: str) -> None:
        """The checkpoint starts loading."""

    def saving(self, out: str) -> None:
        """The converted model starts being written."""


@dataclass
class ConvertResult:
    report: ConversionReport
    model: nn.Module | None = None
    tokenizer: Any = None


def _refuse_monarch_checkpoint(source: str | os.PathLike[str]) -> None:
    """A folder converted already is refused at once, before seconds of loading."""
    folder = Path(os.fspath(source)).expanduser()
    if not (folder / "config.json").is_file():
        return  # a Hub id, or a folder that loading will refuse with its own message
    quantization = read_config(folder).get("quantization_config")
    if isinstance(quantization, dict) and quantization.get("quant_method") == QUANT_METHOD:
        raise ConfigError(f"'{source}' is a Monarch checkpoint already: convert the dense model it came from")


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
) -> ConvertResult:
    """Load ``source``, convert it with ``config`` and (unless ``dry``) save it to ``out``.

    ``calibration_data`` (a text or TSV file, a saved dataset or ``hf:NAME``, see
    :mod:`monarchify.samples`, or samples already read) is the text a calibrating recipe runs
    through the dense model.
    ``check`` compares the dense and converted model's outputs on sample sentences.
    """
    events = events or ConvertEvents()
    _refuse_monarch_checkpoint(source)
    samples = calibration_data if isinstance(calibration_data, TextSamples) else None
    if config.calibration is not None and calibration_data is not None and samples is None:
        samples = read_samples(calibration_data, config.calibration.samples, config.calibration.heldout)
    if out is not None and not dry:
        check_output_dir(out, force, inputs=(source,))
    events.loading(os.fspath(source))
    model = load_model(source)
    tokenizer = load_tokenizer(source) if (samples is not None or not dry) else None
    if dry:
        return ConvertResult(dry_run(model, config, samples=samples, tokenizer=tokenizer, events=events), model)

    functional = FunctionalCheck(model, tokenizer) if check else None
    report = convert(model, config, samples=samples, tokenizer=tokenizer, events=events)
    if functional is not None:
        report.functional_check = functional.result(model)
    report.meta.update({"source": os.fspath(source), "architecture": type(model).__name__})
    if out is not None:
        events.saving(os.fspath(out))
        save_model(model, out, tokenizer=tokenizer, report=report, recipe=report.meta["recipe"], force=force)
    return ConvertResult(report, model, tokenizer)
