"""``holdout``: the kept epoch is the one that scores best on training examples held out from
training, never chosen on the dev split (issue: one run must land near its teacher)."""

from __future__ import annotations

import json

import datasets
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from monarchify.errors import ConfigError
from monarchify.glue import FinetuneOptions, finetune
from monarchify.glue.train import HOLDOUT, RESULTS_FILE, split_holdout

from test_finetune import assert_one_line_error, options, run_cli, write_sst2


@settings(max_examples=60, deadline=None)
@given(n=st.integers(2, 400), share=st.floats(0.01, 0.5))
def test_the_split_is_exact_disjoint_even_and_the_same_for_every_seed(n, share):
    train = datasets.Dataset.from_dict({"i": list(range(n))})
    held_count = int(n * share)
    if held_count == 0:
        with pytest.raises(ConfigError, match="leaves no examples"):
            split_holdout(train, share)
        return
    kept, held = split_holdout(train, share)
    assert len(held) == held_count and len(kept) + len(held) == n
    assert set(kept["i"]).isdisjoint(held["i"]) and set(kept["i"]) | set(held["i"]) == set(range(n))
    # evenly spread: any window of ceil(1/share) consecutive examples holds at least one held-out one
    window = -(-n // held_count) if held_count else n
    positions = sorted(held["i"])
    assert positions[0] < window and all(b - a <= window for a, b in zip(positions, positions[1:]))


def test_holdout_options_are_checked(tmp_path):
    for bad in (0.0, 0.6, True):
        with pytest.raises(ConfigError, match="holdout"):
            FinetuneOptions(task="sst2", model="m", out=tmp_path / "o", holdout=bad)
    with pytest.raises(ConfigError, match="eval_each_epoch and save_checkpoints"):
        FinetuneOptions(task="sst2", model="m", out=tmp_path / "o", holdout=0.2, save_checkpoints=False)


def test_the_kept_model_is_the_best_epoch_on_the_held_out_training_examples(tmp_path, bert_folder):
    data = write_sst2(tmp_path / "glue", n_train=96, n_dev=32)
    opts = options(tmp_path, bert_folder, data, epochs=4, save_checkpoints=True, holdout=0.25)
    result = finetune(opts, progress_bar=False)
    results = json.loads((opts.out / RESULTS_FILE).read_text())
    chosen = results["train"]["chosen"]
    assert chosen["examples"] == 24 and results["train"]["examples"] == 72 and chosen["metric"] == "accuracy"
    assert sorted(float(e) for e in chosen["by_epoch"]) == [1.0, 2.0, 3.0, 4.0]  # the last epoch is a candidate too
    assert chosen["value"] == max(chosen["by_epoch"].values())
    best_epochs = [float(e) for e, v in chosen["by_epoch"].items() if v == chosen["value"]]
    assert chosen["epoch"] == min(best_epochs)  # a tie keeps the earlier epoch (Trainer's strict improvement)
    # the model saved and scored is that epoch's: its held-out score is the chosen one
    assert results["metrics"][HOLDOUT]["accuracy"] == pytest.approx(chosen["value"])
    assert result.out == opts.out


def test_cli_holdout_bad_input_is_one_line(tmp_path, capsys, bert_folder):
    data = write_sst2(tmp_path / "glue", n_train=8, n_dev=4)
    code, err = run_cli(capsys, "finetune", "-t", "sst2", bert_folder, "--data-dir", data, "--out", tmp_path / "o", "--holdout", "0.7")
    assert_one_line_error(code, err, "holdout", "(0, 0.5]")
    code, err = run_cli(capsys, "finetune", "-t", "sst2", bert_folder, "--data-dir", data, "--out", tmp_path / "o",
                        "--holdout", "0.2", "--no-save-checkpoints")
    assert_one_line_error(code, err, "--holdout", "--save-checkpoints")
    text = tmp_path / "t.txt"
    text.write_text("words\n", encoding="utf-8")
    code, err = run_cli(capsys, "compress", bert_folder, "--text", text, "-b", "4", "--out", tmp_path / "c", "--holdout", "0.1")
    assert_one_line_error(code, err, "--holdout belong to --task compression")
    assert not (tmp_path / "o").exists() and not (tmp_path / "c").exists()
