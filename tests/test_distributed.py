"""Every training command under ``torchrun --nproc-per-node 2`` on CPUs (gloo): one process
writes, one process speaks, and two processes reach what one process reaches with the same
global batch.

One launch runs every command (``tests/distributed_driver.py``): starting two processes and
importing transformers in them takes longer than all these tiny runs together. The
single-process references run here, in the test process, through the same command line.

Tolerances: the two runs compute the same sums in a different order (each process averages
its half of the batch, then the halves are averaged), so they agree to float32 rounding,
amplified a little by a few optimizer steps: ``REL`` for losses, perplexities and errors. The
hidden-state term of ``heal`` is a ratio of sums per layer that the two halves of a batch of
padded sentences can only approximate (``monarchify.heal.share``): ``HEAL_REL`` there.
``train``'s held-out loss comes from Trainer's sharded evaluation, which fills the last shard by
repeating an example when the held-out blocks do not split evenly (25 here) and then averages
per-shard means: ``EVAL_REL`` (its training losses still agree to ``REL``). ``train --densify-at``
follows one process's losses to ``REL`` across the switch. Healing sharded (FSDP) reaches healing
with whole copies (DDP) to ``REL`` (losses, perplexities), and their saved weights agree to a
relative 1e-4 (absolute 1e-5): the same sums, reduced in another order.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, tiny_bert, tiny_llama, write_wordpiece_vocab

pytestmark = pytest.mark.slow

REL = 1e-4
EVAL_REL = 3e-3
HEAL_REL = 2e-2
PROCESSES = 2
FSDP = {"ACCELERATE_USE_FSDP": "true"}


def _text(path: Path, lines: int, seed: int, words: int = 40) -> Path:
    import random

    from conftest import WORDS

    rng = random.Random(seed)
    path.write_text("\n".join(" ".join(rng.choices(WORDS[:words], k=rng.randint(8, 30))) for _ in range(lines)) + "\n",
                    encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Tiny models without dropout (dropout draws differ between one and two processes), and
    their data."""
    from transformers import BertTokenizerFast, GPT2Config, GPT2LMHeadModel

    from monarchify import MonarchConfig
    from monarchify.hf.convert import convert_pretrained
    from monarchify.lm.text import train_tokenizer
    from test_finetune import write_sst2

    root = tmp_path_factory.mktemp("dist")
    write_wordpiece_vocab(root / "vocab")
    tokenizer = BertTokenizerFast.from_pretrained(str(root / "vocab"))
    bert = root / "bert"
    tiny_bert(vocab_size=len(tokenizer), hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0).save_pretrained(bert)
    tokenizer.save_pretrained(bert)
    converted = root / "bert-monarch"
    convert_pretrained(bert, converted, MonarchConfig(nblocks=4), check=False)

    text = _text(root / "text.txt", 240, seed=1)
    lm = root / "lm"
    lm_tokenizer = train_tokenizer(_text(root / "corpus.txt", 240, seed=0).read_text().splitlines(), 120, "causal")
    model = tiny_llama(vocab_size=len(lm_tokenizer))
    with torch.no_grad():  # as in test_lm_compress: the converted layers matter against the residual stream
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    model.save_pretrained(lm)
    lm_tokenizer.save_pretrained(lm)
    arch = root / "gpt2"
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=300, n_embd=32, n_layer=2, n_head=4, n_positions=32, resid_pdrop=0.0,
                               embd_pdrop=0.0, attn_pdrop=0.0)).save_pretrained(arch)
    return {"root": root, "bert": bert, "converted": converted, "glue": write_sst2(root / "glue", n_train=64), "text": text,
            "lm": lm, "arch": arch}


def finetune_args(i, out, batch):
    return ["finetune", "--task", "sst2", i["bert"], "--data-dir", i["glue"], "--out", out, "--batch-size", batch,
            "--epochs", "2", "--lr", "2e-3", "--warmup-steps", "0", "--seed", "0", "--no-save-checkpoints"]


def compress_task_args(i, out, batch):
    return ["compress", "--task", "sst2", i["bert"], "--budget", "0.6", "--data-dir", i["glue"], "--out", out,
            "--epochs", "1", "--batch-size", batch, "--calibration-samples", "16", "--teacher-lr", "2e-3", "--student-lr", "2e-3"]


def heal_args(i, out, batch):
    return ["heal", i["converted"], "--teacher", i["bert"], "--text", i["text"], "--out", out, "--max-steps", "10", "--lr", "1e-3",
            "--batch-size", batch, "--max-train-samples", "32"]


def compress_text_args(i, out, batch):
    return ["compress", i["lm"], "--text", i["text"], "--budget", "0.5", "--out", out, "--max-length", "16",
            "--calibration-samples", "24", "--batch-size", batch, "--heal-steps", "12", "--save-steps", "5", "--eval-steps", "6",
            "--max-grad-norm", "0.01"]  # below every step's gradient norm: clipped alike sharded, with copies and alone


def train_args(i, out, batch, *extra):
    return ["train", "-a", i["arch"], "--text", i["text"], "-o", out, "--max-length", "16", "--vocab-size", "300", "--batch-size", batch,
            "--max-steps", "8", "--lr", "3e-3", "--warmup-steps", "0", "--eval-steps", "4", "--save-steps", "2", "--logging-steps", "1",
            "--seed", "0", "-b", "4", *extra]


@pytest.fixture(scope="module")
def launched(inputs):
    """One ``torchrun`` launch of two processes running every command (global batch 8: 4 each)."""
    i, runs = inputs, inputs["root"] / "runs"
    runs.mkdir()
    plan = [
        {"name": "finetune", "args": finetune_args(i, runs / "finetune", 4)},
        {"name": "compress_task", "args": compress_task_args(i, runs / "compress_task", 4)},
        {"name": "heal", "args": heal_args(i, runs / "heal", 4)},
        {"name": "compress_text", "args": compress_text_args(i, runs / "compress_text", 4)},
        {"name": "compress_text_stopped", "args": compress_text_args(i, runs / "compress_text_resumed", 4), "stop": {"heal": 7}},
        {"name": "compress_text_resumed", "args": compress_text_args(i, runs / "compress_text_resumed", 4)},
        {"name": "compress_text_stopped_for_one", "args": compress_text_args(i, runs / "compress_text_one", 4), "stop": {"heal": 7}},
        {"name": "train", "args": train_args(i, runs / "train", 4)},
        {"name": "train_stopped", "args": train_args(i, runs / "train_resumed", 4), "stop": {"train": 4}},
        {"name": "train_resumed", "args": train_args(i, runs / "train_resumed", 4, "--resume")},
        {"name": "train_switch", "args": train_args(i, runs / "train_switch", 4, "--densify-at", "0.5")},
        # stopped before the switch: resumed from the Monarch checkpoint 2, it switches in the resumed run
        {"name": "train_switch_stopped", "args": train_args(i, runs / "train_switch_resumed", 4, "--densify-at", "0.5"), "stop": {"train": 3}},
        {"name": "train_switch_resumed", "args": train_args(i, runs / "train_switch_resumed", 4, "--densify-at", "0.5", "--resume")},
        # healing sharded (FSDP, as accelerate's FSDP configuration asks); a sharded state resumed with copies
        {"name": "compress_text_sharded", "args": compress_text_args(i, runs / "compress_text_sharded", 4), "env": FSDP, "shards": True},
        {"name": "compress_text_sharded_stopped", "args": compress_text_args(i, runs / "compress_text_sharded_resumed", 4), "env": FSDP,
         "stop": {"heal": 7}},
        {"name": "compress_text_sharded_resumed", "args": compress_text_args(i, runs / "compress_text_sharded_resumed", 4)},
    ]
    plan_file = runs / "plan.json"
    plan_file.write_text(json.dumps(plan, default=str))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={PROCESSES}",
         str(REPO / "tests" / "distributed_driver.py"), str(plan_file)],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return runs


def output(runs: Path, name: str, rank: int) -> tuple[int, str, str]:
    base = f"{name}.rank{rank}"
    return tuple(f(runs / f"{base}.{kind}") for f, kind in ((lambda p: int(p.read_text()), "rc"), (Path.read_text, "out"), (Path.read_text, "err")))


def assert_one_writer(runs: Path, name: str, out: Path, said: str = "saving to") -> None:
    """Both processes succeeded, only the main one printed, and no staging folder was left."""
    for rank in range(PROCESSES):
        code, stdout, stderr = output(runs, name, rank)
        assert code == 0, (rank, stderr)
        if rank:
            assert stdout == "" and stderr == "", (rank, stdout, stderr)
    _, stdout, stderr = output(runs, name, 0)
    assert f"{said} {out}" in stderr.replace("\n", "")
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def single(args) -> None:
    """The same command in this process, alone."""
    from monarchify.cli.app import main

    assert main([str(a) for a in args]) == 0


def results(folder: Path, name: str = "eval_results.json") -> dict:
    return json.loads((folder / name).read_text())


def test_finetune_on_two_processes_matches_one(launched, inputs, tmp_path):
    out = launched / "finetune"
    assert_one_writer(launched, "finetune", out)
    two = results(out)
    assert two["train"]["world_size"] == 2 and two["train"]["global_batch"] == 8
    assert two["train"]["steps"] == 16  # 64 examples, 8 a step, 2 epochs: the data was shared, not repeated
    single(finetune_args(inputs, tmp_path / "one", 8))
    one = results(tmp_path / "one")
    assert one["train"]["world_size"] == 1 and one["train"]["global_batch"] == 8 and one["train"]["steps"] == 16
    assert two["metrics"]["validation"]["accuracy"] == one["metrics"]["validation"]["accuracy"]
    assert two["metrics"]["validation"]["loss"] == pytest.approx(one["metrics"]["validation"]["loss"], rel=REL)
    # Trainer's logged losses, each the mean over both halves of the batch (its overall
    # train.loss adds the steps after the last logged one from the main process alone)
    logged = [[e["loss"] for e in run["history"] if "loss" in e] for run in (two, one)]
    assert len(logged[0]) >= 2 and logged[0] == pytest.approx(logged[1], rel=REL)


def test_compress_task_on_two_processes_matches_one(launched, inputs, tmp_path):
    out = launched / "compress_task"
    assert_one_writer(launched, "compress_task", out)
    saved = results(out)
    assert saved["train"]["world_size"] == 2 and saved["train"]["global_batch"] == 8
    single(compress_task_args(inputs, tmp_path / "one", 8))
    one = results(tmp_path / "one")
    assert one["train"]["world_size"] == 1 and one["train"]["global_batch"] == 8
    assert saved["metrics"]["validation"]["accuracy"] == one["metrics"]["validation"]["accuracy"]
    assert saved["metrics"]["validation"]["loss"] == pytest.approx(one["metrics"]["validation"]["loss"], rel=REL)
    stages = out.with_name(out.name + ".stages")
    assert results(stages / "1-teacher")["train"]["world_size"] == 2
    assert (stages / "2-converted" / "config.json").is_file()
    assert not [p.name for p in stages.iterdir() if p.name.startswith(".")]


def test_heal_on_two_processes_matches_one(launched, inputs, tmp_path):
    out = launched / "heal"
    assert_one_writer(launched, "heal", out, said="saved")
    two = results(out, "monarchify_report.json")["meta"]["heal"]
    assert two["world_size"] == 2 and two["global_batch"] == 4
    single(heal_args(inputs, tmp_path / "one", 4))
    one = results(tmp_path / "one", "monarchify_report.json")["meta"]["heal"]
    assert one["world_size"] == 1
    assert two["heldout_hidden_error_before"] == pytest.approx(one["heldout_hidden_error_before"], rel=REL)
    assert two["heldout_hidden_error_after"] == pytest.approx(one["heldout_hidden_error_after"], rel=HEAL_REL)
    assert two["heldout_hidden_error_after"] != two["heldout_hidden_error_before"]  # it trained


def test_compress_text_on_two_processes_matches_one_and_resumes(launched, inputs, tmp_path, capsys):
    out = launched / "compress_text"
    assert_one_writer(launched, "compress_text", out)
    two = results(out)
    assert two["heal"]["world_size"] == 2 and two["heal"]["global_batch"] == 4
    single(compress_text_args(inputs, tmp_path / "one", 4))
    one = results(tmp_path / "one")
    assert one["heal"]["world_size"] == 1
    for key in ("dense", "converted", "compressed"):
        assert two["perplexity"][key] == pytest.approx(one["perplexity"][key], rel=REL), key
    assert two["heal"]["final_loss"] == pytest.approx(one["heal"]["final_loss"], rel=REL)

    # stopped after step 7 (the state of step 5 on disk), then the same command: the same result
    for rank in range(PROCESSES):
        assert output(launched, "compress_text_stopped", rank)[0] == 130
    assert_one_writer(launched, "compress_text_resumed", launched / "compress_text_resumed")
    resumed = results(launched / "compress_text_resumed")
    assert "resuming healing from step 5" in output(launched, "compress_text_resumed", 0)[2]
    assert resumed["perplexity"]["compressed"] == pytest.approx(two["perplexity"]["compressed"], rel=REL)
    assert resumed["heal"]["final_loss"] == pytest.approx(two["heal"]["final_loss"], rel=REL)

    # --batch-size is the global batch here: a run stopped under two processes resumes under one
    assert output(launched, "compress_text_stopped_for_one", 0)[0] == 130
    capsys.readouterr()
    single(compress_text_args(inputs, launched / "compress_text_one", 4))
    assert "resuming healing from step 5" in capsys.readouterr().err
    alone = results(launched / "compress_text_one")
    assert alone["heal"]["world_size"] == 1
    assert alone["perplexity"]["compressed"] == pytest.approx(two["perplexity"]["compressed"], rel=REL)
    assert alone["heal"]["final_loss"] == pytest.approx(two["heal"]["final_loss"], rel=REL)


def test_train_on_two_processes_matches_one_and_resumes(launched, inputs, tmp_path):
    out = launched / "train"
    assert_one_writer(launched, "train", out)
    two = results(out, "train_results.json")
    assert two["train"]["world_size"] == 2 and two["train"]["global_batch"] == 8 and two["train"]["steps"] == 8
    single(train_args(inputs, tmp_path / "one", 8))
    one = results(tmp_path / "one", "train_results.json")
    assert one["train"]["world_size"] == 1 and one["train"]["global_batch"] == 8
    assert two["eval"]["loss"] == pytest.approx(one["eval"]["loss"], rel=EVAL_REL)
    assert [e["loss"] for e in two["curve"] if "loss" in e] == pytest.approx([e["loss"] for e in one["curve"] if "loss" in e], rel=REL)

    stopped = [output(launched, "train_stopped", rank) for rank in range(PROCESSES)]
    assert [code for code, _, _ in stopped] == [0, 0] and "stopped before the last step" in stopped[0][2]
    assert_one_writer(launched, "train_resumed", launched / "train_resumed")
    resumed = results(launched / "train_resumed", "train_results.json")
    assert resumed["train"]["steps"] == 8
    assert resumed["eval"]["loss"] == pytest.approx(two["eval"]["loss"], rel=REL)


def logged_losses(run: dict) -> list[float]:
    return [e["loss"] for e in run["curve"] if "loss" in e]


def test_train_switches_to_dense_on_two_processes_as_on_one(launched, inputs, tmp_path):
    """Every process densifies at step 4 and the gradients of the dense weights are averaged from
    then on: the losses after the switch follow one process's to ``REL`` (a wrapper still
    synchronising the factors alone would leave each process training on its half of the batch)."""
    from transformers import AutoModelForCausalLM

    from monarchify.lm.switch import monarch_layers

    out = launched / "train_switch"
    assert_one_writer(launched, "train_switch", out)
    two = results(out, "train_results.json")
    single(train_args(inputs, tmp_path / "one", 8, "--densify-at", "0.5"))
    one = results(tmp_path / "one", "train_results.json")
    assert two["switch"]["step"] == one["switch"]["step"] == 4 and two["switch"]["layers"] == 8
    assert two["switch"]["loss_after"] == pytest.approx(two["switch"]["loss_before"], rel=1e-5)
    assert two["train"]["world_size"] == 2 and two["train"]["global_batch"] == 8 and two["train"]["steps"] == 8
    assert len(logged_losses(two)) == 8 and logged_losses(two) == pytest.approx(logged_losses(one), rel=REL)
    assert two["eval"]["loss"] == pytest.approx(one["eval"]["loss"], rel=EVAL_REL)

    # a plain folder that stock transformers loads, holding what one process trained
    loaded, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    assert not monarch_layers(loaded)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "one")
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(input_ids=ids).logits, reference.eval()(input_ids=ids).logits, rtol=1e-3, atol=1e-3)


def test_train_stopped_before_the_switch_resumes_and_switches_on_two_processes(launched):
    whole = results(launched / "train_switch", "train_results.json")
    assert "stopped before the last step" in output(launched, "train_switch_stopped", 0)[2]
    out = launched / "train_switch_resumed"
    assert_one_writer(launched, "train_switch_resumed", out)
    assert "resuming from checkpoint-2" in output(launched, "train_switch_resumed", 0)[2]
    resumed = results(out, "train_results.json")
    assert resumed["switch"]["step"] == 4 and resumed["train"]["steps"] == 8
    assert logged_losses(resumed) == pytest.approx(logged_losses(whole), rel=REL)
    assert resumed["eval"]["loss"] == pytest.approx(whole["eval"]["loss"], rel=REL)


def test_compress_text_heals_sharded_on_two_processes_as_with_copies(launched):
    """FSDP: each process holds half of every Monarch factor (split along its first dimension)
    and the run reaches the run with whole copies (DDP) to ``REL``; the gathered folder holds
    the same weights. Its healing state, written sharded, resumes with copies."""
    from safetensors.torch import load_file

    out = launched / "compress_text_sharded"
    assert_one_writer(launched, "compress_text_sharded", out)
    weights, reference = load_file(out / "model.safetensors"), load_file(launched / "compress_text" / "model.safetensors")
    shards = [json.loads((launched / f"compress_text_sharded.rank{rank}.shards.json").read_text()) for rank in range(PROCESSES)]
    factors = [name for name in shards[0] if name.endswith((".L", ".R"))]
    assert factors and sorted(factors) == sorted(name for name in reference if name.endswith((".L", ".R")))
    for name in factors:
        (mine, whole), (theirs, _) = shards[0][name], shards[1][name]
        assert mine[0] + theirs[0] == whole[0] and 0 < mine[0] < whole[0] and mine[1:] == theirs[1:] == whole[1:], name

    sharded, copies = results(out), results(launched / "compress_text")
    assert sharded["heal"]["sharded"] is True and copies["heal"]["sharded"] is False
    assert sharded["heal"]["world_size"] == 2 and sharded["heal"]["global_batch"] == 4
    for key in ("converted", "compressed"):
        assert sharded["perplexity"][key] == pytest.approx(copies["perplexity"][key], rel=REL), key
    assert sharded["heal"]["final_loss"] == pytest.approx(copies["heal"]["final_loss"], rel=REL)
    assert weights.keys() == reference.keys()
    for name in weights:
        torch.testing.assert_close(weights[name], reference[name], rtol=1e-4, atol=1e-5, msg=name)

    for rank in range(PROCESSES):
        assert output(launched, "compress_text_sharded_stopped", rank)[0] == 130
    assert "resuming healing from step 5" in output(launched, "compress_text_sharded_resumed", 0)[2]
    resumed = results(launched / "compress_text_sharded_resumed")
    assert resumed["heal"]["final_loss"] == pytest.approx(sharded["heal"]["final_loss"], rel=REL)
    assert resumed["perplexity"]["compressed"] == pytest.approx(sharded["perplexity"]["compressed"], rel=REL)
