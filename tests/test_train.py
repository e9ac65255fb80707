"""Training from scratch: models built from a config with fresh Monarch layers, the exact switch
to dense with the optimizer following it, and ``monarchify train`` end to end (loss falls,
resume across the switch matches an uninterrupted run, bad input is one line)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers
from transformers import TrainerCallback

import monarchify
from monarchify import MonarchConfig, MonarchLinear
from monarchify.cli.app import main
from monarchify.errors import ConfigError
from monarchify.hf.fresh import build_model
from monarchify.lm.options import RESULTS_FILE, TrainOptions
from monarchify.lm.switch import densify_training, monarch_layers
from monarchify.lm.train import train

SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "monarch matrices replace dense weights with two block diagonal factors",
    "profit rose three percent in the third quarter",
    "where is the nearest train station",
]


def tiny_gpt2(**extra):
    return transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=97, n_positions=32,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **extra,
    )


def tiny_bert():
    return transformers.BertConfig(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64, vocab_size=97,
        max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )


# ------------------------------------------------------------------------- built from a config


@pytest.mark.parametrize("make, auto", [(tiny_gpt2, transformers.AutoModelForCausalLM), (tiny_bert, transformers.AutoModelForMaskedLM)])
def test_from_config_selects_the_block_linears_with_the_dense_init_scale_and_round_trips(tmp_path, make, auto):
    model = monarchify.from_config(make(), MonarchConfig(nblocks=4), seed=0)
    dense, _ = build_model(make(), None, seed=0)  # the same seed draws the same dense init first
    layers = monarch_layers(model)
    expected = [  # every linear layer inside the repeated blocks (GPT-2's h.N, BERT's layer.N), nothing else
        name for name, m in dense.named_modules()
        if type(m).__name__ in ("Linear", "Conv1D") and (".h." in f".{name}" or ".layer." in f".{name}")
    ]
    assert sorted(layers) == sorted(expected) and len(layers) in (8, 12)
    out_emb = model.get_output_embeddings()
    assert not isinstance(out_emb, MonarchLinear)
    assert out_emb.weight is model.get_input_embeddings().weight  # tied, untouched
    for name, layer in layers.items():
        reference = dense.get_submodule(name).weight
        assert torch.isclose(layer.to_dense().norm(), reference.norm(), rtol=1e-4)
        assert not torch.allclose(layer.to_dense().abs().sum(), torch.zeros(()))

    monarchify.save(model, tmp_path / "m")
    loaded = auto.from_pretrained(tmp_path / "m")  # stock from_pretrained, through the plug-in
    assert set(monarch_layers(loaded)) == set(layers)
    ids = torch.randint(0, 97, (2, 16))
    model.eval()
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_from_config_refuses_a_budget_in_one_line():
    with pytest.raises(ConfigError, match="budget"):
        monarchify.from_config(tiny_gpt2(), MonarchConfig(nblocks=4, budget=0.5))


# ------------------------------------------------------------------------- the switch


def adamw_like_trainer(model):
    """Two groups, decay and no decay, in named_parameters order: what Trainer builds."""
    decay = [p for n, p in model.named_parameters() if "bias" not in n and "ln" not in n]
    rest = [p for n, p in model.named_parameters() if "bias" in n or "ln" in n]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}], lr=1e-3)


def test_switch_keeps_the_loss_and_points_the_optimizer_at_the_dense_parameters():
    torch.manual_seed(0)
    model = monarchify.from_config(tiny_gpt2(), MonarchConfig(nblocks=4), seed=0)
    optimizer = adamw_like_trainer(model)
    ids = torch.randint(0, 97, (4, 16))
    for _ in range(3):  # real optimizer state to carry or drop
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    old = monarch_layers(model)
    old_bias_state = {name: optimizer.state[m.bias]["exp_avg"] for name, m in old.items()}
    with torch.no_grad():
        before = model(input_ids=ids, labels=ids).loss.item()

    names = densify_training(model, optimizer)

    assert names == list(old) and not monarch_layers(model)
    with torch.no_grad():
        after = model(input_ids=ids, labels=ids).loss.item()
    assert after == pytest.approx(before, rel=1e-5, abs=1e-6)
    in_optimizer = [p for group in optimizer.param_groups for p in group["params"]]
    assert {id(p) for p in in_optimizer} == {id(p) for p in model.parameters()}
    assert len(in_optimizer) == len(list(model.parameters()))
    stale = {id(p) for m in old.values() for p in (m.L, m.R)}
    assert not stale & {id(p) for p in optimizer.state}
    for name in old:
        new = model.get_submodule(name)
        assert new.weight not in optimizer.state  # AdamW restarts for the dense weight
        assert optimizer.state[new.bias]["exp_avg"] is old_bias_state[name]  # the bias keeps its moments
    weight = model.get_submodule(names[0]).weight.detach().clone()
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    assert not torch.equal(weight, model.get_submodule(names[0]).weight)


# ------------------------------------------------------------------------- monarchify train


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(SENTENCES * 60) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def arch(tmp_path):
    folder = tmp_path / "arch"
    tiny_gpt2().save_pretrained(folder)
    return folder


def options(tmp_path, corpus, arch, name, **changes):
    base = dict(
        arch=str(arch), text=[corpus], out=tmp_path / name, block_size=16, vocab_size=300, batch_size=8,
        max_steps=8, learning_rate=3e-3, warmup=0.0, eval_steps=4, save_steps=2, logging_steps=1, seed=0,
        monarch=MonarchConfig(nblocks=4),
    )
    base.update(changes)
    return TrainOptions(**base)


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


class OptimizerFollows(TrainerCallback):
    """After every step: the optimizer holds exactly the model's parameters."""

    def __init__(self):
        self.checked = 0

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        assert held == {id(p) for p in model.parameters()}
        self.checked += 1


def test_train_monarch_from_scratch_loss_falls_and_saves_a_loadable_folder(tmp_path, corpus, arch):
    result = train(options(tmp_path, corpus, arch, "nb4", max_steps=30, eval_steps=10, save_steps=10, learning_rate=1e-2), progress_bar=False)
    losses = [e["loss"] for e in result.results["curve"] if "loss" in e]
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    assert math.isfinite(result.results["eval"]["perplexity"])
    saved = json.loads((tmp_path / "nb4" / RESULTS_FILE).read_text())
    assert saved["train"]["steps"] == 30 and saved["switch"] is None
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "nb4")
    assert len(monarch_layers(loaded)) == 8
    assert not (tmp_path / "nb4.checkpoints").exists()  # a finished run drops its checkpoints


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_train_switch_is_exact_and_the_optimizer_follows(tmp_path, corpus, arch, family):
    if family == "bert":
        arch = tmp_path / "bert"
        tiny_bert().save_pretrained(arch)
    follows = OptimizerFollows()
    result = train(options(tmp_path, corpus, arch, "switch", densify_at=0.5), callbacks=[follows], progress_bar=False)
    assert result.results["objective"] == ("causal" if family == "gpt2" else "masked")
    switch = result.results["switch"]
    assert switch["step"] == 4 and switch["layers"] == (8 if family == "gpt2" else 12)
    assert switch["loss_after"] == pytest.approx(switch["loss_before"], rel=1e-5)
    assert follows.checked == 8
    assert not monarch_layers(result.model)
    config = json.loads((tmp_path / "switch" / "config.json").read_text())
    assert "quantization_config" not in config  # dense now: a plain Hugging Face folder
    assert result.results["train"]["median_step_ms_dense"] is not None


def logits(model, ids):
    model.eval()
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits


@pytest.mark.parametrize(
    "family, include",
    [("gpt2", None), ("gpt2", ["attn\\.c_proj"]), ("bert", None)],
    ids=["gpt2-every-layer", "gpt2-square-layer-only", "bert"],
)
def test_a_densified_run_saves_a_folder_plain_from_pretrained_loads_as_trained(tmp_path, corpus, arch, family, include):
    """GPT-2's Conv1D stores its weight (in, out): the switch must put a Conv1D back, or the
    saved folder refuses to load (rectangular layers) or loads transposed weights silently
    (square ones)."""
    auto = transformers.AutoModelForCausalLM
    if family == "bert":
        arch, auto = tmp_path / "bert", transformers.AutoModelForMaskedLM
        tiny_bert().save_pretrained(arch)
    recipe = MonarchConfig(nblocks=4, include=include or [])
    result = train(options(tmp_path, corpus, arch, "switch", densify_at=0.5, max_steps=4, monarch=recipe), progress_bar=False)
    assert result.results["switch"]["layers"] == (2 if include else 8 if family == "gpt2" else 12)
    loaded, info = auto.from_pretrained(tmp_path / "switch", output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched weight
    assert not monarch_layers(loaded)
    for name, module in result.model.named_modules():  # every layer of the kind the architecture defines
        assert type(loaded.get_submodule(name)) is type(module), name
    ids = torch.randint(0, 97, (2, 16))
    torch.testing.assert_close(logits(loaded, ids), logits(result.model, ids))


def test_train_densify_at_on_the_command_line_writes_a_gpt2_folder_that_loads_as_trained(capsys, monkeypatch, tmp_path, corpus, arch):
    import monarchify.lm.train as lm_train

    saved = {}
    original = lm_train._save

    def keep_model(options, model, *args, **kwargs):  # the CLI returns no model: catch the one it saves
        saved["model"] = model
        return original(options, model, *args, **kwargs)

    monkeypatch.setattr(lm_train, "_save", keep_model)
    code, err = run_cli(capsys, "train", "--arch", arch, "--text", corpus, "--out", tmp_path / "o", "-b", 4,
                        "--include", "attn\\.c_proj", "--densify-at", 2, "--max-steps", 4, "--max-length", 16,
                        "--vocab-size", 300, "--batch-size", 8)
    assert code == 0, err
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "o")
    assert type(loaded.transformer.h[0].attn.c_proj).__name__ == "Conv1D"
    ids = torch.randint(0, 97, (2, 16))
    torch.testing.assert_close(logits(loaded, ids), logits(saved["model"], ids))

    # evaluations are on the held-out text, and say so (beside the training loss they read as one)
    evaluations = [line for line in err.splitlines() if "evaluation" in line]
    assert evaluations and all("held-out evaluation: loss" in line and "perplexity" in line for line in evaluations), err
    assert not [line for line in err.splitlines() if " loss " in line and "training loss" not in line and "held-out" not in line], err

    # report says what the folder is: trained Monarch, then dense (no Monarch layers left to list)
    code, err = run_cli(capsys, "report", tmp_path / "o")
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("Error:"), err
    assert "trained with 2 Monarch layers, switched to dense after step 2 of 4" in lines[0], err


@pytest.mark.parametrize("stop", [2, 6], ids=["stopped-before-the-switch", "stopped-after-the-switch"])
def test_resume_across_the_switch_matches_an_uninterrupted_run(tmp_path, corpus, arch, stop):
    whole = train(options(tmp_path, corpus, arch, "whole", densify_at=4), progress_bar=False)
    cut = options(tmp_path, corpus, arch, "cut", densify_at=4)
    first = train(cut, callbacks=[StopAt(stop)], progress_bar=False)
    assert first.results["train"]["stopped_early"] and not cut.out.exists()
    assert bool(monarch_layers(first.model)) == (stop < 4)
    resumed = train(options(tmp_path, corpus, arch, "cut", densify_at=4, resume=True), progress_bar=False)
    assert resumed.results["train"]["steps"] == 8 and resumed.results["switch"]["step"] == 4
    expected = whole.model.state_dict()
    got = resumed.model.state_dict()
    assert set(got) == set(expected)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-5, msg=key)
    assert len(resumed.results["step_seconds"]) == 8  # the step times before the stop were carried over


# ------------------------------------------------------------------------- bad input, one line


def run_cli(capsys, *args):
    capsys.readouterr()
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--densify-at", "0.5"], "train with a Monarch recipe (--nblocks)"),
        (["-b", "4", "--densify-at", "1.5"], "--densify-at must be a fraction"),
        (["-b", "4", "--densify-at", "50"], "only 8 steps"),
        (["--width", "30", "--heads", "4"], "not a multiple"),
        (["--text-column", "sentence"], "not a TSV"),
        (["--resume"], "resume"),
        (["--max-length", "64"], "exceeds"),
        (["--objective", "nope"], "objective"),
    ],
)
def test_bad_input_is_refused_in_one_line(capsys, tmp_path, corpus, arch, extra, message):
    code, err = run_cli(capsys, "train", "--arch", arch, "--text", corpus, "--max-steps", 8, "--max-length", 16,
                        "--vocab-size", 300, "--out", tmp_path / "o", *extra)
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and message in lines[0], err


def test_missing_text_and_a_tsv_without_the_column_are_one_line(capsys, tmp_path, arch):
    tsv = tmp_path / "data.tsv"
    tsv.write_text("label\tsentence\n1\ta good film\n", encoding="utf-8")
    for text, extra, message in ((tmp_path / "nope.txt", [], "does not exist"), (tsv, ["--text-column", "review"], "no column")):
        code, err = run_cli(capsys, "train", "--arch", arch, "--text", text, "--out", tmp_path / "o", *extra)
        assert code != 0 and len(err.strip().splitlines()) == 1 and message in err, err


def test_init_saves_an_untrained_monarch_model_that_loads(capsys, tmp_path, arch):
    code, err = run_cli(capsys, "init", "--arch", arch, "-b", "4", "--out", tmp_path / "init")
    assert code == 0, err
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "init")
    assert len(monarch_layers(loaded)) == 8


def test_resume_checks_the_run_manifest_and_names_the_option_that_changed(tmp_path, corpus, arch, capsys):
    from monarchify.manifest import MANIFEST_FILE, RunManifest

    notes = []

    class Notes(monarchify.glue.FinetuneEvents):
        def note(self, message):
            notes.append(message)

    cut = options(tmp_path, corpus, arch, "cut")
    train(cut, callbacks=[StopAt(4)], progress_bar=False)
    manifest = RunManifest.load(cut.checkpoints)
    assert manifest.stages["train"].options["seed"] == 0 and not manifest.stages["train"].done
    with pytest.raises(ConfigError, match=r"seed \(was 0, now 1\)"):
        train(options(tmp_path, corpus, arch, "cut", seed=1, resume=True), progress_bar=False)
    code, err = run_cli(capsys, "train", "--arch", arch, "--text", corpus, "--out", cut.out, "--max-length", 16,
                        "--vocab-size", 300, "--max-steps", 8, "--seed", 0, "-b", 2, "--resume")
    assert code == 1 and len(err.strip().splitlines()) == 1 and "monarch.nblocks (was 4, now 2)" in err, err
    # a checkpoint folder of an earlier version (the options themselves in the file) still resumes
    legacy = {**cut.to_dict(), "learning_rate": 1.0}
    (cut.checkpoints / MANIFEST_FILE).write_text(json.dumps(legacy), encoding="utf-8")
    resumed = train(options(tmp_path, corpus, arch, "cut", resume=True, learning_rate=1e-3), events=Notes(), progress_bar=False)
    assert resumed.results["train"]["steps"] == 8
    assert notes == ["resuming from checkpoint-4 (step 4 of 8)"]


class CountSaves(TrainerCallback):
    def __init__(self):
        self.saves = []

    def on_save(self, args, state, control, **kwargs):
        self.saves.append(state.global_step)


def test_a_short_run_evaluates_and_checkpoints_once_by_default(tmp_path, corpus, arch):
    """Ten evaluations and checkpoints in a 30-step run cost more than its training: by default
    they are at least MIN_DEFAULT_INTERVAL steps apart, and the run still ends with one of each."""
    from monarchify.lm.options import MIN_DEFAULT_INTERVAL

    saves = CountSaves()
    run = options(tmp_path, corpus, arch, "short", max_steps=30, eval_steps=None, save_steps=None)
    result = train(run, callbacks=[saves], progress_bar=False)
    evaluated = [entry["step"] for entry in result.results["curve"] if "eval_loss" in entry]
    assert MIN_DEFAULT_INTERVAL > 30 and evaluated == [30] and saves.saves == [30]


@pytest.mark.parametrize("max_steps, every", [(30, 50), (499, 50), (500, 50), (1000, 100), (20000, 2000)])
def test_default_interval_is_a_tenth_of_a_long_run_and_at_least_fifty_steps(tmp_path, max_steps, every):
    run = TrainOptions(arch="gpt2", text=[tmp_path / "t.txt"], out=tmp_path / "o")
    assert run.eval_steps is None and run.save_steps is None
    assert run.every(run.eval_steps, max_steps) == run.every(run.save_steps, max_steps) == every
    assert run.every(0.1, 30) == 3 and run.every(7, 30) == 7  # what is asked for is kept


def test_the_switch_is_refused_under_a_sharded_launch(monkeypatch, tmp_path, corpus, arch):
    """Under FSDP each process holds pieces of the factors: nothing to multiply out."""
    from monarchify.lm.train import _check_request

    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it; no process group is needed to refuse
    _check_request(options(tmp_path, corpus, arch, "copies", densify_at=0.5))  # copies of the model: allowed
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ConfigError, match="sharded"):
        _check_request(options(tmp_path, corpus, arch, "sharded", densify_at=0.5))
    assert not (tmp_path / "sharded").exists()
