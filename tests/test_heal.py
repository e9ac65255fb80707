"""Healing: the loop pulls a converted model towards its teacher, the command saves a loadable
folder that records the run, and bad input fails with one line."""

from __future__ import annotations

import copy
import json
import os
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModel

from monarchify import MonarchConfig, MonarchLinear, convert
from monarchify.errors import ConfigError
from monarchify.distill import hidden_state_loss
from monarchify.heal import _schedule, heal_, healing_loss, hidden_error, token_logit_loss
from monarchify.heal_config import HealConfig
from monarchify.hf.convert import convert_pretrained

from conftest import WORDS, tiny_bert, tiny_gpt2, tiny_llama
from test_finetune import assert_one_line_error, run_cli


def random_batches(n: int, vocab: int, seed: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        ids = torch.randint(5, vocab, (4, 10), generator=gen)
        mask = torch.ones_like(ids)
        mask[0, 6:] = 0  # one padded row: padding must not count
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def test_healing_brings_the_student_back_towards_the_teacher():
    teacher = tiny_bert(initializer_range=0.2)  # large weights: the layers, not the residuals, dominate
    student = copy.deepcopy(teacher)
    convert(student, MonarchConfig(nblocks=4))
    before_teacher = {k: v.clone() for k, v in teacher.state_dict().items()}
    heldout = random_batches(3, 200, seed=1)
    start = hidden_error(student, teacher, heldout)
    assert start > 0.5 and hidden_error(teacher, teacher, heldout) == 0.0

    result = heal_(student, teacher, random_batches(8, 200, seed=0), HealConfig(steps=60, lr=1e-3), heldout=heldout)
    assert len(result.losses) == 60 and result.heldout_before == pytest.approx(start)
    assert result.heldout_after < 0.5 * result.heldout_before, (result.heldout_before, result.heldout_after)
    assert sum(result.losses[-5:]) < sum(result.losses[:5])
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before_teacher.items())  # teacher untouched
    assert sum(isinstance(m, MonarchLinear) for m in student.modules()) == 12  # still Monarch


def test_schedule_warms_up_then_decays_to_zero():
    factor = _schedule(HealConfig(steps=10, warmup=0.2))
    values = [factor(step) for step in range(10)]
    assert values[:3] == [0.5, 1.0, 1.0]  # warm-up over 2 steps, then the peak
    assert all(a > b for a, b in zip(values[2:], values[3:])) and values[-1] == pytest.approx(1 / 8)
    assert _schedule(HealConfig(steps=4, warmup=0.0))(0) == 1.0


def test_the_held_out_curve_is_measured_without_changing_the_training():
    teacher = tiny_bert(initializer_range=0.2)
    students = [copy.deepcopy(teacher) for _ in range(2)]
    for student in students:
        convert(student, MonarchConfig(nblocks=4))
    batches, heldout = random_batches(4, 200, seed=0), random_batches(2, 200, seed=1)
    plain = heal_(students[0], teacher, batches, HealConfig(steps=7, lr=1e-3), heldout=heldout)
    traced = heal_(students[1], teacher, batches, HealConfig(steps=7, lr=1e-3, eval_every=3), heldout=heldout)
    assert traced.losses == plain.losses  # measuring on the way changes nothing
    assert [step for step, _ in traced.curve] == [0, 3, 6, 7]
    assert traced.curve[0][1] == traced.heldout_before and traced.curve[-1][1] == traced.heldout_after
    assert plain.curve == [(0, plain.heldout_before), (7, plain.heldout_after)]
    assert traced.heldout_after == pytest.approx(plain.heldout_after, rel=1e-6)
    assert heal_(students[0], teacher, batches, HealConfig(steps=2, eval_every=1)).curve == []  # no held-out text


@pytest.mark.parametrize(
    "kwargs", [{"steps": 0}, {"lr": 0.0}, {"warmup": 1.0}, {"weight_decay": -0.1}, {"eval_every": 0}, {"eval_every": True}]
)
def test_heal_config_is_checked(kwargs):
    with pytest.raises(ConfigError):
        HealConfig(**kwargs)


def write_sentences(path, n: int = 80, seed: int = 0):
    rng = random.Random(seed)
    path.write_text("\n".join(" ".join(rng.sample(WORDS, 8)) for _ in range(n)) + "\n", encoding="utf-8")
    return path


def test_cli_heals_a_converted_folder(tmp_path, capsys, bert_folder):
    converted = tmp_path / "monarch"
    convert_pretrained(bert_folder, converted, MonarchConfig(nblocks=4), check=False)
    text = write_sentences(tmp_path / "text.txt")
    out = tmp_path / "healed"
    code = run_cli(capsys, "heal", converted, "--teacher", bert_folder, "--text", text, "-o", out,
                   "--max-steps", "30", "--lr", "3e-4", "--batch-size", "8", "--max-train-samples", "48")[0]
    assert code == 0
    report = json.loads((out / "monarchify_report.json").read_text())
    heal = report["meta"]["heal"]
    assert heal["steps"] == 30 and heal["data"]["samples"] == 48 and heal["data"]["heldout"] == 12
    assert heal["heldout_hidden_error_after"] < heal["heldout_hidden_error_before"]
    assert 0 < heal["median_step_ms"] <= 1000 * heal["seconds"]  # one step's median, within the loop's time
    assert report["meta"]["recipe"]["nblocks"] == 4 and len(report["layers"]) == 12

    healed = AutoModel.from_pretrained(out).eval()
    original = AutoModel.from_pretrained(converted).eval()
    assert isinstance(healed.encoder.layer[0].output.dense, MonarchLinear)
    ids = torch.randint(5, healed.config.vocab_size, (2, 7))
    with torch.no_grad():
        assert not torch.allclose(healed(input_ids=ids).last_hidden_state, original(input_ids=ids).last_hidden_state)

    from monarchify.cli.app import main

    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    assert "healed 30 steps towards" in capsys.readouterr().out


def test_cli_heal_bad_input(tmp_path, capsys, bert_folder, bert_tokenizer):
    converted = tmp_path / "monarch"
    convert_pretrained(bert_folder, converted, MonarchConfig(nblocks=2), check=False)
    text = write_sentences(tmp_path / "text.txt", n=20)
    out = tmp_path / "out"
    base = ["--text", text, "-o", out, "--max-steps", "2"]

    code, err = run_cli(capsys, "heal", bert_folder, "--teacher", bert_folder, *base)
    assert_one_line_error(code, err, "is not a Monarch checkpoint")

    wide = tmp_path / "wide"
    tiny_bert(vocab_size=len(bert_tokenizer), hidden_size=64).save_pretrained(wide)
    code, err = run_cli(capsys, "heal", converted, "--teacher", wide, *base)
    assert_one_line_error(code, err, "is not the dense original", "hidden_size 64 vs 48")

    code, err = run_cli(capsys, "heal", converted, "--teacher", converted, *base)
    assert_one_line_error(code, err, "has Monarch layers: the teacher is the dense original")

    code, err = run_cli(capsys, "heal", converted, "--teacher", bert_folder, "--text", tmp_path / "none.txt", "-o", out)
    assert_one_line_error(code, err, "none.txt", "does not exist")

    code, err = run_cli(capsys, "heal", converted, "--teacher", bert_folder, *base, "--lr", "0")
    assert_one_line_error(code, err, "lr must be positive")
    code, err = run_cli(capsys, "heal", converted, "--teacher", bert_folder, *base, "--train", "norms")
    assert_one_line_error(code, err, "train must be one of all, converted")
    assert not out.exists()

    out.mkdir()
    (out / "keep.txt").write_text("x")
    code, err = run_cli(capsys, "heal", converted, "--teacher", bert_folder, *base)
    assert_one_line_error(code, err, "--force")
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def causal_pair(make):
    """A tiny causal LM as teacher, its 2-block conversion as student, and training and held-out
    batches of its token ids."""
    teacher = make()
    with torch.no_grad():  # larger weights, so the converted layers matter against the residual stream
        for p in teacher.parameters():
            if p.dim() == 2:
                p.mul_(5.0)
    student = copy.deepcopy(teacher)
    convert(student, MonarchConfig(nblocks=2))
    batches = [{"input_ids": b["input_ids"] % 120} for b in random_batches(6, 120, seed=0)]
    heldout = [{"input_ids": b["input_ids"] % 120} for b in random_batches(2, 120, seed=1)]
    return teacher, student, batches, heldout


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama], ids=["gpt2-conv1d", "llama-gqa"])
def test_healing_works_for_other_architectures(make):
    teacher, student, batches, heldout = causal_pair(make)
    result = heal_(student, teacher, batches, HealConfig(steps=40, lr=1e-3), heldout=heldout)
    assert result.heldout_after < result.heldout_before, (result.heldout_before, result.heldout_after)


def test_a_stopped_healing_run_resumes_to_the_same_result(tmp_path):
    """Stopped after a saved state and run again, healing ends with the weights and the
    losses of a run that never stopped: same batches, same moments, same learning rates."""
    teacher = tiny_llama()
    students = [copy.deepcopy(teacher) for _ in range(2)]
    for student in students:
        convert(student, MonarchConfig(nblocks=2))
    batches = [{"input_ids": b["input_ids"] % 120} for b in random_batches(3, 120, seed=0)]
    config = HealConfig(steps=9, lr=1e-3, save_every=4, hidden_weight=0.5, logit_weight=1.0)
    straight = heal_(students[0], teacher, batches, config)

    class Stop(Exception):
        pass

    def stop_at_six(step, loss):
        if step == 6:
            raise Stop

    resumed = copy.deepcopy(students[1])
    with pytest.raises(Stop):
        heal_(resumed, teacher, batches, config, state_dir=tmp_path, progress=stop_at_six)
    state = json.loads((tmp_path / "heal_state.json").read_text())
    assert state["step"] == 4  # the last state saved before the stop
    fresh = copy.deepcopy(students[1])  # the stopped process is gone: a new one loads the state
    result = heal_(fresh, teacher, batches, config, state_dir=tmp_path)
    assert result.losses == pytest.approx(straight.losses, rel=1e-5)
    for (name, a), b in zip(students[0].state_dict().items(), fresh.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name
    assert len(result.step_seconds) == 9 and result.median_step_ms > 0  # the stopped session's steps carried over
    other = HealConfig(steps=9, lr=2e-3, save_every=4, hidden_weight=0.5, logit_weight=1.0)
    with pytest.raises(ConfigError) as refused:  # the record of the run that wrote the state names what changed
        heal_(copy.deepcopy(students[1]), teacher, batches, other, state_dir=tmp_path)
    assert "\n" not in str(refused.value) and "lr (was 0.001, now 0.002)" in str(refused.value), refused.value


def test_a_run_stopped_while_saving_keeps_the_state_before(tmp_path, monkeypatch):
    """Killed in the seconds a save takes (after the new weights are written, before the new
    record lands), the folder still holds the previous state whole: the next run resumes from
    it, not from step 0, and the files of the unfinished save are cleared by the next one."""
    import monarchify.heal as heal_module

    teacher = tiny_llama()
    student = copy.deepcopy(teacher)
    convert(student, MonarchConfig(nblocks=2))
    batches = [{"input_ids": b["input_ids"] % 120} for b in random_batches(3, 120, seed=0)]
    config = HealConfig(steps=9, lr=1e-3, save_every=4, hidden_weight=0.0, logit_weight=1.0)

    class Killed(Exception):
        pass

    real_replace, replaced = os.replace, []

    def replace(src, dst):
        if str(dst).endswith("heal_state.json") and json.loads(Path(src).read_text())["step"] == 8:
            raise Killed  # the weights of step 8 are on disk, its record is not
        replaced.append(Path(dst).name)
        return real_replace(src, dst)

    monkeypatch.setattr(heal_module.os, "replace", replace)
    with pytest.raises(Killed):
        heal_(copy.deepcopy(student), teacher, batches, config, state_dir=tmp_path)
    monkeypatch.setattr(heal_module.os, "replace", real_replace)
    assert json.loads((tmp_path / "heal_state.json").read_text())["step"] == 4
    assert any("step000008" in name for name in replaced)  # the unfinished save got that far

    seen = []
    heal_(copy.deepcopy(student), teacher, batches, config, state_dir=tmp_path, progress=lambda step, loss: seen.append(step))
    assert seen[0] == 5  # resumed after step 4
    record = json.loads((tmp_path / "heal_state.json").read_text())
    assert record["step"] == 8 and sorted(p.name for p in tmp_path.glob("*.safetensors")) == sorted(record["files"].values())


def test_logit_healing_matches_next_token_distributions():
    teacher, student, batches, heldout = causal_pair(tiny_llama)
    from monarchify.heal import token_logit_loss

    def kl(model):
        with torch.no_grad():
            return float(sum(token_logit_loss(model(**b).logits, teacher(**b).logits, None, 1.0) for b in heldout))

    result = heal_(student, teacher, batches, HealConfig(steps=40, lr=1e-3, hidden_weight=0.0, logit_weight=1.0), measure=kl)
    # held-out batches are other random ids: the tiny model generalises only part of the way
    assert result.heldout_after < 0.85 * result.heldout_before, (result.heldout_before, result.heldout_after)
    assert sum(result.losses[-5:]) < 0.5 * sum(result.losses[:5])
    assert kl(teacher) == pytest.approx(0.0, abs=1e-6)


def test_token_logit_loss_counts_only_real_tokens_and_equals_the_per_token_kl():
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 7, generator=gen, dtype=torch.float64), torch.randn(2, 5, 7, generator=gen, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    from monarchify.heal import token_logit_loss

    p, q = t.softmax(-1), s.softmax(-1)
    per_token = (p * (p.log() - q.log())).sum(-1)
    assert float(token_logit_loss(s, t, mask, 1.0)) == pytest.approx(float(per_token[mask.bool()].mean()), rel=1e-9)
    t_changed = t.clone()
    t_changed[0, 3:] += 5.0  # padding: must not move the loss
    assert float(token_logit_loss(s, t_changed, mask, 1.0)) == pytest.approx(float(token_logit_loss(s, t, mask, 1.0)))


@pytest.mark.parametrize("kwargs", [{"hidden_weight": 0.0}, {"logit_weight": -1.0}, {"temperature": 0.0}, {"save_every": 0}])
def test_heal_loss_settings_are_checked(kwargs):
    with pytest.raises(ConfigError):
        HealConfig(**kwargs)


def test_fsdp_shards_the_decoder_blocks_the_configuration_or_the_model_names(monkeypatch):
    """FSDP gathers each block whole only for its own forward and backward: the blocks are the
    classes accelerate's FSDP configuration names, else the model's own unsplittable blocks; the
    Monarch factors are ordinary parameters inside them, so they are sharded with their block."""
    from monarchify.heal import _blocks

    model = tiny_llama()
    convert(model, MonarchConfig(nblocks=4))
    monkeypatch.delenv("FSDP_TRANSFORMER_CLS_TO_WRAP", raising=False)
    blocks = _blocks(model)
    assert blocks == list(model.model.layers)
    inside = {id(p) for block in blocks for p in block.parameters()}
    factors = [m for m in model.modules() if isinstance(m, MonarchLinear)]
    assert factors and all(id(m.L) in inside and id(m.R) in inside for m in factors)
    monkeypatch.setenv("FSDP_TRANSFORMER_CLS_TO_WRAP", "LlamaMLP, LlamaAttention")
    assert _blocks(model) == [m for layer in model.model.layers for m in (layer.self_attn, layer.mlp)]


def test_healing_sharded_refuses_weights_loaded_in_one_process_only(monkeypatch):
    from monarchify.heal import check_sharding

    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it; refused before any process group is needed
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "true")
    check_sharding()  # copies of the model (no FSDP): every process loads everything anyway
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ConfigError, match="fsdp_cpu_ram_efficient_loading"):
        check_sharding()
    model = tiny_llama()
    with pytest.raises(ConfigError, match="fsdp_cpu_ram_efficient_loading"):
        heal_(model, copy.deepcopy(model), [{"input_ids": torch.zeros(2, 4, dtype=torch.long)}], HealConfig(steps=1))
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "false")
    check_sharding()


def test_healing_only_the_converted_layers_leaves_every_other_weight_as_it_was():
    teacher, student, batches, heldout = causal_pair(tiny_llama)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    config = HealConfig(steps=20, lr=1e-3, hidden_weight=0.0, logit_weight=1.0, train="converted")
    result = heal_(student, teacher, batches, config)
    converted = {f"{name}.{p}" for name, m in student.named_modules() if isinstance(m, MonarchLinear) for p, _ in m.named_parameters()}
    assert converted and sum(result.losses[-5:]) < sum(result.losses[:5])
    for key, value in student.state_dict().items():
        if key in converted:
            continue
        assert torch.equal(value, before[key]), key  # embeddings, norms, dense layers: the dense model's
    assert any(not torch.equal(student.state_dict()[k], before[k]) for k in converted)
    assert all(p.requires_grad for p in student.parameters())  # released after the run
    assert "train" in config.to_dict() and "train" not in HealConfig().to_dict()  # the default keeps old fingerprints


def test_healing_only_the_converted_layers_needs_some():
    teacher, _, batches, _ = causal_pair(tiny_llama)
    with pytest.raises(ConfigError, match="converted"):
        heal_(copy.deepcopy(teacher), teacher, batches, HealConfig(steps=2, train="converted"))
    with pytest.raises(ConfigError, match="train"):
        HealConfig(train="embeddings")


def test_per_token_hidden_term_heals_and_is_fingerprinted_only_when_used():
    teacher, student, batches, heldout = causal_pair(tiny_llama)
    config = HealConfig(steps=20, lr=1e-3, hidden_weight=1.0, logit_weight=1.0, hidden_norm="token")
    before = hidden_error(student, teacher, heldout, per_token=True)
    assert before != pytest.approx(hidden_error(student, teacher, heldout), rel=1e-3)
    batch = batches[0]
    with torch.no_grad():
        taught = teacher(**batch, output_hidden_states=True)
        out = student(**batch, output_hidden_states=True)
        mask = batch.get("attention_mask")
        expected = hidden_state_loss(out.hidden_states[1:], taught.hidden_states[1:], mask, per_token=True) + token_logit_loss(
            out.logits, taught.logits, mask, 1.0)
        assert float(healing_loss(student, teacher, batch, config)) == pytest.approx(float(expected), rel=1e-5)
    result = heal_(student, teacher, batches, config, heldout=heldout)
    assert sum(result.losses[-5:]) < sum(result.losses[:5])
    assert result.heldout_before == pytest.approx(before, rel=1e-9)  # measured as the loss weighs tokens
    assert config.to_dict()["hidden_norm"] == "token"
    assert "hidden_norm" not in HealConfig(hidden_weight=0.0, logit_weight=1.0, hidden_norm="token").to_dict()
    with pytest.raises(ConfigError, match="hidden_norm"):
        HealConfig(hidden_norm="tokens")


def test_max_grad_norm_caps_every_step_the_optimizer_takes_and_is_fingerprinted_only_when_set(monkeypatch):
    teacher, student, batches, _ = causal_pair(tiny_llama)
    norms = []
    step = torch.optim.AdamW.step

    def spying(self, *args, **kwargs):  # the norm of the gradient each step is taken with
        grads = [p.grad.flatten() for group in self.param_groups for p in group["params"] if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.cat(grads))))
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", spying)
    heal_(copy.deepcopy(student), teacher, batches, HealConfig(steps=6, lr=1e-3, hidden_weight=0.0, logit_weight=1.0))
    free, cap = list(norms), min(norms) / 2
    norms.clear()
    config = HealConfig(steps=6, lr=1e-3, hidden_weight=0.0, logit_weight=1.0, max_grad_norm=cap)
    result = heal_(student, teacher, batches, config)
    assert len(free) == len(norms) == 6 and min(free) > cap
    assert max(norms) == pytest.approx(cap, rel=1e-4)  # every step was over the cap: each is scaled to it
    assert sum(result.losses[-3:]) < sum(result.losses[:3])  # still heals
    assert config.to_dict()["max_grad_norm"] == cap and "max_grad_norm" not in HealConfig().to_dict()
    with pytest.raises(ConfigError, match="max_grad_norm"):
        HealConfig(max_grad_norm=0.0)
