"""A result at the trivial baseline is said in words, and a conversion's functional check too:
the constant-answer scores (:mod:`monarchify.glue.baseline`), the cosine verdict, and the
warning ``finetune`` prints when a model learned nothing."""

from __future__ import annotations

import json

import pytest

from monarchify.cli.render import OUTPUT_CHANGE_ADVICE, output_verdict
from monarchify.glue.baseline import TOLERANCE, baseline_message, trivial_baseline
from monarchify.glue.tasks import get_task
from monarchify.report import output_change

MRPC = get_task("mrpc")
SST2 = get_task("sst2")
COLA = get_task("cola")
STSB = get_task("stsb")

# 68 of 100 pairs are paraphrases, like MRPC's dev set (68.4%).
MRPC_LABELS = [1] * 68 + [0] * 32


def test_always_answering_the_majority_class_of_mrpc_is_the_baseline_and_is_flagged():
    baseline = trivial_baseline(MRPC, MRPC_LABELS, [1] * 100)
    assert baseline["answer"] == "equivalent" and baseline["main_metric"] == "f1"
    assert baseline["scores"]["accuracy"] == pytest.approx(0.68)
    assert baseline["scores"]["f1"] == pytest.approx(2 * 68 / (68 + 100))  # all-positive F1
    assert baseline["single_answer"] == "equivalent" and baseline["at_baseline"]
    assert baseline["model_score"] == pytest.approx(baseline["scores"]["f1"])
    message = baseline_message("validation", baseline)
    assert "always answering 'equivalent'" in message and "f1 0.810" in message and "accuracy 0.680" in message
    assert "has not learned the task" in message and "--" not in message  # the front end adds its flags


def test_a_model_answering_the_minority_class_only_is_flagged_too():
    baseline = trivial_baseline(MRPC, MRPC_LABELS, [0] * 100)
    assert baseline["single_answer"] == "not_equivalent" and baseline["at_baseline"]
    assert baseline["answer"] == "equivalent"  # the best constant stays the reference
    assert baseline["model_score"] == 0.0


def test_a_model_clearly_better_than_the_baseline_is_not_flagged():
    predictions = [1] * 60 + [0] * 8 + [0] * 30 + [1] * 2  # 90% right
    baseline = trivial_baseline(MRPC, MRPC_LABELS, predictions)
    assert not baseline["at_baseline"] and baseline["single_answer"] is None
    assert baseline["model_score"] > baseline["scores"]["f1"] + 0.05
    assert baseline_message("validation", baseline) is None


def test_a_model_near_the_constant_on_the_main_metric_but_above_it_on_another_is_not_flagged():
    # 56 of 68 paraphrases found, 18 of 32 non-paraphrases rejected: F1 0.812, within the
    # tolerance of the constant's 0.810, but accuracy 0.74 against its 0.68. It learned something.
    predictions = [1] * 56 + [0] * 12 + [0] * 18 + [1] * 14
    baseline = trivial_baseline(MRPC, MRPC_LABELS, predictions)
    assert baseline["model_score"] <= baseline["scores"]["f1"] + TOLERANCE
    assert not baseline["at_baseline"] and baseline_message("validation", baseline) is None
    # Near the constant on every metric: flagged.
    near = [1] * 67 + [0] + [0] + [1] * 31
    assert trivial_baseline(MRPC, MRPC_LABELS, near)["at_baseline"]


def test_accuracy_within_the_tolerance_of_the_majority_share_is_flagged():
    labels = [0] * 75 + [1] * 25
    mixed = [0] * 74 + [1] + [0] * 25  # two answers, but only 74% right
    baseline = trivial_baseline(SST2, labels, mixed)
    assert baseline["answer"] == "negative" and baseline["scores"] == {"accuracy": pytest.approx(0.75)}
    assert baseline["single_answer"] is None and baseline["at_baseline"]
    better = [0] * 75 + [1] * 5 + [0] * 20  # 80%
    assert not trivial_baseline(SST2, labels, better)["at_baseline"]
    just_above = [0] * 75 + [1] * 1 + [0] * 24  # 76%: more than the tolerance above
    assert 0.76 - 0.75 > TOLERANCE and not trivial_baseline(SST2, labels, just_above)["at_baseline"]


def test_cola_constant_scores_a_matthews_correlation_of_zero():
    labels = [1] * 7 + [0] * 3
    baseline = trivial_baseline(COLA, labels, [1] * 10)
    assert baseline["scores"] == {"matthews_correlation": 0.0} and baseline["at_baseline"]
    learned = trivial_baseline(COLA, labels, [1] * 6 + [0] + [0] * 3)
    assert learned["model_score"] > 0.5 and not learned["at_baseline"]


def test_stsb_constant_has_no_correlation():
    labels = [0.0, 1.0, 2.5, 4.0, 5.0]
    constant = trivial_baseline(STSB, labels, [2.5] * 5)
    assert constant["answer"] is None and constant["scores"] == {"pearson": 0.0, "spearmanr": 0.0}
    assert constant["single_answer"] == 2.5 and constant["model_score"] is None and constant["at_baseline"]
    assert "a constant score" in baseline_message("validation", constant)
    learned = trivial_baseline(STSB, labels, [0.2, 1.1, 2.0, 4.2, 4.9])
    assert learned["model_score"] > 0.9 and not learned["at_baseline"]


@pytest.mark.parametrize(("cosine", "words"), [
    (1.0, "nearly unchanged"), (0.99, "nearly unchanged"), (0.9899, "changed a little"), (0.9, "changed a little"),
    (0.8999, "changed a lot"), (0.451, "changed a lot"), (-1.0, "changed a lot"), (float("nan"), "changed a lot"),
])
def test_cosine_verdict_thresholds(cosine, words):
    assert output_change(cosine) == words


def test_the_convert_line_says_what_to_do_only_when_the_outputs_changed_a_lot():
    assert OUTPUT_CHANGE_ADVICE in output_verdict(0.451) and "--text" in output_verdict(0.451)
    assert "changed a lot" in output_verdict(0.451)
    assert "nearly unchanged" in output_verdict(0.995) and "--" not in output_verdict(0.995)


def test_finetune_warns_when_the_model_scores_what_a_constant_answer_scores(tmp_path, capsys, bert_folder):
    """Every dev label is 'positive': no model can beat always answering it, so the run is flagged."""
    from monarchify.cli.app import main

    folder = tmp_path / "glue" / "SST-2"
    folder.mkdir(parents=True)
    (folder / "train.tsv").write_text("sentence\tlabel\n" + "".join(f"word{i} good\t{i % 2}\n" for i in range(8)))
    (folder / "dev.tsv").write_text("sentence\tlabel\n" + "".join(f"word{i} good\t1\n" for i in range(8)))
    out = tmp_path / "out"
    capsys.readouterr()
    code = main([str(a) for a in ("finetune", "--task", "sst2", bert_folder, "--data-dir", tmp_path / "glue",
                                  "--out", out, "--max-steps", "1", "--batch-size", "8", "--no-eval-each-epoch",
                                  "--no-save-checkpoints")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    warnings = [line for line in captured.err.splitlines() if "has not learned the task" in line]
    assert len(warnings) == 1, captured.err
    assert "always answering 'positive'" in warnings[0] and "--lr" in warnings[0] and "--epochs" in warnings[0]
    results = json.loads((out / "eval_results.json").read_text())
    baseline = results["trivial_baseline"]["validation"]
    assert baseline["at_baseline"] and baseline["scores"] == {"accuracy": 1.0} and baseline["answer"] == "positive"
