"""The conversion pipeline as a whole: the Python API does what the CLI does, a dry run shows
what the conversion then does, the recipe is the whole recipe, and importing stays cheap."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import monarchify
from monarchify import CalibrationConfig, MonarchConfig, MonarchLinear
from monarchify.errors import ConfigError, MonarchifyError
from monarchify.pipeline.project import Projected

from conftest import REPO, tiny_bert

TEXTS = [
    "the quick brown fox jumps over the lazy dog",
    "the company said its profit rose ten percent",
    "she did not think the film was as good as the book",
    "where is the nearest train station",
    "monarch matrices replace dense weights with two block diagonal factors",
    "they said the year was good for the company",
] * 3


def rows(report):
    return [(l.name, l.nblocks, l.kept_dense, l.params_dense, l.params_monarch, l.reason) for l in report.layers]


@pytest.mark.parametrize(
    "config",
    [
        MonarchConfig(nblocks=2, overrides={"intermediate\\.dense": 4}),
        MonarchConfig(budget=0.5, overrides={"query": 4}),
        MonarchConfig(budget=0.45, budget_keep_dense=False, exclude=["key"]),
    ],
)
def test_dry_run_shows_exactly_what_convert_then_does(config):
    model = tiny_bert(hidden_size=64, intermediate_size=256)
    plan = monarchify.dry_run(model, config)
    assert not any(isinstance(m, MonarchLinear) for m in model.modules())  # touched nothing
    report = monarchify.convert(model, config)
    assert rows(plan) == rows(report)
    assert plan.model_params_after == report.model_params_after == sum(p.numel() for p in model.parameters())
    converted = {name for name, m in model.named_modules() if isinstance(m, MonarchLinear)}
    assert converted == {layer.name for layer in report.converted}
    assert plan.meta["recipe"] == report.meta["recipe"]


def test_budget_rows_and_recorded_recipe_name_no_flags():
    model = tiny_bert(hidden_size=64, intermediate_size=256)
    report = monarchify.convert(model, MonarchConfig(budget=0.4))
    kept = [layer for layer in report.layers if layer.kept_dense]
    assert kept, "a 0.4 budget on this model keeps some square layers dense"
    assert all(layer.reason == "kept dense by the budget (0.4)" for layer in kept)
    assert "--" not in json.dumps(report.to_dict())
    recipe = MonarchConfig.from_dict(report.meta["recipe"])  # every layer written out
    again_model = tiny_bert(hidden_size=64, intermediate_size=256)
    again = monarchify.convert(again_model, recipe)
    assert [(l.name, l.nblocks) for l in again.converted] == [(l.name, l.nblocks) for l in report.converted]
    assert all(type(again_model.get_submodule(layer.name)) is nn.Linear for layer in kept)


def test_the_python_api_calibrates_like_the_cli(bert_tokenizer):
    config = MonarchConfig(nblocks=4, calibration=CalibrationConfig(samples=12, sweeps=1))
    model = tiny_bert(vocab_size=len(bert_tokenizer))
    report = monarchify.convert(model, config, samples=TEXTS, tokenizer=bert_tokenizer)
    calibration = report.meta["calibration"]
    assert calibration["samples"] == 12 and calibration["heldout"] == 3 and calibration["source"] == "(in memory)"
    assert calibration["tokens"]["fit"] > 12 and calibration["method"] == "whitened+full-refine x1"
    assert all({"output_rel_error", "output_rel_error_plain"} <= set(layer.extra) for layer in report.layers)
    assert calibration["mean_output_rel_error"] < calibration["mean_output_rel_error_plain"]
    assert report.meta["recipe"]["calibration"]["sweeps"] == 1
    # Not the plain projection: the factors differ from it.
    plain = tiny_bert(vocab_size=len(bert_tokenizer))
    monarchify.convert(plain, MonarchConfig(nblocks=4))
    name = report.layers[0].name
    assert not torch.allclose(model.get_submodule(name).L, plain.get_submodule(name).L)


def test_calibration_and_samples_go_together(bert_tokenizer):
    with pytest.raises(ConfigError, match="no calibration samples"):
        monarchify.convert(tiny_bert(), MonarchConfig(calibration=CalibrationConfig()))
    model = tiny_bert()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for run in (monarchify.convert, monarchify.dry_run):  # a text it would not use: refused, not ignored
        with pytest.raises(ConfigError, match="does not calibrate.*set its calibration"):
            run(model, MonarchConfig(), samples=TEXTS, tokenizer=bert_tokenizer)
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("kwargs", [{"samples": 0}, {"sweeps": -1}, {"damping": -0.1}, {"max_length": 0}, {"heldout": 0}])
def test_bad_calibration_settings_are_refused(kwargs):
    with pytest.raises(ConfigError):
        CalibrationConfig(**kwargs)


def test_recipe_round_trips_through_its_dictionary():
    config = MonarchConfig(nblocks=8, overrides={"query": 2}, budget=0.3, calibration=CalibrationConfig(samples=9, sweeps=0),
                           speed_gate=monarchify.SpeedGateConfig(tokens=64))
    assert MonarchConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert "speed_gate" not in MonarchConfig().to_dict()  # recipes without a gate are written as before


def test_a_projector_is_the_extension_point():
    """A projector may return any module: here the dense layer's exact copy as a Linear."""

    def exact(layer, layout):
        copy = nn.Linear(layer.d_in, layer.d_out, bias=layer.has_bias)
        copy.load_state_dict(layer.module.state_dict())
        return Projected(copy, 0.0, {"kind": 1.0})

    model = tiny_bert()
    x = torch.randint(0, 200, (2, 7))
    with torch.no_grad():
        before = model(x)[0]
    report = monarchify.convert(model, MonarchConfig(nblocks=2), projector=exact)
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], before, rtol=0, atol=0)
    assert all(layer.rel_error == 0.0 and layer.extra == {"kind": 1.0} for layer in report.layers)


def test_conversion_leaves_the_thread_count_as_it_found_it(bert_tokenizer):
    original = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monarchify.convert(tiny_bert(hidden_size=256, intermediate_size=512, num_hidden_layers=1), MonarchConfig(nblocks=2))
        assert torch.get_num_threads() == 2
        model = tiny_bert(vocab_size=len(bert_tokenizer))
        config = MonarchConfig(budget=0.5, calibration=CalibrationConfig(samples=10))
        monarchify.convert(model, config, samples=TEXTS, tokenizer=bert_tokenizer)
        assert torch.get_num_threads() == 2
        bad = tiny_bert()
        with torch.no_grad():
            bad.encoder.layer[0].output.dense.weight[0, 0] = float("nan")
        with pytest.raises(MonarchifyError, match="NaN"):
            monarchify.convert(bad, MonarchConfig(nblocks=2))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(original)


@pytest.mark.parametrize("structure", ["monarch", "lowrank"])
def test_layers_projected_side_by_side_are_the_ones_projected_one_at_a_time(bert_tokenizer, structure, monkeypatch):
    """Several threads project several layers at once, each single-threaded: the factors are
    those of one thread, bit for bit, whatever the thread count; progress comes in the plan's
    order."""
    import monarchify.pipeline as pipeline
    from monarchify.pipeline.project import project_layers

    config = MonarchConfig(nblocks=2, structure=structure, calibration=CalibrationConfig(samples=10))

    import threading

    import monarchify.pipeline.project as project_module

    where, started = [], []
    one_layer = project_module._project_one

    def located(*args):
        where.append(threading.current_thread().name)
        started.append(args[1])
        return one_layer(*args)

    monkeypatch.setattr(project_module, "_project_one", located)

    def convert_with(threads, workers=None):
        order = []
        where.clear()
        started.clear()

        def watched(layers, allocation, projector, on_layer=None):
            def record(name):
                order.append(name)
                on_layer(name)
            return project_layers(layers, allocation, projector, record, workers=workers)

        monkeypatch.setattr(pipeline, "project_layers", watched)
        model = tiny_bert(vocab_size=len(bert_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=3)
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            report = monarchify.convert(model, config, samples=TEXTS, tokenizer=bert_tokenizer)
            assert torch.get_num_threads() == threads
        finally:
            torch.set_num_threads(previous)
        return model.state_dict(), report, order

    one, report_one, order_one = convert_with(1)
    assert set(where) == {threading.main_thread().name}
    two, report_two, order_two = convert_with(2)
    assert where and all(name.startswith("monarchify-project") for name in where)
    # the longest first (the 64 x 128 output layers), the square 64 x 64 ones last; the queue is
    # first in, first out, so only neighbours can swap between the two threads
    work = [layer.d_out * layer.d_in ** 2 for layer in started]
    assert work[:2] == [max(work)] * 2 and work[-2:] == [min(work)] * 2 and max(work) > min(work)
    assert all(a >= b for a, b in zip(work[::2], work[2::2]))
    three, _, _ = convert_with(2, workers=3)
    assert len(order_one) == len(report_one.layers) == 18
    assert order_one == order_two == [layer.name for layer in report_one.layers]
    assert one.keys() == two.keys() == three.keys()
    for key in one:
        assert torch.equal(one[key], two[key]) and torch.equal(one[key], three[key]), key
    assert [layer.rel_error for layer in report_one.layers] == [layer.rel_error for layer in report_two.layers]


def test_a_failing_layer_among_parallel_ones_is_named_and_nothing_is_swapped():
    bad = tiny_bert(num_hidden_layers=3)
    with torch.no_grad():
        bad.encoder.layer[2].intermediate.dense.weight[1, 1] = float("inf")
    before = {k: v.clone() for k, v in bad.state_dict().items()}
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(MonarchifyError, match=r"layer\.2\.intermediate\.dense"):
            monarchify.convert(bad, MonarchConfig(nblocks=2))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)
    after = bad.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before if "intermediate.dense.weight" not in k)
    assert not any(isinstance(m, MonarchLinear) for m in bad.modules())


def python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=REPO, timeout=300)


@pytest.mark.slow
def test_imports_stay_light():
    result = python("""
        import sys
        import monarchify
        assert "torch" not in sys.modules and "transformers" not in sys.modules, "import monarchify"
        import monarchify.cli.app
        assert "torch" not in sys.modules and "transformers" not in sys.modules, "the CLI app"
        import monarchify.monarch.layer, monarchify.pipeline
        assert "transformers" not in sys.modules, "the torch-only core"
        print("ok")
    """)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("transformers_first", [False, True])
def test_stock_from_pretrained_loads_monarch_folders_after_import_monarchify(tmp_path, transformers_first):
    folder = tmp_path / "m"
    model = tiny_bert()
    monarchify.convert(model, MonarchConfig(nblocks=2))
    monarchify.save(model, folder)
    first, second = ("import transformers.quantizers", "import monarchify") if transformers_first else ("import monarchify", "")
    result = python(f"""
        {first}
        {second}
        import transformers
        model = transformers.AutoModel.from_pretrained({str(folder)!r})
        print(sum(type(m).__name__ == "MonarchLinear" for m in model.modules()))
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "12"


def test_converting_a_converted_folder_is_refused_at_once(tmp_path, bert_folder, capsys):
    from monarchify.cli.app import main

    out = tmp_path / "once"
    assert main(["convert", str(bert_folder), "-b", "2", "-o", str(out)]) == 0
    capsys.readouterr()
    assert main(["convert", str(out), "-b", "2", "-o", str(tmp_path / "twice")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a Monarch checkpoint already" in err[0]
    assert not (tmp_path / "twice").exists()


def test_save_records_the_reports_recipe_by_default(tmp_path):
    model = tiny_bert(hidden_size=64, intermediate_size=256)
    report = monarchify.convert(model, MonarchConfig(budget=0.45))
    monarchify.save(model, tmp_path / "m", report=report)
    saved = json.loads((tmp_path / "m" / "config.json").read_text())["quantization_config"]["recipe"]
    assert saved == json.loads(json.dumps(report.meta["recipe"])) and saved["budget"] == 0.45


def test_the_recipe_and_the_layout_know_the_same_output_orders():
    from monarchify.config import OUTPUT_ORDERS as recipe_orders
    from monarchify.monarch.layout import OUTPUT_ORDERS as layout_orders

    assert recipe_orders == layout_orders
    assert MonarchConfig().output_order == "blocked"
    with pytest.raises(ConfigError, match="output_order"):
        MonarchConfig(output_order="shuffled")
