"""Monarch plus low rank on disk: format 3 only when a layer has a rank, stock ``from_pretrained``
gives identical outputs, ``report`` reads the ranks back, and a damaged rank is one line."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import monarchify
from monarchify import MonarchConfig
from monarchify.cli.app import main
from monarchify.errors import ModelLoadError
from monarchify.hf.plugin import LOWRANK_FORMAT, PLAIN_FORMAT, check_recipe
from monarchify.hf.stored_report import read_report
from monarchify.monarch import MonarchLinear

from conftest import tiny_bert, tiny_llama

RANKS = {"query": 4, "intermediate\\.dense": 6}


def _inputs(vocab):
    torch.manual_seed(1)
    ids = torch.randint(5, vocab, (2, 11))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@torch.no_grad()
def _first(model, batch):
    return model(**batch)[0]


@pytest.mark.parametrize("build, auto", [(tiny_bert, transformers.AutoModel), (tiny_llama, transformers.AutoModelForCausalLM)])
def test_low_rank_checkpoint_round_trips_through_stock_from_pretrained(tmp_path, build, auto):
    model = build()
    ranks = RANKS if build is tiny_bert else {"q_proj": 4, "up_proj": 6}
    report = monarchify.convert(model, MonarchConfig(nblocks=2, ranks=ranks, allow_structural_zeros=True))
    ranked = {layer.name: layer.rank for layer in report.layers if layer.rank}
    assert ranked and set(ranked.values()) == {4, 6}
    batch = _inputs(model.config.vocab_size)
    expected = _first(model.eval(), batch)
    monarchify.save(model, tmp_path / "out", report=report)
    recipe = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert recipe["format_version"] == LOWRANK_FORMAT == 3
    assert {name: spec["rank"] for name, spec in recipe["modules"].items() if "rank" in spec} == ranked
    assert recipe["recipe"]["ranks"] == ranks
    for loaded in (auto.from_pretrained(tmp_path / "out"), monarchify.load(tmp_path / "out")):
        layers = {n: m for n, m in loaded.named_modules() if isinstance(m, MonarchLinear)}
        assert {n.split(".", 1)[-1]: m.rank for n, m in layers.items() if m.rank} == {
            n.split(".", 1)[-1]: r for n, r in ranked.items()
        }
        assert torch.equal(_first(loaded.eval(), batch), expected)
    stored = read_report(tmp_path / "out")
    assert [(x.name, x.rank, x.params_monarch) for x in stored.layers] == [
        (x.name, x.rank, x.params_monarch) for x in report.layers
    ]


def test_a_checkpoint_without_ranks_stays_format_2(tmp_path):
    model = tiny_bert()
    report = monarchify.convert(model, MonarchConfig(nblocks=2))
    monarchify.save(model, tmp_path / "out", report=report)
    recipe = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert recipe["format_version"] == PLAIN_FORMAT == 2
    assert all("rank" not in spec for spec in recipe["modules"].values())
    assert "ranks" not in recipe["recipe"] and "budget_ranks" not in recipe["recipe"]


def _spec(**extra):
    return {"in_features": 8, "out_features": 6, "nblocks": 2, "bias": True, "output_order": "blocked", **extra}


@pytest.mark.parametrize("spec, fmt, fragment", [
    (_spec(rank=-1), 3, "has rank -1"),
    (_spec(rank="4"), 3, "has rank '4'"),
    (_spec(rank=True), 3, "has rank True"),
    (_spec(rank=7), 3, "from 0 to min(in_features, out_features)"),
    (_spec(rank=2), 2, "which format 2 cannot hold"),
])
def test_a_damaged_rank_is_refused_in_one_line(spec, fmt, fragment):
    with pytest.raises(ModelLoadError) as info:
        check_recipe({"layer": spec}, fmt)
    assert fragment in str(info.value) and "\n" not in str(info.value)
    check_recipe({"layer": _spec(rank=0)}, 2)  # rank 0 is the plain layer in any format
    check_recipe({"layer": _spec(rank=6)}, 3)


def _tamper(folder, change):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    change(config["quantization_config"])
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("change, fragment", [
    (lambda q: q["modules"][next(n for n in q["modules"] if "rank" in q["modules"][n])].update(rank=3), "U"),
    (lambda q: q["modules"][next(n for n in q["modules"] if "rank" in q["modules"][n])].pop("rank"), "does not declare"),
    (lambda q: q.update(format_version=2), "which format 2 cannot hold"),
])
def test_a_tampered_low_rank_checkpoint_never_loads_silently(tmp_path, capsys, change, fragment):
    model = tiny_bert()
    monarchify.convert(model, MonarchConfig(nblocks=2, ranks=RANKS))
    monarchify.save(model, tmp_path / "out")
    _tamper(tmp_path / "out", change)
    with pytest.raises(ModelLoadError):
        monarchify.load(tmp_path / "out")
    capsys.readouterr()
    code = main(["report", str(tmp_path / "out")])
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code != 0 and len(lines) == 1 and lines[0].startswith("Error: ") and fragment in lines[0], err


def test_convert_budget_ranks_from_the_command_line(tmp_path, capsys, bert_folder):
    out = tmp_path / "m"
    capsys.readouterr()
    code = main(["convert", str(bert_folder), "--budget", "0.4", "--budget-ranks", "2,4,8", "-o", str(out), "--json"])
    printed = json.loads(capsys.readouterr().out)
    assert code == 0
    assert printed["meta"]["budget"]["ranks"] == [2, 4, 8]
    assert printed["meta"]["recipe"]["budget_ranks"] == [2, 4, 8]
    ranked = [layer for layer in printed["layers"] if layer.get("rank")]
    assert ranked, "at this budget the tiny BERT takes some low-rank terms"
    assert main(["report", str(out)]) == 0
    table = capsys.readouterr().out
    assert f"+r{ranked[0]['rank']}" in table
    code = main(["convert", str(bert_folder), "--budget-ranks", "8", "-o", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code != 0 and "--budget-ranks needs --budget" in err
    code = main(["convert", str(bert_folder), "--budget", "0.4", "--budget-ranks", "8;9", "-o", str(tmp_path / "y")])
    assert code != 0 and "separated by commas" in capsys.readouterr().err
