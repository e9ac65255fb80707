"""Calibrated streaming conversion, block by block: the in-memory calibrated result (factors,
block counts, report), padded batches, one block in memory at a time, resume, clean errors."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import BertTokenizerFast

from conftest import WORDS, tiny_bert, tiny_gpt2, tiny_llama, write_wordpiece_vocab
from test_streaming import Interrupt, assert_same_tensors

from monarchify.cli.app import main
from monarchify.config import CalibrationConfig, MonarchConfig
from monarchify.errors import ConfigError
from monarchify.hf import blockwise
from monarchify.hf.convert import convert_pretrained
from monarchify.hf.stream_state import staging_folder
from monarchify.hf.streaming import convert_streaming
from monarchify.pipeline.plan import plan
from monarchify.samples import read_samples

MAKERS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}
CALIBRATION = CalibrationConfig(samples=9, heldout=4, batch_size=4, sweeps=1)


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """A WordPiece tokenizer for BERT, and the same vocabulary without token type ids for the
    decoders (whose forward takes none)."""
    folder = tmp_path_factory.mktemp("tok")
    write_wordpiece_vocab(folder)
    bert = BertTokenizerFast.from_pretrained(str(folder))
    decoder = BertTokenizerFast.from_pretrained(str(folder), model_input_names=["input_ids", "attention_mask"])
    return {"bert": bert, "llama": decoder, "gpt2": decoder}


def source(tmp_path, tokenizers, arch, dtype=torch.float32):
    folder = tmp_path / f"{arch}-src"
    tokenizer = tokenizers[arch]
    MAKERS[arch](vocab_size=len(tokenizer)).to(dtype).save_pretrained(folder, max_shard_size="20KB")
    tokenizer.save_pretrained(folder)
    assert len(list(folder.glob("*.safetensors"))) > 2
    return folder


def text_file(tmp_path, lines=16, shift=0):
    """Lines of very different lengths, so every batch is padded."""
    path = tmp_path / f"calib{shift}.txt"
    path.write_text("\n".join(" ".join(WORDS[(7 * i + j + shift) % len(WORDS)] for j in range(2 + (5 * i) % 17))
                              for i in range(lines)) + "\n", encoding="utf-8")
    return path


def report_of(folder):
    return json.loads((folder / "monarchify_report.json").read_text())


def close(a, b, tol=1e-6):
    return abs(a - b) <= tol * max(1.0, abs(a), abs(b))


@pytest.mark.parametrize("arch", sorted(MAKERS))
def test_streaming_calibrated_equals_in_memory_calibrated(tmp_path, tokenizers, arch):
    src = source(tmp_path, tokenizers, arch)
    data = text_file(tmp_path)
    config = MonarchConfig(nblocks=4, overrides={"(layer|layers|h)\\.1\\..*": 2}, calibration=CALIBRATION)
    memory = convert_pretrained(src, tmp_path / "memory", config, calibration_data=data, stream=False, check=False)
    streamed = convert_pretrained(src, tmp_path / "stream", config, calibration_data=data, stream=True)
    assert streamed.report.meta["conversion"] == "streaming"
    assert_same_tensors(tmp_path / "memory", tmp_path / "stream")  # bit for bit
    rows = [(r.name, r.nblocks, r.rel_error, r.extra) for r in memory.report.layers]
    assert [(r.name, r.nblocks, r.rel_error, r.extra) for r in streamed.report.layers] == rows
    mem, st = report_of(tmp_path / "memory")["meta"], report_of(tmp_path / "stream")["meta"]
    assert mem["recipe"] == st["recipe"] and mem["recipe"]["calibration"]["samples"] == 9
    mem["calibration"].pop("collect_seconds"), st["calibration"].pop("collect_seconds")
    assert mem["calibration"] == st["calibration"]
    assert json.loads((tmp_path / "memory" / "config.json").read_text()) == \
        json.loads((tmp_path / "stream" / "config.json").read_text())


def test_padding_is_left_out_of_the_statistics(tmp_path, tokenizers):
    """The same text batched alone or with long neighbours gives the same statistics."""
    src = source(tmp_path, tokenizers, "bert")
    samples = read_samples(text_file(tmp_path), 9, 4)
    seen = {}

    def run(batch_size):
        calibration = CalibrationConfig(samples=9, heldout=4, batch_size=batch_size, sweeps=0)
        config = MonarchConfig(calibration=calibration)
        out = tmp_path / f"b{batch_size}"
        report = convert_streaming(src, out, config, samples=samples)
        seen[batch_size] = report

    run(1)
    run(9)
    assert seen[9].meta["calibration"]["tokens"] == seen[1].meta["calibration"]["tokens"]
    for a, b in zip(seen[1].layers, seen[9].layers):
        assert close(a.rel_error, b.rel_error, 1e-4) and close(a.extra["output_rel_error"], b.extra["output_rel_error"], 1e-4)


def test_only_one_block_is_in_memory_at_a_time(tmp_path, tokenizers, monkeypatch):
    src = source(tmp_path, tokenizers, "llama")
    real, running = [], []
    run_block, load_tree = blockwise.BlockwiseCalibration._run_block, blockwise._Weights.load_tree

    def watch(self, index, project):
        running[:] = [self]
        run_block(self, index, project)
        assert all(p.is_meta for p in self.model.parameters())  # dropped again

    def loaded(weights, root, prefix):
        load_tree(weights, root, prefix)
        params = running[0].model.named_parameters()
        real.append((prefix, sorted({name.split(".")[2] if name.startswith("model.layers.") else name
                                     for name, p in params if not p.is_meta})))

    monkeypatch.setattr(blockwise.BlockwiseCalibration, "_run_block", watch)
    monkeypatch.setattr(blockwise._Weights, "load_tree", loaded)
    convert_pretrained(src, tmp_path / "out", MonarchConfig(calibration=CALIBRATION), calibration_data=text_file(tmp_path),
                       stream=True)
    assert real == [("model.layers.0.", ["0"]), ("model.layers.1.", ["1"])]


def test_an_interrupted_calibrated_run_resumes_to_the_same_output(tmp_path, tokenizers):
    src = source(tmp_path, tokenizers, "gpt2")
    samples = read_samples(text_file(tmp_path), 9, 4)
    config = MonarchConfig(calibration=CALIBRATION)
    whole = convert_streaming(src, tmp_path / "whole", config, samples=samples, max_shard_size="15KB")
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        convert_streaming(src, out, config, samples=samples, max_shard_size="15KB", events=Interrupt(after=12))
    finished = list(staging_folder(out).glob("*.safetensors"))
    assert finished and not out.exists()
    resumed = convert_streaming(src, out, config, samples=samples, max_shard_size="15KB", resume=True, events=Interrupt(10**9))
    assert_same_tensors(tmp_path / "whole", out)
    assert [r.to_dict() for r in resumed.layers] == [r.to_dict() for r in whole.layers]
    other = read_samples(text_file(tmp_path, shift=1), 9, 4)  # other text: no resuming
    with pytest.raises(KeyboardInterrupt):
        convert_streaming(src, out, config, samples=samples, max_shard_size="15KB", events=Interrupt(after=12), force=True)
    with pytest.raises(ConfigError, match="another recipe"):
        convert_streaming(src, out, config, samples=other, max_shard_size="15KB", resume=True, force=True)


def test_layers_outside_one_list_of_blocks_are_one_line(tmp_path, tokenizers, monkeypatch, capsys):
    import monarchify.hf.convert as hf_convert

    src = source(tmp_path, tokenizers, "bert")
    data = text_file(tmp_path)
    capsys.readouterr()
    code = main(["convert", str(src), "--stream", "--text", str(data), "--include", "pooler\\.dense", "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and err.startswith("Error: cannot stream this conversion: layer "
                                                                      "'pooler.dense' is outside the repeated blocks")
    assert "needs the in-memory path" in err
    assert "no list of repeated blocks" in blockwise.blocks_problem(torch.nn.Sequential(torch.nn.Linear(2, 2)), [])
    llama = tiny_llama()
    layers = plan(llama, MonarchConfig())
    assert blockwise.blocks_problem(llama, layers) is None
    llama.config.layer_types = ["sliding_attention", "full_attention"]  # a mask per kind: not recorded
    assert "2 kinds (full_attention, sliding_attention)" in blockwise.blocks_problem(llama, layers)
    # left to choose, a big folder falls back to the in-memory path, and calibrates the pooler there
    monkeypatch.setattr(hf_convert, "STREAM_ABOVE", 0)
    config = MonarchConfig(include=["pooler\\.dense"], calibration=CALIBRATION)
    result = convert_pretrained(src, tmp_path / "out", config, calibration_data=data, check=False)
    assert result.model is not None and "conversion" not in result.report.meta


def test_a_calibrating_recipe_streams_on_its_own_past_the_size_threshold(tmp_path, tokenizers, monkeypatch):
    import monarchify.hf.convert as hf_convert

    src = source(tmp_path, tokenizers, "llama")
    monkeypatch.setattr(hf_convert, "STREAM_ABOVE", 0)
    result = convert_pretrained(src, tmp_path / "out", MonarchConfig(calibration=CALIBRATION), calibration_data=text_file(tmp_path))
    assert result.model is None and result.report.meta["conversion"] == "streaming"
    with pytest.raises(ConfigError, match="cannot stream this conversion: a budget"):
        convert_pretrained(src, tmp_path / "b", MonarchConfig(budget=0.5, calibration=CALIBRATION),
                           calibration_data=text_file(tmp_path), stream=True)


@pytest.mark.parametrize("problem", ["missing", "empty"])
def test_bad_calibration_text_is_one_line_before_any_work(tmp_path, tokenizers, capsys, problem):
    src = source(tmp_path, tokenizers, "llama")
    data = tmp_path / "calib.txt"
    if problem == "empty":
        data.write_text("\n  \n", encoding="utf-8")
    capsys.readouterr()
    code = main(["convert", str(src), "--stream", "--text", str(data), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 1 and err.startswith("Error:") and len(err.splitlines()) == 1
    assert ("does not exist" if problem == "missing" else "no samples") in err
    assert not (tmp_path / "out").exists() and not staging_folder(tmp_path / "out").exists()


def test_each_block_announces_itself_before_it_calibrates(tmp_path, tokenizers):
    """The bar would otherwise stand still for the minutes a large block takes."""
    src = source(tmp_path, tokenizers, "llama")
    seen = []

    class Events(Interrupt):
        def calibrating(self, block, blocks):
            seen.append((block, blocks, len(streamed)))

        def streamed(self, name, nbytes):
            streamed.append(name)

    streamed = []
    samples = read_samples(text_file(tmp_path), 9, 4)
    convert_streaming(src, tmp_path / "out", MonarchConfig(calibration=CALIBRATION), samples=samples, events=Events(10**9))
    assert [(block, blocks) for block, blocks, _ in seen] == [(0, 2), (1, 2)]
    block0 = [i for i, name in enumerate(streamed) if name.startswith("model.layers.0.")]
    first_linear = streamed.index("model.layers.0.self_attn.q_proj.weight")
    assert seen[0][2] <= first_linear  # announced before its first projection is written
    assert max(block0) < seen[1][2] <= streamed.index("model.layers.1.self_attn.q_proj.weight")


def test_the_command_line_streams_a_calibrated_conversion(tmp_path, tokenizers, capsys):
    src = source(tmp_path, tokenizers, "llama")
    code = main(["convert", str(src), "--stream", "--text", str(text_file(tmp_path, lines=40)), "--json",
                 "-o", str(tmp_path / "out")])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["meta"]["conversion"] == "streaming" and report["meta"]["calibration"]["samples"] > 0
    assert (tmp_path / "out" / "monarchify_report.json").is_file()
