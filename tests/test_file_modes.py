"""Output folders follow the user's umask: every file of every command's output is 0644 under
umask 022 (safetensors writes its own files 0600, and a model folder shared with a server or
another user must not be unreadable in part)."""

from __future__ import annotations

import os
import stat

import pytest

from monarchify.cli.app import main

from test_compress import FAST, options as compress_options
from test_finetune import write_sst2
from test_train import SENTENCES, tiny_gpt2


@pytest.fixture(autouse=True)
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def modes(folder):
    found = {
        str(path.relative_to(folder)): stat.S_IMODE(path.stat().st_mode)
        for path in folder.rglob("*") if path.is_file()
    }
    assert any(name.endswith(".safetensors") for name in found), found
    return found


def assert_all_0644(*folders):
    for folder in folders:
        wrong = {name: oct(mode) for name, mode in modes(folder).items() if mode != 0o644}
        assert not wrong, f"{folder}: {wrong}"


def run(*args):
    assert main([str(a) for a in args]) == 0


def test_convert_streaming_and_densify_write_0644(tmp_path, bert_folder):
    run("convert", bert_folder, "-b", 4, "--no-check", "-o", tmp_path / "convert")
    run("convert", bert_folder, "-b", 4, "--stream", "-o", tmp_path / "stream")
    run("densify", tmp_path / "convert", "-o", tmp_path / "dense")
    assert_all_0644(tmp_path / "convert", tmp_path / "stream", tmp_path / "dense")


def test_train_and_a_densified_run_write_0644(tmp_path):
    tiny_gpt2().save_pretrained(tmp_path / "arch")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(SENTENCES * 20) + "\n", encoding="utf-8")
    for name, extra in (("monarch", []), ("densified", ["--densify-at", 2])):
        run("train", "--arch", tmp_path / "arch", "--text", corpus, "--out", tmp_path / name, "-b", 4, "--max-steps", 4,
            "--max-length", 16, "--vocab-size", 300, "--batch-size", 8, *extra)
    assert_all_0644(tmp_path / "monarch", tmp_path / "densified")


def test_finetune_writes_0644(tmp_path, bert_folder):
    data = write_sst2(tmp_path / "glue")
    run("finetune", "--task", "sst2", bert_folder, "--data-dir", data, "-b", 4, "--max-steps", 2,
        "--no-save-checkpoints", "--out", tmp_path / "ft")
    assert_all_0644(tmp_path / "ft")


@pytest.mark.slow
def test_compress_writes_0644_in_its_output_and_its_stages(tmp_path, bert_folder):
    from monarchify.glue.compress import CONVERTED, TEACHER, compress

    opts = compress_options(tmp_path, bert_folder, write_sst2(tmp_path / "glue"), finetune={**FAST, "max_steps": 2})
    compress(opts)
    assert_all_0644(opts.out, opts.stages / TEACHER, opts.stages / CONVERTED)
