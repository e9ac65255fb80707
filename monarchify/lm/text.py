"""Text for language-model training: lines from text or TSV files, a held-out part, a tokenizer,
and fixed-length blocks of token ids.

Lines are documents. The held-out part is every k-th line rather than the file's tail, so that a
file made of several sources (SST-2 then MRPC, say) is evaluated on all of them. Token ids are
concatenated with a separator between documents and cut into ``block_size`` blocks (no
padding: every position of every block is trained on).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from monarchify.errors import ConfigError
from monarchify.samples import TEXT_COLUMNS
from monarchify.tsv import tsv_rows

TSV_SUFFIXES = (".tsv", ".tab")


@dataclass
class Lines:
    """The documents of a run, split, with where they came from."""

    train: list[str]
    heldout: list[str]
    sources: list[str]


def _tsv_lines(path: Path, columns: Sequence[str]) -> list[str]:
    with tsv_rows(path) as reader:
        header = next(reader, None)
        if header is None:
            raise ConfigError(f"text file '{path}' is empty")
        names = [cell.strip().lower() for cell in header]
        wanted = [c.lower() for c in columns] or [n for n in names if n in TEXT_COLUMNS]
        missing = [c for c in wanted if c not in names]
        if missing or not wanted:
            what = f"has no column {missing[0]!r}" if missing else "has no text column (e.g. 'sentence')"
            raise ConfigError(f"TSV file '{path}' {what}; its columns: {', '.join(h.strip() for h in header)}")
        index = [names.index(c) for c in wanted]
        lines = []
        for row in reader:
            for i in index:
                if i < len(row) and row[i].strip():
                    lines.append(row[i].strip())
    return lines


def _plain_lines(path: Path) -> list[str]:
    with path.open(encoding="utf-8-sig") as handle:
        return [line.strip() for line in handle if line.strip()]


def read_lines(paths: Sequence[str | os.PathLike[str]], columns: Sequence[str] = (), *, max_lines: int | None = None,
               eval_fraction: float = 0.05) -> Lines:
    """Every non-empty line (or TSV cell of the text columns) of ``paths``, in order, cut to
    ``max_lines``, with every ``round(1/eval_fraction)``-th one held out."""
    lines: list[str] = []
    for raw in paths:
        path = Path(raw)
        if not path.is_file():
            raise ConfigError(f"text file '{path}' does not exist")
        tsv = path.suffix.lower() in TSV_SUFFIXES
        if columns and not tsv:
            raise ConfigError(f"text columns were given but '{path}' is not a TSV file (.tsv)")
        try:
            found = _tsv_lines(path, columns) if tsv else _plain_lines(path)
        except UnicodeDecodeError:
            raise ConfigError(f"text file '{path}' is not UTF-8 text") from None
        except OSError as exc:
            raise ConfigError(f"cannot read text file '{path}': {exc.strerror or exc}") from None
        lines.extend(found)
    lines = lines[:max_lines] if max_lines is not None else lines
    every = max(2, round(1 / eval_fraction))
    heldout = lines[every - 1 :: every]
    train = [line for i, line in enumerate(lines) if (i + 1) % every]
    if not train or not heldout:
        raise ConfigError(f"too little text: {len(lines)} lines give no held-out part (need at least {every})")
    return Lines(train, heldout, [str(p) for p in paths])


SPECIAL_TOKENS = {
    "causal": {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"},
    "masked": {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]", "mask_token": "[MASK]"},
}


def train_tokenizer(lines: Sequence[str], vocab_size: int, objective: str) -> Any:
    """A byte-level BPE tokenizer learned on ``lines`` (never an unknown token), with the
    special tokens the objective needs, as a ``PreTrainedTokenizerFast``.

    Why learn one: no tokenizer can be downloaded here, and a small vocabulary learned on the
    training text keeps the embedding and the output layer from dominating a small model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = SPECIAL_TOKENS[objective]
    tokens = list(dict.fromkeys(special.values()))
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=tokens, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator(lines, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, **special)


def separator_id(tokenizer: Any) -> int:
    """The token put between documents: end-of-text for a causal model, [SEP] for a masked one."""
    for token in (tokenizer.eos_token, tokenizer.sep_token):
        if token is not None:
            return int(tokenizer.convert_tokens_to_ids(token))
    raise ConfigError("the tokenizer has neither an end-of-text nor a separator token to put between documents")


def pack(lines: Sequence[str], tokenizer: Any, block_size: int, *, batch: int = 1000) -> torch.Tensor:
    """``(n_blocks, block_size)`` token ids: every line's ids, each followed by the separator,
    concatenated and cut into blocks (the incomplete last block is dropped)."""
    sep = separator_id(tokenizer)
    ids: list[int] = []
    for start in range(0, len(lines), batch):
        encoded = tokenizer(list(lines[start : start + batch]), add_special_tokens=False)["input_ids"]
        for row in encoded:
            ids.extend(row)
            ids.append(sep)
    n = len(ids) // block_size
    if n == 0:
        raise ConfigError(f"too little text: {len(ids)} tokens do not fill one block of {block_size}")
    return torch.tensor(ids[: n * block_size], dtype=torch.long).view(n, block_size)


class Blocks(torch.utils.data.Dataset):
    """Blocks of token ids as ``{"input_ids": ...}`` examples; ``labels`` too when fixed in
    advance (the held-out part of a masked run is masked once, so every evaluation scores the
    same positions)."""

    def __init__(self, ids: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        self.ids, self.labels = ids, labels

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = {"input_ids": self.ids[i]}
        if self.labels is not None:
            item["labels"] = self.labels[i]
        return item


class Collator:
    """Causal: labels are the inputs (the model shifts them). Masked: BERT's 15 % masking
    (80 % [MASK], 10 % random, 10 % kept), drawn per batch, unless the example brings its labels."""

    def __init__(self, tokenizer: Any, objective: str, mlm_probability: float) -> None:
        from transformers import DataCollatorForLanguageModeling

        self.objective = objective
        self.mlm = DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=mlm_probability) if objective == "masked" else None

    def __call__(self, examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        ids = torch.stack([e["input_ids"] for e in examples])
        if "labels" in examples[0]:
            return {"input_ids": ids, "labels": torch.stack([e["labels"] for e in examples])}
        if self.mlm is None:
            return {"input_ids": ids, "labels": ids.clone()}
        return self.mlm([{"input_ids": row} for row in ids])


def fixed_masking(ids: torch.Tensor, collator: Collator, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked inputs and labels for ``ids``, drawn once from ``seed`` (the global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        batch = collator([{"input_ids": row} for row in ids])
    return batch["input_ids"], batch["labels"]
