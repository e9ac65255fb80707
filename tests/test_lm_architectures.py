"""`compress --text` and `eval` on the causal LM families users bring, not only Llama.

Each family lays its linears out differently (GPT-2's transposed Conv1D, Phi-3's fused qkv and
gate/up projections, Gemma's scaled embeddings and tied head, Gemma 2's logit soft-capping, Qwen2's
biased q/k/v, Qwen3's per-head query/key norms, Mistral's sliding window, GPT-NeoX's and Falcon's
fused query_key_value with parallel residuals, OPT's decoder stack); the same command has to find
the block linears, convert, heal, save a folder that loads back, and score it the way a plain
transformers computation does."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from monarchify.heal_config import HealConfig
from monarchify.lm.compress import TextCompressOptions, compress_text

from test_lm_compress import _text

SMALL = dict(vocab_size=None, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64)


def _config(family: str, vocab: int):
    import transformers

    small = dict(SMALL, vocab_size=vocab)
    if family == "gpt2":
        return transformers.GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    if family == "qwen2":
        return transformers.Qwen2Config(**small, num_key_value_heads=2, tie_word_embeddings=True)
    if family == "mistral":
        return transformers.MistralConfig(**small, num_key_value_heads=2, sliding_window=16)
    if family == "gemma":
        return transformers.GemmaConfig(**small, num_key_value_heads=1, head_dim=16)
    if family == "phi3":
        return transformers.Phi3Config(**small, num_key_value_heads=2, pad_token_id=0)
    if family == "phi":
        return transformers.PhiConfig(**small, num_key_value_heads=4)
    if family == "qwen3":
        return transformers.Qwen3Config(**small, num_key_value_heads=2, head_dim=16)
    if family == "gemma2":
        return transformers.Gemma2Config(**small, num_key_value_heads=2, head_dim=16, sliding_window=16)
    if family == "gpt_neox":
        return transformers.GPTNeoXConfig(**small)
    if family == "falcon":
        return transformers.FalconConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
    if family == "opt":
        return transformers.OPTConfig(vocab_size=vocab, hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
                                      max_position_embeddings=64, word_embed_proj_dim=64)
    raise AssertionError(family)


FAMILIES = ["gpt2", "qwen2", "mistral", "gemma", "phi3", "phi", "qwen3", "gemma2", "gpt_neox", "falcon", "opt"]
BLOCK_LINEAR = re.compile(r"(^|\.)(layers|h)\.\d+\.")  # inside a repeated block, whatever the family calls the stack


def _saved(tmp_path, family: str, tokenizer, seed: int):
    """A random model of ``family`` and the folder it and the tokenizer were saved to."""
    import transformers

    torch.manual_seed(seed)
    dense = transformers.AutoModelForCausalLM.from_config(_config(family, len(tokenizer))).eval()
    folder = tmp_path / family
    dense.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return dense, folder


@pytest.fixture(scope="module")
def tokenizer_and_text(tmp_path_factory):
    from monarchify.lm.text import train_tokenizer

    folder = tmp_path_factory.mktemp("text")
    text = _text(folder / "train.txt")
    return train_tokenizer(text.read_text().splitlines(), 120, "causal"), text


@pytest.mark.parametrize("family", FAMILIES)
def test_compress_text_converts_heals_and_reloads_every_family(tmp_path, tokenizer_and_text, family):
    import transformers

    from monarchify.hf.loading import load_model
    from monarchify.monarch import MonarchLinear

    tokenizer, text = tokenizer_and_text
    dense, folder = _saved(tmp_path, family, tokenizer, seed=0)
    # The linears inside the repeated blocks (the head and embeddings are never converted),
    # less those two blocks would not make smaller (square ones), which compress keeps dense.
    from monarchify.monarch import MonarchLayout
    from monarchify.pipeline.plan import dense_weight

    linears, square = set(), set()
    for name, module in dense.named_modules():
        if isinstance(module, (torch.nn.Linear, transformers.pytorch_utils.Conv1D)) and BLOCK_LINEAR.search(name):
            d_out, d_in = dense_weight(module).shape
            (linears if MonarchLayout(d_in, d_out, 2).weight_params < d_in * d_out else square).add(name)

    out = tmp_path / "out"
    result = compress_text(TextCompressOptions(
        model=str(folder), text=[text], out=out, recipe={"nblocks": 2}, block_size=16, calibration_samples=16, batch_size=4,
        heal=HealConfig(steps=4, lr=1e-3, hidden_weight=0.0, logit_weight=1.0, save_every=2, eval_every=2),
        eval_fraction=0.1))

    saved = json.loads((out / "eval_results.json").read_text())
    for key in ("dense", "converted", "compressed"):
        assert math.isfinite(saved["perplexity"][key]) and saved["perplexity"][key] > 1.0, (family, key)
    assert saved["params"]["compressed"] < saved["params"]["dense"], family
    assert saved["perplexity"] == result.results["perplexity"]

    loaded = load_model(str(out)).eval()
    converted = {name for name, module in loaded.named_modules() if isinstance(module, MonarchLinear)}
    assert len(linears) >= 4 and converted == linears, family
    assert all(isinstance(loaded.get_submodule(name), (torch.nn.Linear, transformers.pytorch_utils.Conv1D)) for name in square)
    ids = torch.randint(0, len(tokenizer), (2, 12))
    logits = loaded(input_ids=ids).logits
    assert logits.shape == (2, 12, len(tokenizer)) and torch.isfinite(logits).all(), family


@pytest.mark.parametrize("family", FAMILIES)
def test_perplexity_agrees_with_each_family_s_own_loss(tokenizer_and_text, family):
    """The perplexity `eval` reports is exp of the mean next-token loss over the same windows;
    here the reference is each model's own loss (labels = inputs), window by window, so the
    families' position ids, scaled embeddings and logit soft-capping are all in it."""
    import transformers

    from monarchify.lm.perplexity import perplexity, read_text, tokenize_text

    tokenizer, text = tokenizer_and_text
    torch.manual_seed(1)
    model = transformers.AutoModelForCausalLM.from_config(_config(family, len(tokenizer))).eval()
    ids = tokenize_text(read_text([text]), tokenizer)[: 5 * 32]

    measured = perplexity(model, ids, window=32, batch_size=2)

    with torch.no_grad():
        losses = [model(input_ids=w[None], labels=w[None]).loss.double() for w in ids.split(32)]
    assert measured.tokens == 5 * 31
    assert measured.perplexity == pytest.approx(math.exp(float(torch.stack(losses).mean())), rel=1e-5), family


@pytest.mark.parametrize("family", ["gpt2", "phi3", "gpt_neox", "opt"])
def test_a_budget_by_layer_kind_finds_each_family_s_kinds(tmp_path, tokenizer_and_text, family):
    """`--budget-objective kinds` names kinds by a layer's place inside its repeated block, so
    fused projections (GPT-2's transposed c_attn, Phi-3's qkv_proj, GPT-NeoX's query_key_value)
    and another stack's name (OPT's decoder.layers) are kinds like any other."""
    import transformers

    from monarchify.hf.stored_report import read_report
    from monarchify.lm.kinds import group_by_kind, kind_of

    tokenizer, text = tokenizer_and_text
    dense, folder = _saved(tmp_path, family, tokenizer, seed=2)
    in_blocks = [name for name, module in dense.named_modules()
                 if isinstance(module, (torch.nn.Linear, transformers.pytorch_utils.Conv1D)) and BLOCK_LINEAR.search(name)]
    expected = set(group_by_kind(in_blocks))

    out = tmp_path / "out"
    result = compress_text(TextCompressOptions(model=str(folder), text=[text], out=out, budget=0.6, by_kind=True, block_size=16,
                                               calibration_samples=16, batch_size=4, heal=None, eval_fraction=0.1))
    allocation = result.results["allocation"]
    assert set(allocation["plan"]) == expected and len(expected) >= 4, (family, allocation["plan"])
    assert allocation["params"]["plan"] <= allocation["params"]["budget"]
    assert allocation["perplexity"][allocation["chosen"]] == min(allocation["perplexity"].values())
    converted = {kind_of(layer.name) for layer in read_report(str(out)).layers}
    if allocation["chosen"] == "kinds":
        assert converted == {kind for kind, b in allocation["plan"].items() if b != "dense"}, family
    assert result.results["params"]["compressed"] < result.results["params"]["dense"]
