"""The training core (monarchify/training.py): one precision check, one step timer, one resume
check, used alike by fine-tuning, training from scratch and healing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from monarchify import training
from monarchify.errors import ConfigError
from monarchify.manifest import MANIFEST_FILE
from monarchify.training import StepTimer, check_precision, check_resume, median_ms, record_run, recorded


# ---------------------------------------------------------------------------------- timing


def test_the_median_step_leaves_the_warm_up_steps_out():
    slow_start = [5.0, 4.0, 3.0, 0.010, 0.030, 0.020, 0.040]
    assert median_ms(slow_start) == pytest.approx(1000 * 0.025)  # the median of the last four
    assert median_ms([0.5, 0.1]) == pytest.approx(300.0)  # too few to leave any out: all of them
    assert median_ms([]) is None
    assert median_ms(slow_start, skip=0) == pytest.approx(1000 * 0.040)  # all seven, the slow start included


def test_the_step_timer_times_between_begin_and_end_only(monkeypatch):
    clock = iter([10.0, 10.5, 20.0, 20.25])  # begin, end, begin, end: the gap between steps is not counted
    monkeypatch.setattr(training.time, "perf_counter", lambda: next(clock))
    timer = StepTimer([1.0])  # a resumed run carries on the earlier session's steps
    timer.end()  # no step begun: nothing recorded
    for _ in range(2):
        timer.begin()
        timer.end()
    assert timer.step_seconds == [1.0, 0.5, 0.25]
    assert timer.seconds == pytest.approx(1.75)
    assert timer.median_ms(1) == pytest.approx(375.0)  # a phase of the run: steps 1 onwards


def test_the_trainer_callback_feeds_the_same_timer():
    from monarchify.hf.training_arguments import StepTimerCallback

    callback = StepTimerCallback()
    for _ in range(3):
        callback.on_step_begin(None, None, None)
        callback.on_step_end(None, None, None)
    assert len(callback.timer.step_seconds) == 3 and all(s >= 0 for s in callback.timer.step_seconds)


# ---------------------------------------------------------------------------------- precision


def test_fp32_is_always_allowed(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    check_precision("fp32")


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_without_a_gpu_is_refused(monkeypatch, precision):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=f"precision {precision} needs a CUDA GPU"):
        check_precision(precision)


def test_bf16_on_a_gpu_without_bf16_is_refused_but_fp16_is_not(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    with pytest.raises(ConfigError, match="bf16 support"):
        check_precision("bf16")
    check_precision("fp16")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    check_precision("bf16")


def test_training_from_scratch_checks_bf16_support_too(monkeypatch, tmp_path):
    """Before the core, only fine-tuning asked whether the GPU has bf16."""
    from monarchify.lm.options import TrainOptions
    from monarchify.lm.train import _check_request

    (tmp_path / "t.txt").write_text("some text\n")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    with pytest.raises(ConfigError, match="bf16 support"):
        _check_request(TrainOptions(arch="gpt2", text=[tmp_path / "t.txt"], out=tmp_path / "o", precision="bf16"))
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.checkpoints").exists()


# ---------------------------------------------------------------------------------- resume


def test_a_resume_with_a_changed_option_is_refused_naming_it(tmp_path):
    record_run(tmp_path, "finetune", {"learning_rate": 2e-3, "seed": 0, "monarch": {"nblocks": 4}})
    assert check_resume(tmp_path, "finetune", {"learning_rate": 2e-3, "seed": 0, "monarch": {"nblocks": 4}}) == "started"
    with pytest.raises(ConfigError) as refused:
        check_resume(tmp_path, "finetune", {"learning_rate": 1e-3, "seed": 0, "monarch": {"nblocks": 8}})
    message = str(refused.value)
    assert "\n" not in message
    assert "learning_rate (was 0.002, now 0.001)" in message and "monarch.nblocks (was 4, now 8)" in message
    assert "seed" not in message
    assert check_resume(tmp_path / "elsewhere", "finetune", {"seed": 0}) == "new"  # nothing recorded: the caller decides


def test_an_earlier_record_is_checked_the_same_way(tmp_path):
    """A folder an earlier version wrote (its options kept its own way) has no run manifest;
    read as one, it refuses the same changes in the same words, with the caller's advice."""
    old = recorded(tmp_path, "heal", {"lr": 1e-3, "steps": 9})
    assert check_resume(tmp_path, "heal", {"lr": 1e-3, "steps": 9}, manifest=old) == "started"
    with pytest.raises(ConfigError, match=r"steps \(was 9, now 12\); start over"):
        check_resume(tmp_path, "heal", {"lr": 1e-3, "steps": 12}, manifest=recorded(tmp_path, "heal", {"lr": 1e-3, "steps": 9}),
                     advice="start over")
    assert not (tmp_path / MANIFEST_FILE).exists()  # checking writes nothing


def test_a_finetune_resume_with_another_seed_is_refused_before_loading(tmp_path, bert_folder):
    """finetune's own request check goes through the core: a resume of checkpoints made with
    another seed names it, and nothing is loaded or written."""
    from monarchify.glue.options import FinetuneOptions
    from monarchify.glue.train import STAGE, _check_request

    opts = FinetuneOptions(task="sst2", model=bert_folder, out=tmp_path / "out", seed=1, resume=True)
    (opts.checkpoints / "checkpoint-2").mkdir(parents=True)
    record_run(opts.checkpoints, STAGE, FinetuneOptions(task="sst2", model=bert_folder, out=tmp_path / "out").deciding())
    before = json.loads((opts.checkpoints / MANIFEST_FILE).read_text())
    with pytest.raises(ConfigError, match=r"seed \(was 42, now 1\)"):
        _check_request(opts)
    assert json.loads((opts.checkpoints / MANIFEST_FILE).read_text()) == before
    assert not opts.out.exists()


# ------------------------------------------------------------------------------- the machine


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS line")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
def test_peak_memory_is_a_high_water_mark_in_mib():
    held = torch.ones(64 * 1024 * 1024 // 4)  # 64 MiB, every page written
    now = _rss_mib()
    peak = training.peak_rss_mib()
    del held
    assert now - 4 <= peak < 64 * now  # in MiB (KiB or bytes would be 1,024 times off), give or take a page table
    assert training.peak_rss_mib() >= peak  # never falls
