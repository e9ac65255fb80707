"""Text samples for the steps that run a model on real text (calibration, healing): read them
from a file or dataset, and turn them into model inputs.

Sources:

* a text file: one sample per non-empty line;
* a ``.tsv`` file (GLUE layout): the text columns become the sample; two text columns (a
  sentence pair, as in MRPC) are tokenised as a pair, the way the model sees them when
  fine-tuned. Read with quoting disabled (GLUE fields contain unbalanced quotes) and the
  UTF-8 byte-order mark stripped;
* a folder written by ``datasets``' ``save_to_disk``, or ``hf:NAME[:CONFIG[:SPLIT]]`` for a
  Hub dataset (needs the network): the string columns, known names first.

Samples are taken in source order: the first ``samples`` are used (to fit a projection, or
to heal), the next ``heldout`` measure the result on text it did not see. Anything wrong with
the source is a one-line :class:`SampleError`, raised before any model is loaded.

Torch is imported only by :func:`tokenize`, so reading and checking a source stays cheap.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from monarchify.errors import ConfigError, MonarchifyError
from monarchify.tsv import tsv_rows

if TYPE_CHECKING:
    import torch

Sample = str | tuple[str, str]

DEFAULT_SAMPLES = 256
DEFAULT_MAX_LENGTH = 128
# Header names of text columns in GLUE/SuperGLUE-style files and common datasets.
TEXT_COLUMNS = (
    "sentence", "sentence1", "sentence2", "question", "question1", "question2", "#1 string",
    "#2 string", "text", "text_a", "text_b", "premise", "hypothesis", "passage", "content",
)
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class SampleError(ConfigError):
    """Text samples that cannot be used (missing, empty, no text columns...)."""


def default_heldout(samples: int) -> int:
    """Held-out samples measured next to ``samples`` fitted: a quarter, at least one."""
    return max(1, samples // 4)


def samples_for_tokens(lengths: list[int], start: int, tokens: int) -> int:
    """How many samples to fit so that they hold ``tokens`` tokens: ``start``, doubled until
    the first that many of ``lengths`` (tokens per sample, in source order) sum to ``tokens``,
    or all of them. Doubling keeps the counts to the few one would try by hand, so a size
    chosen here is one that can be asked for again with ``samples``."""
    n = _check_count(start, "calibration samples")
    while n < len(lengths) and sum(lengths[:n]) < tokens:
        n *= 2
    return min(n, len(lengths)) if lengths else n


@dataclass
class TextSamples:
    source: str
    kind: str
    """``text``, ``tsv`` or ``dataset``."""
    columns: list[str]
    fit: list[Sample]
    heldout: list[Sample]

    def describe(self) -> dict[str, Any]:
        """What the recorded recipe says about the data (enough to repeat it)."""
        return {
            "source": self.source, "kind": self.kind, "columns": self.columns,
            "samples": len(self.fit), "heldout": len(self.heldout),
        }


# --- reading ------------------------------------------------------------------------------


def _check_count(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SampleError(f"{what} must be a positive integer, got {value!r}", field=what if what.isidentifier() else None)
    return value


def _words(value: str) -> bool:
    """Looks like natural-language text: two or more words and a letter (IDs, labels and
    numbers do not)."""
    return len(value.split()) >= 2 and any(ch.isalpha() for ch in value)


def _text_columns_by_content(rows: list[list[str]]) -> list[int]:
    if not rows:
        return []
    width = max(len(row) for row in rows)
    found = []
    for col in range(width):
        values = [row[col] for row in rows if col < len(row)]
        if values and sum(_words(v) for v in values) >= 0.8 * len(rows):
            found.append(col)
    return found[:2]


def _read_tsv(path: Path, wanted: int) -> tuple[list[str], list[Sample]]:
    """Text columns (by header name, else by the content of the first 50 rows) and up to
    ``wanted`` samples, streamed (a large file is not read past what is needed)."""
    with tsv_rows(path) as reader:
        rows = list(itertools.islice((row for row in reader if any(cell.strip() for cell in row)), 51))
        if not rows:
            raise SampleError(f"data file '{path}' is empty")
        header = [cell.strip().lower() for cell in rows[0]]
        columns = [i for i, name in enumerate(header) if name in TEXT_COLUMNS][:2]
        if columns:
            names, body = [rows[0][i].strip() for i in columns], rows[1:]
        else:
            columns = _text_columns_by_content(rows[1:] or rows)
            if not columns:
                raise SampleError(
                    f"'{path}' has no text columns (no header named {', '.join(TEXT_COLUMNS[:4])}..., "
                    "and no column of sentences)"
                )
            starts_with_header = not any(_words(rows[0][i]) for i in columns if i < len(rows[0]))
            names, body = [f"column {i + 1}" for i in columns], rows[1:] if starts_with_header else rows
        samples: list[Sample] = []
        for row in itertools.chain(body, reader):
            if len(samples) >= wanted:
                break
            if len(row) <= max(columns):
                continue
            texts = [row[i].strip() for i in columns]
            if all(texts):
                samples.append(texts[0] if len(texts) == 1 else (texts[0], texts[1]))
    return names, samples


def _read_lines(path: Path, wanted: int) -> list[Sample]:
    samples: list[Sample] = []
    with path.open(encoding="utf-8-sig") as handle:
        for line in handle:
            if line.strip():
                samples.append(line.strip())
                if len(samples) >= wanted:
                    break
    return samples


def _dataset_columns(dataset: Any) -> list[str]:
    strings = [name for name, feat in dataset.features.items() if getattr(feat, "dtype", None) == "string"]
    known = [name for name in strings if name.lower() in TEXT_COLUMNS]
    return (known or strings)[:2]


def _load_dataset(source: str) -> Any:
    try:
        import datasets
    except ImportError:
        raise SampleError("reading a dataset needs the 'datasets' package (pip install datasets)") from None
    try:
        if source.startswith("hf:"):
            parts = source[3:].split(":")
            if not parts[0] or len(parts) > 3:
                raise SampleError(f"'{source}': expected hf:NAME[:CONFIG[:SPLIT]]")
            name, config, split = (parts + [None, None])[:3]
            return datasets.load_dataset(name, config or None, split=split or "train")
        loaded = datasets.load_from_disk(source)
    except MonarchifyError:
        raise
    except Exception as exc:  # datasets raises many types (network, missing files, bad config)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        hint = " (is the Hugging Face Hub reachable?)" if source.startswith("hf:") else ""
        raise SampleError(f"could not load dataset '{source}'{hint}: {first}") from None
    if isinstance(loaded, datasets.DatasetDict):
        split = "train" if "train" in loaded else next(iter(loaded), None)
        if split is None:
            raise SampleError(f"dataset '{source}' has no splits")
        loaded = loaded[split]
    return loaded


def _read_dataset(source: str, wanted: int) -> tuple[list[str], list[Sample]]:
    dataset = _load_dataset(source)
    columns = _dataset_columns(dataset)
    if not columns:
        raise SampleError(f"dataset '{source}' has no text (string) columns")
    samples: list[Sample] = []
    for row in dataset.select_columns(columns):
        texts = [str(row[c] or "").strip() for c in columns]
        if all(texts):
            samples.append(texts[0] if len(texts) == 1 else (texts[0], texts[1]))
            if len(samples) >= wanted:
                break
    return columns, samples


def read_samples(
    source: str | os.PathLike[str], samples: int = DEFAULT_SAMPLES, heldout: int | None = None
) -> TextSamples:
    """Read ``samples`` fitting samples and ``heldout`` more (default: a quarter) from ``source``.

    With fewer samples available, a fifth of what there is (at least one) is held out; a
    source needs at least two samples.
    """
    _check_count(samples, "samples")
    heldout = default_heldout(samples) if heldout is None else _check_count(heldout, "held-out samples")
    text = os.fspath(source)
    path = Path(text).expanduser()
    wanted = samples + heldout
    try:
        if text.startswith("hf:") or path.is_dir():
            kind = "dataset"
            columns, found = _read_dataset(text, wanted)
        elif not path.exists():
            raise SampleError(f"data file '{text}' does not exist")
        elif path.suffix.lower() == ".tsv":
            kind = "tsv"
            columns, found = _read_tsv(path, wanted)
        else:
            kind, columns = "text", ["line"]
            found = _read_lines(path, wanted)
    except UnicodeDecodeError:
        raise SampleError(f"data file '{text}' is not UTF-8 text") from None
    except OSError as exc:
        raise SampleError(f"cannot read data file '{text}': {exc.strerror or exc}") from None
    return split_samples(found, samples, heldout, source=text, kind=kind, columns=columns)


def split_samples(
    found: list[Sample], samples: int, heldout: int | None = None, *, source: str, kind: str = "list",
    columns: list[str] | None = None,
) -> TextSamples:
    """The first ``samples`` of ``found`` to use and the next ``heldout`` (default: a quarter)
    to measure on; with fewer available, a fifth of them (at least one) is held out."""
    _check_count(samples, "samples")
    heldout = default_heldout(samples) if heldout is None else _check_count(heldout, "held-out samples")
    if not found:
        raise SampleError(f"data source '{source}' has no samples (it is empty or has only blank rows)")
    if len(found) < 2:
        raise SampleError(
            f"data source '{source}' has only 1 sample; at least 2 are needed (some are held out "
            "to measure the result)"
        )
    wanted = samples + heldout
    if len(found) < wanted:
        heldout = max(1, len(found) // 5)
    fit = found[: len(found) - heldout] if len(found) < wanted else found[:samples]
    return TextSamples(source, kind, columns or ["text"], fit, found[len(fit) : len(fit) + heldout])


# --- feeding the model ----------------------------------------------------------------------


def tokenize(
    samples: list[Sample], tokenizer: Any, *, batch_size: int = 32, max_length: int = DEFAULT_MAX_LENGTH
) -> list[dict[str, torch.Tensor]]:
    """Padded batches of model inputs; one sample per batch when the tokenizer cannot pad."""
    if tokenizer is None:
        raise SampleError("running the model on text needs its tokenizer, and the model folder has none")
    if getattr(tokenizer, "pad_token", None) is None:
        batch_size = 1
    batches = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        pairs = [s if isinstance(s, tuple) else (s, None) for s in chunk]
        first = [a for a, _ in pairs]
        second = [b for _, b in pairs] if all(b is not None for _, b in pairs) else None
        encoded = tokenizer(
            first, second, truncation=True, max_length=max_length, padding=len(chunk) > 1, return_tensors="pt"
        )
        batches.append({k: v for k, v in encoded.items() if k in MODEL_INPUTS})
    _check_unknown(batches, tokenizer)
    return batches


def _check_unknown(batches: list[dict[str, torch.Tensor]], tokenizer: Any, limit: float = 0.5) -> None:
    """Refuse text that is mostly ``[UNK]`` tokens: a model folder without tokenizer files
    (transformers then builds an empty one) or a tokenizer for another language."""
    import torch

    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None:
        return
    special = torch.tensor(sorted(set(getattr(tokenizer, "all_special_ids", [])) - {unk}), dtype=torch.long)
    unknown = words = 0
    for batch in batches:
        ids = batch["input_ids"]
        real = batch["attention_mask"].bool() if "attention_mask" in batch else torch.ones_like(ids, dtype=torch.bool)
        real &= ~torch.isin(ids, special)
        unknown += int((ids[real] == unk).sum())
        words += int(real.sum())
    if words and unknown > limit * words:
        raise SampleError(
            f"the tokenizer maps {unknown / words:.0%} of the tokens to its unknown token; "
            "does the model folder lack its tokenizer files, or is the data in another language?"
        )


def model_device(model: Any) -> torch.device:
    """Where ``model``'s parameters live: batches are moved there before a forward pass."""
    import torch

    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")
