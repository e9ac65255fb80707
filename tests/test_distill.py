"""Distillation: the losses against float64 brute force, the trainer's loss mixing, and
``finetune --teacher`` end to end and on bad input."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import TrainingArguments

from monarchify import MonarchConfig
from monarchify.distill import hidden_state_loss, logit_loss
from monarchify.distill_config import DistillConfig
from monarchify.errors import ConfigError
from monarchify.glue import MonarchTrainer, finetune

from conftest import tiny_bert
from test_finetune import assert_one_line_error, check_run, options, run_cli, write_sst2


def brute_force_kd(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> float:
    total = 0.0
    for s_row, t_row in zip(student.tolist(), teacher.tolist()):
        zs = [v / temperature for v in s_row]
        zt = [v / temperature for v in t_row]
        log_norm_s = math.log(sum(math.exp(v) for v in zs))
        log_norm_t = math.log(sum(math.exp(v) for v in zt))
        for a, b in zip(zs, zt):
            log_ps, log_pt = a - log_norm_s, b - log_norm_t
            total += math.exp(log_pt) * (log_pt - log_ps)
    return total / len(student) * temperature**2


@settings(max_examples=30, deadline=None)
@given(batch=st.integers(1, 5), classes=st.integers(2, 6), temperature=st.floats(0.5, 4.0), seed=st.integers(0, 10_000))
def test_logit_loss_is_the_tempered_kl_divergence(batch, classes, temperature, seed):
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, classes, generator=gen, dtype=torch.float64) * 3
    teacher = torch.randn(batch, classes, generator=gen, dtype=torch.float64) * 3
    got = float(logit_loss(student, teacher, temperature))
    assert got == pytest.approx(brute_force_kd(student, teacher, temperature), rel=1e-9, abs=1e-12)
    assert float(logit_loss(teacher, teacher, temperature)) == pytest.approx(0.0, abs=1e-12)


def test_logit_loss_trains_only_the_student_and_regression_is_squared_error():
    student = torch.randn(4, 3, requires_grad=True)
    teacher = torch.randn(4, 3, requires_grad=True)
    logit_loss(student, teacher, 2.0).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0 and teacher.grad is None
    s, t = torch.tensor([[1.0], [2.0]]), torch.tensor([[0.0], [4.0]])
    assert float(logit_loss(s, t, 3.0)) == pytest.approx((1 + 4) / 2)
    with pytest.raises(ConfigError, match="shape"):
        logit_loss(torch.zeros(2, 3), torch.zeros(2, 2))


def test_hidden_state_loss_against_brute_force_with_padding():
    gen = torch.Generator().manual_seed(0)
    layers = 3
    student = [torch.randn(2, 5, 4, generator=gen, dtype=torch.float64) for _ in range(layers)]
    teacher = [torch.randn(2, 5, 4, generator=gen, dtype=torch.float64) for _ in range(layers)]
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    expected = 0.0
    for s, t in zip(student, teacher):
        num = den = 0.0
        for b in range(2):
            for i in range(5):
                if mask[b, i]:
                    num += float(((s[b, i] - t[b, i]) ** 2).sum())
                    den += float((t[b, i] ** 2).sum())
        expected += num / den / layers
    assert float(hidden_state_loss(student, teacher, mask)) == pytest.approx(expected, rel=1e-12)
    # Padded positions do not count, whatever they hold.
    noisy = [s.clone() for s in student]
    for s in noisy:
        s[0, 3:] = 1e6
    assert float(hidden_state_loss(noisy, teacher, mask)) == pytest.approx(expected, rel=1e-12)
    assert float(hidden_state_loss(teacher, teacher)) == 0.0


def test_hidden_state_loss_refuses_other_architectures():
    a = [torch.zeros(1, 2, 4)] * 3
    with pytest.raises(ConfigError, match="3 hidden states and teacher 2"):
        hidden_state_loss(a, a[:2])
    with pytest.raises(ConfigError, match="shape"):
        hidden_state_loss(a, [torch.zeros(1, 2, 5)] * 3)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"alpha": 1.5}, "distill.alpha"), ({"temperature": 0.0}, "distill.temperature"), ({"hidden_weight": -1}, "distill.hidden_weight")],
)
def test_distill_config_is_checked(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        DistillConfig("teacher", **kwargs)


def test_trainer_mixes_task_and_teacher_losses(tmp_path):
    """alpha 0: the task loss; alpha 1: the KD loss; a perfect student: zero; eval: task loss."""
    student = tiny_bert(with_head=True, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    inputs = {"input_ids": torch.randint(5, 200, (4, 7)), "attention_mask": torch.ones(4, 7, dtype=torch.long), "labels": torch.tensor([0, 1, 1, 0])}
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none")

    def loss(alpha: float, hidden: float = 0.0, teacher_model=teacher, train: bool = True) -> float:
        trainer = MonarchTrainer(model=student, args=args, teacher=teacher_model, distill=DistillConfig("t", alpha=alpha, temperature=2.0, hidden_weight=hidden))
        student.train(train)
        with torch.no_grad():
            return float(trainer.compute_loss(student, dict(inputs)))

    student.eval()
    with torch.no_grad():
        out_s = student(**inputs, output_hidden_states=True)
        out_t = teacher(**{k: v for k, v in inputs.items() if k != "labels"}, output_hidden_states=True)
    task, kd = float(out_s.loss), float(logit_loss(out_s.logits, out_t.logits, 2.0))
    states = float(hidden_state_loss(out_s.hidden_states[1:], out_t.hidden_states[1:], inputs["attention_mask"]))
    assert kd > 0 and states > 0
    assert loss(0.0) == pytest.approx(task, rel=1e-5)
    assert loss(1.0) == pytest.approx(kd, rel=1e-5)
    assert loss(0.25, hidden=2.0) == pytest.approx(0.75 * task + 0.25 * kd + 2.0 * states, rel=1e-5)
    assert loss(1.0, teacher_model=copy.deepcopy(student)) == pytest.approx(0.0, abs=1e-6)
    assert loss(1.0, train=False) == pytest.approx(task, rel=1e-5)  # evaluation reports the task loss


@pytest.mark.slow
def test_finetune_distills_a_monarch_student_from_a_finetuned_teacher(tmp_path, bert_folder):
    data = write_sst2(tmp_path / "glue")
    teacher_opts = options(tmp_path, bert_folder, data, out=tmp_path / "teacher")
    finetune(teacher_opts, progress_bar=False)

    distill = DistillConfig(str(teacher_opts.out), alpha=0.5, temperature=2.0, hidden_weight=1.0)
    opts = options(tmp_path, bert_folder, data, out=tmp_path / "student", monarch=MonarchConfig(nblocks=2), distill=distill)
    result = finetune(opts, progress_bar=False)
    results = check_run(result, opts.out)
    assert results["distill"] == distill.to_dict() and results["arguments"]["distill"] == distill.to_dict()
    assert results["params"]["monarch_layers"] == 12


def test_cli_distillation_bad_input(tmp_path, capsys, bert_folder, bert_tokenizer):
    data = write_sst2(tmp_path / "glue", n_train=8, n_dev=4)
    base = ["finetune", "-t", "sst2", bert_folder, "--data-dir", data, "--out", tmp_path / "out"]

    code, err = run_cli(capsys, *base, "--teacher", bert_folder)  # a base model: no task head
    assert_one_line_error(code, err, "has no fine-tuned classification head", "fine-tune the dense model on sst2 first")

    three = tmp_path / "three-labels"
    tiny_bert(vocab_size=len(bert_tokenizer), with_head=True, num_labels=3).save_pretrained(three)
    code, err = run_cli(capsys, *base, "--teacher", three)
    assert_one_line_error(code, err, "has 3 outputs; sst2 needs 2")

    other_vocab = tmp_path / "other-vocab"
    tiny_bert(vocab_size=len(bert_tokenizer) + 7, with_head=True).save_pretrained(other_vocab)
    code, err = run_cli(capsys, *base, "--teacher", other_vocab)
    assert_one_line_error(code, err, "vocab_size")

    code, err = run_cli(capsys, *base, "--teacher", tmp_path / "missing")
    assert_one_line_error(code, err, "missing", "does not exist")

    code, err = run_cli(capsys, *base, "--distill-alpha", "0.3")
    assert_one_line_error(code, err, "--teacher")

    code, err = run_cli(capsys, *base, "--teacher", three, "--distill-alpha", "2")
    assert_one_line_error(code, err, "--distill-alpha must be between 0 and 1")
    assert not (tmp_path / "out").exists()


def test_hidden_state_loss_per_token_against_brute_force():
    gen = torch.Generator().manual_seed(1)
    student = [torch.randn(2, 5, 4, generator=gen, dtype=torch.float64) for _ in range(2)]
    teacher = [torch.randn(2, 5, 4, generator=gen, dtype=torch.float64) for _ in range(2)]
    teacher[0][1, 0] *= 1000  # a massive-activation token
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]])
    expected = 0.0
    for s, t in zip(student, teacher):
        ratios = [float(((s[b, i] - t[b, i]) ** 2).sum() / (t[b, i] ** 2).sum()) for b in range(2) for i in range(5) if mask[b, i]]
        expected += sum(ratios) / len(ratios) / 2
    assert float(hidden_state_loss(student, teacher, mask, per_token=True)) == pytest.approx(expected, rel=1e-12)
    # A ratio of sums is ruled by the massive token; per token it is one of seven.
    assert float(hidden_state_loss(student, teacher, mask)) != pytest.approx(expected, rel=1e-2)
