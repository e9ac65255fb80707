"""``ConversionReport.from_dict`` inverts ``to_dict``: the one reader of a saved report."""

from __future__ import annotations

import json

import pytest

import monarchify
from monarchify.config import CalibrationConfig, MonarchConfig
from monarchify.hf.saving import REPORT_FILE, save_model
from monarchify.hf.stored_report import read_report
from monarchify.report import ConversionReport, LayerReport
from monarchify.samples import read_samples
from monarchify.version import __version__

from conftest import WORDS, tiny_bert, tiny_llama

CALIBRATION = CalibrationConfig(samples=12, sweeps=1)


def _samples(tmp_path):
    lines = [" ".join(WORDS[(i * 5 + j) % len(WORDS)] for j in range(3 + i % 6)) for i in range(20)]
    path = tmp_path / "calib.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return read_samples(path, samples=12)


RECIPES = {
    "plain": (tiny_bert, MonarchConfig(nblocks=2), False),
    "rectangular": (tiny_llama, MonarchConfig(nblocks=2, exclude=["v_proj"]), False),
    "budget-kept-dense": (tiny_bert, MonarchConfig(budget=0.7), False),
    "calibrated": (tiny_bert, MonarchConfig(nblocks=2, calibration=CALIBRATION), True),
    "budget-ranks-calibrated": (tiny_bert, MonarchConfig(budget=0.6, budget_ranks=[4, 8], calibration=CALIBRATION), True),
    "lowrank": (tiny_bert, MonarchConfig(nblocks=4, structure="lowrank", calibration=CALIBRATION), True),
}


@pytest.mark.parametrize("name", RECIPES)
def test_a_saved_report_reads_back_as_it_was_written(name, tmp_path, bert_tokenizer):
    make, config, calibrates = RECIPES[name]
    model = make(vocab_size=len(bert_tokenizer))
    kwargs = {"samples": _samples(tmp_path), "tokenizer": bert_tokenizer} if calibrates else {}
    report = monarchify.convert(model, config, **kwargs)
    report.functional_check = {"cosine": 0.97, "max_abs_diff": 0.25}
    if name == "budget-kept-dense":
        assert any(layer.kept_dense for layer in report.layers) and report.converted
    if name == "budget-ranks-calibrated":
        assert any(layer.rank for layer in report.layers)
    if name == "lowrank":
        assert all(layer.structure == "lowrank" for layer in report.layers)

    save_model(model, tmp_path / "out", report=report)
    saved = json.loads((tmp_path / "out" / REPORT_FILE).read_text(encoding="utf-8"))
    again = ConversionReport.from_dict(saved)
    assert again.to_dict() == saved
    assert again.layers == report.layers  # the objects too, not only their JSON
    assert (again.model_params_before, again.model_params_after) == (report.model_params_before, report.model_params_after)
    # ``report`` on the folder: the saved report, checked against the tensors, plus the version
    # config.json records.
    read = read_report(tmp_path / "out").to_dict()
    assert read == {**saved, "meta": {**saved["meta"], "monarchify_version": __version__}}


def test_a_dry_run_report_round_trips(bert_tokenizer):
    report = monarchify.dry_run(tiny_bert(), MonarchConfig(nblocks=4))
    data = json.loads(json.dumps(report.to_dict()))
    assert all(row["rel_error"] is None for row in data["layers"])
    assert ConversionReport.from_dict(data).to_dict() == data


def test_a_row_written_before_ranks_and_structures_existed_reads_with_their_defaults():
    row = {"name": "a", "kind": "Linear", "shape": [8, 4], "nblocks": 2, "padded": False, "bias": True,
           "params_dense": 40, "params_monarch": 24, "rel_error": 0.5, "flops_dense": 64, "flops_monarch": 32}
    layer = LayerReport.from_dict(row)
    assert (layer.rank, layer.structure, layer.kept_dense, layer.extra) == (0, "monarch", False, {})
    assert layer.to_dict() == {**row, "kept_dense": False, "reason": None, "extra": {}}


@pytest.mark.parametrize("change,fragment", [
    (lambda r: r.pop("params_dense"), "no 'params_dense'"),
    (lambda r: r.update(shape=[8]), "malformed 'shape'"),
    (lambda r: r.update(rel_error="big"), "malformed 'rel_error'"),
    (lambda r: r.update(rel_error=True), "malformed 'rel_error'"),
    (lambda r: r.update(nblocks=2.0), "malformed 'nblocks'"),
    (lambda r: r.update(extra=[]), "malformed 'extra'"),
])
def test_a_malformed_row_is_refused_by_field(change, fragment):
    row = tiny_bert_row()
    change(row)
    with pytest.raises(ValueError, match=fragment):
        LayerReport.from_dict(row)


@pytest.mark.parametrize("data", [
    [1, 2],
    {"layers": [], "meta": []},
    {"layers": {}, "totals": {"model_params": 1, "model_params_before": 2}},
    {"layers": [], "totals": {"model_params": 1}},
    {"layers": [], "totals": {"model_params": 1, "model_params_before": 2}, "functional_check": 0.9},
])
def test_what_is_not_a_report_is_refused(data):
    with pytest.raises(ValueError):
        ConversionReport.from_dict(data)


def tiny_bert_row() -> dict:
    return monarchify.dry_run(tiny_bert(), MonarchConfig(nblocks=2)).layers[0].to_dict()
