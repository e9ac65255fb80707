"""What a first session runs into: evaluations done once, no half-minute wait for a missing
network, Ctrl-C messages that fit the command, budget totals over every selected layer, and
``report`` in model order saying why errors are missing."""

from __future__ import annotations

import json
import shutil
import socket
import time
from pathlib import Path

import torch

from monarchify import MonarchConfig
from monarchify.cli.app import main
from monarchify.cli.render import UNCALIBRATED_BUDGET, totals_lines
from monarchify.glue import data as glue_data
from monarchify.glue.train import RESULTS_FILE, MonarchTrainer, finetune
from monarchify.hf.convert import convert_pretrained
from monarchify.hf.saving import REPORT_FILE
from monarchify.report import ConversionReport, LayerReport
from tests.test_finetune import options, write_sst2

from conftest import WORDS, tiny_bert


def run(capsys, *args):
    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), err
    return lines[0]


def last_error_line(err: str) -> str:
    """An interrupted run has printed its progress; it ends with its one error line."""
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert lines[-1].startswith("Error: ") and sum(line.startswith("Error: ") for line in lines) == 1, err
    return lines[-1]


# ----------------------------------------------------------------------------- evaluations


def test_the_final_model_is_evaluated_once(tmp_path, monkeypatch, bert_folder):
    """Two steps per epoch, stopped at step 3: epoch 1 is evaluated at step 2, the final model
    once, at step 3 (the epoch cut short by max_steps used to evaluate it a second time)."""
    calls: list[int] = []
    loop = MonarchTrainer.evaluation_loop

    def counting(self, *args, **kwargs):
        calls.append(self.state.global_step)
        return loop(self, *args, **kwargs)

    monkeypatch.setattr(MonarchTrainer, "evaluation_loop", counting)
    data = write_sst2(tmp_path / "glue", n_train=32, n_dev=8)
    opts = options(tmp_path, bert_folder, data, max_steps=3, eval_each_epoch=True)
    results = finetune(opts, progress_bar=False).results
    assert calls == [2, 3]
    evaluated = [entry["step"] for entry in results["history"] if "eval_validation_accuracy" in entry]
    assert evaluated == [2, 3]  # the history still ends with the saved model's evaluation
    assert results["history"][-1]["eval_validation_accuracy"] == results["metrics"]["validation"]["accuracy"]
    curves = opts.out / "training_curves.png"
    if curves.exists():  # matplotlib installed
        assert curves.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -------------------------------------------------------------------------------- no network


def test_without_network_finetune_fails_at_once_with_one_line(tmp_path, capsys, monkeypatch, bert_folder):
    import datasets

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(glue_data, "hub_reachable", lambda timeout=glue_data.HUB_PROBE_SECONDS: False)

    def no_load(*args, **kwargs):
        raise AssertionError("load_dataset must not be tried without a network")

    monkeypatch.setattr(datasets, "load_dataset", no_load)
    start = time.perf_counter()
    code, _, err = run(capsys, "finetune", "--task", "mrpc", bert_folder, "--out", tmp_path / "out")
    line = one_error_line(err)
    assert code == 1 and time.perf_counter() - start < 10
    assert "could not get GLUE 'mrpc'" in line and "cannot be reached" in line and "MRPC/train.tsv" in line

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # offline mode: not even the probe
    monkeypatch.setattr(glue_data, "hub_reachable", no_load)
    code, _, err = run(capsys, "finetune", "--task", "mrpc", bert_folder, "--out", tmp_path / "out")
    assert code == 1 and "offline mode is on" in one_error_line(err)


def test_hub_probe_tells_an_open_port_from_a_closed_one(monkeypatch):
    from huggingface_hub import constants

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert glue_data.hub_reachable(timeout=2)
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{closed.getsockname()[1]}")
        start = time.perf_counter()
        assert not glue_data.hub_reachable(timeout=2)
        assert time.perf_counter() - start < 2.5


# ----------------------------------------------------------------------------------- Ctrl-C


def test_ctrl_c_during_convert_says_nothing_was_written(tmp_path, capsys, monkeypatch, bert_folder):
    import monarchify.hf.convert as hf_convert

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(hf_convert, "convert_pretrained", interrupted)
    code, _, err = run(capsys, "convert", bert_folder, "-b", "2", "--out", tmp_path / "out")
    line = one_error_line(err)
    assert code == 130 and "nothing was written" in line
    assert "checkpoint" not in line and "fine-tun" not in line and not (tmp_path / "out").exists()


def interrupt_at(monkeypatch, step: int) -> None:
    """Ctrl-C when training is about to run optimisation step ``step + 1``."""
    from monarchify.cli.training_progress import RichProgress

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step >= step:
            raise KeyboardInterrupt

    monkeypatch.setattr(RichProgress, "on_step_begin", on_step_begin, raising=False)


def finetune_args(tmp_path: Path, bert_folder: Path) -> list:
    data = write_sst2(tmp_path / "glue", n_train=8, n_dev=4)
    return ["finetune", "--task", "sst2", bert_folder, "--data-dir", data, "--out", tmp_path / "out",
            "--batch-size", "4", "--epochs", "2", "--no-eval-each-epoch"]


def test_ctrl_c_before_the_first_checkpoint_leaves_no_folder_and_promises_none(tmp_path, capsys, monkeypatch, bert_folder):
    args = finetune_args(tmp_path, bert_folder)
    interrupt_at(monkeypatch, 1)  # epoch 1 has two steps: no checkpoint yet
    code, _, err = run(capsys, *args)
    line = last_error_line(err)
    assert code == 130 and "before the first checkpoint" in line and "--resume" not in line
    checkpoints = tmp_path / "out.checkpoints"
    assert not checkpoints.exists() and not (tmp_path / "out").exists()

    code, _, err = run(capsys, *args, "--resume")
    line = one_error_line(err)
    assert code == 1 and "does not exist" in line and "without --resume" in line

    checkpoints.mkdir()  # an empty folder (left by an older version) is no checkpoint either
    code, _, err = run(capsys, *args, "--resume")
    assert code == 1 and "holds no checkpoint" in one_error_line(err)


def test_ctrl_c_after_a_checkpoint_says_how_to_resume(tmp_path, capsys, monkeypatch, bert_folder):
    args = finetune_args(tmp_path, bert_folder)
    interrupt_at(monkeypatch, 2)  # epoch 1 is saved
    code, _, err = run(capsys, *args)
    line = last_error_line(err)
    checkpoints = tmp_path / "out.checkpoints"
    assert code == 130 and "add --resume" in line and str(checkpoints) in line
    assert (checkpoints / "checkpoint-2").is_dir() and not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------- budget


def report_of(kept: int, converted: int) -> ConversionReport:
    dense = [LayerReport(f"l.{i}.dense", "Linear", [64, 64], 1, False, True, 4160, 4160, kept_dense=True) for i in range(kept)]
    monarch = [LayerReport(f"l.{i}.m", "Linear", [64, 64], 4, False, True, 4160, 2048 + 64, 0.5) for i in range(converted)]
    return ConversionReport([*dense, *monarch], 100_000, 90_000)


def test_totals_count_every_selected_layer_and_the_converted_ones_apart():
    totals = report_of(kept=1, converted=3).totals()
    assert totals["selected_params_dense"] == 4 * 4160 and totals["selected_params_after"] == 4160 + 3 * 2112
    assert totals["params_dense"] == 3 * 4160 and totals["params_monarch"] == 3 * 2112  # converted only, as before
    assert totals["selected_flops_dense"] == 4 * 2 * 64 * 64 and totals["selected_flops_after"] == 2 * 64 * 64 + 3 * 2 * 2048
    selected, converted = totals_lines(totals)
    assert selected.startswith("selected layers (4, 1 kept dense): parameters 16.6K → 10.5K (63.1%)"), selected
    assert converted.startswith("converted layers only (3): parameters 12.5K → 6336 (50.8%)"), converted
    only = totals_lines(report_of(kept=0, converted=2).totals())
    assert len(only) == 1 and only[0].startswith("FLOPs per token in these layers")


def test_budget_without_calibration_warns(tmp_path, capsys, bert_folder):
    code, out, err = run(capsys, "convert", bert_folder, "--budget", "0.5", "--dry-run", "--no-check")
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "--text" in warnings[0]

    text = tmp_path / "sentences.txt"
    text.write_text("\n".join(" ".join(WORDS[i:i + 9]) for i in range(0, 80, 3)) + "\n", encoding="utf-8")
    code, out, err = run(capsys, "convert", bert_folder, "--budget", "0.5", "--dry-run", "--no-check",
                         "--text", text, "--calibration-samples", "16")
    assert code == 0, err
    assert UNCALIBRATED_BUDGET not in err.replace("\n", " ") and "warning:" not in err


def test_report_of_a_budget_folder_lists_the_layers_kept_dense(tmp_path, capsys, bert_folder):
    out = tmp_path / "budget"
    code, _, err = run(capsys, "convert", bert_folder, "--budget", "0.6", "--no-check", "--out", out, "--json")
    assert code == 0, err
    saved = json.loads((out / REPORT_FILE).read_text())
    code, printed, err = run(capsys, "report", out, "--json")
    assert code == 0, err
    shown = json.loads(printed)
    assert [layer["name"] for layer in shown["layers"]] == [layer["name"] for layer in saved["layers"]]
    assert shown["totals"]["kept_dense"] == saved["totals"]["kept_dense"]
    assert shown["totals"]["selected_params_after"] == saved["meta"]["budget"]["params_used"]


# ---------------------------------------------------------------------------------- report


def model_order(model: torch.nn.Module, names: set[str]) -> list[str]:
    return [name for name, _ in model.named_modules() if name in names]


def test_report_without_its_saved_report_lists_layers_in_model_order(tmp_path, capsys, bert_tokenizer):
    """Eleven blocks: by name, layer.10 would come before layer.2, and attention.output before
    attention.self; model order has neither."""
    source = tmp_path / "bert11"
    model = tiny_bert(vocab_size=len(bert_tokenizer), num_hidden_layers=11, hidden_size=16, num_attention_heads=2,
                      intermediate_size=32)
    model.save_pretrained(source)
    out = tmp_path / "monarch"
    convert_pretrained(source, out, MonarchConfig(nblocks=2), check=False)
    (out / REPORT_FILE).unlink()
    code, printed, err = run(capsys, "report", out, "--json")
    assert code == 0, err
    names = [layer["name"] for layer in json.loads(printed)["layers"]]
    assert names == model_order(model, set(names)) and len(names) == 66
    assert names != sorted(names)
    code, table, err = run(capsys, "report", out)
    assert code == 0 and "has no monarchify_report.json" in table


def test_report_of_a_fine_tuned_folder_says_why_there_are_no_errors(tmp_path, capsys, bert_folder):
    out = tmp_path / "monarch"
    convert_pretrained(bert_folder, out, MonarchConfig(nblocks=2), check=False)
    fine_tuned = tmp_path / "fine-tuned"
    shutil.copytree(out, fine_tuned)
    (fine_tuned / REPORT_FILE).unlink()  # what finetune writes for a folder it did not convert
    (fine_tuned / RESULTS_FILE).write_text("{}\n")
    code, table, err = run(capsys, "report", fine_tuned)
    assert code == 0, err
    note = " ".join(table.split())
    assert "no errors (—): they are measured when converting, against the dense weights" in note
    assert "fine-tuned" in note

    code, table, err = run(capsys, "report", out)  # the converted folder: its errors, no note
    assert code == 0 and "no errors" not in table and "before fine-tuning" not in table
