"""Convert a pretrained checkpoint end to end: load, project, check, save."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from monarchify.atomic import check_output_dir
from monarchify.calibrated import CalibrationSettings, prepare_conversion
from monarchify.calibration import DEFAULT_SAMPLES, read_calibration
from monarchify.config import MonarchConfig
from monarchify.hf.checkpoint import load_model, load_tokenizer, save_model
from monarchify.report import ConversionReport
from monarchify.speed_gate import SpeedGate
from monarchify.surgery import Projector, convert, dry_run

SAMPLE_SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "Monarch matrices replace dense weights with two block-diagonal factors.",
    "The company said its third-quarter profit rose 12 percent on strong demand.",
    "She did not think the film was as good as the book, but she enjoyed it anyway.",
    "Where is the nearest train station?",
)


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


@torch.no_grad()
def sample_outputs(model: nn.Module, tokenizer: Any, sentences: tuple[str, ...] = SAMPLE_SENTENCES) -> list[torch.Tensor]:
    """The model's first output (hidden states or logits) for each sentence, unpadded."""
    model.eval()
    outputs = []
    for sentence in sentences:
        inputs = tokenizer(sentence, return_tensors="pt")
        inputs = {k: v.to(model.device) for k, v in inputs.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        result = model(**inputs)
        first = result[0] if isinstance(result, (tuple, list)) else next(iter(result.values()))
        outputs.append(first.float().cpu())
    return outputs


def compare_outputs(dense: list[torch.Tensor], monarch: list[torch.Tensor]) -> dict[str, float]:
    """How far the converted model's outputs moved: max abs and relative Frobenius difference."""
    a = torch.cat([t.flatten() for t in dense])
    b = torch.cat([t.flatten() for t in monarch])
    norm = float(a.norm())
    return {
        "sentences": len(dense),
        "max_abs_diff": float((a - b).abs().max()),
        "rel_diff": float((a - b).norm()) / norm if norm else 0.0,
        "cosine": float(torch.nn.functional.cosine_similarity(a, b, dim=0)),
    }


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
        check_output_dir(out, force)
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

    before = sample_outputs(model, tokenizer) if (check and tokenizer is not None) else None
    config = prepared.surgery_config
    events.projecting(len(dry_run(model, config).layers))
    report = convert(model, config, projector=projector or prepared.projector, progress=events.projected, keep_dense=speed_gate)
    prepared.finish(report, model)
    if speed_gate is not None:
        speed_gate.annotate(report)
    if before is not None:
        report.functional_check = compare_outputs(before, sample_outputs(model, tokenizer))
    report.meta.update({"source": os.fspath(source), "architecture": type(model).__name__})
    if out is not None:
        events.saving(os.fspath(out))
        save_model(model, out, tokenizer=tokenizer, report=report, recipe=prepared.config.to_dict(), force=force)
    return ConvertResult(report, model, tokenizer)
