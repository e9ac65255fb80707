"""``--threads`` and the busy-machine warning of the training commands (``finetune``, ``train``,
``compress``, ``heal``): the count reaches torch inside the run and the results record it, a
busy machine is said once when training starts (and not at all when the command is refused
before that), ``--threads 0`` is one line."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from transformers import TrainerControl, TrainerState

import monarchify.glue.compress
import monarchify.glue.train
import monarchify.hf.heal
import monarchify.lm.train
from monarchify import MonarchConfig, bench
from monarchify.cli.app import main
from monarchify.errors import ConfigError
from monarchify.hf.convert import convert_pretrained
from tests.test_finetune import write_sst2
from tests.test_heal import write_sentences

PRESET = 2
"""The count torch has before a command runs; the tests ask for another (1) so it shows."""

ENTRY_POINTS = {  # the library function each command calls once its options are checked
    "finetune": (monarchify.glue.train, "finetune"),
    "train": (monarchify.lm.train, "train"),
    "compress": (monarchify.glue.compress, "compress"),
    "heal": (monarchify.hf.heal, "heal_pretrained"),
}


@pytest.fixture
def preset_threads():
    """torch at PRESET threads, and the caller's count put back after: the setting is process-wide."""
    before = torch.get_num_threads()
    torch.set_num_threads(PRESET)
    yield
    torch.set_num_threads(before)


def command_line(name: str, tmp_path) -> list[str]:
    """The shortest valid command line of each training command (the run itself is replaced)."""
    text = write_sentences(tmp_path / "text.txt", n=8)
    return {
        "finetune": ["finetune", "--task", "sst2", tmp_path / "model", "--out", tmp_path / "out"],
        "train": ["train", "--arch", "gpt2", "--text", text, "--out", tmp_path / "out"],
        "compress": ["compress", "--task", "sst2", tmp_path / "model", "--budget", "0.5", "--out", tmp_path / "out"],
        "heal": ["heal", tmp_path / "model", "--teacher", tmp_path / "dense", "--text", text, "--out", tmp_path / "out"],
    }[name]


def run_cli(capsys, *args):
    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def inside_the_run(monkeypatch):
    """Replace each command's run by one that records torch's thread count, starts training
    twice as far as the command's callbacks can tell (compress trains twice), and stops."""
    seen: list[int] = []

    def fake(*args, callbacks=(), progress=None, **kwargs):
        seen.append(torch.get_num_threads())
        for _ in range(2):
            for callback in callbacks:  # Trainer's calls when a training starts and ends
                callback.on_train_begin(None, TrainerState(max_steps=4), TrainerControl())
                callback.on_train_end(None, TrainerState(max_steps=4), TrainerControl())
            if progress is not None:  # heal's call after each step
                progress(1, 0.5)
        raise ConfigError("stopped by the test")

    for module, name in ENTRY_POINTS.values():
        monkeypatch.setattr(module, name, fake)
    return seen


def warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("warning:")]


@pytest.mark.parametrize("command", ENTRY_POINTS)
def test_threads_reach_torch_inside_the_run(capsys, tmp_path, monkeypatch, preset_threads, inside_the_run, command):
    monkeypatch.setattr(bench, "load_average", lambda: 0.0)
    code, _, err = run_cli(capsys, *command_line(command, tmp_path), "--threads", "1")
    assert code == 1 and "stopped by the test" in err
    assert inside_the_run == [1]
    torch.set_num_threads(PRESET)
    code, _, err = run_cli(capsys, *command_line(command, tmp_path))  # no flag: torch's count as it was
    assert code == 1 and "stopped by the test" in err
    assert inside_the_run == [1, PRESET]


@pytest.mark.parametrize("command", ENTRY_POINTS)
def test_a_busy_machine_is_warned_about_once_when_training_starts(capsys, tmp_path, monkeypatch, preset_threads, inside_the_run, command):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(bench, "load_average", lambda: 5.25)
    code, _, err = run_cli(capsys, *command_line(command, tmp_path), "--threads", "1")
    assert code == 1 and inside_the_run == [1]
    [line] = warnings(err)
    assert "load average 5.25 with 1 thread:" in line and "many times slower" in line
    assert "--threads 1" not in line  # nothing fewer to suggest
    assert err.index("warning:") < err.index("stopped by the test")  # said before the run, not after it
    torch.set_num_threads(PRESET)
    code, _, err = run_cli(capsys, *command_line(command, tmp_path))  # torch's own 2 threads: try fewer
    [line] = warnings(err)
    assert "with 2 threads:" in line and "--threads 1" in line


@pytest.mark.parametrize(
    ("command", "bad", "message"),
    [
        ("finetune", ["--task", "sst3"], "unknown GLUE task"),
        ("compress", ["--task", "sst3"], "unknown GLUE task"),
        ("train", ["--text", "{tmp}/none.txt"], "does not exist"),
        ("heal", ["--text", "{tmp}/none.txt"], "does not exist"),
    ],
)
def test_a_refused_command_on_a_busy_machine_prints_its_error_alone(capsys, tmp_path, monkeypatch, preset_threads, command, bad, message):
    """The library refuses it before training starts: no warning about a run that never happens."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(bench, "load_average", lambda: 5.25)
    args = command_line(command, tmp_path)
    for flag, value in zip(bad[::2], bad[1::2]):
        args[args.index(flag) + 1] = value.format(tmp=tmp_path)
    code, _, err = run_cli(capsys, *args, "--threads", "1")
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("Error:") and message in lines[0], err


@pytest.mark.parametrize("command", ENTRY_POINTS)
@pytest.mark.parametrize("load", [0.25, 1.0, None], ids=["low", "one-thread's-worth", "no-reading"])
def test_an_idle_machine_gets_no_warning(capsys, tmp_path, monkeypatch, preset_threads, inside_the_run, command, load):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(bench, "load_average", lambda: load)
    code, _, err = run_cli(capsys, *command_line(command, tmp_path), "--threads", "1")
    assert code == 1 and inside_the_run == [1] and warnings(err) == []


@pytest.mark.parametrize("command", ENTRY_POINTS)
def test_a_gpu_run_is_not_warned_about_the_cpu_but_heal_is(capsys, tmp_path, monkeypatch, preset_threads, inside_the_run, command):
    """Trainer goes to the GPU when there is one; heal trains where the model loads, the CPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench, "load_average", lambda: 5.25)
    code, _, err = run_cli(capsys, *command_line(command, tmp_path), "--threads", "1")
    assert code == 1 and len(warnings(err)) == (command == "heal")


@pytest.mark.parametrize("command", [*ENTRY_POINTS, "bench layer"])
@pytest.mark.parametrize("count", ["0", "-2"])
def test_threads_below_one_is_a_one_line_error_before_anything_runs(capsys, tmp_path, preset_threads, inside_the_run, command, count):
    args = ["bench", "layer", "--device", "cpu"] if command == "bench layer" else command_line(command, tmp_path)
    code, out, err = run_cli(capsys, *args, "--threads", count)
    assert code == 1 and out == ""
    assert err.strip().splitlines() == ["Error: --threads must be >= 1"]
    assert inside_the_run == [] and torch.get_num_threads() == PRESET


# --- real runs: the results record the count ---------------------------------------------


def test_finetune_records_its_threads(capsys, tmp_path, bert_folder, preset_threads):
    data = write_sst2(tmp_path / "glue", n_train=16, n_dev=8)
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "finetune", "--task", "sst2", bert_folder, "--data-dir", data, "--out", out,
                           "--max-steps", "2", "--batch-size", "8", "--no-eval-each-epoch", "--no-save-checkpoints",
                           "--threads", "1")
    assert code == 0, err
    results = json.loads((out / "eval_results.json").read_text())
    assert results["environment"]["cpu_threads"] == 1


def test_train_records_its_threads(capsys, tmp_path, preset_threads):
    arch = tmp_path / "arch"
    transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=97, n_positions=16).save_pretrained(arch)
    text = write_sentences(tmp_path / "text.txt", n=60)
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--arch", arch, "--text", text, "--out", out, "--max-steps", "2",
                           "--max-length", "16", "--vocab-size", "300", "--batch-size", "4", "--threads", "1")
    assert code == 0, err
    results = json.loads((out / "train_results.json").read_text())
    assert results["environment"]["cpu_threads"] == 1


def test_heal_records_its_threads(capsys, tmp_path, bert_folder, preset_threads):
    converted = tmp_path / "monarch"
    convert_pretrained(bert_folder, converted, MonarchConfig(nblocks=2), check=False)
    text = write_sentences(tmp_path / "text.txt", n=20)
    out = tmp_path / "healed"
    code, _, err = run_cli(capsys, "heal", converted, "--teacher", bert_folder, "--text", text, "--out", out,
                           "--max-steps", "2", "--max-train-samples", "8", "--batch-size", "4", "--threads", "1")
    assert code == 0, err
    report = json.loads((out / "monarchify_report.json").read_text())
    assert report["meta"]["heal"]["cpu_threads"] == 1


def test_convert_takes_threads_too(capsys, tmp_path, monkeypatch, preset_threads):
    """A calibrated conversion of an LLM is minutes of CPU: ``convert --threads`` sets torch's
    count before it starts, like the training commands."""
    import monarchify.hf.convert

    seen = []

    def fake(*args, **kwargs):
        seen.append(torch.get_num_threads())
        raise ConfigError("stopped by the test")

    monkeypatch.setattr(monarchify.hf.convert, "convert_pretrained", fake)
    code, _, err = run_cli(capsys, "convert", tmp_path, "-o", tmp_path / "out", "--threads", "1")
    assert code == 1 and "stopped by the test" in err and seen == [1]
    code, _, err = run_cli(capsys, "convert", tmp_path, "-o", tmp_path / "out", "--threads", "0")
    assert code == 1 and "--threads must be >= 1" in err and seen == [1]
