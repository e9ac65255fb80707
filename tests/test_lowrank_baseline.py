"""The low-rank baseline structure end to end: a tiny random Llama (grouped-query: k_proj and
v_proj narrower) and a tiny BERT converted with ``structure="lowrank"``, compared with Monarch at
the same block count, saved, loaded through stock ``from_pretrained``, reported and densified."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from transformers import BertTokenizerFast

import monarchify
from monarchify import MonarchConfig
from monarchify.cli.app import main
from monarchify.config import CalibrationConfig
from monarchify.errors import ConfigError, ModelLoadError
from monarchify.glue.compress import CompressOptions
from monarchify.hf.convert import convert_pretrained
from monarchify.hf.densify import densify_folder
from monarchify.hf.plugin import STRUCTURE_FORMAT, check_recipe
from monarchify.hf.stored_report import read_report
from monarchify.monarch import LowRankLinear, MonarchLinear

from conftest import WORDS, tiny_bert, tiny_llama, write_wordpiece_vocab

AUTO = {"llama": transformers.AutoModelForCausalLM, "bert": transformers.AutoModel}


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """The same WordPiece vocabulary for BERT and, without token type ids, for the decoder."""
    folder = tmp_path_factory.mktemp("tok")
    write_wordpiece_vocab(folder)
    return {
        "bert": BertTokenizerFast.from_pretrained(str(folder)),
        "llama": BertTokenizerFast.from_pretrained(str(folder), model_input_names=["input_ids", "attention_mask"]),
    }


def dense_folder(tmp_path, tokenizers, arch):
    folder = tmp_path / f"{arch}-dense"
    tokenizer = tokenizers[arch]
    (tiny_llama if arch == "llama" else tiny_bert)(vocab_size=len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def calibration_lines(count=40, shift=0):
    return [" ".join(WORDS[(7 * i + j + shift) % len(WORDS)] for j in range(3 + (5 * i) % 13)) for i in range(count)]


def _batch(vocab):
    torch.manual_seed(1)
    ids = torch.randint(5, vocab, (2, 11))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@torch.no_grad()
def _out(model, batch):
    return model.eval()(**batch)[0]


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_lowrank_keeps_monarch_parameters_within_one_rank_step(arch):
    build = tiny_llama if arch == "llama" else tiny_bert
    monarch = monarchify.dry_run(build(), MonarchConfig(nblocks=4))
    model = build()
    lowrank = monarchify.convert(model, MonarchConfig(nblocks=4, structure="lowrank"))
    assert [row.name for row in lowrank.layers] == [row.name for row in monarch.layers]
    narrow = 0
    for m, low in zip(monarch.layers, lowrank.layers):
        d_out, d_in = low.shape
        narrow += d_out < d_in
        assert low.structure == "lowrank" and low.rank >= 1 and not low.kept_dense
        assert low.params_monarch == low.rank * (d_in + d_out) + (d_out if low.bias else 0)
        assert 0 <= m.params_monarch - low.params_monarch < d_in + d_out  # never more, within one rank step
        module = model.get_submodule(low.name)
        assert isinstance(module, LowRankLinear) and module.rank == low.rank
        w = build().get_submodule(low.name).weight.detach().double()
        sigma = torch.linalg.svdvals(w)  # the plain truncated SVD's error, from the singular values
        assert low.rel_error == pytest.approx(float((sigma[low.rank:].square().sum() / sigma.square().sum()).sqrt()), rel=1e-6)
    assert narrow if arch == "llama" else True  # grouped-query k_proj / v_proj are in the comparison
    assert not any(isinstance(m, MonarchLinear) for m in model.modules())
    assert lowrank.meta["recipe"]["structure"] == "lowrank"


def test_calibrated_lowrank_has_lower_output_error_on_the_calibration_text(tmp_path, tokenizers):
    source = dense_folder(tmp_path, tokenizers, "llama")
    lines = calibration_lines()
    text = tmp_path / "calib.txt"
    text.write_text("\n".join(lines) + "\n", encoding="utf-8")
    calibration = CalibrationConfig(samples=32, heldout=8, batch_size=8)
    plain = convert_pretrained(source, None, MonarchConfig(nblocks=4, structure="lowrank"), check=False, dry=False)
    whitened = convert_pretrained(source, None, MonarchConfig(nblocks=4, structure="lowrank", calibration=calibration),
                                  calibration_data=text, check=False)
    meta = whitened.report.meta["calibration"]
    assert meta["mean_output_rel_error"] < meta["mean_output_rel_error_plain"]
    assert [r.rank for r in whitened.report.layers] == [r.rank for r in plain.report.layers]
    # calibrated conversion runs block by block: it must build the same structure, at the same size
    assert all(isinstance(whitened.model.get_submodule(r.name), LowRankLinear) for r in whitened.report.layers)
    assert sum(p.numel() for p in whitened.model.parameters()) == sum(p.numel() for p in plain.model.parameters())

    # The whole model on the text it was fitted to: the calibrated model stays closer to the dense one.
    dense = transformers.AutoModelForCausalLM.from_pretrained(source).eval()
    batch = tokenizers["llama"](lines[:32], padding=True, return_tensors="pt")
    reference = _out(dense, batch)
    mask = batch["attention_mask"].bool()
    errors = [float((_out(m.model, batch) - reference)[mask].norm() / reference[mask].norm()) for m in (whitened, plain)]
    assert errors[0] <= errors[1]


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_lowrank_folder_round_trips_reports_and_densifies(tmp_path, tokenizers, arch, capsys):
    source = dense_folder(tmp_path, tokenizers, arch)
    out = tmp_path / "lowrank"
    assert main(["convert", str(source), "--structure", "lowrank", "-b", "4", "-o", str(out), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert all(row["structure"] == "lowrank" and row["rank"] >= 1 for row in printed["layers"])

    quant = json.loads((out / "config.json").read_text())["quantization_config"]
    assert quant["format_version"] == STRUCTURE_FORMAT
    assert all(spec["structure"] == "lowrank" and "nblocks" not in spec for spec in quant["modules"].values())
    assert quant["recipe"]["structure"] == "lowrank"

    batch = _batch(len(tokenizers[arch]))
    converted = monarchify.load(out)
    stock = AUTO[arch].from_pretrained(out)
    ranks = {n: m.rank for n, m in stock.named_modules() if isinstance(m, LowRankLinear)}
    assert len(ranks) == len(printed["layers"])
    assert torch.equal(_out(stock, batch), _out(converted, batch))

    stored = read_report(out)
    assert [(r.name, r.rank, r.params_monarch, r.structure) for r in stored.layers] == [
        (r["name"], r["rank"], r["params_monarch"], "lowrank") for r in printed["layers"]
    ]
    assert main(["report", str(out)]) == 0
    table = capsys.readouterr().out
    assert f"rank {printed['layers'][0]['rank']}" in table and "low rank" in table

    assert main(["densify", str(out), "-o", str(tmp_path / "dense-again")]) == 0
    plain = AUTO[arch].from_pretrained(tmp_path / "dense-again")
    assert not any(isinstance(m, LowRankLinear) for m in plain.modules())
    assert torch.allclose(_out(plain, batch), _out(stock, batch), atol=1e-5)
    in_memory = monarchify.load(out)
    from monarchify.pipeline.densify import densify_
    assert len(densify_(in_memory)) == len(ranks)
    assert torch.allclose(_out(in_memory, batch), _out(stock, batch), atol=1e-5)


def test_budget_chooses_ranks_and_the_recorded_recipe_repeats_them(tmp_path):
    model = tiny_llama()
    report = monarchify.convert(model, MonarchConfig(budget=0.4, structure="lowrank"))
    budget = report.meta["budget"]
    assert budget["structure"] == "lowrank" and budget["params_used"] <= budget["params_budget"]
    chosen = {r.name: r.rank for r in report.layers if not r.kept_dense}
    assert chosen and budget["lowrank"] == chosen
    assert report.totals()["selected_params_after"] == budget["params_used"]
    again = monarchify.convert(tiny_llama(), MonarchConfig.from_dict(report.meta["recipe"]))
    assert {r.name: r.rank for r in again.layers if not r.kept_dense} == chosen
    assert {r.name for r in again.layers} == set(chosen)  # what the budget kept dense is excluded by name
    # an explicit rank grid
    grid = monarchify.dry_run(tiny_llama(), MonarchConfig(budget=0.4, structure="lowrank", budget_ranks=[2, 8],
                                                          budget_keep_dense=False))
    assert {r.rank for r in grid.layers} <= {2, 8}


def test_ranks_pin_a_lowrank_layer():
    report = monarchify.dry_run(tiny_llama(), MonarchConfig(structure="lowrank", ranks={"q_proj": 3}))
    assert {r.rank for r in report.layers if r.name.endswith("q_proj")} == {3}
    with pytest.raises(ConfigError, match="k_proj"):
        monarchify.dry_run(tiny_llama(), MonarchConfig(structure="lowrank", ranks={"k_proj": 17}))  # 64 -> 16


@pytest.mark.parametrize("args, message", [
    (["--structure", "lowrank", "--only-if-faster"], "--only-if-faster times Monarch layers"),
    (["--structure", "blocks"], "structure must be one of monarch, lowrank"),
    (["--structure", "lowrank", "--stream"], "cannot stream this conversion: --structure 'lowrank'"),
])
def test_cli_refuses_what_lowrank_cannot_do(tmp_path, capsys, args, message):
    folder = tmp_path / "dense"
    tiny_bert().save_pretrained(folder)
    assert main(["convert", str(folder), "-o", str(tmp_path / "out"), *args]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("Error:") and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_config_records_structure_only_when_lowrank():
    assert "structure" not in MonarchConfig().to_dict()
    assert MonarchConfig.from_dict(MonarchConfig(structure="lowrank").to_dict()).structure == "lowrank"
    with pytest.raises(ConfigError, match="speed_gate times Monarch layers"):
        MonarchConfig(structure="lowrank", speed_gate={})
    assert CompressOptions(task="sst2", model="m", out="o", budget=0.5, structure="lowrank").recipe.structure == "lowrank"


def _spec(**extra):
    return {"structure": "lowrank", "in_features": 8, "out_features": 6, "rank": 3, "bias": True, **extra}


@pytest.mark.parametrize("spec, fmt, fragment", [
    (_spec(rank=0), 4, "a rank up to"),
    (_spec(rank=7), 4, "a rank up to"),
    (_spec(in_features="8"), 4, "positive integer"),
    (_spec(), 3, "format 3 cannot hold"),
    (_spec(structure="butterfly"), 4, "structure 'butterfly'"),
])
def test_a_damaged_lowrank_entry_is_refused(spec, fmt, fragment):
    with pytest.raises(ModelLoadError, match=fragment.replace("(", r"\(")):
        check_recipe({"layer": spec}, fmt)
    check_recipe({"layer": _spec()}, 4)


def test_a_tampered_lowrank_folder_is_refused(tmp_path):
    model = tiny_bert()
    report = monarchify.convert(model, MonarchConfig(structure="lowrank"))
    monarchify.save(model, tmp_path / "out", report=report)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    name = next(iter(config["quantization_config"]["modules"]))
    config["quantization_config"]["modules"][name]["rank"] -= 1
    (tmp_path / "out" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="misshapen"):
        read_report(tmp_path / "out")
    with pytest.raises(ModelLoadError):
        densify_folder(tmp_path / "out", tmp_path / "dense")
    with pytest.raises(ModelLoadError):
        monarchify.load(tmp_path / "out")


def test_training_and_conversion_helpers_see_lowrank_layers():
    """What fine-tuning, distillation and gradual replacement look for finds low-rank layers too."""
    from monarchify.errors import NoMatchError
    from monarchify.glue.train import monarch_factor_names, parameter_counts
    from monarchify.gradual import GradualLinear, unwrap, wrap
    from monarchify.hf.teacher import has_monarch_layers

    dense = tiny_bert()
    before = sum(p.numel() for p in dense.parameters())
    model = tiny_bert()
    report = monarchify.convert(model, MonarchConfig(structure="lowrank"))
    names = {r.name for r in report.layers}
    assert monarch_factor_names(model) == {f"{n}.{f}" for n in names for f in ("U", "V")}
    counts = parameter_counts(model)
    assert counts["dense"] == before and counts["monarch_layers"] == len(names)
    assert has_monarch_layers(model)
    with pytest.raises(NoMatchError, match="already"):
        monarchify.convert(model, MonarchConfig())
    assert sorted(wrap(model, dense, p=1.0)) == sorted(names)
    assert all(isinstance(model.get_submodule(n), GradualLinear) for n in names)
    assert unwrap(model) == len(names)
