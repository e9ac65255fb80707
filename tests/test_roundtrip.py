"""Convert -> save -> stock ``from_pretrained`` -> identical outputs, for three architectures.

This is the tripwire for transformers' plug-in API (``monarchify/hf/plugin.py``).
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import monarchify
from monarchify import MonarchConfig
from monarchify.hf.densify import densify_folder
from monarchify.monarch import MonarchLinear

from conftest import tiny_bert, tiny_gpt2, tiny_llama

CASES = {
    "bert": (tiny_bert, transformers.AutoModel),
    "gpt2": (tiny_gpt2, transformers.AutoModelForCausalLM),
    "llama": (tiny_llama, transformers.AutoModelForCausalLM),
}


def inputs(vocab: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    ids = torch.randint(5, vocab, (2, 11))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@torch.no_grad()
def first_output(model, batch):
    return model(**batch)[0]


@pytest.mark.parametrize("arch", sorted(CASES))
@pytest.mark.parametrize("nblocks", [2, 4])
def test_convert_save_and_stock_from_pretrained_give_identical_outputs(tmp_path, arch, nblocks):
    build, auto_cls = CASES[arch]
    model = build()
    report = monarchify.convert(model, MonarchConfig(nblocks=nblocks))
    assert report.layers and all(layer.rel_error is not None for layer in report.layers)
    batch = inputs(model.config.vocab_size)
    expected = first_output(model, batch)

    monarchify.save(model, tmp_path / "out", report=report)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    recipe = config["quantization_config"]
    assert recipe["quant_method"].split(":")[0] == "monarch"  # a sentence for stock transformers (test_load_guard.py)
    assert set(recipe["modules"]) == {layer.name for layer in report.layers}
    assert recipe["monarchify_version"] == monarchify.__version__
    assert not list((tmp_path / "out").glob("*.bin"))

    for loaded in (auto_cls.from_pretrained(tmp_path / "out"), monarchify.load(tmp_path / "out")):
        n_monarch = sum(isinstance(m, MonarchLinear) for m in loaded.modules())
        assert n_monarch == len(report.layers)
        assert torch.equal(first_output(loaded.eval(), batch), expected)


def test_padding_shapes_round_trip(tmp_path):
    """Hidden 48 and intermediate 100 at 8 blocks: 100 is padded to 104."""
    model = tiny_bert()
    report = monarchify.convert(model, MonarchConfig(nblocks=3))
    assert any(layer.padded for layer in report.layers)
    batch = inputs(model.config.vocab_size)
    expected = first_output(model, batch)
    monarchify.save(model, tmp_path / "out")
    assert torch.equal(first_output(monarchify.load(tmp_path / "out").eval(), batch), expected)


def test_a_base_model_checkpoint_loads_into_a_model_with_a_head(tmp_path):
    model = tiny_bert()
    monarchify.convert(model, MonarchConfig(nblocks=2))
    monarchify.save(model, tmp_path / "out")
    clf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "out", num_labels=3)
    assert isinstance(clf.bert.encoder.layer[0].attention.self.query, MonarchLinear)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(clf.state_dict()["bert." + name], tensor, rtol=0, atol=0)


def test_a_reloaded_model_can_be_trained_and_saved_again(tmp_path):
    model = tiny_bert(with_head=True)
    monarchify.convert(model, MonarchConfig(nblocks=2))
    monarchify.save(model, tmp_path / "a")
    loaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "a")
    from transformers.trainer_utils import validate_quantization_for_training

    validate_quantization_for_training(loaded)  # Trainer's gate for plug-in-loaded models
    loaded.train()
    opt = torch.optim.SGD(loaded.parameters(), lr=0.1)
    batch = inputs(loaded.config.vocab_size)
    loss = loaded(**batch, labels=torch.tensor([0, 1])).loss
    loss.backward()
    assert loaded.bert.encoder.layer[0].attention.self.query.L.grad is not None
    opt.step()
    monarchify.save(loaded, tmp_path / "b")
    again = monarchify.load(tmp_path / "b").eval()
    loaded.eval()
    torch.testing.assert_close(first_output(again, batch), first_output(loaded, batch), rtol=0, atol=0)


def test_large_checkpoints_are_sharded_and_still_load_and_report(tmp_path):
    model = tiny_bert()
    report = monarchify.convert(model, MonarchConfig(nblocks=2))
    monarchify.save(model, tmp_path / "out", report=report, max_shard_size="40KB")
    shards = sorted((tmp_path / "out").glob("*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "out" / "model.safetensors.index.json").is_file()
    batch = inputs(model.config.vocab_size)
    assert torch.equal(first_output(monarchify.load(tmp_path / "out").eval(), batch), first_output(model, batch))
    again = monarchify.read_report(tmp_path / "out")
    assert again.totals()["model_params"] == report.model_params_after


def test_an_architecture_saved_under_renamed_keys_round_trips_and_reports(tmp_path):
    """transformers 5 saves ViT under its original key names (``encoder.layer.0.attention.
    attention.query``) while its modules are ``layers.0.attention.q_proj``: loading renames
    them back, and ``read_report`` must find the Monarch weights through the same rules."""
    config = transformers.ViTConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=96, image_size=16, patch_size=8, num_labels=3)
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(config).eval()
    report = monarchify.convert(model, MonarchConfig(nblocks=2))
    pixels = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = model(pixel_values=pixels).logits
    monarchify.save(model, tmp_path / "out", report=report)

    loaded = transformers.AutoModelForImageClassification.from_pretrained(tmp_path / "out").eval()
    assert sum(isinstance(m, MonarchLinear) for m in loaded.modules()) == len(report.layers) == 12
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values=pixels).logits, expected)
    again = monarchify.read_report(tmp_path / "out")
    assert [layer.name for layer in again.layers] == [layer.name for layer in report.layers]
    assert [layer.params_monarch for layer in again.layers] == [layer.params_monarch for layer in report.layers]
    # densify finds each layer's tensors by the same rule, and writes them back under the stored names.
    densify_folder(tmp_path / "out", tmp_path / "dense")
    dense = transformers.AutoModelForImageClassification.from_pretrained(tmp_path / "dense").eval()
    assert not any(isinstance(m, MonarchLinear) for m in dense.modules())
    with torch.no_grad():
        torch.testing.assert_close(dense(pixel_values=pixels).logits, expected, rtol=1e-4, atol=1e-5)


def test_report_counts_parameters_not_the_buffers_saved_beside_them(tmp_path):
    """BART saves a persistent buffer (``final_logits_bias``) in its weight files."""
    config = transformers.BartConfig(vocab_size=60, d_model=32, encoder_layers=1, decoder_layers=1,
                                     encoder_attention_heads=4, decoder_attention_heads=4,
                                     encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.BartForConditionalGeneration(config)
    report = monarchify.convert(model, MonarchConfig(nblocks=2))
    monarchify.save(model, tmp_path / "out", report=report)
    totals = monarchify.read_report(tmp_path / "out").totals()
    assert totals["model_params"] == sum(p.numel() for p in model.parameters()) == report.totals()["model_params"]
    assert totals["model_params_before"] == report.totals()["model_params_before"]


def _as_format_1(folder) -> None:
    """Rewrite a checkpoint's recipe the way monarchify wrote it before output orders existed."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    recipe = config["quantization_config"]
    recipe["format_version"] = 1
    for spec in recipe["modules"].values():
        del spec["output_order"]
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("order", ["blocked", "interleaved"])
def test_each_output_order_round_trips_and_is_recorded(tmp_path, order):
    model = tiny_bert()
    report = monarchify.convert(model, MonarchConfig(nblocks=2, output_order=order))
    batch = inputs(model.config.vocab_size)
    expected = first_output(model, batch)
    monarchify.save(model, tmp_path / "out", report=report)
    recipe = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert recipe["format_version"] == 2
    assert {spec["output_order"] for spec in recipe["modules"].values()} == {order}
    loaded = transformers.AutoModel.from_pretrained(tmp_path / "out").eval()
    assert {m.output_order for m in loaded.modules() if isinstance(m, MonarchLinear)} == {order}
    assert torch.equal(first_output(loaded, batch), expected)


def test_a_format_1_checkpoint_loads_with_the_interleaved_order(tmp_path):
    """Checkpoints written before format 2 hold interleaved factors and say nothing of it: they
    must load as interleaved (loading them as blocked would silently permute every output)."""
    model = tiny_bert()
    monarchify.convert(model, MonarchConfig(nblocks=2, output_order="interleaved"))
    batch = inputs(model.config.vocab_size)
    expected = first_output(model, batch)
    monarchify.save(model, tmp_path / "out")
    _as_format_1(tmp_path / "out")
    loaded = monarchify.load(tmp_path / "out").eval()
    assert {m.output_order for m in loaded.modules() if isinstance(m, MonarchLinear)} == {"interleaved"}
    assert torch.equal(first_output(loaded, batch), expected)


def test_save_with_tokenizer_writes_a_folder_that_needs_no_tokenizer_argument(tmp_path, bert_tokenizer):
    """The README's Python snippet: ``save(..., tokenizer=...)`` ships the tokenizer, so the folder
    loads with ``AutoTokenizer`` (and ``finetune`` on it needs no ``--tokenizer``)."""
    model = tiny_bert(vocab_size=len(bert_tokenizer))
    report = monarchify.convert(model, MonarchConfig(nblocks=4))
    out = monarchify.save(model, tmp_path / "bert-monarch", tokenizer=bert_tokenizer, report=report)
    assert (out / "tokenizer_config.json").is_file()
    loaded = transformers.AutoTokenizer.from_pretrained(str(out))
    text = "the quick brown fox"
    assert loaded(text)["input_ids"] == bert_tokenizer(text)["input_ids"]
    assert isinstance(transformers.AutoModel.from_pretrained(str(out)).encoder.layer[0].intermediate.dense, MonarchLinear)


FAMILIES = {  # model type -> (auto class, the config's own names for the tiny sizes)
    "roberta": ("AutoModelForSequenceClassification", {}),
    "distilbert": ("AutoModelForSequenceClassification", dict(dim=32, n_layers=2, n_heads=4, hidden_dim=64)),
    "albert": ("AutoModelForSequenceClassification", dict(embedding_size=16)),
    "deberta-v2": ("AutoModelForSequenceClassification", {}),
    "electra": ("AutoModelForSequenceClassification", {}),
    "modernbert": ("AutoModelForSequenceClassification", {}),
    "mistral": ("AutoModelForCausalLM", dict(num_key_value_heads=2)),
    "qwen2": ("AutoModelForCausalLM", dict(num_key_value_heads=2)),
    "gemma": ("AutoModelForCausalLM", dict(head_dim=8, num_key_value_heads=2)),
    "phi": ("AutoModelForCausalLM", {}),
    "opt": ("AutoModelForCausalLM", dict(ffn_dim=64, word_embed_proj_dim=32)),
    "gpt_neox": ("AutoModelForCausalLM", {}),
    "falcon": ("AutoModelForCausalLM", dict(new_decoder_architecture=False)),
    "t5": ("AutoModel", dict(d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8)),
}


@pytest.mark.slow
@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_other_families_round_trip_through_stock_loading(tmp_path, model_type):
    """Module names, fused projections, tied or grouped attention: whatever the family, the
    default selection converts its blocks' linears and stock ``from_pretrained`` gives back
    the same outputs."""
    auto_name, names = FAMILIES[model_type]
    auto_cls = getattr(transformers, auto_name)
    config = transformers.AutoConfig.for_model(
        model_type, **{**dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                              vocab_size=100, max_position_embeddings=64, pad_token_id=0), **names})
    torch.manual_seed(0)
    model = auto_cls.from_config(config).eval()
    report = monarchify.convert(model, MonarchConfig(nblocks=2))
    assert len(report.layers) >= 6
    batch = inputs(100)
    if model_type == "t5":
        batch["decoder_input_ids"] = batch["input_ids"][:, :5]
    expected = first_output(model, batch)
    monarchify.save(model, tmp_path / "out", report=report)
    loaded = auto_cls.from_pretrained(tmp_path / "out").eval()
    assert sum(isinstance(m, MonarchLinear) for m in loaded.modules()) == len(report.layers)
    assert torch.equal(first_output(loaded, batch), expected)
    assert [layer.name for layer in monarchify.read_report(tmp_path / "out").layers] == [layer.name for layer in report.layers]


def test_loaded_factors_own_aligned_memory(tmp_path):
    """A memory-mapped safetensors file leaves tensors at arbitrary offsets; the CPU product
    would copy such factors on every call, so loading copies them once to aligned memory."""
    model = tiny_llama()
    monarchify.convert(model, MonarchConfig(nblocks=4))
    monarchify.save(model, tmp_path / "out")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    params = [p for m in loaded.modules() if isinstance(m, MonarchLinear) for p in m.parameters()]
    assert params and all(p.data_ptr() % 64 == 0 for p in params)
