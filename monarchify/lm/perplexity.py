"""Perplexity of a causal language model on plain text, in fixed windows.

The text is read whole (every line of every file, blank ones included, joined with newlines: the
way WikiText-2's test set is conventionally scored) and tokenised once, without special tokens.
It is cut into windows of ``window`` tokens that start every ``stride`` tokens; each window scores
only the tokens no earlier window scored, so with ``stride < window`` every scored token sees at
least ``window - stride`` tokens of context. A token needs something before it to be predicted:
without a BOS token the first token of the text (and, with non-overlapping windows, the first of
every window) is context only; with ``bos_id`` each window starts with that token and all its
tokens are scored.

Library code: ``monarchify eval`` calls it, and it knows nothing of the command line.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from monarchify.errors import ConfigError
from monarchify.model_inputs import is_causal_lm, position_limit
from monarchify.samples import model_device

DEFAULT_WINDOW = 256
"""Tokens per window. Perplexities are comparable only at equal windows; 256 is long enough that
most scored tokens have a paragraph of context, and short enough that a 135M model scores 32K
tokens in minutes on one CPU core (the cost grows linearly with the window at this length)."""


@dataclass(frozen=True)
class Window:
    """Text tokens ``[begin, end)`` go into the model; ``[first_scored, end)`` are scored."""

    begin: int
    end: int
    first_scored: int


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float
    """Mean negative log-likelihood per scored token, in nats."""
    tokens: int
    """Tokens scored."""
    windows: int
    window: int
    stride: int
    bos: bool
    text_tokens: int
    """Tokens of the text that went into the windows (after ``max_tokens``)."""
    seconds: float
    """Time spent running the model (not loading it or tokenising)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_text(paths: Sequence[str | os.PathLike[str]]) -> str:
    """Every line of every file, blank lines kept, joined with newlines."""
    if not paths:
        raise ConfigError("no text file given")
    lines: list[str] = []
    for raw in paths:
        path = Path(raw)
        if not path.is_file():
            raise ConfigError(f"text file '{path}' does not exist")
        try:
            lines.extend(path.read_text(encoding="utf-8-sig").splitlines())
        except UnicodeDecodeError:
            raise ConfigError(f"text file '{path}' is not UTF-8 text") from None
        except OSError as exc:
            raise ConfigError(f"cannot read text file '{path}': {exc.strerror or exc}") from None
    return "\n".join(lines) + "\n"


def tokenize_text(text: str, tokenizer: Any) -> torch.Tensor:
    """The text's token ids, one sequence, no special tokens (windows add the BOS themselves)."""
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def plan_windows(n: int, window: int, stride: int, *, bos: bool) -> list[Window]:
    """The windows over ``n`` tokens; the last one may be shorter. Every token but those with
    nothing before them is scored exactly once."""
    if window < 1 or not 1 <= stride <= window:
        raise ConfigError(f"window must be >= 1 and stride between 1 and window; got window {window}, stride {stride}",
                          field=("window", "stride"))
    if n < window:
        raise ConfigError(f"the text has {n} tokens, fewer than one window of {window}")
    windows, scored_to, begin = [], 0, 0
    while scored_to < n:
        end = min(begin + window, n)
        first = max(scored_to, begin if bos else begin + 1)
        windows.append(Window(begin, end, first))
        scored_to, begin = end, begin + stride
    return windows


def window_nll(model: nn.Module, ids: torch.Tensor, first_scored: int) -> torch.Tensor:
    """Summed negative log-likelihood, per row of ``ids`` (batch, length), of the tokens at
    positions ``first_scored`` onwards given those before them. Computed in float64 from
    float64 logits, else in float32."""
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits[:, first_scored - 1 : -1]
    targets = ids[:, first_scored:]
    # Row by row: a batch's logits span the vocabulary (200 MB for 4 windows of 256 tokens over
    # SmolLM2's 49,152), and a float copy plus a log-softmax of the whole batch tripled that.
    return torch.stack([
        nn.functional.cross_entropy(row if row.dtype == torch.float64 else row.float(), target, reduction="none").sum(dtype=torch.float64)
        for row, target in zip(logits, targets)
    ])


def perplexity(
    model: nn.Module,
    ids: torch.Tensor,
    *,
    window: int = DEFAULT_WINDOW,
    stride: int | None = None,
    bos_id: int | None = None,
    max_tokens: int | None = None,
    batch_size: int = 8,
    on_batch: Callable[[int, int], None] | None = None,
) -> PerplexityResult:
    """Perplexity of ``model`` on the token ids ``ids`` (one sequence) in windows of ``window``
    tokens every ``stride`` (default: ``window``, no overlap), the first ``max_tokens`` only when
    given, ``bos_id`` before every window when given. ``batch_size`` windows of equal length run
    together; ``on_batch(windows_done, windows_total)`` follows every batch."""
    if not is_causal_lm(model):
        raise ConfigError(f"{type(model).__name__} is not a causal language model; perplexity needs one (e.g. a *ForCausalLM)")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}", field="batch_size")
    if max_tokens is not None and max_tokens < 1:
        raise ConfigError(f"max_tokens must be >= 1, got {max_tokens}", field="max_tokens")
    stride = window if stride is None else stride
    ids = ids.reshape(-1)[:max_tokens]
    bos = bos_id is not None
    limit = position_limit(model)
    if limit is not None and window + bos > limit:
        raise ConfigError(f"a window of {window} tokens{' plus the BOS token' if bos else ''} is longer than the model's {limit} positions")
    windows = plan_windows(len(ids), window, stride, bos=bos)
    device = model_device(model)
    was_training = model.training
    model.eval()
    total, scored, done = 0.0, 0, 0
    start = time.perf_counter()
    try:
        for group in _batches(windows, batch_size):
            first = group[0]
            rows = torch.stack([ids[w.begin : w.end] for w in group])
            offset = first.first_scored - first.begin
            if bos:
                rows = torch.cat([torch.full((len(group), 1), bos_id, dtype=rows.dtype), rows], dim=1)
                offset += 1
            total += float(window_nll(model, rows.to(device), offset).sum())
            scored += len(group) * (first.end - first.first_scored)
            done += len(group)
            if on_batch is not None:
                on_batch(done, len(windows))
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - start
    nll = total / scored
    return PerplexityResult(perplexity=math.exp(nll), nll=nll, tokens=scored, windows=len(windows), window=window,
                            stride=stride, bos=bos, text_tokens=len(ids), seconds=seconds)


def _batches(windows: list[Window], size: int) -> list[list[Window]]:
    """Consecutive windows of the same shape (length and scored offset), at most ``size`` each:
    stacked without padding. Only the first window (no BOS) and the last can differ."""
    groups: list[list[Window]] = []
    for w in windows:
        shape = (w.end - w.begin, w.first_scored - w.begin)
        last = groups[-1] if groups else None
        if last and len(last) < size and (last[0].end - last[0].begin, last[0].first_scored - last[0].begin) == shape:
            last.append(w)
        else:
            groups.append([w])
    return groups


def bos_default(tokenizer: Any) -> bool:
    """Whether the tokenizer puts a BOS token before text on its own: the model then always saw
    one in use, and windows get it too unless told otherwise."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == bos


def evaluate_folder(
    folder: str | os.PathLike[str],
    texts: Sequence[str | os.PathLike[str]],
    *,
    bos: bool | None = None,
    device: torch.device | str = "cpu",
    on_loaded: Callable[[], None] | None = None,
    **options: Any,
) -> PerplexityResult:
    """:func:`perplexity` of the model in ``folder`` (dense or Monarch) on the text files
    ``texts``, tokenised with the folder's tokenizer. ``bos=None`` follows the tokenizer
    (:func:`bos_default`). The text is read first, so a missing file fails before the load."""
    from monarchify.hf.loading import load_model, load_tokenizer

    text = read_text(texts)
    model = load_model(folder)
    if not is_causal_lm(model):
        raise ConfigError(f"'{folder}' holds a {type(model).__name__}, not a causal language model; perplexity needs one (e.g. a *ForCausalLM)")
    tokenizer = load_tokenizer(folder)
    if tokenizer is None:
        raise ConfigError(f"'{folder}' has no tokenizer files; perplexity needs the model's tokenizer")
    bos = bos_default(tokenizer) if bos is None else bos
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos and bos_id is None:
        raise ConfigError(f"the tokenizer of '{folder}' has no BOS token to put before each window")
    if on_loaded is not None:
        on_loaded()
    return perplexity(model.to(device), tokenize_text(text, tokenizer), bos_id=bos_id if bos else None, **options)
