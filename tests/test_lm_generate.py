"""Healing text the dense model writes: sampled from its own distribution within the nucleus (no
top-k, no temperature), reproducible, full windows, kept and reused by a resumed run."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from monarchify.errors import ConfigError
from monarchify.heal_config import HealConfig
from monarchify.lm.compress import GENERATED, TextCompressEvents, compress_text
from monarchify.lm.generate import load_windows, prompts, save_windows, write_windows

from conftest import tiny_llama
from test_lm_compress import _options, _text, lm_folder  # noqa: F401 - the fixture


@pytest.mark.parametrize("top_p", [1.0, 0.6])
def test_written_tokens_follow_the_model_distribution_in_its_nucleus_never_the_end_of_text(top_p):
    model = tiny_llama(vocab_size=60)
    model.config.eos_token_id = 2
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)  # a peaked distribution, which a temperature would flatten
    start = torch.tensor([[5, 9, 11]])
    with torch.no_grad():
        probs = model(start).logits[0, -1].double().softmax(-1)
    probs[2] = 0.0  # never sampled: every window is full
    probs /= probs.sum()
    ranked = probs.argsort(descending=True)
    kept = int((probs[ranked].cumsum(0) < top_p).sum()) + 1  # the smallest set holding top_p
    nucleus = torch.zeros_like(probs)
    nucleus[ranked[:kept]] = probs[ranked[:kept]]
    nucleus /= nucleus.sum()
    n = 3000
    written = write_windows(model, start.repeat(n, 1), 4, seed=0, batch_size=1000, top_p=top_p)
    assert written.shape == (n, 4) and torch.equal(written[:, :3], start.repeat(n, 1))
    counts = torch.bincount(written[:, 3], minlength=60).double()
    assert counts[2] == 0 and counts[ranked[kept:]].sum() == 0
    # ten bins of the tokens sorted by probability: a wrong cut empties or fills the unlikely bins,
    # a temperature moves mass between bins; the tolerance is ~5 binomial standard deviations
    for chunk in nucleus.argsort().chunk(10):
        p = float(nucleus[chunk].sum())
        seen = float(counts[chunk].sum()) / n
        assert abs(seen - p) < 5 * (p * (1 - p) / n) ** 0.5 + 1e-3, (p, seen)


def test_no_end_of_text_token_is_written_when_a_model_has_several():
    model = tiny_llama(vocab_size=12)
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.weight[[2, 3]] = 1.0  # every position puts most of its mass on 2 and 3
    model.config.eos_token_id = [2, 3]
    written = write_windows(model, torch.tensor([[5, 6]] * 50), 8, seed=0, top_p=1.0)
    assert not torch.isin(written, torch.tensor([2, 3])).any()
    model.config.eos_token_id = None  # a model without one writes every token it likes
    assert torch.isin(write_windows(model, torch.tensor([[5, 6]] * 50), 8, seed=0, top_p=1.0), torch.tensor([2, 3])).any()


def test_writing_is_reproducible_batch_by_batch_and_needs_room():
    model = tiny_llama()
    starts = prompts(torch.arange(40 * 16).reshape(40, 16) % 100, 10, seed=3, length=4)
    assert starts.shape == (10, 4)
    a = write_windows(model, starts, 12, seed=7, batch_size=4)
    assert torch.equal(a, write_windows(model, starts, 12, seed=7, batch_size=4))
    assert not torch.equal(a, write_windows(model, starts, 12, seed=8, batch_size=4))
    assert torch.equal(a[:4], write_windows(model, starts[:4], 12, seed=7, batch_size=4))  # batch i: seed + i
    with pytest.raises(ValueError, match="no room"):
        write_windows(model, starts, 4, seed=0)


def test_prompts_cover_the_windows_before_repeating():
    windows = torch.arange(5 * 8).reshape(5, 8)
    starts = prompts(windows, 7, seed=0, length=3)
    firsts = sorted(int(row[0]) for row in starts[:5])
    assert firsts == [0, 8, 16, 24, 32] and starts.shape == (7, 3)


def test_saved_windows_are_read_back_only_for_their_fingerprint(tmp_path):
    windows = torch.arange(12).reshape(3, 4)
    save_windows(tmp_path / "w.safetensors", windows, "a")
    assert torch.equal(load_windows(tmp_path / "w.safetensors", "a"), windows)
    assert load_windows(tmp_path / "w.safetensors", "b") is None
    assert load_windows(tmp_path / "missing.safetensors", "a") is None
    assert not list(tmp_path.glob("*.partial"))


def test_compress_heals_on_written_text_and_a_resumed_run_reuses_it(tmp_path, lm_folder):  # noqa: F811
    text = _text(tmp_path / "train.txt", seed=1)
    out = tmp_path / "out"
    heal = HealConfig(steps=6, lr=1e-3, logit_weight=1.0, hidden_weight=0.0, save_every=3)
    written = []
    result = compress_text(_options(lm_folder, text, out, heal=heal, generate=10),
                           TextCompressEvents(generating=lambda done, total: written.append((done, total))))
    assert written[0] == (0, 10) and written[-1] == (10, 10)
    saved = json.loads((out / "eval_results.json").read_text())
    assert saved["tokens"]["generated"] == 10 * 16 and "generate_seconds" in saved["times"]
    assert saved["options"]["generate"] == 10
    assert saved["heal"]["windows"]["generated"] == 10 and saved["heal"]["windows"]["text"] > 0
    stored = out.with_name("out.stages") / GENERATED
    assert stored.is_file()

    shutil.rmtree(out)
    messages = []
    again = compress_text(_options(lm_folder, text, out, heal=heal, generate=10),
                          TextCompressEvents(done=messages.append, note=messages.append, generating=lambda *a: pytest.fail("written again")))
    assert any("written already" in m for m in messages), messages
    assert again.results["perplexity"]["compressed"] == pytest.approx(result.results["perplexity"]["compressed"], rel=1e-5)

    shutil.rmtree(out)
    messages.clear()
    more = []
    compress_text(_options(lm_folder, text, out, heal=heal, generate=12), TextCompressEvents(
        note=messages.append, generating=lambda done, total: more.append(total)))
    assert any("generate" in m and "healing again" in m for m in messages), messages
    assert more and more[-1] == 12

    shutil.rmtree(out)  # other healing settings: healed again, on the windows already written
    messages.clear()
    longer = HealConfig(steps=7, lr=1e-3, logit_weight=1.0, hidden_weight=0.0, save_every=3)
    compress_text(_options(lm_folder, text, out, heal=longer, generate=12), TextCompressEvents(
        note=messages.append, done=messages.append, generating=lambda *a: pytest.fail("written again")))
    assert any("healing again" in m for m in messages) and any("written already" in m for m in messages), messages


def test_generate_is_checked(tmp_path, lm_folder):  # noqa: F811
    text = _text(tmp_path / "train.txt")
    with pytest.raises(ConfigError, match="generate"):
        _options(lm_folder, text, tmp_path / "o", generate=-1)
    with pytest.raises(ConfigError, match="healing"):
        _options(lm_folder, text, tmp_path / "o", generate=4, heal=None)
    with pytest.raises(ConfigError, match="2 tokens"):
        _options(lm_folder, text, tmp_path / "o", generate=4, block_size=1)
