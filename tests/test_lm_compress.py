"""Language-model compression: convert under a budget on text, heal towards the dense model,
measure held-out perplexity; stages resume and redo only what a changed option decides."""

from __future__ import annotations

import json
import random

import pytest
import torch
import transformers

from monarchify.errors import ConfigError
from monarchify.heal_config import HealConfig
from monarchify.lm.compress import (
    CALIBRATION_HELDOUT, TextCompressEvents, TextCompressOptions, compress_text, window_perplexity,
)
from monarchify.manifest import MANIFEST_FILE

from conftest import WORDS, tiny_gpt2, tiny_llama


def _text(path, lines=240, seed=0):
    rng = random.Random(seed)
    path.write_text("\n".join(" ".join(rng.choices(WORDS[:40], k=rng.randint(8, 30))) for _ in range(lines)) + "\n",
                    encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def lm_folder(tmp_path_factory):
    """A tiny random causal LM with a small byte-level tokenizer, saved as a user would have it."""
    from monarchify.lm.text import train_tokenizer

    folder = tmp_path_factory.mktemp("tiny-lm")
    text = _text(folder / "corpus.txt")
    tokenizer = train_tokenizer(text.read_text().splitlines(), 120, "causal")
    model = tiny_llama(vocab_size=len(tokenizer))
    with torch.no_grad():  # larger weights: the converted layers matter against the residual stream
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    model.save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    return folder / "model"


def _options(model, text, out, **overrides):
    settings = dict(model=str(model), text=[text], out=out, budget=0.5, block_size=16, calibration_samples=24,
                    batch_size=4, heal=HealConfig(steps=12, lr=2e-3, hidden_weight=0.0, logit_weight=1.0, save_every=5,
                                                  eval_every=6), eval_fraction=0.1)
    settings.update(overrides)
    return TextCompressOptions(**settings)


def test_compress_text_heals_and_records_perplexities(tmp_path, lm_folder):
    text = _text(tmp_path / "train.txt", seed=1)
    out = tmp_path / "out"
    result = compress_text(_options(lm_folder, text, out))
    saved = json.loads((out / "eval_results.json").read_text())
    assert saved["perplexity"] == result.results["perplexity"]
    ppl = saved["perplexity"]
    # The model is random, so a conversion can score lower than it by chance; what healing does
    # is pull the converted model's distributions towards the dense one's.
    assert ppl["converted"] != ppl["dense"]
    assert abs(ppl["compressed"] - ppl["dense"]) < abs(ppl["converted"] - ppl["dense"]), ppl
    assert [point["step"] for point in saved["heal"]["curve"]] == [0, 6, 12]
    assert saved["heal"]["tokens"] == 12 * 4 * 16
    assert 0 < saved["heal"]["median_step_ms"] <= 1000 * saved["heal"]["seconds"] + 10  # seconds are rounded to 0.01
    assert saved["params"]["compressed"] < saved["params"]["dense"]
    memory = saved["memory"]  # high-water marks: the conversion's, then the whole run's
    if memory["peak_rss_mib"] is not None:
        assert 0 < memory["convert_peak_rss_mib"] <= memory["peak_rss_mib"]
    allocation = saved["allocation"]  # the budget's plan was checked against a uniform one
    assert allocation["chosen"] in ("budget", "uniform")
    assert allocation["perplexity"][allocation["chosen"]] == min(allocation["perplexity"].values())
    assert allocation["perplexity"][allocation["chosen"]] == pytest.approx(ppl["converted"], rel=1e-5)

    from monarchify.hf.loading import load_model

    model = load_model(str(out))
    assert window_perplexity(model, _windows(lm_folder, text), 4) > 0
    manifest = json.loads((tmp_path / "out.stages" / MANIFEST_FILE).read_text())
    assert [name for name, stage in manifest["stages"].items() if stage["done"]] == ["convert", "heal"]


def _windows(model, text):
    from monarchify.hf.loading import load_tokenizer
    from monarchify.lm.text import pack

    return pack(text.read_text().splitlines(), load_tokenizer(str(model)), 16)[:8]


def test_window_perplexity_is_the_exponent_of_the_mean_token_nll():
    model = tiny_gpt2()
    ids = torch.randint(0, 120, (3, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logp = model(input_ids=ids).logits.double().log_softmax(-1)
    nll = -logp[:, :-1].gather(-1, ids[:, 1:, None]).mean()
    assert window_perplexity(model, ids, batch_size=2) == pytest.approx(float(nll.exp()), rel=1e-5)


def test_a_stopped_run_resumes_and_a_changed_budget_converts_again(tmp_path, lm_folder):
    import shutil

    from monarchify.lm.compress import TextCompressEvents

    text = _text(tmp_path / "train.txt", seed=1)
    out = tmp_path / "out"
    heal = HealConfig(steps=8, lr=1e-3, logit_weight=1.0, hidden_weight=0.0, save_every=3)

    class Stop(Exception):
        pass

    def stop_at_five(step, steps, loss):
        if step == 5:
            raise Stop

    with pytest.raises(Stop):
        compress_text(_options(lm_folder, text, out, heal=heal), TextCompressEvents(heal_step=stop_at_five))
    assert not out.exists()
    messages = []
    events = TextCompressEvents(note=messages.append, done=messages.append, stage=messages.append)
    resumed = compress_text(_options(lm_folder, text, out, heal=heal), events)
    assert any("converted already" in m for m in messages), messages
    assert any("resuming healing from step 3 of 8" in m for m in messages), messages
    straight = compress_text(_options(lm_folder, text, tmp_path / "straight", heal=heal))
    assert resumed.results["perplexity"]["compressed"] == pytest.approx(straight.results["perplexity"]["compressed"], rel=1e-4)
    allocation = resumed.results["allocation"]  # the budget's plan was checked against a uniform one, and it is kept
    assert allocation == straight.results["allocation"] and allocation["chosen"] in ("budget", "uniform")
    assert allocation["perplexity"][allocation["chosen"]] == min(allocation["perplexity"].values())
    assert allocation["perplexity"][allocation["chosen"]] == pytest.approx(resumed.results["perplexity"]["converted"], rel=1e-5)

    shutil.rmtree(out)  # as after a stop before the final save
    messages.clear()
    smaller = compress_text(_options(lm_folder, text, out, heal=heal, budget=0.3), events)
    assert any("recipe.budget (was 0.5, now 0.3)" in m and "converting again" in m for m in messages), messages
    assert smaller.results["params"]["compressed"] < resumed.results["params"]["compressed"]


def test_options_are_checked_before_anything_runs(tmp_path, lm_folder):
    text = _text(tmp_path / "t.txt")
    with pytest.raises(ConfigError, match="block_size"):
        _options(lm_folder, text, tmp_path / "o", block_size=0)
    with pytest.raises(ConfigError, match="budget"):
        _options(lm_folder, text, tmp_path / "o", budget=1.5)
    with pytest.raises(ConfigError, match="restart_from"):
        _options(lm_folder, text, tmp_path / "o", restart_from="teacher")


def test_cli_compress_text_prints_the_perplexities_and_refuses_task_flags(tmp_path, lm_folder, capsys):
    from test_finetune import assert_one_line_error, run_cli

    text = _text(tmp_path / "train.txt", seed=2)
    out = tmp_path / "cli-out"
    code, err = run_cli(capsys, "compress", lm_folder, "--text", text, "--budget", "0.5", "--out", out,
                        "--heal-steps", "4", "--max-length", "16", "--batch-size", "4", "--calibration-samples", "16",
                        "--json")
    assert code == 0, err
    results = json.loads((out / "eval_results.json").read_text())
    assert results["heal"]["steps"] == 4 and results["heldout"]["window"] == 16
    # the measured schedule is the default: peak 5e-4, gradients clipped to norm 1
    assert results["options"]["heal"]["lr"] == 5e-4 and results["options"]["heal"]["max_grad_norm"] == 1.0
    assert [p["step"] for p in results["heal"]["curve"]] == [0, 1, 2, 3, 4]  # default: every steps // 4
    # the curve is shown as it grows (a real healing run is hours), each point as recorded
    shown = [line for line in err.splitlines() if line.startswith(("held-out perplexity before", "held-out perplexity after"))]
    assert len(shown) == 5 and shown[0].startswith("held-out perplexity before healing: ")
    for line, point in zip(shown[1:], results["heal"]["curve"][1:]):
        assert line == f"held-out perplexity after step {point['step']}/4: {point['perplexity']:.2f}"

    code, err = run_cli(capsys, "compress", lm_folder, "--text", text, "--budget", "0.5", "--out",
                        tmp_path / "o2", "--epochs", "2")
    assert_one_line_error(code, err, "--epochs belong to --task compression")
    code, err = run_cli(capsys, "compress", lm_folder, "--budget", "0.5", "--out", tmp_path / "o3")
    assert_one_line_error(code, err, "give --task", "or --text")
    code, err = run_cli(capsys, "compress", lm_folder, "--text", tmp_path / "missing.txt", "--budget", "0.5",
                        "--out", tmp_path / "o4")
    assert_one_line_error(code, err, "missing.txt", "does not exist")
    assert not (tmp_path / "o4").exists() and not (tmp_path / "o4.stages").exists()
    for task in (["--text", text], ["--task", "mrpc"]):  # a zero rate is refused, not swapped for the default
        code, err = run_cli(capsys, "compress", lm_folder, *task, "--budget", "0.5", "--out", tmp_path / "o5",
                            "--student-lr", "0")
        assert_one_line_error(code, err, "--student-lr", "positive")
        assert not (tmp_path / "o5").exists() and not (tmp_path / "o5.stages").exists()


@pytest.mark.parametrize("samples, heldout", [(1, 1), (16, 4), (32, CALIBRATION_HELDOUT), (128, CALIBRATION_HELDOUT)])
def test_held_out_calibration_windows_are_capped(tmp_path, samples, heldout):
    options = _options("model", tmp_path / "t.txt", tmp_path / "out", calibration_samples=samples)
    assert options.conversion.calibration.heldout == heldout
    assert options.stage_options()["convert"]["recipe"]["calibration"]["heldout"] == heldout  # a change redoes the stage


def test_cli_compress_text_at_a_block_count_with_sequential_calibration(tmp_path, lm_folder, capsys):
    from test_finetune import assert_one_line_error, run_cli

    text = _text(tmp_path / "train.txt", seed=3)
    out = tmp_path / "b2"
    code, err = run_cli(capsys, "compress", lm_folder, "--text", text, "-b", "2", "--sequential", "--out", out,
                        "--heal-steps", "0", "--max-length", "16", "--calibration-samples", "16")
    assert code == 0, err
    results = json.loads((out / "eval_results.json").read_text())
    assert results["recipe"]["nblocks"] == 2 and results["recipe"]["calibration"]["sequential"] is True
    assert results["recipe"]["calibration"]["heldout"] == 4  # a quarter of 16, under the cap
    assert "budget" not in results["recipe"] or results["recipe"]["budget"] is None
    assert results["heal"] == {"steps": 0} and results["perplexity"]["compressed"] == results["perplexity"]["converted"]

    code, err = run_cli(capsys, "compress", lm_folder, "--text", text, "-b", "2", "--budget", "0.5", "--out", tmp_path / "x")
    assert_one_line_error(code, err, "--budget FRACTION or --nblocks N")
    code, err = run_cli(capsys, "compress", lm_folder, "--task", "sst2", "-b", "2", "--out", tmp_path / "y")
    assert_one_line_error(code, err, "--task compression needs --budget")


def test_cli_compress_text_keeps_layers_two_blocks_would_not_shrink_and_heals_hidden_states_when_asked(tmp_path, lm_folder, capsys):
    from test_finetune import assert_one_line_error, run_cli

    from monarchify.hf.stored_report import read_report

    text = _text(tmp_path / "train.txt", seed=4)
    out = tmp_path / "b2h"
    code, err = run_cli(capsys, "compress", lm_folder, "--text", text, "-b", "2", "--out", out, "--heal-steps", "2",
                        "--distill-hidden", "0.5", "--max-length", "16", "--batch-size", "4", "--calibration-samples", "16")
    assert code == 0, err
    results = json.loads((out / "eval_results.json").read_text())
    assert results["options"]["heal"]["hidden_weight"] == 0.5 and results["options"]["heal"]["logit_weight"] == 1.0
    assert results["options"]["heal"]["hidden_norm"] == "token"  # a causal LM: per token, not ruled by its massive tokens
    assert results["recipe"]["keep_dense_if_not_smaller"] is True
    report = read_report(str(out))
    kept = {layer.name for layer in report.layers if layer.kept_dense}
    square = {layer.name for layer in report.layers if layer.shape[0] == layer.shape[1]}
    assert square and kept == square  # q_proj/o_proj of the tiny Llama: 2 blocks hold all their weights
    assert all("no smaller" in layer.reason for layer in report.layers if layer.kept_dense)
    code, err = run_cli(capsys, "compress", lm_folder, "--text", text, "-b", "2", "--out", tmp_path / "neg",
                        "--distill-hidden", "-1")
    assert_one_line_error(code, err, "hidden_weight", "negative")
    assert not (tmp_path / "neg").exists()


def test_cli_compress_text_heals_the_converted_layers_only_on_text_the_dense_model_wrote_too(tmp_path, lm_folder, capsys):
    from safetensors.torch import load_file
    from test_finetune import assert_one_line_error, run_cli

    text = _text(tmp_path / "train.txt", seed=5)
    out = tmp_path / "frozen"
    code, err = run_cli(capsys, "compress", lm_folder, "--text", text, "-b", "4", "--out", out, "--heal-steps", "3",
                        "--heal-train", "converted", "--generate", "6", "--max-length", "16", "--batch-size", "4",
                        "--calibration-samples", "16", "--max-grad-norm", "0.5")
    assert code == 0, err
    results = json.loads((out / "eval_results.json").read_text())
    assert results["options"]["heal"]["train"] == "converted" and results["tokens"]["generated"] == 6 * 16
    assert results["options"]["heal"]["max_grad_norm"] == 0.5
    healed, dense = load_file(str(out / "model.safetensors")), load_file(str(lm_folder / "model.safetensors"))
    assert torch.equal(healed["model.embed_tokens.weight"], dense["model.embed_tokens.weight"])
    assert torch.equal(healed["model.norm.weight"], dense["model.norm.weight"])
    code, err = run_cli(capsys, "compress", lm_folder, "--task", "mrpc", "--budget", "0.5", "--out", tmp_path / "t",
                        "--generate", "4")
    assert_one_line_error(code, err, "--generate")
    code, err = run_cli(capsys, "compress", lm_folder, "--task", "mrpc", "--budget", "0.5", "--out", tmp_path / "t",
                        "--max-grad-norm", "1")
    assert_one_line_error(code, err, "--max-grad-norm")
    code, err = run_cli(capsys, "compress", lm_folder, "--text", text, "-b", "4", "--out", tmp_path / "bad",
                        "--max-grad-norm", "-1")
    assert_one_line_error(code, err, "--max-grad-norm", "positive")
    code, err = run_cli(capsys, "compress", lm_folder, "--text", text, "-b", "4", "--out", tmp_path / "unclipped",
                        "--heal-steps", "1", "--max-grad-norm", "0", "--max-length", "16", "--calibration-samples", "16")
    assert code == 0, err  # 0 turns the default clipping off
    assert "max_grad_norm" not in json.loads((tmp_path / "unclipped" / "eval_results.json").read_text())["options"]["heal"]
    code, err = run_cli(capsys, "compress", lm_folder, "--text", text, "-b", "4", "--out", tmp_path / "bad",
                        "--heal-train", "everything")
    assert_one_line_error(code, err, "train must be one of")
    assert not (tmp_path / "t").exists() and not (tmp_path / "bad").exists()


def test_a_bfloat16_checkpoint_heals_in_float32_and_is_saved_as_it_came(tmp_path, lm_folder):
    """Most published LLM checkpoints are bfloat16: healing them in bfloat16 would lose AdamW's
    small steps (and gave negative divergences); the output keeps the stored precision."""
    from safetensors import safe_open

    from monarchify.distill import logit_loss

    model = transformers.AutoModelForCausalLM.from_pretrained(lm_folder).to(torch.bfloat16)
    half = tmp_path / "bf16"
    model.save_pretrained(half)
    transformers.AutoTokenizer.from_pretrained(lm_folder).save_pretrained(half)
    text = _text(tmp_path / "train.txt", seed=5)
    result = compress_text(_options(half, text, tmp_path / "out", budget=None, recipe={"nblocks": 4},
                                    heal=HealConfig(steps=3, lr=1e-3, hidden_weight=0.0, logit_weight=1.0, eval_every=3)))
    assert result.results["dtype"] == {"measured_and_healed": "float32", "saved": "bfloat16"}
    assert result.results["heal"]["final_loss"] >= 0
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    # the divergence itself is taken in float32 from half-precision logits
    torch.manual_seed(0)
    s, t = torch.randn(64, 3000) * 4, torch.randn(64, 3000) * 4
    exact = logit_loss(s.double(), t.double())
    assert abs(float(logit_loss(s.bfloat16(), t.bfloat16())) - float(logit_loss(s.bfloat16().double(), t.bfloat16().double()))) < 1e-4 * float(exact)


@pytest.mark.parametrize("better", ["budget", "uniform"])
def test_the_budget_plan_is_kept_only_when_the_model_prefers_it(tmp_path, lm_folder, monkeypatch, better):
    """The uniform rival is the largest block count within the budget; whichever of the two
    the held-out text scores lower ends in the converted stage, and the other is gone."""
    import monarchify.lm.compress as lm_compress
    from monarchify.hf.convert import convert_pretrained
    from monarchify.hf.loading import load_tokenizer
    from monarchify.hf.saving import recipe_of
    from monarchify.hf.stored_report import read_report

    text = _text(tmp_path / "train.txt", seed=1)
    options = _options(lm_folder, text, tmp_path / "out", heal=None, budget=0.6)
    data = lm_compress.load_text(options, load_tokenizer(str(lm_folder)))
    converted = tmp_path / "stages" / lm_compress.CONVERTED
    convert_pretrained(str(lm_folder), converted, options.conversion, calibration_data=data.calibration, check=False)
    plan = read_report(str(converted)).meta["budget"]
    rival = lm_compress.uniform_rival(read_report(str(converted)), 0.6)
    fitting = [int(b) for b, v in plan["uniform"].items() if v["params"] <= plan["params_budget"]]
    assert rival == max(fitting, key=lambda b: plan["uniform"][str(b)]["params"])

    def score(model, windows, batch_size=8):
        return 2.0 if (recipe_of(model).get("budget") is None) == (better == "budget") else 1.0

    monkeypatch.setattr(lm_compress, "window_perplexity", score)
    allocation = lm_compress.check_against_uniform(options, converted, data, lm_compress.TextCompressEvents())
    assert allocation == {"chosen": better, "uniform": {"nblocks": rival}, "perplexity": {"budget": 1.0, "uniform": 2.0}
                          if better == "budget" else {"budget": 2.0, "uniform": 1.0}}
    kept = read_report(str(converted))
    assert ("budget" in kept.meta) == (better == "budget")
    assert sorted(p.name for p in converted.parent.iterdir()) == [lm_compress.CONVERTED]


def test_cli_compress_text_converts_only_the_layers_chosen_and_at_their_own_block_counts(tmp_path, lm_folder, capsys):
    from test_finetune import assert_one_line_error, run_cli

    from monarchify.hf.stored_report import read_report

    text = _text(tmp_path / "train.txt", seed=7)
    out = tmp_path / "chosen"
    code, err = run_cli(capsys, "compress", lm_folder, "--text", text, "-b", "2", "--exclude", "k_proj", "--exclude", "v_proj",
                        "--override", "down_proj=4", "--out", out, "--heal-steps", "0", "--max-length", "16",
                        "--calibration-samples", "16")
    assert code == 0, err
    results = json.loads((out / "eval_results.json").read_text())
    assert results["recipe"]["exclude"] == ["k_proj", "v_proj"] and results["recipe"]["overrides"] == {"down_proj": 4}
    layers = {layer.name: layer for layer in read_report(str(out)).layers}
    assert not any(name.endswith(("k_proj", "v_proj")) for name in layers)  # never selected, so never converted
    down = [layer for name, layer in layers.items() if name.endswith("down_proj")]
    gate = [layer for name, layer in layers.items() if name.endswith("gate_proj")]
    assert down and all(layer.nblocks == 4 for layer in down)
    assert gate and all(layer.nblocks == 2 for layer in gate)
    # the choice is part of what the converted stage was made with: a changed one converts again
    import shutil

    shutil.rmtree(out)  # as after a stop before the final save
    code, err = run_cli(capsys, "compress", lm_folder, "--text", text, "-b", "2", "--exclude", "k_proj", "--out", out,
                        "--heal-steps", "0", "--max-length", "16", "--calibration-samples", "16")
    assert code == 0, err
    assert "recipe.exclude" in err and "converting again" in err, err
    layers = {layer.name for layer in read_report(str(out)).layers}
    assert any(name.endswith("v_proj") for name in layers) and not any(name.endswith("k_proj") for name in layers)

    code, err = run_cli(capsys, "compress", lm_folder, "--task", "mrpc", "--budget", "0.5", "--exclude", "query", "--out", tmp_path / "t")
    assert_one_line_error(code, err, "--exclude", "--text compression")
    code, err = run_cli(capsys, "compress", lm_folder, "--text", text, "-b", "2", "--override", "down_proj", "--out", tmp_path / "bad")
    assert_one_line_error(code, err, "REGEX=NBLOCKS")
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad.stages").exists()


def test_a_budget_allocated_by_kind_measures_every_kind_and_keeps_the_better_of_it_and_uniform(tmp_path, lm_folder):
    from monarchify.hf.stored_report import read_report
    from monarchify.lm.compress import KINDS
    from monarchify.lm.kinds import kind_of

    text = _text(tmp_path / "train.txt", seed=8)
    out = tmp_path / "kinds"
    messages = []
    events = TextCompressEvents(note=messages.append, done=messages.append, stage=messages.append)
    result = compress_text(_options(lm_folder, text, out, budget=0.6, by_kind=True, heal=None), events)
    allocation = result.results["allocation"]
    assert allocation["objective"] == "kinds"
    kinds = set(allocation["plan"])
    assert kinds == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                     "mlp.up_proj", "mlp.down_proj"}
    measured = {(m["kind"], m["nblocks"]) for m in allocation["measured"]}
    assert {kind for kind, _ in measured} == kinds and all(b in (2, 3, 4) for _, b in measured)
    assert allocation["params"]["plan"] <= allocation["params"]["budget"]
    assert allocation["chosen"] in ("kinds", "uniform") and allocation["uniform"] is not None
    assert allocation["perplexity"][allocation["chosen"]] == min(allocation["perplexity"].values())
    assert allocation["perplexity"][allocation["chosen"]] == pytest.approx(result.results["perplexity"]["converted"], rel=1e-5)
    layers = read_report(str(out)).layers
    if allocation["chosen"] == "kinds":  # the saved model is the plan, kind by kind (dense kinds not selected at all)
        assert {kind_of(layer.name): layer.nblocks for layer in layers} == {
            kind: b for kind, b in allocation["plan"].items() if b != "dense"}
    else:
        assert {layer.nblocks for layer in layers} == {allocation["uniform"]["nblocks"]}
    assert any("measuring 7 kinds" in m for m in messages), messages
    assert not list(tmp_path.glob(f"kinds.stages/{KINDS}-*"))  # the candidates are gone

    with pytest.raises(ConfigError, match="by_kind"):
        _options(lm_folder, text, tmp_path / "x", budget=None, recipe={"nblocks": 2}, by_kind=True)
    with pytest.raises(ConfigError, match="by_kind"):
        _options(lm_folder, text, tmp_path / "x", by_kind=True, recipe={"overrides": {"q_proj": 4}})


def test_cli_budget_objective_kinds_is_the_text_recipes(tmp_path, lm_folder, capsys):
    from test_finetune import assert_one_line_error, run_cli

    text = _text(tmp_path / "train.txt", seed=9)
    out = tmp_path / "cli-kinds"
    code, err = run_cli(capsys, "compress", lm_folder, "--text", text, "--budget", "0.6", "--budget-objective", "kinds",
                        "--out", out, "--heal-steps", "0", "--max-length", "16", "--calibration-samples", "16")
    assert code == 0, err
    results = json.loads((out / "eval_results.json").read_text())
    assert results["allocation"]["objective"] == "kinds" and results["options"]["by_kind"] is True
    assert "mlp.up_proj at 2 blocks, the rest dense: held-out perplexity x" in err
    code, err = run_cli(capsys, "compress", lm_folder, "--task", "mrpc", "--budget", "0.5", "--budget-objective", "kinds",
                        "--out", tmp_path / "t")
    assert_one_line_error(code, err, "kinds", "--text")
    code, err = run_cli(capsys, "convert", lm_folder, "--budget", "0.5", "--budget-objective", "kinds", "--out", tmp_path / "c")
    assert_one_line_error(code, err, "kinds", "language model", "text recipe")
    assert not (tmp_path / "c").exists()
