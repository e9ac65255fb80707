"""Convert a pretrained checkpoint end to end: load, project, check, save."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from monarchify.atomic import check_output_dir
from monarchify.calibrated import CalibrationSettings, prepare_conversion
from monarchify.calibration import DEFAULT_SAMPLES, read_calibration
from monarchify.config import MonarchConfig
from monarchify.hf.checkpoint import load_model, load_tokenizer, save_model
from monarchify.hf.functional_check import FunctionalCheck
from monarchify.report import ConversionReport
from monarchify.speed_gate import SpeedGate
from monarchify.surgery import Projector, convert, dry_run


class ConvertEvents:
    """Hooks for a front end to show progress; every method is optional."""

    def loading(self, source: str) -> None: ...
    def calibrating(self, samples: int) -> None: ...
    def projecting(self, total: int) -> None: ...
    def projected(self, name: str) -> None: ...
    def saving(self, out: str) -> None: ...


@dataclass
class ConvertResult:
    report: ConversionReport
    model: nn.Module | None = None
    tokenizer: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


def convert_pretrained(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str] | None,
    config: MonarchConfig,
    *,
    force: bool = False,
    dry: bool = False,
    check: bool = True,
    projector: Projector | None = None,
    events: ConvertEvents | None = None,
    speed_gate: SpeedGate | None = None,
    calibrate: str | os.PathLike[str] | None = None,
    calibration_samples: int = DEFAULT_SAMPLES,
    calibration: CalibrationSettings | None = None,
) -> ConvertResult:
    """Load ``source``, convert it with ``config`` and (unless ``dry``) save it to ``out``.

    The output folder is checked before anything is loaded, and written atomically at the end.
    ``speed_gate`` leaves dense every layer Monarch does not speed up on this device.
    ``calibrate`` (a text/TSV file or dataset, see :mod:`monarchify.calibration`) makes the
    projection activation-aware; ``config.budget`` chooses per-layer block counts
    (:mod:`monarchify.budget`). Calibration data is read before the model is loaded.
    """
    events = events or ConvertEvents()
    data = read_calibration(calibrate, calibration_samples) if calibrate is not None else None
    if out is not None and not dry:
        check_output_dir(out, force, inputs=(source,))
    events.loading(os.fspath(source))
    model = load_model(source)
    tokenizer = load_tokenizer(source) if (data is not None or not dry) else None
    if data is not None:
        events.calibrating(len(data.fit) + len(data.heldout))
    prepared = prepare_conversion(model, tokenizer, config, data, calibration)
    if dry:
        plan = prepared.finish(dry_run(model, prepared.surgery_config), model)
        if speed_gate is not None:
            speed_gate.mark_plan(plan, model)
        return ConvertResult(plan, model)

    functional = FunctionalCheck(model, tokenizer) if check else None
    config = prepared.surgery_config
    events.projecting(len(dry_run(model, config).layers))
    report = convert(model, config, projector=projector or prepared.projector, progress=events.projected, keep_dense=speed_gate)
    prepared.finish(report, model)
    if speed_gate is not None:
        speed_gate.annotate(report)
    if functional is not None:
        report.functional_check = functional.result(model)
    report.meta.update({"source": os.fspath(source), "architecture": type(model).__name__})
    if out is not None:
        events.saving(os.fspath(out))
        save_model(model, out, tokenizer=tokenizer, report=report, recipe=prepared.config.to_dict(), force=force)
    return ConvertResult(report, model, tokenizer)
