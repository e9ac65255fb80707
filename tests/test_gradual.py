"""Gradual replacement: the routing, the schedule, and a fine-tuning run that saves no dense
originals."""

from __future__ import annotations

import json

import pytest
import torch

import monarchify
from monarchify import MonarchConfig, MonarchLinear
from monarchify.errors import ConfigError
from monarchify.glue import finetune
from monarchify.glue.train import RESULTS_FILE
from monarchify.hf.loading import load_tokenizer
from monarchify.gradual import GradualLinear, Schedule, unwrap, wrap
from transformers import TrainerCallback

from conftest import tiny_bert
from test_finetune import options, write_sst2


def converted_pair():
    dense = tiny_bert()
    model = tiny_bert()
    monarchify.convert(model, MonarchConfig(nblocks=2))
    return model, dense


def test_a_wrapped_layer_runs_monarch_with_probability_p_and_always_in_eval():
    model, dense = converted_pair()
    name = "encoder.layer.0.intermediate.dense"
    wrap(model, dense, p=0.0)
    layer = model.get_submodule(name)
    assert isinstance(layer, GradualLinear) and not any(p.requires_grad for p in layer.dense.parameters())
    x = torch.randn(3, 48)
    with torch.no_grad():
        # Each mode's own Monarch output: evaluation on a few rows takes the decoding path,
        # which rounds differently from the training one (docs/performance.md).
        layer.train()
        as_monarch, as_dense = layer.monarch(x), dense.get_submodule(name)(x)
        torch.testing.assert_close(layer(x), as_dense, rtol=0, atol=0)  # p = 0: the original
        layer.eval()
        torch.testing.assert_close(layer(x), layer.monarch(x), rtol=0, atol=0)  # evaluation: always Monarch
        torch.testing.assert_close(layer(x), as_monarch, rtol=1e-5, atol=1e-6)
        layer.train()
        layer.p = 0.3
        torch.manual_seed(0)
        picks = [torch.equal(layer(x), as_monarch) for _ in range(2000)]
    assert 0.26 < sum(picks) / len(picks) < 0.34


def test_unwrap_restores_the_monarch_layers_and_drops_the_originals():
    model, dense = converted_pair()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert len(wrap(model, dense)) == 12
    assert unwrap(model) == 12
    assert sum(isinstance(m, MonarchLinear) for m in model.modules()) == 12
    assert not any(isinstance(m, GradualLinear) for m in model.modules())
    assert model.state_dict().keys() == before.keys()


def test_the_originals_must_fit():
    model, _ = converted_pair()
    with pytest.raises(ConfigError, match="same shape"):
        wrap(model, tiny_bert(hidden_size=64))
    with pytest.raises(ConfigError, match="Monarch layers"):
        wrap(tiny_bert(), tiny_bert())


def test_the_schedule_rises_linearly_to_one_and_stays():
    schedule = Schedule(total=100, fraction=0.5, start=0.2)
    assert schedule.p(0) == pytest.approx(0.2)
    assert schedule.p(25) == pytest.approx(0.6)
    assert schedule.p(50) == 1.0 and schedule.p(99) == 1.0
    for bad in ({"fraction": 0.0}, {"fraction": 1.5}, {"fraction": 0.5, "start": 1.0}):
        with pytest.raises(ConfigError):
            Schedule(total=10, **bad)


@pytest.mark.slow
def test_finetune_with_gradual_replacement_learns_and_saves_plain_monarch(tmp_path, bert_folder):
    data = write_sst2(tmp_path / "glue")
    seen = []

    class Spy(TrainerCallback):  # what p each step ran with, read from the wrapped layers
        def on_step_end(self, args, state, control, model=None, **kwargs):
            seen.append(next(m.p for m in model.modules() if isinstance(m, GradualLinear)))

    opts = options(tmp_path, bert_folder, data, monarch=MonarchConfig(nblocks=2), gradual=0.3, gradual_start=0.5, epochs=10)
    result = finetune(opts, progress_bar=False, callbacks=[Spy()])
    assert seen[0] == pytest.approx(0.5) and seen[-1] == 1.0
    assert all(a <= b for a, b in zip(seen, seen[1:]))
    assert seen.index(1.0) == pytest.approx(0.3 * len(seen), abs=1)
    results = json.loads((opts.out / RESULTS_FILE).read_text())
    assert results["arguments"]["gradual"] == 0.3
    assert results["metrics"]["validation"]["accuracy"] > 0.7
    loaded = monarchify.load(opts.out)
    assert sum(isinstance(m, MonarchLinear) for m in loaded.modules()) == 12
    saved = loaded.state_dict().keys()
    assert not any(".monarch." in key for key in saved)  # saved unwrapped, originals dropped
    assert not any(isinstance(m, GradualLinear) for m in result.model.modules())


def test_gradual_needs_dense_originals(tmp_path, bert_folder):
    data = write_sst2(tmp_path / "glue")
    converted = tmp_path / "converted"
    model = monarchify.load(bert_folder)
    monarchify.convert(model, MonarchConfig(nblocks=2))
    monarchify.save(model, converted, tokenizer=load_tokenizer(bert_folder))
    with pytest.raises(ConfigError, match="needs the dense originals"):
        finetune(options(tmp_path, converted, data, gradual=0.5), progress_bar=False)
    with pytest.raises(ConfigError, match="gradual must be"):
        options(tmp_path, bert_folder, data, gradual=1.5)
