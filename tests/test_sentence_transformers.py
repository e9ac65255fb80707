"""sentence-transformers exports: ``config.json`` names the pre-training class (here
``BertForMaskedLM``) while the weights are the base model's. They convert as the base model
they are, and the written folders are still sentence-transformers models."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_bert
from monarchify.cli.app import main
from monarchify.config import MonarchConfig
from monarchify.hf.convert import convert_pretrained
from monarchify.hf.densify import densify_folder
from monarchify.hf.loading import load_model

POOLING = {"word_embedding_dimension": 48, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True,
           "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False}
MODULES = [
    {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
    {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
]
KEPT = ["modules.json", "sentence_bert_config.json", "config_sentence_transformers.json", "1_Pooling/config.json"]


@pytest.fixture
def st_export(tmp_path, bert_tokenizer):
    """The layout sentence-transformers writes, by hand: the base BertModel's weights, a config
    naming BertForMaskedLM, the pooling module and the package's own files."""
    folder = tmp_path / "st-export"
    model = tiny_bert(vocab_size=len(bert_tokenizer))
    model.save_pretrained(folder)
    bert_tokenizer.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["BertForMaskedLM"]
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(POOLING))
    (folder / "modules.json").write_text(json.dumps(MODULES))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 32, "do_lower_case": False}))
    (folder / "config_sentence_transformers.json").write_text(json.dumps({"__version__": {"sentence_transformers": "2.0.0"}}))
    (folder / "README.md").write_text("# tiny\nScores of the original model.\n")
    return folder, model


def _kept_as_is(source, out):
    for name in KEPT:
        assert (out / name).read_bytes() == (source / name).read_bytes(), name
    assert not (out / "README.md").exists()  # the card describes the original model's scores


def test_convert_loads_the_base_model_says_so_and_keeps_the_sentence_transformers_files(st_export, tmp_path, capsys):
    source, dense = st_export
    capsys.readouterr()
    code = main(["convert", str(source), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 0, err
    said = " ".join(err.split())  # the terminal may wrap the note
    assert said.count("note: sentence-transformers export: loading the base model (BertModel), not the BertForMaskedLM") == 1
    out = tmp_path / "out"
    _kept_as_is(source, out)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["BertModel"]
    converted = load_model(out)
    assert type(converted).__name__ == "BertModel"
    # The base model's own weights were converted (not a freshly initialised one): the first
    # layer's query, multiplied back out, is close to the dense one.
    name = "encoder.layer.0.attention.self.query"
    dense_w = dense.get_submodule(name).weight
    monarch_w = converted.get_submodule(name).to_dense()
    assert (monarch_w - dense_w).norm() < dense_w.norm()
    assert torch.equal(converted.embeddings.word_embeddings.weight, dense.embeddings.word_embeddings.weight)


def test_the_converted_folder_is_still_a_sentence_transformers_model(st_export, tmp_path):
    st = pytest.importorskip("sentence_transformers")
    source, _ = st_export
    result = convert_pretrained(source, tmp_path / "out", MonarchConfig(nblocks=4), check=False)
    encoder = st.SentenceTransformer(str(tmp_path / "out"), device="cpu")
    embeddings = encoder.encode(["the quick brown fox", "a lazy dog"], convert_to_tensor=True)
    # Mean pooling over the converted model's token states, computed here by hand.
    batch = encoder.tokenize(["the quick brown fox", "a lazy dog"])
    with torch.no_grad():
        states = result.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[0]
    mask = batch["attention_mask"].unsqueeze(-1).float()
    torch.testing.assert_close(embeddings, (states * mask).sum(1) / mask.sum(1), rtol=1e-5, atol=1e-6)


def test_streaming_and_densify_keep_them_too(st_export, tmp_path):
    source, _ = st_export
    convert_pretrained(source, tmp_path / "streamed", MonarchConfig(nblocks=4), stream=True)
    _kept_as_is(source, tmp_path / "streamed")
    assert json.loads((tmp_path / "streamed" / "config.json").read_text())["architectures"] == ["BertModel"]
    densify_folder(tmp_path / "streamed", tmp_path / "dense")
    for name in KEPT:
        assert (tmp_path / "dense" / name).read_bytes() == (source / name).read_bytes(), name
    assert type(load_model(tmp_path / "dense")).__name__ == "BertModel"


def test_a_plain_folder_missing_its_head_is_still_refused(st_export):
    """Only the sentence-transformers layout is loaded as its base model: without modules.json
    the same folder is a BertForMaskedLM missing its head."""
    source, _ = st_export
    (source / "modules.json").unlink()
    with pytest.raises(Exception, match="has no weights for"):
        load_model(source)
