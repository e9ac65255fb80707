"""``convert --only-if-faster``: layers Monarch does not speed up stay dense, and say why.

Timings themselves are never asserted (the machine is shared): the gate's measurement is
replaced by a fixed table where a decision is checked, and only checked for consistency
where the real timer runs.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from monarchify.pipeline import speed_gate as gate_module
from monarchify.cli.app import main
from monarchify.config import MonarchConfig, SpeedGateConfig
from monarchify.monarch import MonarchLinear
from monarchify.pipeline.speed_gate import SpeedGate, SpeedVerdict
from monarchify.pipeline import convert
from tests.conftest import tiny_bert


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def slow_attention(self, layout, dtype, device, bias):
    """Fixed verdicts: square (attention) layers lose, the MLP layers win."""
    square = layout.d_in == layout.d_out
    return SpeedVerdict(0.8 if square else 1.7, 1.2 if square else 1.4, self.config.tokens, "cpu float32")


@pytest.mark.parametrize(
    "fwd,fb,faster", [(1.5, 1.2, True), (1.5, 0.9, False), (0.9, 1.5, False), (1.0, 2.0, False), (1.01, None, True)]
)
def test_a_layer_converts_only_when_monarch_wins_every_measure(fwd, fb, faster):
    verdict = SpeedVerdict(fwd, fb, 512, "cpu float32")
    assert verdict.faster is faster
    assert (verdict.reason is None) is faster
    if not faster:
        assert "512 tokens" in verdict.reason and f"fwd {fwd:.2f}×" in verdict.reason


def test_vetoed_layers_stay_dense_unprojected_and_reported(monkeypatch):
    monkeypatch.setattr(SpeedGate, "measure", slow_attention)
    model = tiny_bert()
    x = torch.randint(0, 200, (2, 9))
    before = {n: m.weight.clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    report = convert(model, MonarchConfig(nblocks=2, speed_gate=SpeedGateConfig(tokens=64)))

    kept = [layer for layer in report.layers if layer.kept_dense]
    converted = [layer for layer in report.layers if not layer.kept_dense]
    assert {layer.name.rsplit(".", 1)[-1] for layer in kept} == {"query", "key", "value", "dense"}
    assert all(layer.shape[0] == layer.shape[1] for layer in kept)
    assert converted and all(layer.shape[0] != layer.shape[1] for layer in converted)
    for layer in kept:
        module = model.get_submodule(layer.name)
        assert type(module) is nn.Linear and torch.equal(module.weight, before[layer.name])
        assert layer.reason.startswith("not faster on cpu") and layer.rel_error is None
        assert layer.params_monarch == layer.params_dense and layer.extra["speed"]["faster"] is False
    for layer in converted:
        assert isinstance(model.get_submodule(layer.name), MonarchLinear)
        assert layer.extra["speed"]["forward_ratio"] == pytest.approx(1.7)
    assert report.totals()["kept_dense"] == len(kept)
    assert report.meta["speed_gate"]["tokens"] == 64
    model(x)  # still runs


def test_each_distinct_shape_is_timed_once(monkeypatch):
    calls = []

    def fake_benchmark(d_in, d_out, nblocks, tokens, **kwargs):
        calls.append((d_in, d_out, nblocks))
        return {"forward": {"ratio": 2.0}, "forward_backward": {"ratio": 2.0}}

    monkeypatch.setattr(gate_module, "layer_benchmark", fake_benchmark)
    model = tiny_bert()
    convert(model, MonarchConfig(nblocks=2, speed_gate=SpeedGateConfig(tokens=16)))
    assert sorted(calls) == [(48, 48, 2), (48, 100, 2), (100, 48, 2)]


def test_cli_only_if_faster_writes_a_loadable_mixed_checkpoint(tmp_path, capsys, bert_folder, monkeypatch):
    monkeypatch.setattr(SpeedGate, "measure", slow_attention)
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "convert", bert_folder, "-b", "2", "--only-if-faster", "--tokens", "32", "-o", out, "--json")
    assert code == 0, err
    report = json.loads(stdout)
    assert report["totals"]["kept_dense"] == 8 and report["totals"]["layers"] == 4
    assert all(layer["reason"] for layer in report["layers"] if layer["kept_dense"])

    import monarchify

    model = monarchify.load(out)
    monarch = {name for name, m in model.named_modules() if isinstance(m, MonarchLinear)}
    assert monarch == {f"encoder.layer.{i}.{part}.dense" for i in (0, 1) for part in ("intermediate", "output")}
    assert type(model.get_submodule("encoder.layer.0.attention.self.query")) is nn.Linear


def test_cli_table_says_which_layers_stay_dense_and_why(tmp_path, capsys, bert_folder, monkeypatch):
    monkeypatch.setattr(SpeedGate, "measure", slow_attention)
    code, stdout, err = run(capsys, "convert", bert_folder, "-b", "2", "--only-if-faster", "--dry-run")
    assert code == 0, err
    assert stdout.count("not faster") == 8 and stdout.count("dense") >= 8


def test_a_layer_that_loses_only_its_backward_pass_stays_dense(monkeypatch):
    """Measured ratios by shape, through the gate, the allocation and the report: the wide-in
    layer wins forward but loses forward+backward, the wide-out one wins both, the square ones
    lose forward only."""
    ratios = {(48, 48): (0.7, 1.3), (48, 100): (1.6, 1.2), (100, 48): (1.4, 0.9)}

    def fake_benchmark(d_in, d_out, nblocks, tokens, **kwargs):
        fwd, fb = ratios[(d_in, d_out)]
        return {"forward": {"ratio": fwd}, "forward_backward": {"ratio": fb}}

    monkeypatch.setattr(gate_module, "layer_benchmark", fake_benchmark)
    model = tiny_bert()
    report = convert(model, MonarchConfig(nblocks=2, speed_gate=SpeedGateConfig(tokens=16)))
    for layer in report.layers:
        fwd, fb = ratios[(layer.shape[1], layer.shape[0])]
        converted = isinstance(model.get_submodule(layer.name), MonarchLinear)
        assert converted is (tuple(layer.shape) == (100, 48)) and layer.kept_dense is not converted, layer.name
        assert layer.extra["speed"]["forward_ratio"] == fwd and layer.extra["speed"]["forward_backward_ratio"] == fb
        if not converted:
            assert f"fwd {fwd:.2f}×, fwd+bwd {fb:.2f}×" in layer.reason


def test_real_timer_decisions_follow_the_measured_ratios(capsys, bert_folder):
    """With the real clock: one measurement per shape, and a layer converted exactly when both
    of its measured ratios are above 1."""
    code, stdout, err = run(capsys, "convert", bert_folder, "-b", "2", "--only-if-faster", "--tokens", "8", "--dry-run", "--json")
    assert code == 0, err
    layers = json.loads(stdout)["layers"]
    assert len(layers) == 12
    by_shape = {}
    for layer in layers:
        speed = layer["extra"]["speed"]
        fwd, fb = speed["forward_ratio"], speed["forward_backward_ratio"]
        assert 0 < fwd < float("inf") and 0 < fb < float("inf")
        assert by_shape.setdefault(tuple(layer["shape"]), (fwd, fb)) == (fwd, fb)  # each shape timed once
        assert layer["kept_dense"] is not (fwd > 1 and fb > 1), layer
        assert (layer["params_monarch"] < layer["params_dense"]) is not layer["kept_dense"]


def test_tokens_without_the_gate_is_a_one_line_error(capsys, bert_folder, tmp_path):
    code, _, err = run(capsys, "convert", bert_folder, "--tokens", "64", "-o", tmp_path / "o")
    assert code == 1 and err.strip().startswith("Error: --tokens") and len(err.strip().splitlines()) == 1
    code, _, err = run(capsys, "convert", bert_folder, "--only-if-faster", "--tokens", "0", "-o", tmp_path / "o")
    assert code == 1 and "positive" in err
