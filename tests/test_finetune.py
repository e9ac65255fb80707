"""``finetune`` end to end on a tiny random BERT (dense, converted on the fly, converted folder),
and the CLI's answers to bad input."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, TrainingArguments

from monarchify import MonarchConfig, MonarchLinear
from monarchify.cli.app import main
from monarchify.glue import FinetuneOptions, MonarchTrainer, finetune
from monarchify.glue.train import RESULTS_FILE, monarch_factor_names
from monarchify.hf.convert import convert_pretrained

from conftest import WORDS, tiny_bert

FILLER = [w for w in WORDS if w != "good"]


def write_sst2(root: Path, n_train: int = 96, n_dev: int = 32, seed: int = 0) -> Path:
    """SST-2 layout with a learnable rule: the label is 1 exactly when the sentence says 'good'."""
    rng = random.Random(seed)
    folder = root / "SST-2"
    folder.mkdir(parents=True)
    for name, n in (("train.tsv", n_train), ("dev.tsv", n_dev)):
        lines = ["sentence\tlabel"]
        for i in range(n):
            words = rng.sample(FILLER, 7)
            label = i % 2
            if label:  # same length either way: only the word tells
                for position in rng.sample(range(7), 3):
                    words[position] = "good"
            lines.append(f"{' '.join(words)}\t{label}")
        (folder / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def options(tmp_path: Path, model: Path, data: Path, **overrides) -> FinetuneOptions:
    settings = dict(
        task="sst2", model=str(model), out=tmp_path / "out", data_dir=data, learning_rate=2e-3,
        batch_size=16, epochs=6, warmup=0.0, logging_steps=1, seed=0, save_checkpoints=False,
    )
    settings.update(overrides)
    return FinetuneOptions(**settings)


def losses(results: dict) -> list[float]:
    return [entry["loss"] for entry in results["history"] if "loss" in entry]


def reload_logits(folder: Path, model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(5, model.config.vocab_size, (3, 9))
    reloaded = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    model.eval()
    with torch.no_grad():
        return reloaded(input_ids=ids).logits, model(input_ids=ids).logits


def check_run(result, out: Path) -> dict:
    results = json.loads((out / RESULTS_FILE).read_text())
    assert results == json.loads(json.dumps(result.results, default=str))
    steps = losses(results)
    assert len(steps) >= 10
    # Loss goes down: the last few logged losses are well below the first ones.
    assert sum(steps[-3:]) / 3 < 0.8 * sum(steps[:3]) / 3, steps
    assert results["metrics"]["validation"]["accuracy"] > 0.7
    train = results["train"]
    assert train["seconds"] >= train["seconds_excluding_eval"] >= train["step_seconds"] > 0
    assert train["samples_per_second"] > 0 and results["eval"]["seconds"] > 0
    assert train["world_size"] == 1 and train["global_batch"] == results["arguments"]["batch_size"] * results["arguments"]["grad_accum"]
    assert results["arguments"]["task"] == "sst2" and results["task"] == "sst2"
    assert not out.with_name(out.name + ".checkpoints").exists()
    return results


RESULT_KEYS = {
    "task", "model", "monarch", "distill", "metrics", "main_metric", "trivial_baseline", "train", "eval", "params", "data",
    "history", "notes", "arguments", "command", "environment",
}
SECTION_KEYS = {
    "monarch": {"converted_on_the_fly", "recipe", "layers", "convert_seconds"},
    "train": {"seconds", "seconds_excluding_eval", "step_seconds", "samples_per_second", "steps_per_second", "steps",
              "epochs", "examples", "loss", "sessions", "resumed_from", "world_size", "global_batch"},
    "eval": {"seconds", "samples_per_second", "examples"},
    "params": {"monarch", "dense", "ratio", "monarch_layers"},
    "data": {"source", "sizes", "skipped"},
    "environment": {"monarchify", "monarchify_source_sha256", "torch", "transformers", "python", "device", "cuda_devices",
                    "cpu_threads", "world_size", "load_average_at_start", "load_average_at_end"},
}


def test_dense_end_to_end(tmp_path, bert_folder):
    data = write_sst2(tmp_path / "glue")
    opts = options(tmp_path, bert_folder, data, save_checkpoints=True)  # removed after success
    result = finetune(opts, progress_bar=False)
    results = check_run(result, opts.out)
    # eval_results.json is what runs are compared by: its layout must not drift.
    assert set(results) == RESULT_KEYS and {k: set(results[k]) for k in SECTION_KEYS} == SECTION_KEYS
    assert results["data"]["sizes"] == {"train": 96, "validation": 32} == {"train": results["train"]["examples"], **results["eval"]["examples"]}
    # One evaluation per epoch; the last is the final evaluation after training (also in "metrics").
    assert [sorted(k for k in entry if k.startswith("eval_")) for entry in results["history"] if "eval_validation_loss" in entry] \
        == [["eval_validation_accuracy", "eval_validation_loss"]] * 6
    assert not any("eval_loss" in entry for entry in results["history"])
    assert results["params"]["monarch"] == results["params"]["dense"] and results["params"]["monarch_layers"] == 0
    assert any("classification head" in note for note in results["notes"])
    config = json.loads((opts.out / "config.json").read_text())
    assert "quantization_config" not in config  # a plain Hugging Face folder
    assert config["id2label"] == {"0": "negative", "1": "positive"}
    new, old = reload_logits(opts.out, result.model)
    torch.testing.assert_close(new, old)


def test_monarch_on_the_fly_end_to_end(tmp_path, bert_folder):
    data = write_sst2(tmp_path / "glue")
    opts = options(tmp_path, bert_folder, data, monarch=MonarchConfig(nblocks=2), monarch_lr=3e-3)
    result = finetune(opts, progress_bar=False)
    results = check_run(result, opts.out)
    params = results["params"]
    assert params["monarch_layers"] == 12 and params["monarch"] < params["dense"]
    assert results["monarch"]["converted_on_the_fly"] and results["monarch"]["recipe"]["nblocks"] == 2
    config = json.loads((opts.out / "config.json").read_text())
    assert all(name.startswith("bert.") for name in config["quantization_config"]["modules"])
    assert (opts.out / "monarchify_report.json").is_file()
    new, old = reload_logits(opts.out, result.model)
    torch.testing.assert_close(new, old)


def test_converted_base_model_folder_trains_with_a_new_head(tmp_path, bert_folder):
    converted = tmp_path / "bert-monarch"
    convert_pretrained(bert_folder, converted, MonarchConfig(nblocks=2), check=False)
    # A saved BertModel folder loads into BertForSequenceClassification (prefix resolved by the plug-in).
    model = AutoModelForSequenceClassification.from_pretrained(converted, num_labels=2)
    assert isinstance(model.bert.encoder.layer[0].attention.self.query, MonarchLinear)

    data = write_sst2(tmp_path / "glue")
    opts = options(tmp_path, converted, data)
    result = finetune(opts, progress_bar=False)  # Trainer accepts the plug-in-loaded model (is_trainable)
    results = check_run(result, opts.out)
    assert not results["monarch"]["converted_on_the_fly"] and results["params"]["monarch_layers"] == 12
    new, old = reload_logits(opts.out, result.model)
    torch.testing.assert_close(new, old)


@pytest.mark.parametrize("task", ["stsb", "mnli"])
def test_regression_and_two_dev_sets(tmp_path, bert_folder, task):
    from test_glue_data import write_task

    write_task(tmp_path / "glue", task, n=8)
    opts = options(tmp_path, bert_folder, tmp_path / "glue", task=task, max_steps=2, batch_size=4)
    results = finetune(opts, progress_bar=False).results
    want = {"stsb": {"validation"}, "mnli": {"validation_matched", "validation_mismatched"}}[task]
    assert set(results["metrics"]) == want
    if task == "stsb":
        assert {"pearson", "spearmanr"} <= set(results["metrics"]["validation"])
        assert json.loads((opts.out / "config.json").read_text())["problem_type"] == "regression"
    else:
        assert all("accuracy" in m for m in results["metrics"].values())


def test_monarch_factors_get_their_own_learning_rate(tmp_path):
    from monarchify import convert

    model = tiny_bert(with_head=True)
    convert(model, MonarchConfig(nblocks=2))
    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=1e-4, weight_decay=0.01, report_to="none")
    trainer = MonarchTrainer(model=model, args=args, monarch_lr=5e-4)
    optimizer = trainer.create_optimizer()
    factors = {id(p) for n, p in model.named_parameters() if n in monarch_factor_names(model)}
    assert len(factors) == 24
    for group in optimizer.param_groups:
        ids = {id(p) for p in group["params"]}
        assert ids <= factors or not ids & factors
        assert group["lr"] == (5e-4 if ids <= factors else 1e-4)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))


# ------------------------------------------------------------------------------- bad input


def run_cli(capsys, *args) -> tuple[int, str]:
    capsys.readouterr()  # drop what fixtures printed
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code != 0
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_cli_bad_input(tmp_path, capsys, bert_folder):
    data = write_sst2(tmp_path / "glue", n_train=8, n_dev=4)
    base = ["finetune", bert_folder, "--data-dir", data, "--out", tmp_path / "out"]

    code, err = run_cli(capsys, *base, "--task", "sst3")
    assert_one_line_error(code, err, "unknown GLUE task 'sst3'", "cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli")

    code, err = run_cli(capsys, *base, "--task", "mrpc")
    assert_one_line_error(code, err, "MRPC/train.tsv", "MRPC/dev.tsv")

    code, err = run_cli(capsys, "finetune", "--task", "sst2", tmp_path / "no-such-model", "--data-dir", data, "--out", tmp_path / "o2")
    assert_one_line_error(code, err, "no-such-model", "does not exist")

    code, err = run_cli(capsys, *base, "--task", "sst2", "--exclude", "query")
    assert_one_line_error(code, err, "--nblocks")

    code, err = run_cli(capsys, *base, "--task", "sst2", "--nblocks", "2", "--include", "no_such_layer")
    assert_one_line_error(code, err, "no_such_layer")

    code, err = run_cli(capsys, *base, "--task", "sst2", "--resume")
    assert_one_line_error(code, err, "resume: checkpoint folder", "out.checkpoints")

    bad = data / "SST-2" / "dev.tsv"
    bad.write_text(bad.read_text().replace("\t1\n", "\tpositive\n", 1))
    code, err = run_cli(capsys, *base, "--task", "sst2")
    assert_one_line_error(code, err, "dev.tsv' line", "'positive' does not fit sst2")
    assert not (tmp_path / "out").exists()


def test_cli_refuses_to_convert_a_monarch_folder_twice(tmp_path, capsys, bert_folder):
    converted = tmp_path / "bert-monarch"
    convert_pretrained(bert_folder, converted, MonarchConfig(nblocks=2), check=False)
    data = write_sst2(tmp_path / "glue", n_train=8, n_dev=4)
    code, err = run_cli(capsys, "finetune", "-t", "sst2", converted, "--data-dir", data, "-o", tmp_path / "out", "-b", "2")
    assert_one_line_error(code, err, "already has Monarch layers", "without a Monarch recipe (--nblocks)")


def test_resume_after_an_interruption(tmp_path, bert_folder):
    import time

    from transformers import TrainerCallback

    from monarchify.glue.options import FinetuneEvents

    class Crash(Exception):
        pass

    class SlowFirstEpochThenCrash(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.epoch is not None and state.epoch >= 1:
                raise Crash
            time.sleep(0.5)  # inside the step: the first session trains for a second at least

    class Notes(FinetuneEvents):
        lines: list[str] = []

        def note(self, message):
            self.lines.append(message)

    data = write_sst2(tmp_path / "glue", n_train=32, n_dev=8)
    opts = options(tmp_path, bert_folder, data, epochs=2, save_checkpoints=True, eval_each_epoch=False)
    with pytest.raises(Crash):
        finetune(opts, callbacks=[SlowFirstEpochThenCrash()], progress_bar=False)
    assert not opts.out.exists() and (opts.checkpoints / "checkpoint-2").is_dir()

    class CountSteps(TrainerCallback):
        steps: list[int] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.steps.append(state.global_step)

    opts.resume = True
    results = finetune(opts, events=Notes(), callbacks=[CountSteps()], progress_bar=False).results
    assert results["train"]["steps"] == 4 and results["arguments"]["resume"]
    assert CountSteps.steps == [3, 4]  # only the second epoch ran again
    assert [e["step"] for e in results["history"] if "loss" in e] == [1, 2, 3, 4]
    assert (opts.out / RESULTS_FILE).is_file() and not opts.checkpoints.exists()
    # the results describe the whole run: both sessions' time, the rates over all 4 steps of 16
    train = results["train"]
    assert train["sessions"] == 2 and train["resumed_from"] == "checkpoint-2"
    assert train["step_seconds"] >= 1.0 and train["seconds"] >= train["seconds_excluding_eval"] >= train["step_seconds"]
    assert train["samples_per_second"] * train["seconds"] == pytest.approx(4 * 16, rel=0.02)
    assert train["steps_per_second"] * train["seconds"] == pytest.approx(4, rel=0.02)
    assert "resuming from checkpoint-2 (step 2 of 4)" in Notes.lines


def test_resume_with_other_options_is_refused_naming_the_option(tmp_path, bert_folder, capsys):
    data = write_sst2(tmp_path / "glue", n_train=16, n_dev=4)
    opts = options(tmp_path, bert_folder, data, epochs=2, max_steps=1, save_checkpoints=True, keep_checkpoints=True,
                   eval_each_epoch=False)
    finetune(opts, progress_bar=False)
    assert (opts.checkpoints / "checkpoint-1").is_dir()
    base = ["finetune", "--task", "sst2", bert_folder, "--data-dir", data, "--out", opts.out, "--resume",
            "--epochs", "2", "--max-steps", "1", "--seed", "0", "--batch-size", "16", "--warmup-steps", "0"]
    code, err = run_cli(capsys, *base, "--lr", "0.001")
    assert_one_line_error(code, err, "learning_rate (was 0.002, now 0.001)")
    # what only changes where the run writes or how often it logs may differ
    code, err = run_cli(capsys, *base, "--lr", "0.002", "--eval-batch-size", "8", "--max-eval-samples", "2")
    assert code == 0, err


def test_resume_lets_errors_other_than_a_missing_checkpoint_through(tmp_path, bert_folder):
    from transformers import TrainerCallback

    class Broken(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            raise ValueError("the checkpoint's optimizer state does not fit")

    data = write_sst2(tmp_path / "glue", n_train=16, n_dev=4)
    opts = options(tmp_path, bert_folder, data, epochs=1, save_checkpoints=True, keep_checkpoints=True, eval_each_epoch=False)
    finetune(opts, progress_bar=False)
    opts.resume = True
    with pytest.raises(ValueError, match="optimizer state does not fit"):
        finetune(opts, callbacks=[Broken()], progress_bar=False)


@pytest.mark.parametrize("steps", [0, -5])
def test_max_steps_must_be_positive_or_minus_one(tmp_path, steps):
    from monarchify.errors import ConfigError

    with pytest.raises(ConfigError, match="max_steps must be at least 1"):
        FinetuneOptions(task="mrpc", model="m", out=tmp_path / "o", max_steps=steps)
    assert FinetuneOptions(task="mrpc", model="m", out=tmp_path / "o", max_steps=-1).max_steps == -1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_without_a_gpu_is_refused_before_anything_loads(tmp_path, capsys, precision):
    code = main(["finetune", "--task", "mrpc", str(tmp_path / "missing"), "--out", str(tmp_path / "o"),
                 "--precision", precision])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err[-1] == f"Error: precision {precision} needs a CUDA GPU; this machine has none (use fp32)"


def test_library_messages_name_fields_not_flags(tmp_path):
    from monarchify.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^learning_rate must be positive, got -1$"):
        FinetuneOptions(task="mrpc", model="m", out=tmp_path / "o", learning_rate=-1)
    with pytest.raises(ConfigError, match=r"^max_train_samples must be at least 1, got 0$"):
        FinetuneOptions(task="mrpc", model="m", out=tmp_path / "o", max_train_samples=0)


def test_finetune_and_heal_help_import_neither_torch_nor_transformers():
    """``monarchify finetune --help`` and ``heal --help`` build their options from these modules;
    torch, transformers and datasets load only when a command runs."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import monarchify.cli.finetune, monarchify.cli.heal, monarchify.glue.results\n"
        "print(sorted(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
