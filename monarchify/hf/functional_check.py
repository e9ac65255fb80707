"""The functional check of a conversion: the same inputs through the model before and after.

The layer report says how far each weight moved; this says how far the *outputs* moved, which
is what a user notices. It must never be the reason a conversion fails: a checkpoint whose
tokenizer is missing, broken or encodes a sentence to nothing still gets checked, on fixed
random token ids, and a model that does not read token ids at all (speech, vision) is
reported as not checked, with the reason.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from monarchify.model_inputs import position_limit, random_inputs
from monarchify.report import output_change

SAMPLE_SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "Monarch matrices replace dense weights with two block-diagonal factors.",
    "The company said its third-quarter profit rose 12 percent on strong demand.",
    "She did not think the film was as good as the book, but she enjoyed it anyway.",
    "Where is the nearest train station?",
)
RANDOM_TOKENS = 16
"""Length of the random token sequences used when the tokenizer cannot encode the sentences."""
_PASSED = ("input_ids", "attention_mask", "token_type_ids")


def sample_inputs(model: nn.Module, tokenizer: Any, sentences: tuple[str, ...] = SAMPLE_SENTENCES) -> tuple[list[dict[str, torch.Tensor]], str]:
    """Model inputs for the check and where they came from (``"tokenizer"`` or ``"random token ids"``).

    Returns no inputs (and the reason) for a model whose main input is not token ids.
    Encoder-decoder models get the same ids as decoder inputs, so both stacks are exercised.
    """
    config = getattr(model, "config", None)
    main_input = getattr(model, "main_input_name", "input_ids")
    vocab = getattr(config, "vocab_size", None)
    if main_input != "input_ids" or not vocab:
        return [], f"the model reads {main_input!r}, not token ids"
    source = "tokenizer"
    inputs = [_encoded(tokenizer, sentence) for sentence in sentences] if tokenizer is not None else []
    if not inputs or any(item is None for item in inputs):
        batch = random_inputs(model, len(sentences), min(RANDOM_TOKENS, position_limit(model) or RANDOM_TOKENS), seed=0)
        return [{name: tensor[i : i + 1] for name, tensor in batch.items()} for i in range(len(sentences))], "random token ids"
    if getattr(config, "is_encoder_decoder", False):
        inputs = [{**item, "decoder_input_ids": item["input_ids"]} for item in inputs]
    return inputs, source


def _encoded(tokenizer: Any, sentence: str) -> dict[str, torch.Tensor] | None:
    """The tokenizer's encoding of one sentence, or None if it fails or encodes to nothing."""
    try:
        encoded = tokenizer(sentence, return_tensors="pt")
        ids = encoded["input_ids"]
    except Exception:  # noqa: BLE001 - any tokenizer failure means "use random ids"
        return None
    if not isinstance(ids, torch.Tensor) or ids.numel() == 0:
        return None
    return {k: v for k, v in encoded.items() if k in _PASSED}


@torch.no_grad()
def sample_outputs(model: nn.Module, inputs: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
    """The model's first output (hidden states or logits) for each input, unpadded."""
    model.eval()
    device = next(model.parameters()).device
    outputs = []
    for item in inputs:
        result = model(**{k: v.to(device) for k, v in item.items()})
        first = result[0] if isinstance(result, (tuple, list)) else next(iter(result.values()))
        outputs.append(first.float().cpu())
    return outputs


def compare_outputs(dense: list[torch.Tensor], monarch: list[torch.Tensor], source: str) -> dict[str, Any]:
    """How far the converted model's outputs moved: max abs and relative Frobenius difference,
    cosine, and the cosine in words (:func:`monarchify.report.output_change`)."""
    a = torch.cat([t.flatten() for t in dense])
    b = torch.cat([t.flatten() for t in monarch])
    norm = float(a.norm())
    cosine = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
    return {
        "sentences": len(dense),
        "inputs": source,
        "max_abs_diff": float((a - b).abs().max()),
        "rel_diff": float((a - b).norm()) / norm if norm else 0.0,
        "cosine": cosine,
        "verdict": output_change(cosine),
    }


class FunctionalCheck:
    """Records the dense outputs before conversion and compares after.

    A dense model that cannot run on the sample inputs (some exotic signature) is recorded as
    not checked; once the dense model ran, a converted model that cannot is a real failure
    and raises.
    """

    def __init__(self, model: nn.Module, tokenizer: Any) -> None:
        self.inputs, self.source = sample_inputs(model, tokenizer)
        self.skipped: str | None = None if self.inputs else self.source
        self.before: list[torch.Tensor] | None = None
        if self.inputs:
            try:
                self.before = sample_outputs(model, self.inputs)
            except Exception as exc:  # noqa: BLE001 - the dense model's own signature problem
                first_line = (str(exc).splitlines() or [""])[0][:200]
                self.skipped = f"the dense model could not run on sample inputs ({type(exc).__name__}: {first_line})"

    def result(self, model: nn.Module) -> dict[str, Any]:
        if self.before is None:
            return {"skipped": self.skipped}
        return compare_outputs(self.before, sample_outputs(model, self.inputs), self.source)
