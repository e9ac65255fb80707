"""``monarchify convert`` and ``monarchify report`` as a user runs them, bad input included."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from monarchify.cli.app import main


def run(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what fixtures printed (transformers' save progress bars)
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code != 0
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name)


def joined_outputs(model, inputs: list[dict]) -> torch.Tensor:
    """The model's first output on every input, flattened and joined: what the functional
    check compares, computed here with the model directly."""
    with torch.no_grad():
        return torch.cat([model.eval()(**item)[0].flatten() for item in inputs])


def assert_check_matches_the_models(check: dict, dense_folder: Path, out: Path, inputs: list[dict]) -> None:
    """The reported differences are those between the dense folder and the saved converted
    folder, recomputed here on the same inputs, and the conversion kept clearly more of the
    function than dropping the converted layers would (a zeroed or random model fails)."""
    import transformers

    import monarchify

    architecture = getattr(transformers, transformers.AutoConfig.from_pretrained(dense_folder).architectures[0])
    dense = joined_outputs(architecture.from_pretrained(dense_folder), inputs)
    converted = monarchify.load(out)
    ours = joined_outputs(converted, inputs)
    assert check["sentences"] == len(inputs)
    assert check["rel_diff"] == pytest.approx(float((dense - ours).norm() / dense.norm()), rel=1e-4)
    assert check["max_abs_diff"] == pytest.approx(float((dense - ours).abs().max()), rel=1e-4)
    assert check["cosine"] == pytest.approx(float(torch.nn.functional.cosine_similarity(dense, ours, dim=0)), abs=1e-6)
    with torch.no_grad():
        for module in converted.modules():
            if isinstance(module, monarchify.MonarchLinear):
                module.L.zero_()  # each converted layer reduced to its bias
    dropped = joined_outputs(converted, inputs)
    assert 0 < check["rel_diff"] < 0.8 * float((dense - dropped).norm() / dense.norm())  # 0.5 (BERT), 0.7 (GPT-2)


def assert_layer_errors_match_the_weights(layers: list[dict], dense_folder: Path, out: Path) -> None:
    """Each reported ``rel_error`` is ||W - M|| / ||W|| of the dense folder's weight and the
    saved factors multiplied out."""
    import monarchify

    dense = load_file(dense_folder / "model.safetensors")
    modules = dict(monarchify.load(out).named_modules())
    assert layers
    for layer in layers:
        weight = dense[f"{layer['name']}.weight"].double()
        with torch.no_grad():
            approx = modules[layer["name"]].to_dense().double()
        assert layer["rel_error"] == pytest.approx(float((weight - approx).norm() / weight.norm()), rel=1e-4)


def test_convert_then_report(tmp_path, capsys, bert_folder, bert_tokenizer):
    from monarchify.hf.functional_check import SAMPLE_SENTENCES

    out = tmp_path / "out"
    code, stdout, err = run(capsys, "convert", bert_folder, "--nblocks", "2", "--out", out, "--json")
    assert code == 0, err
    converted = json.loads(stdout)
    assert converted["totals"]["layers"] == 12
    assert converted["functional_check"]["inputs"] == "tokenizer"
    sentences = [bert_tokenizer(sentence, return_tensors="pt") for sentence in SAMPLE_SENTENCES]
    assert_check_matches_the_models(converted["functional_check"], bert_folder, out, sentences)
    assert_layer_errors_match_the_weights(converted["layers"], bert_folder, out)

    saved = json.loads((out / "monarchify_report.json").read_text())
    assert saved["layers"] == converted["layers"]
    assert (out / "tokenizer.json").is_file() or (out / "vocab.txt").is_file()

    code, stdout, _ = run(capsys, "report", out, "--json", "--sort", "error")
    assert code == 0
    report = json.loads(stdout)
    for key in ("name", "shape", "nblocks", "params_dense", "params_monarch", "rel_error"):
        assert all(key in layer for layer in report["layers"])
    errors = [layer["rel_error"] for layer in report["layers"]]
    assert errors == sorted(errors, reverse=True)
    by_name = {layer["name"]: layer for layer in converted["layers"]}
    for layer in report["layers"]:
        assert layer["params_monarch"] == by_name[layer["name"]]["params_monarch"]
        assert layer["rel_error"] == by_name[layer["name"]]["rel_error"]
    tensors = load_file(out / "model.safetensors")
    assert report["totals"]["model_params"] == sum(t.numel() for t in tensors.values())
    for key in ("params_dense", "params_monarch", "model_params"):
        assert key in report["totals"]

    code, stdout, _ = run(capsys, "report", out)
    assert code == 0 and "encoder.layer.1.output.dense" in stdout and "rel. error" in stdout


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys, bert_folder):
    out = tmp_path / "never"
    code, stdout, _ = run(capsys, "convert", bert_folder, "-b", "4", "--override", "attention\\..*=2",
                          "--out", out, "--dry-run")
    assert code == 0
    assert "dry run" in stdout and "FLOPs" in stdout and "encoder.layer.0.intermediate.dense" in stdout
    assert not out.exists() and leftovers(tmp_path) == []
    code, stdout, _ = run(capsys, "convert", bert_folder, "--dry-run", "--json", "--exclude", "intermediate\\..*")
    plan = json.loads(stdout)
    assert plan["totals"]["layers"] == 10 and all(layer["rel_error"] is None for layer in plan["layers"])


@pytest.mark.parametrize("value", ["0", "-1", "abc"])
def test_bad_block_counts(tmp_path, capsys, bert_folder, value):
    code, _, err = run(capsys, "convert", bert_folder, "--nblocks", value, "--out", tmp_path / "o")
    assert_one_line_error(code, err, "nblocks")
    assert not (tmp_path / "o").exists()


def test_the_output_order_flag_reaches_the_checkpoint_and_a_bad_one_is_refused(tmp_path, capsys, bert_folder):
    out = tmp_path / "o"
    assert run(capsys, "convert", bert_folder, "-b", "2", "--output-order", "interleaved", "--out", out, "--no-check")[0] == 0
    recipe = json.loads((out / "config.json").read_text())["quantization_config"]
    assert recipe["recipe"]["output_order"] == "interleaved"
    assert {spec["output_order"] for spec in recipe["modules"].values()} == {"interleaved"}
    code, _, err = run(capsys, "convert", bert_folder, "--output-order", "sideways", "--out", tmp_path / "bad")
    assert_one_line_error(code, err, "--output-order must be one of", "sideways")
    assert not (tmp_path / "bad").exists()


def test_too_many_blocks_names_the_layer(tmp_path, capsys, bert_folder):
    code, _, err = run(capsys, "convert", bert_folder, "--nblocks", "8", "--out", tmp_path / "o")
    assert_one_line_error(code, err, "structural zeros", "encoder.layer.0")
    assert not (tmp_path / "o").exists()


def test_missing_model_folder(tmp_path, capsys):
    code, _, err = run(capsys, "convert", tmp_path / "nope", "--out", tmp_path / "o")
    assert_one_line_error(code, err, "does not exist")


def test_hub_id_while_offline(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = run(capsys, "convert", "bert-base-uncased", "--out", tmp_path / "o")
    assert_one_line_error(code, err, "bert-base-uncased", "Hub")
    assert not (tmp_path / "o").exists()


def test_regex_matching_nothing_shows_names(tmp_path, capsys, bert_folder):
    code, _, err = run(capsys, "convert", bert_folder, "--include", "no_such_layer", "--out", tmp_path / "o")
    assert_one_line_error(code, err, "no_such_layer", "encoder.layer.0.attention.self.query")
    assert not (tmp_path / "o").exists()


def test_existing_output_needs_force(tmp_path, capsys, bert_folder):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run(capsys, "convert", bert_folder, "-b", "2", "--out", out)
    assert_one_line_error(code, err, "not empty", "--force")
    assert (out / "keep.txt").read_text() == "mine"
    code, _, err = run(capsys, "convert", bert_folder, "-b", "2", "--out", out, "--force")
    assert code == 0, err
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert leftovers(tmp_path) == []


def test_nan_weight_names_the_layer(tmp_path, capsys, bert_folder):
    weights = bert_folder / "model.safetensors"
    tensors = load_file(weights)
    key = next(k for k in tensors if k.endswith("layer.1.attention.self.value.weight"))
    tensors[key][2, 3] = float("nan")
    save_file(tensors, weights, metadata={"format": "pt"})
    code, _, err = run(capsys, "convert", bert_folder, "-b", "2", "--out", tmp_path / "o")
    assert_one_line_error(code, err, "layer.1.attention.self.value", "NaN")
    assert not (tmp_path / "o").exists() and leftovers(tmp_path) == []


@pytest.fixture
def converted(tmp_path, capsys, bert_folder):
    out = tmp_path / "converted"
    code, _, err = run(capsys, "convert", bert_folder, "-b", "2", "--out", out, "--no-check")
    assert code == 0, err
    return out


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_weights_are_reported_by_report_and_load(capsys, converted, damage):
    weights = converted / "model.safetensors"
    data = weights.read_bytes()
    if damage == "truncate":
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        weights.write_bytes(b"\x00\x01not a safetensors file" * 10)
    else:
        weights.write_bytes(b"")
    code, _, err = run(capsys, "report", converted)
    assert_one_line_error(code, err, "model.safetensors")

    import monarchify
    from monarchify.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="safetensors"):
        monarchify.load(converted)


def test_report_on_a_dense_folder_and_on_nothing(tmp_path, capsys, bert_folder):
    code, _, err = run(capsys, "report", bert_folder)
    assert_one_line_error(code, err, "not a Monarch checkpoint")
    code, _, err = run(capsys, "report", tmp_path / "nothing")
    assert_one_line_error(code, err, "does not exist")


@pytest.mark.slow
def test_help_explains_and_the_real_entry_point_exits_non_zero(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    helped = subprocess.run([sys.executable, "-m", "monarchify.cli.app", "convert", "--help"],
                            capture_output=True, text=True, env=env)
    assert helped.returncode == 0 and "--nblocks" in helped.stdout and "Examples" in helped.stdout
    failed = subprocess.run([sys.executable, "-m", "monarchify.cli.app", "convert", str(tmp_path / "x"), "-o",
                             str(tmp_path / "o")], capture_output=True, text=True, env=env)
    assert failed.returncode == 1
    assert failed.stderr.strip().startswith("Error: ") and "Traceback" not in failed.stderr


def test_converting_a_model_leaves_reloadable_identical_outputs(tmp_path, capsys, bert_folder, bert_tokenizer):
    import monarchify

    out = tmp_path / "out"
    assert run(capsys, "convert", bert_folder, "-b", "2", "--out", out)[0] == 0
    model = monarchify.load(bert_folder)
    monarchify.convert(model, monarchify.MonarchConfig(nblocks=2))
    batch = bert_tokenizer(["the quick brown fox"], return_tensors="pt")
    with torch.no_grad():
        expected = model.eval()(**batch)[0]
        got = monarchify.load(out).eval()(**batch)[0]
    assert torch.equal(got, expected)


def test_a_folder_without_tokenizer_files_is_checked_on_random_ids_and_gets_no_tokenizer(tmp_path, capsys):
    """transformers 5 builds an empty tokenizer from the bare model type; it must not be taken
    for the checkpoint's own (it encodes the sample sentences to nothing) nor be saved."""
    from tests.conftest import tiny_gpt2

    from monarchify.hf.functional_check import sample_inputs
    from monarchify.hf.loading import load_tokenizer

    source = tmp_path / "gpt2-no-tokenizer"
    tiny_gpt2().save_pretrained(source)
    assert load_tokenizer(source) is None
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "convert", source, "--nblocks", "2", "--out", out, "--json")
    assert code == 0, err
    check = json.loads(stdout)["functional_check"]
    assert check["inputs"] == "random token ids"
    ids, _ = sample_inputs(tiny_gpt2(), None)  # the check's fixed random ids (seeded)
    assert_check_matches_the_models(check, source, out, ids)
    assert not any(name.startswith("tokenizer") or name.startswith("vocab") for name in os.listdir(out))


def test_a_folder_with_its_tokenizer_keeps_it(bert_folder):
    from monarchify.hf.loading import load_tokenizer

    tokenizer = load_tokenizer(bert_folder)
    assert tokenizer is not None and len(tokenizer) >= 100
    assert tokenizer("hello world")["input_ids"]


def _rewrite_weights(folder: Path, change) -> None:
    file = folder / "model.safetensors"
    tensors = load_file(file)
    change(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_a_checkpoint_missing_a_tensor_is_refused_not_filled_with_random_values(tmp_path, capsys, bert_folder):
    _rewrite_weights(bert_folder, lambda t: t.pop("encoder.layer.0.output.dense.weight"))
    out = tmp_path / "out"
    code, _, err = run(capsys, "convert", bert_folder, "-b", "2", "--out", out)
    assert_one_line_error(code, err, "has no weights for encoder.layer.0.output.dense.weight")
    assert not out.exists() and leftovers(tmp_path) == []


def test_a_checkpoint_that_does_not_fit_its_config_names_the_tensor(tmp_path, capsys, bert_folder):
    config = json.loads((bert_folder / "config.json").read_text())
    config["intermediate_size"] += 4
    (bert_folder / "config.json").write_text(json.dumps(config))
    code, _, err = run(capsys, "convert", bert_folder, "-b", "2", "--out", tmp_path / "out")
    assert_one_line_error(code, err, "encoder.layer.0.intermediate.dense.bias' has shape [100]", "config.json describes [104]")


def test_monarch_factors_the_recipe_does_not_declare_are_refused(tmp_path, capsys, bert_folder):
    out = tmp_path / "m"
    assert run(capsys, "convert", bert_folder, "-b", "2", "--out", out, "--no-check")[0] == 0
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"]["modules"].pop("encoder.layer.0.attention.self.query")
    (out / "config.json").write_text(json.dumps(config))
    code, _, err = run(capsys, "bench", "model", out, "--no-train", "--repeat", "1", "--warmup", "1")
    assert code == 1 and "encoder.layer.0.attention.self.query" in err.strip().splitlines()[-1]


def test_output_that_would_replace_the_input_is_refused_even_with_force(tmp_path, capsys, bert_folder):
    before = sorted(os.listdir(bert_folder))
    for out in (bert_folder, bert_folder.parent):
        code, _, err = run(capsys, "convert", bert_folder, "-b", "2", "--out", out, "--force")
        assert_one_line_error(code, err, "would replace the input")
    assert sorted(os.listdir(bert_folder)) == before


LAYER = "encoder.layer.0.attention.output.dense"


def _tamper_config(change):
    def apply(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        change(config["quantization_config"])
        (folder / "config.json").write_text(json.dumps(config))
    return apply


def _tamper_report(value):
    def apply(folder: Path) -> None:
        (folder / "monarchify_report.json").write_text(json.dumps(value))
    return apply


@pytest.mark.parametrize("tamper,fragment", [
    (_tamper_config(lambda q: q["modules"][LAYER].update(nblocks=4)), "but its factors have shapes"),
    (_tamper_config(lambda q: q["modules"][LAYER].update(in_features=128)), "but its factors have shapes"),
    (_tamper_config(lambda q: q["modules"][LAYER].update(nblocks="2")), "positive integer"),
    (_tamper_config(lambda q: q["modules"].update({LAYER: None})), "positive integer"),
    (_tamper_config(lambda q: q.update(modules=["x"])), "must map layer names"),
    (_tamper_config(lambda q: q.update(modules={})), "does not declare"),
    (_tamper_config(lambda q: q.update(padding="reflect")), "unknown Monarch padding"),
    (_tamper_config(lambda q: q.update(format_version=99)), "Monarch format 99"),
    (_tamper_config(lambda q: q["modules"][LAYER].update(output_order="shuffled")), "output_order 'shuffled'"),
    (_tamper_report([1, 2]), "is not a monarchify report"),
    (_tamper_report({"layers": [{"name": LAYER, "rel_error": "big"}]}), "is not a monarchify report"),
    (_tamper_report({"layers": [], "meta": []}), "is not a monarchify report"),
])
def test_a_tampered_checkpoint_is_one_line_from_report(tmp_path, capsys, bert_folder, tamper, fragment):
    out = tmp_path / "m"
    assert run(capsys, "convert", bert_folder, "-b", "2", "--out", out, "--no-check")[0] == 0
    tamper(out)
    code, _, err = run(capsys, "report", out)
    assert_one_line_error(code, err, fragment)
    assert "unexpected" not in err


def test_ctrl_c_says_so_in_one_line_and_leaves_nothing(tmp_path, capsys, bert_folder, monkeypatch):
    import monarchify.hf.loading as loading

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(loading, "read_config", interrupt)
    code, _, err = run(capsys, "convert", bert_folder, "-b", "2", "--out", tmp_path / "out")
    assert code == 130
    assert err.strip().splitlines()[-1].startswith("Error: interrupted")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
