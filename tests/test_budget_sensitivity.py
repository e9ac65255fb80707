"""``budget_objective="output"``: each layer's error weighted by how far it moves the model's
output. The measurement against its closed form on a linear model, the weighted plan, and the
recipe end to end and through the command line."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import monarchify
from monarchify.cli.app import main
from monarchify.config import CalibrationConfig, MonarchConfig
from monarchify.errors import ConfigError
from monarchify.hf.convert import convert_pretrained
from monarchify.pipeline import convert
from monarchify.pipeline.allocate import plan_budget
from monarchify.pipeline.observe import output_sensitivity
from monarchify.pipeline.plan import plan
from monarchify.pipeline.pricing import DENSE

from conftest import tiny_bert
from test_calibration import SENTENCES, write


class TwoBranches(nn.Module):
    """``z = U_a a(x) + U_b b(x)``: linear, so the sensitivity has a closed form."""

    def __init__(self, width: int = 16, gain_a: float = 1.0, gain_b: float = 1.0) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(width, width), nn.Linear(width, width)
        self.ua, self.ub = nn.Linear(width, 4, bias=False), nn.Linear(width, 4, bias=False)
        with torch.no_grad():
            self.ua.weight.mul_(gain_a)
            self.ub.weight.mul_(gain_b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ua(self.a(x)) + self.ub(self.b(x))


def test_the_sensitivity_of_a_linear_model_is_its_closed_form():
    """Noise of variance ``ε² mean(y²)`` on every entry of ``y = a(x)`` moves ``z`` by
    ``ε² mean(y²) ||U_a||²`` per row: the weight is that over ``mean ||z||²`` and ``ε²``."""
    torch.manual_seed(0)
    model = TwoBranches(gain_a=3.0, gain_b=0.5)
    batches = [{"x": torch.randn(512, 16)} for _ in range(8)]
    weights = output_sensitivity(model, {"a": model.a, "b": model.b}, batches)
    with torch.no_grad():
        x = torch.cat([b["x"] for b in batches])
        z2 = model(x).pow(2).sum(1).mean()
        for name, up in (("a", model.ua), ("b", model.ub)):
            y2 = getattr(model, name)(x).pow(2).mean()
            expected = float(y2 * up.weight.pow(2).sum() / z2)
            assert weights[name] == pytest.approx(expected, rel=0.05)
    assert weights["a"] > 10 * weights["b"]
    assert model.training  # left as it was


class GarbageWherePadded(TwoBranches):
    """A :class:`TwoBranches` whose output at padded positions is ``garbage`` (a head's logits
    there mean nothing): the layers' outputs, and so the noise, do not depend on it."""

    def __init__(self, garbage: float) -> None:
        super().__init__()
        self.garbage = garbage

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + (1 - attention_mask)[..., None] * self.garbage


def test_padded_positions_are_left_out():
    torch.manual_seed(0)
    mask = torch.ones(4, 10, dtype=torch.long)
    mask[1, 6:], mask[3, 2:] = 0, 0
    batches = [{"x": torch.randn(4, 10, 16), "attention_mask": mask} for _ in range(3)]
    clean, noisy = GarbageWherePadded(0.0), GarbageWherePadded(1e3)
    noisy.load_state_dict(clean.state_dict())
    weights = output_sensitivity(clean, {"a": clean.a, "b": clean.b}, batches)
    assert output_sensitivity(noisy, {"a": noisy.a, "b": noisy.b}, batches) == pytest.approx(weights, rel=1e-6)


def test_measuring_leaves_the_model_unchanged_and_repeats(bert_tokenizer):
    from monarchify.samples import tokenize

    model = tiny_bert(vocab_size=len(bert_tokenizer)).eval()
    modules = {layer.name: layer.module for layer in plan(model, MonarchConfig())}
    batches = tokenize(SENTENCES[:8], bert_tokenizer, batch_size=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    weights = output_sensitivity(model, modules, batches)
    assert set(weights) == set(modules) and all(0 < w < float("inf") for w in weights.values())
    assert weights == output_sensitivity(model, modules, batches)  # seeded noise: repeatable
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks for m in model.modules())


def test_a_sensitive_layer_gets_more_parameters():
    model = tiny_bert(hidden_size=64, intermediate_size=256, num_hidden_layers=1)
    config = MonarchConfig(budget=0.4)
    layers = plan(model, config)
    plain = plan_budget(layers, config)
    # The layer the plain plan compresses hardest, made to matter a thousand times more.
    target = max((n for n, o in plain.choices.items() if o.nblocks is not DENSE), key=lambda n: plain.choices[n].nblocks)
    weights = {layer.name: 1000.0 if layer.name == target else 1.0 for layer in layers}
    weighted = plan_budget(layers, config, weights=weights)
    assert weighted.choices[target].params > plain.choices[target].params
    assert weighted.params_used <= weighted.params_budget
    record = weighted.to_dict()
    assert record["sensitivity"] == weights and record["error_kind"].startswith("output-sensitivity-weighted")
    assert "sensitivity" not in plain.to_dict()
    # Equal weights are the plain objective, scaled: the same plan.
    scaled = plan_budget(layers, config, weights=dict.fromkeys(weights, 7.0))
    assert {n: o.nblocks for n, o in scaled.choices.items()} == {n: o.nblocks for n, o in plain.choices.items()}


def test_the_output_objective_end_to_end_and_in_the_recipe(bert_folder, tmp_path):
    calib = write(tmp_path / "calib.txt", "\n".join(SENTENCES * 3))
    config = MonarchConfig(budget=0.45, budget_objective="output", calibration=CalibrationConfig(samples=20, sweeps=0))
    result = convert_pretrained(bert_folder, tmp_path / "out", config, calibration_data=calib, check=False)
    budget = result.report.meta["budget"]
    assert set(budget["sensitivity"]) == {layer.name for layer in result.report.layers}
    assert budget["params_used"] <= budget["params_budget"]
    recipe = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]["recipe"]
    assert recipe["budget_objective"] == "output"
    assert "budget_objective" not in MonarchConfig(budget=0.5).to_dict()  # old recipes stay byte-identical
    # The recorded recipe pins every layer: it re-applies without the text, to the same layers.
    report = convert(monarchify.load(bert_folder), MonarchConfig.from_dict({**recipe, "calibration": None}))
    assert {(l.name, l.nblocks) for l in report.converted} == {(l.name, l.nblocks) for l in result.report.converted}
    # With the text again, it still chooses nothing, so no layer is measured.
    again = convert_pretrained(bert_folder, tmp_path / "again", MonarchConfig.from_dict(recipe), calibration_data=calib, check=False)
    assert "sensitivity" not in again.report.meta["budget"]
    assert {(l.name, l.nblocks) for l in again.report.converted} == {(l.name, l.nblocks) for l in result.report.converted}


def test_the_output_objective_needs_a_budget_and_calibration(bert_folder, tmp_path, capsys):
    with pytest.raises(ConfigError, match="needs a budget"):
        MonarchConfig(budget_objective="output")
    with pytest.raises(ConfigError, match="calibrate the conversion"):
        convert(tiny_bert(), MonarchConfig(budget=0.5, budget_objective="output"))
    with pytest.raises(ConfigError, match="must be one of"):
        MonarchConfig(budget=0.5, budget_objective="logits")
    for extra in (["--budget", "0.5"], ["--budget-objective", "logits", "--budget", "0.5"]):
        code = main(["convert", str(bert_folder), "-o", str(tmp_path / "out"), "--budget-objective", "output", *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 1 and len(err) == 1 and err[0].startswith("Error: "), err
    assert not (tmp_path / "out").exists()
