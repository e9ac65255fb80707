"""``monarchify bench``: what it measures and reports (never how fast: timings live in
``benchmarks/``, not in tests)."""

from __future__ import annotations

import json

import pytest
import torch

from monarchify import bench
from monarchify.cli.app import main
from monarchify.config import MonarchConfig
from monarchify.monarch import MonarchLayout, MonarchLinear
from monarchify.surgery import convert
from tests.conftest import tiny_bert

QUICK = ("--warmup", "1", "--repeat", "2")


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code, err, fragment):
    """A non-zero exit whose stderr ends in the one ``Error:`` line (progress notes may precede it)."""
    errors = [line for line in err.splitlines() if line.startswith("Error: ")]
    return code != 0 and len(errors) == 1 and err.strip().splitlines()[-1] == errors[0] and fragment in errors[0] \
        and "Traceback" not in err


def test_layer_json_has_the_documented_fields_and_consistent_ratios(capsys):
    code, out, err = run(capsys, "bench", "layer", "--d-in", "64", "--d-out", "96", "--nblocks", "4", "--tokens", "16",
                         "--dtype", "float32", "--json", *QUICK)
    assert code == 0, err
    result = json.loads(out)
    for key in ("forward", "forward_backward"):
        row = result[key]
        assert row["dense_ms"] > 0 and row["monarch_ms"] > 0
        assert row["ratio"] == pytest.approx(row["dense_ms"] / row["monarch_ms"])
    assert result["config"] == {"d_in": 64, "d_out": 96, "nblocks": 4, "tokens": 16, "dtype": "float32", "bias": True,
                                "warmup": 1, "repeat": 2}
    assert result["params"] == {"dense": 64 * 96 + 96, "monarch": MonarchLayout(64, 96, 4).weight_params + 96}
    assert result["implementation"] == "strided" and result["environment"]["device"] == "cpu"


def test_layer_reference_column_and_no_backward(capsys):
    code, out, err = run(capsys, "bench", "layer", "--d-in", "32", "--d-out", "32", "--tokens", "8", "--reference",
                         "--no-backward", "--json", *QUICK)
    assert code == 0, err
    result = json.loads(out)
    assert "forward_backward" not in result
    assert result["forward"]["ratio_reference"] == pytest.approx(result["forward"]["dense_ms"] / result["forward"]["reference_ms"])


def test_layer_table_for_people(capsys):
    code, out, err = run(capsys, "bench", "layer", "--d-in", "48", "--d-out", "96", "--nblocks", "2", "--tokens", "8",
                         "--dtype", "bfloat16", *QUICK)
    assert code == 0, err
    assert "48→96, 2 blocks, 8 tokens, bfloat16" in out and "dense / monarch" in out and "forward backward" in out
    assert "medians of 2 interleaved runs" in out


@pytest.mark.parametrize(
    "args,fragment",
    [
        (("--dtype", "float8"), "unknown dtype"),
        (("--device", "cuda"), "no usable CUDA GPU"),
        (("--device", "tpu9"), "unknown device"),
        (("--repeat", "0"), "repeat"),
        (("--tokens", "0"), "tokens"),
        (("--nblocks", "64"), "more than a 32->32 layer"),
        (("--nblocks", "8"), "structural zeros"),
    ],
)
def test_layer_bad_input_is_one_line(capsys, args, fragment):
    if fragment == "no usable CUDA GPU" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    code, _, err = run(capsys, "bench", "layer", "--d-in", "32", "--d-out", "32", "--tokens", "4", *QUICK, *args)
    assert one_line_error(code, err, fragment), err


def test_model_on_a_dense_folder_converts_in_memory(capsys, bert_folder):
    code, out, err = run(capsys, "bench", "model", bert_folder, "--nblocks", "2", "--batch", "2", "--seq-len", "8", "--json", *QUICK)
    assert code == 0, err
    result = json.loads(out)
    assert result["monarch_layers"] == 12 and result["params"]["monarch"] < result["params"]["dense"]
    for key in ("inference", "train_step"):
        assert result[key]["ratio"] == pytest.approx(result[key]["dense_ms"] / result[key]["monarch_ms"])
    assert result["config"]["nblocks"] == 2 and result["config"]["batch"] == 2


def test_model_on_a_monarch_checkpoint_against_its_multiplied_out_twin(capsys, bert_folder, tmp_path):
    out_dir = tmp_path / "mon"
    code, _, err = run(capsys, "convert", bert_folder, "-b", "2", "-o", out_dir, "--no-check")
    assert code == 0, err
    code, out, err = run(capsys, "bench", "model", out_dir, "--batch", "2", "--seq-len", "8", "--no-train", *QUICK)
    assert code == 0, err
    assert "12 Monarch layers" in out and "inference" in out and "train step" not in out
    code, out, err = run(capsys, "bench", "model", out_dir, "--batch", "2", "--seq-len", "8", "--no-train", "--json", *QUICK)
    assert code == 0, err
    assert json.loads(out)["config"]["converted_in_memory"] is False


def test_densified_twin_computes_the_same_function():
    torch.manual_seed(0)
    model = tiny_bert()
    convert(model, MonarchConfig(nblocks=2))
    dense = bench.densified(model)
    assert not any(isinstance(m, MonarchLinear) for m in dense.modules())
    x = torch.randint(0, 200, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(dense(x).last_hidden_state, model(x).last_hidden_state, rtol=1e-5, atol=1e-5)


def test_model_folder_that_does_not_exist(capsys, tmp_path):
    code, _, err = run(capsys, "bench", "model", tmp_path / "nope")
    assert one_line_error(code, err, "does not exist"), err


def test_compare_interleaves_and_counts_every_run():
    calls = []
    stats = bench.compare({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, torch.device("cpu"), warmup=2, repeat=3)
    assert len(stats["a"].runs) == 3 and len(stats["b"].runs) == 3
    # warm-up a b a b, then rounds a a b b | b b a a | a a b b (each timed call follows an untimed one)
    assert calls == ["a", "b"] * 2 + ["a", "a", "b", "b", "b", "b", "a", "a", "a", "a", "b", "b"]


def _tiny_t5():
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    return T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4)).eval()


def _tiny_vit():
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                       image_size=16, patch_size=8, num_labels=3)
    return ViTForImageClassification(config).eval()


@pytest.mark.parametrize("build,expected", [(_tiny_t5, {"input_ids", "attention_mask", "decoder_input_ids"}),
                                            (_tiny_vit, {"pixel_values", "labels"})])
def test_model_inputs_follow_what_the_model_reads(build, expected):
    """Encoder-decoder models need decoder ids, vision models images; both must benchmark."""
    model = build()
    inputs = bench._sample_inputs(model, 2, 8, torch.device("cpu"), 0)
    assert set(inputs) == expected
    dense, monarch = bench.model_pair(model, nblocks=2)
    result = bench.models_benchmark(dense, monarch, batch=2, seq_len=8, warmup=1, repeat=1, device="cpu")
    assert result["monarch_layers"] > 0 and result["train_step"]["monarch_ms"] > 0


def test_model_inputs_refuse_a_sequence_longer_than_the_positions():
    from monarchify.errors import ConfigError

    with pytest.raises(ConfigError, match="--seq-len 65 is longer than the model's 64 positions"):
        bench._sample_inputs(tiny_bert(), 1, 65, torch.device("cpu"), 0)
    assert bench._sample_inputs(tiny_bert(), 1, 64, torch.device("cpu"), 0)["input_ids"].shape == (1, 64)
