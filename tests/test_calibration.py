"""Calibration: every input format, clean failures (library and CLI), statistics that match an
explicit computation, and activation-aware conversion end to end on a tiny BERT."""

from __future__ import annotations

import json

import pytest
import torch

import monarchify
from monarchify.pipeline.observe import GRAM_SLAB, collect, gram
from monarchify.pipeline.plan import plan
from monarchify.samples import SampleError, read_samples, tokenize
from monarchify.cli.app import main
from monarchify.config import CalibrationConfig, MonarchConfig
from monarchify.errors import ConfigError, MonarchifyError
from monarchify.hf.convert import convert_pretrained
from monarchify.monarch.whitening import output_rel_error

from conftest import tiny_bert

SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "the company said its profit rose",
    "she did not think the film was good",
    "where is the nearest train station",
    "monarch matrices replace dense weights",
    "two block diagonal factors",
    "he said they would do it",
    "the book was good anyway",
    "our year was strong",
    "this is not the train",
]


def write(path, text, encoding="utf-8"):
    path.write_bytes(text.encode(encoding))
    return path


def glue_tsv(tmp_path, rows=SENTENCES):
    """An MRPC-shaped file: BOM, header, IDs, and fields with unbalanced quotes."""
    lines = ["\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String"]
    for i, text in enumerate(rows):
        lines.append(f'{i % 2}\t{1000 + i}\t{2000 + i}\tHe said "{text}\t{text[::-1]} ends"')
    return write(tmp_path / "train.tsv", "\n".join(lines) + "\n")


# --- reading ------------------------------------------------------------------------------


def test_text_file_one_sample_per_line(tmp_path):
    path = write(tmp_path / "calib.txt", "\ufeff" + "\n\n".join(SENTENCES) + "\n\n   \n")
    data = read_samples(path, samples=8)
    assert data.kind == "text"
    assert data.fit == SENTENCES[:8]  # BOM stripped, blank lines skipped
    assert data.heldout == SENTENCES[8:10]  # a quarter of 8, read right after
    assert data.describe()["samples"] == 8 and data.describe()["heldout"] == 2


def test_glue_tsv_pairs_with_bom_and_unbalanced_quotes(tmp_path):
    data = read_samples(glue_tsv(tmp_path), samples=4, heldout=3)
    assert data.kind == "tsv" and data.columns == ["#1 String", "#2 String"]
    assert data.fit[0] == (f'He said "{SENTENCES[0]}', f'{SENTENCES[0][::-1]} ends"')
    assert [s[0] for s in data.fit + data.heldout] == [f'He said "{t}' for t in SENTENCES[:7]]


def test_headerless_tsv_finds_the_sentence_column(tmp_path):
    """CoLA's layout: source, label, marker, sentence, and no header row."""
    lines = [f"src{i}\t{i % 2}\t\t{text}" for i, text in enumerate(SENTENCES)]
    data = read_samples(write(tmp_path / "cola.tsv", "\n".join(lines)), samples=5, heldout=2)
    assert data.columns == ["column 4"]
    assert data.fit == SENTENCES[:5]  # the first row is data, not a header


def test_single_text_column_by_header(tmp_path):
    lines = ["sentence\tlabel"] + [f"{text}\t1" for text in SENTENCES]
    data = read_samples(write(tmp_path / "sst2.tsv", "\n".join(lines)), samples=3, heldout=1)
    assert data.fit == SENTENCES[:3] and data.heldout == SENTENCES[3:4]


def test_rows_without_text_are_skipped_and_reading_stops_when_enough(tmp_path):
    lines = ["sentence\tlabel"] + [f"\t{i}" if i % 2 else f"{SENTENCES[i % 10]} {i}\t1" for i in range(200)]
    data = read_samples(write(tmp_path / "gaps.tsv", "\n".join(lines)), samples=60, heldout=15)
    assert len(data.fit) == 60 and len(data.heldout) == 15
    assert data.heldout[-1] == f"{SENTENCES[148 % 10]} 148"  # the 75th non-empty row, in order


def test_few_samples_hold_out_a_fifth(tmp_path):
    data = read_samples(write(tmp_path / "few.txt", "\n".join(SENTENCES)), samples=256)
    assert len(data.fit) == 8 and len(data.heldout) == 2


def test_real_mrpc_train_file(glue_dir):
    path = glue_dir / "MRPC" / "train.tsv"
    data = read_samples(path, samples=300)
    assert len(data.fit) == 300 and len(data.heldout) == 75
    assert all(isinstance(s, tuple) and all(s) for s in data.fit + data.heldout)
    # Independently: the same rows read with the quoting the data README prescribes.
    import csv

    with path.open(encoding="utf-8-sig", newline="") as handle:
        rows = list(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))[1:376]
    assert [(r[3], r[4]) for r in rows] == data.fit + data.heldout
    assert any('"' in a or '"' in b for a, b in data.fit)


def test_saved_dataset_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    table = {"idx": list(range(10)), "sentence1": SENTENCES, "sentence2": SENTENCES[::-1], "label": [0, 1] * 5}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(table)}).save_to_disk(str(tmp_path / "ds"))
    data = read_samples(tmp_path / "ds", samples=6, heldout=2)
    assert data.kind == "dataset" and data.columns == ["sentence1", "sentence2"]
    assert data.fit[0] == (SENTENCES[0], SENTENCES[-1])
    assert len(data.fit) == 6 and len(data.heldout) == 2


@pytest.mark.parametrize(
    ("make", "samples", "message"),
    [
        (lambda p: p / "missing.txt", 8, "does not exist"),
        (lambda p: write(p / "empty.txt", ""), 8, "has no samples"),
        (lambda p: write(p / "blank.txt", "\n  \n\n"), 8, "has no samples"),
        (lambda p: write(p / "one.txt", "just one sample here\n"), 8, "only 1 sample"),
        (lambda p: write(p / "numbers.tsv", "id\tlabel\n1\t0\n2\t1\n3\t0\n"), 8, "no text columns"),
        (lambda p: write(p / "empty.tsv", ""), 8, "is empty"),
        (lambda p: write(p / "latin.txt", "caf\u00e9 au lait\nna\u00efve\n", "latin-1"), 8, "not UTF-8"),
        (lambda p: write(p / "ok.txt", "a b\nc d\n"), 0, "positive integer"),
        (lambda p: write(p / "ok.txt", "a b\nc d\n"), -3, "positive integer"),
        (lambda p: p, 8, "could not load dataset"),  # a folder that is no dataset
    ],
)
def test_bad_calibration_input_is_a_one_line_error(tmp_path, make, samples, message):
    with pytest.raises(SampleError, match=message) as info:
        read_samples(make(tmp_path), samples=samples)
    assert isinstance(info.value, MonarchifyError)
    assert "\n" not in str(info.value)


# --- statistics -----------------------------------------------------------------------------


@pytest.fixture
def tiny(bert_tokenizer):
    model = tiny_bert(vocab_size=len(bert_tokenizer))
    modules = {layer.name: layer.module for layer in plan(model, MonarchConfig())}
    return model, modules


def test_statistics_ignore_padding_and_share_identical_inputs(tiny, bert_tokenizer):
    model, modules = tiny
    samples = [(a, b) for a, b in zip(SENTENCES, SENTENCES[3:] + SENTENCES[:3])]
    padded = collect(model, modules, tokenize(samples, bert_tokenizer, batch_size=4))
    single = collect(model, modules, tokenize(samples, bert_tokenizer, batch_size=1))
    for name in modules:
        torch.testing.assert_close(padded.covariance(name), single.covariance(name), rtol=1e-5, atol=1e-6)
    query, key = (n for n in modules if n.endswith(("layer.0.attention.self.query", "layer.0.attention.self.key")))
    assert padded.owner[key] == padded.owner[query] == query
    assert set(padded.owner) == set(modules) and len(set(padded.owner.values())) == 2 * 4  # q/k/v share an input


def test_statistics_equal_an_explicit_computation(tiny, bert_tokenizer):
    model, modules = tiny
    name = next(n for n in modules if n.endswith("layer.1.output.dense"))
    batches = tokenize(SENTENCES, bert_tokenizer, batch_size=3)
    seen = []
    handle = modules[name].register_forward_hook(lambda m, args, out: seen.append(args[0].detach()))
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    handle.remove()
    rows = torch.cat([x[b["attention_mask"].bool()] for x, b in zip(seen, batches)]).double()
    stats = collect(model, modules, batches)
    torch.testing.assert_close(stats.covariance(name), rows.T @ rows / rows.shape[0], rtol=1e-5, atol=1e-7)
    assert stats.counts[name] == int(sum(b["attention_mask"].sum() for b in batches))


@pytest.mark.parametrize("rows, width", [(7, 3), (300, 2 * GRAM_SLAB), (257, 2 * GRAM_SLAB + 1), (64, 1536), (1000, 700),
                                         (5, 3 * GRAM_SLAB)])
def test_gram_in_slabs_is_the_symmetric_product(rows, width):
    generator = torch.Generator().manual_seed(rows * 7919 + width)
    x = torch.randn(rows, width, generator=generator) * torch.rand(width, generator=generator) * 10
    got = gram(x)
    reference = x.double().T @ x.double()
    torch.testing.assert_close(got.double(), reference, rtol=1e-5, atol=1e-6 * float(reference.abs().max()))  # float32 rounding
    assert got.dtype == x.dtype and got.shape == (width, width)
    assert torch.equal(got, got.T)  # mirrored, not computed twice


# --- activation-aware conversion ---------------------------------------------------------


def test_calibrated_conversion_records_errors_that_match_held_out_activations(bert_folder, tmp_path):
    calib = write(tmp_path / "calib.txt", "\n".join(SENTENCES * 4))
    result = convert_pretrained(
        bert_folder, tmp_path / "out", MonarchConfig(nblocks=4, calibration=CalibrationConfig(samples=24, sweeps=1)),
        calibration_data=calib, check=False,
    )
    layers = result.report.layers
    assert all({"output_rel_error", "output_rel_error_plain"} <= set(layer.extra) for layer in layers)
    white = sum(layer.extra["output_rel_error"] for layer in layers)
    plain = sum(layer.extra["output_rel_error_plain"] for layer in layers)
    assert white < plain

    # Independently: the dense model's inputs on the held-out samples, the converted matrices.
    dense = monarchify.load(bert_folder)
    modules = {layer.name: dense.get_submodule(layer.name) for layer in layers}
    data = read_samples(calib, samples=24)
    stats = collect(dense, modules, tokenize(data.heldout, result.tokenizer))
    for layer in layers[:4]:
        w = modules[layer.name].weight.detach().double()
        m = result.model.get_submodule(layer.name).to_dense().detach().double()
        expected = output_rel_error(w, m, stats.covariance(layer.name))
        assert layer.extra["output_rel_error"] == pytest.approx(expected, rel=1e-4)

    recipe = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]["recipe"]
    assert recipe["calibration"]["samples"] == 24 and recipe["calibration"]["sweeps"] == 1
    saved = json.loads((tmp_path / "out" / "monarchify_report.json").read_text())
    assert saved["meta"]["calibration"]["mean_output_rel_error"] < saved["meta"]["calibration"]["mean_output_rel_error_plain"]


def test_weighted_budget_end_to_end_and_reloads(bert_folder, tmp_path):
    calib = write(tmp_path / "calib.txt", "\n".join(SENTENCES * 3))
    result = convert_pretrained(
        bert_folder, tmp_path / "out", MonarchConfig(budget=0.45, calibration=CalibrationConfig(samples=20, sweeps=0)),
        calibration_data=calib, check=False,
    )
    budget = result.report.meta["budget"]
    assert budget["params_used"] <= budget["params_budget"] <= 0.45 * budget["params_dense"]
    assert "activation-weighted" in budget["error_kind"]
    names = [layer.name for layer in plan(monarchify.load(bert_folder), MonarchConfig())]
    assert [layer.name for layer in result.report.layers] == names  # kept-dense ones listed too
    used = sum(layer.params_monarch for layer in result.report.layers)
    assert used == budget["params_used"]
    # The saved recipe reproduces the same layers; without the calibration text, minus calibration.
    recipe = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]["recipe"]
    assert MonarchConfig.from_dict(recipe).calibration == CalibrationConfig(samples=20, heldout=5, sweeps=0)
    again = monarchify.load(bert_folder)
    with pytest.raises(ConfigError, match="no calibration samples"):
        monarchify.convert(again, MonarchConfig.from_dict(recipe))
    report = monarchify.convert(again, MonarchConfig.from_dict({**recipe, "calibration": None}))
    assert {(l.name, l.nblocks) for l in report.converted} == {(l.name, l.nblocks) for l in result.report.converted}
    loaded = monarchify.load(tmp_path / "out")
    batch = {"input_ids": torch.tensor([[2, 10, 11, 12, 3]])}
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch)[0], result.model(**batch)[0])


def test_calibrate_needs_a_tokenizer(tmp_path):
    folder = tmp_path / "no-tok"
    tiny_bert().save_pretrained(folder)
    calib = write(tmp_path / "calib.txt", "\n".join(SENTENCES))
    # transformers 5 builds an empty tokenizer for such a folder; load_tokenizer refuses it.
    with pytest.raises(SampleError, match="the model folder has none"):
        convert_pretrained(folder, tmp_path / "out", MonarchConfig(calibration=CalibrationConfig()), calibration_data=calib)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("read", [False, True], ids=["file", "samples-read"])
@pytest.mark.parametrize("path", ["memory", "dry-run", "streaming"])
def test_a_text_for_a_recipe_that_does_not_calibrate_is_refused(bert_folder, tmp_path, read, path):
    """Ignoring it would hand back a plain projection to a caller who asked for a calibrated one."""
    calib = write(tmp_path / "calib.txt", "\n".join(SENTENCES))
    data = read_samples(calib, samples=8) if read else calib
    out = tmp_path / "out"
    where = {"memory": {"stream": False}, "dry-run": {"dry": True}, "streaming": {"stream": True}}[path]
    for source in (bert_folder, tmp_path / "no-such-model"):  # refused before the model is looked at
        with pytest.raises(ConfigError) as refused:
            convert_pretrained(source, out, MonarchConfig(nblocks=4), calibration_data=data, check=False, **where)
        message = str(refused.value)
        assert "does not calibrate" in message and "set its calibration" in message
        assert "\n" not in message and "--" not in message  # one line, naming the recipe field, not a flag
        assert not out.exists()


# --- through the CLI ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--text", "{tmp}/missing.txt"], "does not exist"),
        (["--text", "{tmp}/empty.txt"], "has no samples"),
        (["--text", "{tmp}/numbers.tsv"], "no text columns"),
        (["--text", "{tmp}/ok.txt", "--calibration-samples", "0"], "positive integer"),
        (["--calibration-samples", "8"], "need --text"),
        (["--budget", "1.5"], "between 0 and 1"),
        (["--budget", "0.01"], "below what the candidates allow"),
    ],
)
def test_cli_bad_calibration_or_budget_fails_cleanly(bert_folder, tmp_path, capsys, extra, message):
    write(tmp_path / "empty.txt", "")
    write(tmp_path / "numbers.tsv", "id\tlabel\n1\t0\n2\t1\n")
    write(tmp_path / "ok.txt", "a b\nc d\n")
    out = tmp_path / "out"
    args = ["convert", str(bert_folder), "-o", str(out), *[a.format(tmp=tmp_path) for a in extra]]
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("Error: ") and message in err[0], err
    assert not out.exists()
    assert not list(tmp_path.glob(".out.partial-*"))


def test_cli_calibrated_budget_conversion(bert_folder, tmp_path, capsys):
    calib = write(tmp_path / "calib.txt", "\n".join(SENTENCES * 2))
    out = tmp_path / "out"
    args = ["convert", str(bert_folder), "-o", str(out), "--text", str(calib), "--calibration-samples", "12",
            "--refine-sweeps", "0", "--budget", "0.5", "--json"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["meta"]["budget"]["fraction"] == 0.5
    assert report["meta"]["calibration"]["samples"] == 12
    assert all("output_rel_error" in layer["extra"] for layer in report["layers"] if not layer["kept_dense"])
    assert (out / "config.json").is_file()


@pytest.mark.parametrize("how", [[], ["--dry-run"], ["--stream"]], ids=["memory", "dry-run", "streaming"])
def test_cli_calibrate_calibrates(bert_folder, tmp_path, capsys, how):
    """--text sets the recipe's calibration with its text: the library's refusal of a text
    without one never reaches a person."""
    calib = write(tmp_path / "calib.txt", "\n".join(SENTENCES * 2))
    out = tmp_path / "out"
    args = ["convert", str(bert_folder), "--text", str(calib), "--calibration-samples", "12",
            "--refine-sweeps", "0", "--json", *how]
    capsys.readouterr()
    assert main(args if how == ["--dry-run"] else [*args, "-o", str(out)]) == 0, capsys.readouterr().err
    report = json.loads(capsys.readouterr().out)
    calibration = report["meta"]["calibration"]
    assert calibration["samples"] == 12 and calibration["source"] == str(calib)
    assert (out / "config.json").is_file() == (how != ["--dry-run"])
