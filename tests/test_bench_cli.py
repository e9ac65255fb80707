"""``monarchify bench``: what it measures and reports.

How fast Monarch is lives in ``benchmarks/``, not in tests. Here a fake clock that advances
by a known cost whenever a layer runs gives every timing and ratio an exact expected value,
and one real-clock test checks that the timer measures work at all.
"""

from __future__ import annotations

import copy
import json
import statistics
import time

import pytest
import torch
from torch import nn

from monarchify import bench, convert
from monarchify.cli.app import main
from monarchify.config import MonarchConfig
from monarchify.hf import model_bench
from monarchify.monarch import MonarchLinear, kernels
from tests.conftest import tiny_bert, tiny_gpt2

QUICK = ("--warmup", "1", "--repeat", "2")
COST_MS = {"dense": 3.0, "monarch": 1.0, "reference": 2.0}
"""What one call of each kind of layer costs on the fake clock."""


class FakeClock:
    """Stands in for the ``time`` module in :mod:`monarchify.bench`. It advances only when a
    layer's forward runs, by ``COST_MS`` for its kind, so a correct benchmark must report
    exactly those costs (and their ratios); a swapped, mis-attributed or mis-aggregated
    timing cannot."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now

    def tick(self, module: nn.Module, args, output) -> None:
        if isinstance(module, MonarchLinear):
            self.now += COST_MS["reference" if kernels._choice.get() == "reference" else "monarch"] / 1e3
        elif type(module) is nn.Linear:
            self.now += COST_MS["dense"] / 1e3


@pytest.fixture
def fake_clock(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(bench, "time", clock)
    handle = nn.modules.module.register_module_forward_hook(clock.tick)
    yield clock
    handle.remove()


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code, err, fragment):
    """A non-zero exit whose stderr ends in the one ``Error:`` line (progress notes may precede it)."""
    errors = [line for line in err.splitlines() if line.startswith("Error: ")]
    return code != 0 and len(errors) == 1 and err.strip().splitlines()[-1] == errors[0] and fragment in errors[0] \
        and "Traceback" not in err


def test_layer_json_has_the_documented_fields_and_the_clock_s_times(capsys, fake_clock):
    code, out, err = run(capsys, "bench", "layer", "--d-in", "64", "--d-out", "96", "--nblocks", "4", "--tokens", "16",
                         "--dtype", "float32", "--json", *QUICK)
    assert code == 0, err
    result = json.loads(out)
    for key in ("forward", "forward_backward"):
        assert result[key] == pytest.approx({"dense_ms": 3.0, "monarch_ms": 1.0, "ratio": 3.0})
    assert result["config"] == {"d_in": 64, "d_out": 96, "nblocks": 4, "output_order": "blocked", "tokens": 16, "dtype": "float32", "bias": True,
                                "warmup": 1, "repeat": 2}
    # docs/monarch.md: b·q·(p + s) weights, with p = 16, s = 24, q = 16 at b = 4.
    assert result["params"] == {"dense": 64 * 96 + 96, "monarch": 4 * 16 * (16 + 24) + 96}
    assert result["flops_ratio"] == pytest.approx(64 * 96 / 2560)
    assert result["implementation"] == "strided" and result["environment"]["device"] == "cpu"


def test_layer_reference_column_and_no_backward(capsys, fake_clock):
    code, out, err = run(capsys, "bench", "layer", "--d-in", "32", "--d-out", "32", "--tokens", "8", "--reference",
                         "--no-backward", "--json", *QUICK)
    assert code == 0, err
    result = json.loads(out)
    assert "forward_backward" not in result
    assert result["forward"] == pytest.approx({"dense_ms": 3.0, "monarch_ms": 1.0, "ratio": 3.0,
                                               "reference_ms": 2.0, "ratio_reference": 1.5})


def test_real_timings_grow_with_the_work_and_agree_with_a_stopwatch():
    """The one test on the real clock, with margins a busy machine cannot close: 500 000
    times the FLOPs must take longer (50-200x here, call overhead included), and a stopwatch
    timing the same dense layer independently must agree within 10x."""
    small = bench.layer_benchmark(16, 16, 2, 4, device="cpu", backward=False, warmup=1, repeat=3)
    big = bench.layer_benchmark(1024, 1024, 2, 512, device="cpu", backward=False, warmup=1, repeat=3)
    for key in ("dense_ms", "monarch_ms"):
        assert big["forward"][key] > 5 * small["forward"][key], (small["forward"], big["forward"])
    layer, x = nn.Linear(1024, 1024), torch.randn(512, 1024)
    with torch.no_grad():
        layer(x)
        watch = []
        for _ in range(5):
            start = time.perf_counter()
            layer(x)
            watch.append((time.perf_counter() - start) * 1e3)
    assert 0.1 < big["forward"]["dense_ms"] / statistics.median(watch) < 10, (big["forward"], watch)


def test_layer_table_for_people(capsys):
    code, out, err = run(capsys, "bench", "layer", "--d-in", "48", "--d-out", "96", "--nblocks", "2", "--tokens", "8",
                         "--dtype", "bfloat16", *QUICK)
    assert code == 0, err
    assert "48→96, 2 blocks (blocked), 8 tokens, bfloat16" in out and "dense / monarch" in out and "forward backward" in out
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


def test_model_on_a_dense_folder_converts_in_memory(capsys, bert_folder, fake_clock):
    code, out, err = run(capsys, "bench", "model", bert_folder, "--nblocks", "2", "--batch-size", "2", "--seq-len", "8", "--json", *QUICK)
    assert code == 0, err
    result = json.loads(out)
    assert result["monarch_layers"] == 12 and result["params"]["monarch"] < result["params"]["dense"]
    # The tiny BERT has 13 linear layers: 6 per block, and the pooler, which stays dense.
    dense_ms, monarch_ms = 13 * 3.0, 1 * 3.0 + 12 * 1.0
    for key in ("inference", "train_step"):
        assert result[key] == pytest.approx({"dense_ms": dense_ms, "monarch_ms": monarch_ms, "ratio": dense_ms / monarch_ms})
    assert result["config"]["nblocks"] == 2 and result["config"]["batch"] == 2


def test_model_on_a_monarch_checkpoint_against_its_multiplied_out_twin(capsys, bert_folder, tmp_path):
    out_dir = tmp_path / "mon"
    code, _, err = run(capsys, "convert", bert_folder, "-b", "2", "-o", out_dir, "--no-check")
    assert code == 0, err
    code, out, err = run(capsys, "bench", "model", out_dir, "--batch-size", "2", "--seq-len", "8", "--no-train", *QUICK)
    assert code == 0, err
    assert "12 Monarch layers" in out and "inference" in out and "train step" not in out
    code, out, err = run(capsys, "bench", "model", out_dir, "--batch-size", "2", "--seq-len", "8", "--no-train", "--json", *QUICK)
    assert code == 0, err
    assert json.loads(out)["config"]["converted_in_memory"] is False


def test_densified_twin_computes_the_same_function():
    torch.manual_seed(0)
    model = tiny_bert()
    convert(model, MonarchConfig(nblocks=2))
    dense = model_bench.densified(model)
    assert not any(isinstance(m, MonarchLinear) for m in dense.modules())
    x = torch.randint(0, 200, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(dense(x).last_hidden_state, model(x).last_hidden_state, rtol=1e-5, atol=1e-5)


def test_the_densified_twin_is_what_densify_makes():
    """One densify: GPT-2's twin gets its Conv1D layers back (the architecture's own), with the
    bits ``densify_`` computes."""
    from monarchify.pipeline.densify import densify_

    model = tiny_gpt2()
    convert(model, MonarchConfig(nblocks=2, allow_structural_zeros=True))
    twin = model_bench.densified(model)
    reference = copy.deepcopy(model)
    densify_(reference)
    assert [type(m) for m in twin.modules()] == [type(m) for m in reference.modules()]
    assert type(twin.transformer.h[0].mlp.c_fc).__name__ == "Conv1D"
    for (name, a), (_, b) in zip(twin.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), name


def test_model_folder_that_does_not_exist(capsys, tmp_path):
    code, _, err = run(capsys, "bench", "model", tmp_path / "nope")
    assert one_line_error(code, err, "does not exist"), err


def test_stats_are_the_timed_calls_summarised_by_median_and_best(monkeypatch):
    """Each contender's timed call is the second of a pair (the first warms its cache); a
    fake timer that reports what the call returns shows which calls were timed."""
    monkeypatch.setattr(bench, "_timer", lambda device: lambda fn: fn())
    returns = {"a": iter([0, 5, 0, 1, 0, 1000]), "b": iter([0, 2, 0, 2, 0, 2])}
    stats = bench.compare({name: (lambda it=it: next(it)) for name, it in returns.items()}, torch.device("cpu"),
                          warmup=0, repeat=3)
    assert stats["a"].runs == [5, 1, 1000] and stats["a"].median == 5 and stats["a"].best == 1
    assert bench.pair(stats["b"], stats["a"])["ratio"] == pytest.approx(2 / 5)  # the outlier does not move it


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
    inputs = model_bench._sample_inputs(model, 2, 8, torch.device("cpu"), 0)
    assert set(inputs) == expected
    dense, monarch = model_bench.model_pair(model, nblocks=2)
    result = model_bench.models_benchmark(dense, monarch, batch=2, seq_len=8, warmup=1, repeat=1, device="cpu")
    assert result["monarch_layers"] > 0 and result["train_step"]["monarch_ms"] > 0


def test_model_inputs_refuse_a_sequence_longer_than_the_positions():
    from monarchify.errors import ConfigError

    with pytest.raises(ConfigError, match="sequence length 65 is longer than the model's 64 positions"):
        model_bench._sample_inputs(tiny_bert(), 1, 65, torch.device("cpu"), 0)
    assert model_bench._sample_inputs(tiny_bert(), 1, 64, torch.device("cpu"), 0)["input_ids"].shape == (1, 64)


# --- causal language models: prefill and decoding ------------------------------------------

GEN = ("--batch-size", "1", "--seq-len", "8", "--prompt-tokens", "8", "--new-tokens", "3", "--gen-batch-size", "1", "--gen-batch-size", "2")


@pytest.fixture
def llama_folder(tmp_path):
    from tests.conftest import tiny_llama

    folder = tmp_path / "tiny-llama"
    tiny_llama().save_pretrained(folder)
    return folder


def test_causal_lm_prefill_and_decode_tokens_per_second_on_the_clock(capsys, llama_folder, fake_clock):
    """Every forward pass of the tiny Llama runs its 14 block linears and the (dense) output
    layer once: 15 × 3 ms dense, 14 × 1 + 3 ms Monarch. Prefill is one pass over the prompt;
    decoding 3 tokens is 3 passes (the first over the 8-token prompt, then one per new token)."""
    code, out, err = run(capsys, "bench", "model", llama_folder, "--nblocks", "2", "--no-train", *GEN, "--json", *QUICK)
    assert code == 0, err
    result = json.loads(out)
    dense_ms, monarch_ms = 15 * 3.0, 14 * 1.0 + 3.0
    assert result["config"]["generation"] == {"prompt_tokens": 8, "new_tokens": 3, "decode_prompt_tokens": 8, "batches": [1, 2]}
    assert [row["batch"] for row in result["prefill"]] == [1, 2] == [row["batch"] for row in result["decode"]]
    for row in result["prefill"]:
        tokens = row["batch"] * 8
        assert row == pytest.approx({"batch": row["batch"], "tokens": tokens, "dense_ms": dense_ms, "monarch_ms": monarch_ms,
                                     "ratio": dense_ms / monarch_ms, "dense_tokens_per_s": tokens / (dense_ms / 1e3),
                                     "monarch_tokens_per_s": tokens / (monarch_ms / 1e3)})
    for row in result["decode"]:
        tokens = row["batch"] * 3
        assert row == pytest.approx({"batch": row["batch"], "tokens": tokens, "dense_ms": 3 * dense_ms, "monarch_ms": 3 * monarch_ms,
                                     "ratio": dense_ms / monarch_ms, "dense_tokens_per_s": tokens / (3 * dense_ms / 1e3),
                                     "monarch_tokens_per_s": tokens / (3 * monarch_ms / 1e3), "new_tokens_per_sequence": 3})
    assert result["inference"]["ratio"] == pytest.approx(dense_ms / monarch_ms)


def test_decoding_makes_exactly_the_new_tokens_asked_for_on_both_models(monkeypatch):
    """A spy on ``generate`` sees every sequence grow by ``new_tokens`` (greedy, cache on, no
    early stop at an end-of-text token, which min_new_tokens forbids), and the progress hook
    counts every call up to its announced total."""
    from tests.conftest import tiny_llama

    dense, monarch = model_bench.model_pair(tiny_llama(), nblocks=2)
    seen = []
    for name, model in (("dense", dense), ("monarch", monarch)):
        original = model.generate

        def spy(*args, name=name, original=original, **kwargs):
            out = original(*args, **kwargs)
            seen.append((name, kwargs["do_sample"], kwargs["use_cache"], tuple(kwargs["input_ids"].shape), tuple(out.shape)))
            return out

        monkeypatch.setattr(model, "generate", spy)
    ticks = []
    result = model_bench.models_benchmark(dense, monarch, batch=2, seq_len=8, device="cpu", train=True, warmup=1, repeat=1,
                                          generation=model_bench.Generation(prompt_tokens=6, new_tokens=5, batches=(3,)),
                                          progress=lambda stage, done, total: ticks.append((stage, done, total)))
    assert {s[0] for s in seen} == {"dense", "monarch"} and len(seen) == 2 * 3
    assert all(s[1:] == (False, True, (3, 8), (3, 13)) for s in seen), seen
    assert result["decode"][0]["new_tokens_per_sequence"] == 5 and result["decode"][0]["tokens"] == 15
    assert result["prefill"][0]["tokens"] == 18 and result["prefill"][0]["monarch_tokens_per_s"] > 0
    assert result["train_step"]["monarch_ms"] > 0
    assert [t[1] for t in ticks] == list(range(1, len(ticks) + 1)) and ticks[-1][1] == ticks[-1][2] == 4 * 2 * 3
    assert {t[0] for t in ticks} == {"inference", "prefill, batch 3", "decode, batch 3", "training step"}


def test_decoding_that_stops_early_is_refused(monkeypatch):
    from tests.conftest import tiny_llama

    dense, monarch = model_bench.model_pair(tiny_llama(), nblocks=2)
    for model in (dense, monarch):
        monkeypatch.setattr(model, "generate", lambda input_ids, **kw: input_ids[:, :-1])
    with pytest.raises(model_bench.ConfigError, match="generation made \\[-1\\] new tokens per sequence, not 4"):
        model_bench.models_benchmark(dense, monarch, batch=1, seq_len=8, device="cpu", train=False, warmup=0, repeat=1,
                                     generation=model_bench.Generation(prompt_tokens=4, new_tokens=4, batches=(1,)))


def test_causal_lm_table_and_no_generation_for_other_models(capsys, llama_folder, bert_folder):
    code, out, err = run(capsys, "bench", "model", llama_folder, "--nblocks", "2", "--no-train", *GEN, *QUICK)
    assert code == 0, err
    assert "tokens per second: prefill of 8 tokens" in out and "decode, batch 2" in out and "Monarch / dense" in out
    code, out, err = run(capsys, "bench", "model", bert_folder, "--nblocks", "2", "--batch-size", "1", "--seq-len", "8",
                         "--no-train", "--json", *QUICK)
    assert code == 0, err
    assert "prefill" not in json.loads(out) and "decode" not in json.loads(out)
    code, out, err = run(capsys, "bench", "model", llama_folder, "--no-train", "--no-generate", "--json", "--seq-len", "8", *QUICK)
    assert code == 0, err
    assert "prefill" not in json.loads(out)


@pytest.mark.parametrize("args,fragment", [
    (("--new-tokens", "30"), "decoding 30 tokens (new_tokens) after a prompt of 8 is longer than the model's 32 positions"),
    (("--prompt-tokens", "33"), "a prompt of 33 tokens (prompt_tokens) is longer than the model's 32 positions"),
    (("--gen-batch-size", "0"), "every generation batch must be >= 1"),
])
def test_generation_that_cannot_run_is_one_line(capsys, llama_folder, args, fragment):
    code, _, err = run(capsys, "bench", "model", llama_folder, "--no-train", "--seq-len", "8", "--prompt-tokens", "8", *args, *QUICK)
    assert one_line_error(code, err, fragment), err


def test_layer_at_one_token_times_the_decoding_path_for_inference(capsys, fake_clock):
    # One thread: the native kernel is auto's choice there only (with more, MKL's threaded path).
    code, out, err = run(capsys, "bench", "layer", "--d-in", "64", "--d-out", "96", "--tokens", "1", "--threads", "1", "--json", *QUICK)
    assert code == 0, err
    result = json.loads(out)
    from monarchify.monarch.kernels import native

    decoding = "native" if native.library() is not None else "small"
    assert (result["implementation"], result["implementation_train"]) == (decoding, "strided")


def test_prefill_computes_logits_for_the_last_position_only_as_generate_does():
    """A user waits for the prompt's pass and its last position's logits (``generate`` asks for
    no more); the other positions' logits are vocabulary x prompt of work nobody waits for."""
    from monarchify.hf import model_bench
    from tests.conftest import tiny_llama

    dense, monarch = model_bench.model_pair(tiny_llama(), nblocks=2)
    seen = []
    for model in (dense, monarch):
        model.lm_head.register_forward_hook(lambda module, args, out: seen.append(tuple(args[0].shape[:2])))
    model_bench.models_benchmark(dense, monarch, batch=2, seq_len=8, device="cpu", train=False, warmup=0, repeat=1,
                           generation=model_bench.Generation(prompt_tokens=6, new_tokens=2, batches=(3,)))
    assert (3, 1) in seen and (3, 6) not in seen


def test_a_low_rank_checkpoint_benchmarks_against_its_multiplied_out_twin(capsys, tmp_path):
    """``--structure lowrank`` folders (the baseline a user compares Monarch with) are converted
    checkpoints too: timed as they are, against the dense model they multiply out to."""
    from monarchify.hf.convert import convert_pretrained
    from monarchify.hf.loading import load_model
    from monarchify.monarch import LowRankLinear
    from tests.conftest import tiny_llama

    source, folder = tmp_path / "dense", tmp_path / "lowrank"
    tiny_llama().save_pretrained(source)
    convert_pretrained(source, folder, MonarchConfig(nblocks=2, structure="lowrank"), check=False)
    model = load_model(folder)
    dense, converted = model_bench.model_pair(model)
    assert converted is model and not any(isinstance(m, LowRankLinear) for m in dense.modules())
    ids = torch.randint(0, dense.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(dense(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    code, out, err = run(capsys, "bench", "model", folder, "--no-train", *GEN, "--json", *QUICK)
    assert code == 0, err
    result = json.loads(out)
    layers = sum(isinstance(m, LowRankLinear) for m in model.modules())
    assert layers > 0 and result["monarch_layers"] == layers and result["config"]["converted_in_memory"] is False
    assert [row["batch"] for row in result["decode"]] == [1, 2] and all(row["monarch_ms"] > 0 for row in result["decode"])
    assert result["structure"] == "low rank"
    code, out, err = run(capsys, "bench", "model", folder, "--no-train", *GEN, *QUICK)  # the tables name it too
    assert code == 0, err
    assert "low rank tok/s" in out and "Monarch" not in out
