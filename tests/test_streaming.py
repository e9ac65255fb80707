"""Streaming conversion: tensor by tensor, bit for bit the in-memory result, resumable, atomic."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open

from conftest import tiny_bert, tiny_gpt2, tiny_llama
from monarchify.cli.app import main
from monarchify.config import MonarchConfig, SpeedGateConfig
from monarchify.errors import ConfigError, ModelLoadError, OutputNotEmptyError
from monarchify.hf.convert import ConvertEvents, convert_pretrained
from monarchify.hf.loading import load_model
from monarchify.hf.stored_report import read_report
from monarchify.hf.stream_state import STATE_FILE, staging_folder
from monarchify.hf.streaming import convert_streaming
from monarchify.hf.tensorfiles import Planned, ShardWriter, read_header, read_tensor

MAKERS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}


def tensors_of(folder):
    found = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            found.update({key: handle.get_tensor(key) for key in handle.keys()})
    return found


def assert_same_tensors(a, b):
    ta, tb = tensors_of(a), tensors_of(b)
    assert sorted(ta) == sorted(tb)
    for key in ta:
        assert ta[key].dtype == tb[key].dtype and torch.equal(ta[key], tb[key]), key


def sharded_source(tmp_path, arch="llama", dtype=torch.bfloat16, shard="20KB"):
    folder = tmp_path / f"{arch}-src"
    MAKERS[arch]().to(dtype).save_pretrained(folder, max_shard_size=shard)
    assert shard != "20KB" or len(list(folder.glob("*.safetensors"))) > 2  # really several shards
    return folder


@pytest.mark.parametrize("arch", sorted(MAKERS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_streaming_writes_the_in_memory_factors_bit_for_bit(tmp_path, arch, dtype):
    src = sharded_source(tmp_path, arch, dtype)
    config = MonarchConfig(nblocks=4, overrides={"(layer|layers|h)\\.1\\..*": 2})
    memory = convert_pretrained(src, tmp_path / "memory", config, stream=False, check=False)
    streamed = convert_streaming(src, tmp_path / "stream", config, max_shard_size="15KB")
    assert len(list((tmp_path / "stream").glob("*.safetensors"))) > 2  # written as several shards
    assert_same_tensors(tmp_path / "memory", tmp_path / "stream")
    cfg = {name: json.loads((tmp_path / name / "config.json").read_text()) for name in ("memory", "stream")}
    assert cfg["memory"] == cfg["stream"]
    assert [row.to_dict() for row in streamed.layers] == [row.to_dict() for row in memory.report.layers]
    assert (streamed.model_params_before, streamed.model_params_after) == (
        memory.report.model_params_before, memory.report.model_params_after)
    assert streamed.meta["recipe"] == memory.report.meta["recipe"]
    # the streamed folder is an ordinary Monarch folder: it reloads and reports
    reloaded = load_model(tmp_path / "stream")
    ids = torch.randint(0, 100, (2, 6))
    with torch.no_grad():
        assert torch.equal(reloaded(ids)[0], memory.model(ids)[0])
    assert [r.rel_error for r in read_report(tmp_path / "stream").layers] == [r.rel_error for r in memory.report.layers]


class Interrupt(ConvertEvents):
    """Ctrl-C after ``after`` source tensors."""

    def __init__(self, after):
        self.after, self.seen, self.notes = after, 0, []

    def streamed(self, name, nbytes):
        self.seen += 1
        if self.seen == self.after:
            raise KeyboardInterrupt

    def note(self, text):
        self.notes.append(text)


def test_an_interrupted_run_leaves_no_output_and_resumes_from_its_finished_shards(tmp_path):
    src = sharded_source(tmp_path)
    config = MonarchConfig(nblocks=4)
    convert_streaming(src, tmp_path / "whole", config, max_shard_size="15KB")
    out = tmp_path / "out"
    events = Interrupt(after=20)
    with pytest.raises(KeyboardInterrupt):
        convert_streaming(src, out, config, max_shard_size="15KB", events=events)
    staging = staging_folder(out)
    assert not out.exists() and (staging / STATE_FILE).is_file()
    finished = sorted(p.name for p in staging.glob("*.safetensors"))
    assert finished and not list(staging.glob("*.tmp")) and "resume" in events.notes[-1]
    stamps = {name: os.stat(staging / name).st_mtime_ns for name in finished}

    resumed = Interrupt(after=10**9)
    convert_streaming(src, out, config, max_shard_size="15KB", resume=True, events=resumed)
    assert not staging.exists() and not (out / STATE_FILE).exists()
    assert any(f"{len(finished)} of" in note for note in resumed.notes)
    assert resumed.seen < len(read_header_keys(src))  # the finished shards' tensors were not redone
    assert {name: os.stat(out / name).st_mtime_ns for name in finished} == stamps  # not rewritten
    assert_same_tensors(tmp_path / "whole", out)
    assert json.loads((out / "monarchify_report.json").read_text())["layers"] == \
        json.loads((tmp_path / "whole" / "monarchify_report.json").read_text())["layers"]


def read_header_keys(folder):
    keys = []
    for file in folder.glob("*.safetensors"):
        keys += list(read_header(file)[0])
    return keys


def test_resume_refuses_another_recipe_and_a_fresh_run_starts_over(tmp_path):
    src = sharded_source(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        convert_streaming(src, out, MonarchConfig(nblocks=4), max_shard_size="15KB", events=Interrupt(after=20))
    with pytest.raises(ConfigError, match="another recipe"):
        convert_streaming(src, out, MonarchConfig(nblocks=2), max_shard_size="15KB", resume=True)
    convert_streaming(src, out, MonarchConfig(nblocks=2), max_shard_size="15KB")  # no resume: starts over
    assert json.loads((out / "config.json").read_text())["quantization_config"]["recipe"]["nblocks"] == 2
    assert not staging_folder(out).exists()


def test_output_folder_rules_hold_when_streaming(tmp_path):
    src = sharded_source(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(OutputNotEmptyError):
        convert_streaming(src, out, MonarchConfig())
    convert_streaming(src, out, MonarchConfig(), force=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    with pytest.raises(Exception, match="would replace the input"):
        convert_streaming(src, src, MonarchConfig(), force=True)


def test_the_path_is_chosen_by_size_recipe_and_flags(tmp_path, monkeypatch):
    import monarchify.hf.convert as hf_convert

    src = sharded_source(tmp_path, "bert")
    paths = []
    monkeypatch.setattr(hf_convert, "convert_streaming", lambda *a, **k: paths.append("stream") or read_report_stub())
    convert_pretrained(src, tmp_path / "a", MonarchConfig(), check=False)  # small: in memory
    assert paths == []
    monkeypatch.setattr(hf_convert, "STREAM_ABOVE", 0)
    convert_pretrained(src, tmp_path / "b", MonarchConfig(), check=False)  # big: streams on its own
    assert paths == ["stream"]
    with pytest.raises(ConfigError, match="cannot stream this conversion: speed_gate is not available"):
        convert_pretrained(src, tmp_path / "c", MonarchConfig(speed_gate=SpeedGateConfig()), stream=True)
    with pytest.raises(ConfigError, match="budget"):
        convert_pretrained(src, tmp_path / "c", MonarchConfig(budget=0.5), stream=True)
    with pytest.raises(ConfigError, match="dry run"):
        convert_pretrained(src, None, MonarchConfig(), stream=True, dry=True)
    with pytest.raises(ConfigError, match="resuming needs a streaming"):
        convert_pretrained(src, tmp_path / "d", MonarchConfig(), stream=False, resume=True)
    assert paths == ["stream"]


def read_report_stub():
    from monarchify.report import ConversionReport

    return ConversionReport([], 0, 0)


def test_tensor_names_that_are_not_the_models_are_left_to_the_in_memory_path(tmp_path):
    from safetensors.torch import save_file

    src = sharded_source(tmp_path, "bert", shard="10MB")
    tensors = tensors_of(src)
    save_file({"bert." + k: v for k, v in tensors.items()}, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConfigError, match="tensor names are not the model's own"):
        convert_pretrained(src, tmp_path / "out", MonarchConfig(), stream=True)


def test_a_truncated_shard_is_one_line(tmp_path):
    src = sharded_source(tmp_path)
    shard = sorted(src.glob("*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ModelLoadError, match="not a valid safetensors file"):
        convert_streaming(src, tmp_path / "out", MonarchConfig())
    assert not (tmp_path / "out").exists() and not staging_folder(tmp_path / "out").exists()


def test_shard_writer_files_read_back_with_the_safetensors_library(tmp_path):
    values = {"a": torch.randn(3, 5, dtype=torch.bfloat16), "b": torch.arange(7), "c": torch.empty(0), "d": torch.tensor(2.5)}
    writer = ShardWriter(tmp_path / "x.safetensors", [Planned(k, v.dtype, tuple(v.shape)) for k, v in values.items()])
    for key, value in values.items():
        writer.write(key, value)
    assert not (tmp_path / "x.safetensors").exists()  # only the finished file gets the name
    writer.close()
    with safe_open(str(tmp_path / "x.safetensors"), framework="pt") as handle:
        assert sorted(handle.keys()) == sorted(values) and handle.metadata() == {"format": "pt"}
        for key, value in values.items():
            assert torch.equal(handle.get_tensor(key), value)
    stored, _ = read_header(tmp_path / "x.safetensors")
    assert all(torch.equal(read_tensor(stored[k]), v) for k, v in values.items())


def test_convert_command_streams_with_progress_and_resume_flag(tmp_path, capsys):
    src = sharded_source(tmp_path)
    assert main(["convert", str(src), "--stream", "-b", "4", "-o", str(tmp_path / "out")]) == 0
    assert json.loads((tmp_path / "out" / "monarchify_report.json").read_text())["meta"]["conversion"] == "streaming"
    assert read_report(tmp_path / "out").layers
    assert main(["convert", str(src), "--no-stream", "--resume", "-o", str(tmp_path / "x")]) != 0
    assert "--resume continues a streaming conversion" in capsys.readouterr().err


def test_projection_on_cuda_is_refused_in_one_line_without_a_gpu_and_matches_the_cpu_with_one(tmp_path):
    src = sharded_source(tmp_path)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            convert_streaming(src, tmp_path / "gpu", MonarchConfig(), device="cuda")
        assert not (tmp_path / "gpu").exists()
        return
    convert_streaming(src, tmp_path / "cpu", MonarchConfig())
    convert_streaming(src, tmp_path / "gpu", MonarchConfig(), device="cuda")
    cpu, gpu = tensors_of(tmp_path / "cpu"), tensors_of(tmp_path / "gpu")
    for key in cpu:  # the factors of an SVD are unique up to signs: compare their products' errors via the report
        assert cpu[key].shape == gpu[key].shape
    rows = [json.loads((tmp_path / n / "monarchify_report.json").read_text())["layers"] for n in ("cpu", "gpu")]
    for a, b in zip(*rows):
        assert abs(a["rel_error"] - b["rel_error"]) < 1e-6 * max(a["rel_error"], 1e-12) + 1e-9


def test_a_failed_final_rename_keeps_the_staging_folder_and_resume_finishes(tmp_path, monkeypatch):
    from pathlib import Path

    src = sharded_source(tmp_path)
    config = MonarchConfig(nblocks=4)
    convert_streaming(src, tmp_path / "whole", config, max_shard_size="15KB")
    out = tmp_path / "out"
    staging = staging_folder(out)
    real_rename = Path.rename

    def rename(self, target):
        if self == staging:
            raise OSError(28, "No space left on device")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    events = Interrupt(after=10**9)
    with pytest.raises(OSError, match="No space"):
        convert_streaming(src, out, config, max_shard_size="15KB", events=events)
    assert not out.exists() and (staging / STATE_FILE).is_file() and "resume" in events.notes[-1]
    monkeypatch.undo()

    resumed = Interrupt(after=10**9)
    convert_streaming(src, out, config, max_shard_size="15KB", resume=True, events=resumed)
    assert resumed.seen == 0  # every shard was finished: only the small files were written again
    assert not staging.exists() and not (out / STATE_FILE).exists()
    assert_same_tensors(tmp_path / "whole", out)


def test_resume_on_another_device_is_refused(tmp_path, monkeypatch):
    """Factors projected on CUDA are not the CPU's bit for bit: the shards of one device are not
    finished with the other (torch's CUDA check is patched: the refusal comes before any work)."""
    src = sharded_source(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        convert_streaming(src, out, MonarchConfig(nblocks=4), max_shard_size="15KB", events=Interrupt(after=20))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ConfigError, match="another device"):
        convert_streaming(src, out, MonarchConfig(nblocks=4), max_shard_size="15KB", resume=True, device="cuda")
    assert staging_folder(out).is_dir()  # the refusal keeps the finished shards for a resume on the CPU
