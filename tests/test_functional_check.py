"""The conversion's functional check works whatever the tokenizer, and never sinks a conversion."""

from __future__ import annotations

import pytest
import torch
import transformers

from monarchify.hf.functional_check import RANDOM_TOKENS, SAMPLE_SENTENCES, FunctionalCheck, sample_inputs


def tiny_gpt2() -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=97, n_embd=32, n_layer=1, n_head=2, n_positions=64)
    return transformers.GPT2LMHeadModel(config)


class EmptyTokenizer:
    """Encodes everything to zero tokens (a toy or mismatched vocabulary)."""

    def __call__(self, text, return_tensors=None):
        return {"input_ids": torch.zeros(1, 0, dtype=torch.long), "attention_mask": torch.zeros(1, 0, dtype=torch.long)}


class BrokenTokenizer:
    def __call__(self, text, return_tensors=None):
        raise RuntimeError("WordPiece error: Missing [UNK] token")


class WordTokenizer:
    def __call__(self, text, return_tensors=None):
        ids = torch.tensor([[len(word) % 97 for word in text.split()]])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


@pytest.mark.parametrize("tokenizer", [None, EmptyTokenizer(), BrokenTokenizer()])
def test_unusable_tokenizers_fall_back_to_random_ids_within_the_vocabulary(tokenizer):
    model = tiny_gpt2()
    inputs, source = sample_inputs(model, tokenizer)
    assert source == "random token ids"
    assert len(inputs) == len(SAMPLE_SENTENCES)
    for item in inputs:
        assert item["input_ids"].shape == (1, RANDOM_TOKENS)
        assert 0 <= int(item["input_ids"].min()) and int(item["input_ids"].max()) < 97
    # deterministic: the same ids before and after conversion, and from run to run
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(inputs, sample_inputs(model, tokenizer)[0]))


def test_a_working_tokenizer_is_used_and_only_model_inputs_are_passed():
    inputs, source = sample_inputs(tiny_gpt2(), WordTokenizer())
    assert source == "tokenizer"
    assert set(inputs[0]) == {"input_ids", "attention_mask"}
    assert inputs[0]["input_ids"].shape[1] == len(SAMPLE_SENTENCES[0].split())


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model.eval()(**item).logits.flatten() for item in inputs])


def test_the_check_measures_a_change_and_reports_zero_for_none():
    model = tiny_gpt2()
    check = FunctionalCheck(model, EmptyTokenizer())
    same = check.result(model)
    assert same["rel_diff"] == 0.0 and same["max_abs_diff"] == 0.0 and same["inputs"] == "random token ids"
    before = logits(model, check.inputs)
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight.mul_(1.5)
    after = logits(model, check.inputs)
    moved = check.result(model)
    # The reported numbers are the change of the logits, recomputed here from the two models.
    assert moved["sentences"] == len(SAMPLE_SENTENCES)
    assert moved["rel_diff"] == pytest.approx(float((after - before).norm() / before.norm()), rel=1e-5)
    assert moved["max_abs_diff"] == pytest.approx(float((after - before).abs().max()), rel=1e-5)
    assert moved["cosine"] == pytest.approx(float(before @ after / (before.norm() * after.norm())), abs=1e-6)
    assert moved["rel_diff"] > 1e-4 and moved["cosine"] < 1.0


def test_encoder_decoder_models_get_decoder_inputs_too():
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=50, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
    model = transformers.T5ForConditionalGeneration(config)
    check = FunctionalCheck(model, None)
    assert check.skipped is None
    assert all("decoder_input_ids" in item for item in check.inputs)
    assert check.result(model)["rel_diff"] == 0.0


def test_models_that_do_not_read_token_ids_are_reported_unchecked():
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=16, patch_size=8)
    check = FunctionalCheck(transformers.ViTModel(config), None)
    assert check.inputs == [] and "pixel_values" in check.skipped
    assert check.result(None) == {"skipped": check.skipped}


def test_a_dense_model_that_cannot_run_is_unchecked_but_a_broken_conversion_raises():
    class Picky(torch.nn.Module):
        main_input_name = "input_ids"
        config = transformers.PretrainedConfig(vocab_size=10)

        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(1))
            self.broken = True

        def forward(self, input_ids, attention_mask):
            if self.broken:
                raise ValueError("needs pixel_values\nsecond line")
            return (input_ids.float() * self.weight,)

    picky = Picky()
    check = FunctionalCheck(picky, None)
    assert check.skipped.startswith("the dense model could not run") and "\n" not in check.skipped
    picky.broken = False
    check = FunctionalCheck(picky, None)
    picky.broken = True
    with pytest.raises(ValueError):
        check.result(picky)
