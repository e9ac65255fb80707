"""Distillation data augmentation (:mod:`monarchify.glue.augment`): variants of the training
sentences that the teacher labels."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from monarchify.errors import ConfigError
from monarchify.glue import finetune
from monarchify.glue.augment import teacher_labels, variant, variants, vocabulary
from monarchify.glue.train import RESULTS_FILE

from conftest import WORDS
from test_finetune import assert_one_line_error, options, run_cli, write_sst2

sentences = st.lists(st.sampled_from(WORDS), min_size=1, max_size=12).map(" ".join)


@settings(max_examples=80, deadline=None)
@given(rows=st.lists(st.tuples(sentences, sentences), min_size=1, max_size=6), copies=st.integers(1, 3),
       rate=st.floats(0.01, 1.0), seed=st.integers(0, 2**16))
def test_variants_keep_the_shape_change_a_word_and_draw_only_from_the_task_text(rows, copies, rate, seed):
    out = variants(rows, copies, rate, seed)
    assert len(out) == len(rows) * copies
    words = set(vocabulary(rows))
    for k, row in enumerate(out):
        source = rows[k // copies]
        assert len(row) == len(source)
        for text, original in zip(row, source):
            assert len(text.split()) == len(original.split())  # words are replaced, never added or dropped
            assert set(text.split()) <= words
    assert variants(rows, copies, rate, seed) == out  # deterministic for a seed


def test_at_least_one_word_is_drawn_again_and_draws_follow_the_text_s_frequencies():
    rng = random.Random(0)
    words = ["common"] * 9 + ["rare"]
    drawn = Counter()
    for _ in range(2000):
        new = variant("a b c d", words, 1e-9, rng).split()  # rate ~0: still one word replaced
        changed = [w for w in new if w not in "abcd"]
        assert len(changed) == 1
        drawn[changed[0]] += 1
    assert 0.85 < drawn["common"] / 2000 < 0.95


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError, match="augment"):
        variants([("a",)], 0)
    with pytest.raises(ConfigError, match="augment_rate"):
        variants([("a",)], 1, rate=0.0)


class _Teacher(torch.nn.Module):
    """Says 1 exactly when the first token id is even: a rule to check the labels against."""

    def __init__(self, regression=False):
        super().__init__()
        self.regression = regression
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, **_):
        from types import SimpleNamespace

        even = (input_ids[:, 0] % 2 == 0).float()
        logits = even[:, None] * 3.0 if self.regression else torch.stack([1 - even, even], -1)
        return SimpleNamespace(logits=logits)


def test_teacher_labels_are_its_argmax_or_its_score_batch_by_batch(bert_tokenizer):
    rows = [(w,) for w in WORDS[:37]]
    first = [bert_tokenizer(w, add_special_tokens=False)["input_ids"][0] for (w,) in rows]
    teacher = _Teacher().train()
    labels = teacher_labels(teacher, _NoSpecial(bert_tokenizer), rows, regression=False, max_length=8, batch_size=5)
    assert labels == [int(i % 2 == 0) for i in first] and teacher.training  # mode restored
    scores = teacher_labels(_Teacher(regression=True), _NoSpecial(bert_tokenizer), rows, regression=True, max_length=8)
    assert scores == [3.0 * (i % 2 == 0) for i in first]


class _NoSpecial:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, *texts, **kwargs):
        return self.tokenizer(*texts, add_special_tokens=False, **kwargs)


def test_finetune_with_augment_trains_on_the_variants_and_records_them(tmp_path, bert_folder):
    from monarchify.distill import DistillConfig

    data = write_sst2(tmp_path / "glue", n_train=48, n_dev=16)
    teacher = options(tmp_path, bert_folder, data, out=tmp_path / "teacher", epochs=2)
    finetune(teacher, progress_bar=False)
    opts = options(tmp_path, bert_folder, data, out=tmp_path / "student", epochs=1, augment=2, holdout=0.25,
                   save_checkpoints=True, distill=DistillConfig(str(teacher.out)))
    finetune(opts, progress_bar=False)
    results = json.loads((opts.out / RESULTS_FILE).read_text())
    assert results["data"]["augmented"]["variants"] == 2 * 36  # of the 36 left after holding 12 out
    assert results["train"]["examples"] == 36 * 3
    assert results["arguments"]["augment"] == 2


def test_cli_augment_needs_a_teacher_and_belongs_to_task_compression(tmp_path, capsys, bert_folder):
    data = write_sst2(tmp_path / "glue", n_train=8, n_dev=4)
    code, err = run_cli(capsys, "finetune", "-t", "sst2", bert_folder, "--data-dir", data, "--out", tmp_path / "o", "--augment", "2")
    assert_one_line_error(code, err, "--augment", "teacher")
    code, err = run_cli(capsys, "compress", bert_folder, "--task", "sst2", "--budget", "0.5", "--data-dir", data,
                        "--out", tmp_path / "c", "--augment", "-1")
    assert_one_line_error(code, err, "augment")
    text = tmp_path / "t.txt"
    text.write_text("words\n", encoding="utf-8")
    code, err = run_cli(capsys, "compress", bert_folder, "--text", text, "-b", "4", "--out", tmp_path / "c", "--augment", "1")
    assert_one_line_error(code, err, "--augment belong to --task compression")
    assert not (tmp_path / "o").exists() and not (tmp_path / "c").exists()
