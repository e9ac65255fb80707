"""Healing text the dense model writes itself.

Healing pulls the student towards the teacher's next-token distribution, so any text will do as
long as it is text the teacher has an opinion on, and the more varied it is the less the student
learns one file instead of the teacher. A user's healing file is small (wikitext-2's validation
set is 250K tokens: two passes of a 600-step run), and the student then fits that file's articles
rather than the teacher at large. The teacher can write more, each window started from a few
tokens of the user's text so that it stays near that text's domain (data-free distillation of
LLMs, LLM-QAT, does the same).

What is sampled only chooses the *contexts*: at every position healing matches the teacher's whole
next-token distribution, whatever token came next. So the contexts should look like the text the
model will meet, and a small model sampled at temperature 1 does not write such text: one unlikely
token and it drifts into symbols and mixed scripts (SmolLM2-135M did within a window, from
WikiText prompts). Nucleus sampling (``TOP_P``) cuts those tails and keeps the text varied.

Sampling is reproducible: batch ``i`` samples under seed ``seed + i``, whatever came before.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

PROMPT_TOKENS = 8
"""Tokens of the user's text each written window starts from."""
TOP_P = 0.9
"""Each token is sampled from the smallest set of tokens holding this much of the probability."""


def prompts(windows: torch.Tensor, n: int, seed: int, length: int = PROMPT_TOKENS) -> torch.Tensor:
    """The first ``length`` tokens of ``n`` training windows, drawn evenly (with a seeded shuffle,
    repeating the windows when ``n`` exceeds them)."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.cat([torch.randperm(len(windows), generator=generator) for _ in range(-(-n // len(windows)))])[:n]
    return windows[order, :length]


@torch.no_grad()
def write_windows(
    model: nn.Module,
    starts: torch.Tensor,
    block_size: int,
    *,
    seed: int,
    batch_size: int = 64,
    top_p: float = TOP_P,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """``(len(starts), block_size)`` token windows: each row of ``starts`` continued by ``model``
    to ``block_size`` tokens, sampled from its next-token distribution cut to the nucleus ``top_p``.

    ``batch_size`` rows are written at once: on a CPU a batch of 64 writes about 1.7 times the
    tokens per second a batch of 16 does (SmolLM2-135M, one thread).

    The end-of-text token is never sampled either (every window is full: a window cut short would
    be padding that healing then skips)."""
    from transformers import GenerationConfig

    new = block_size - starts.shape[1]
    if new < 1:
        raise ValueError(f"windows of {block_size} tokens leave no room after {starts.shape[1]} prompt tokens")
    eos = model.config.eos_token_id
    ends = [eos] if isinstance(eos, int) else list(eos or [])  # Llama 3 has two: neither is sampled
    config = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=top_p, max_new_tokens=new, min_new_tokens=new,
                              pad_token_id=ends[0] if ends else 0, eos_token_id=ends or None)
    model.eval()
    device = next(model.parameters()).device
    written = []
    if progress is not None:
        progress(0, len(starts))  # the clock starts with the first batch, not after it
    for i, first in enumerate(range(0, len(starts), batch_size)):
        batch = starts[first: first + batch_size].to(device)
        torch.manual_seed(seed + i)
        out = model.generate(batch, attention_mask=torch.ones_like(batch), generation_config=config)
        written.append(out[:, :block_size].cpu())
        if progress is not None:
            progress(first + len(batch), len(starts))
    return torch.cat(written) if written else starts.new_zeros((0, block_size))


def save_windows(path: Path, windows: torch.Tensor, fingerprint: str) -> None:
    """``windows`` to a safetensors file, atomically (a stop while writing leaves no file)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    save_file({"windows": windows.contiguous()}, str(partial), metadata={"fingerprint": fingerprint})
    partial.replace(path)


def load_windows(path: Path, fingerprint: str) -> torch.Tensor | None:
    """The windows saved at ``path`` if they were written for ``fingerprint``, else None."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        if (f.metadata() or {}).get("fingerprint") != fingerprint:
            return None
        return f.get_tensor("windows")
