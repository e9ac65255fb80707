"""Dense vs Monarch timing of whole models: inference, a training step, and for a causal
language model prefill and decoding, on the current device.

With the Hugging Face code because it loads folders and drives ``generate``; the timing itself
(round-robin, medians, the environment) is :mod:`monarchify.bench`, which the pipeline's speed
gate uses too. Plain library code: the ``monarchify bench model`` command and the scripts in
``benchmarks/`` call it.
"""

from __future__ import annotations

import copy
import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from monarchify.bench import Stat, calls, compare, environment, pair, resolve_device
from monarchify.errors import ConfigError
from monarchify.model_inputs import is_causal_lm, position_limit, random_inputs
from monarchify.monarch import STRUCTURED_LAYERS, LowRankLinear
from monarchify.pipeline.densify import densify_


def densified(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every Monarch (or low-rank) layer multiplied out into the dense
    layer it replaced (:func:`~monarchify.pipeline.densify.densify_`, what ``densify`` and the
    switch to dense use): the dense model a Monarch checkpoint competes with (same
    architecture, same numbers)."""
    dense = copy.deepcopy(model)
    densify_(dense)
    return dense


def model_pair(model: nn.Module, nblocks: int = 4) -> tuple[nn.Module, nn.Module]:
    """``(dense, monarch)`` versions of ``model``: multiplied out if it already has converted
    layers (Monarch or the low-rank baseline), else converted (the default selection) at
    ``nblocks``."""
    from monarchify.config import MonarchConfig
    from monarchify.pipeline import convert

    if any(isinstance(m, STRUCTURED_LAYERS) for m in model.modules()):
        return densified(model), model
    monarch = copy.deepcopy(model)
    convert(monarch, MonarchConfig(nblocks=nblocks))
    return model, monarch


def _sample_inputs(model: nn.Module, batch: int, seq_len: int, device: torch.device, seed: int) -> dict[str, torch.Tensor]:
    """A random batch of what the model reads (:func:`~monarchify.model_inputs.random_inputs`),
    with labels for classifiers so a training step has a loss."""
    inputs = random_inputs(model, batch, seq_len, seed)
    config = getattr(model, "config", None)
    labels = getattr(config, "num_labels", None)
    if labels and type(model).__name__.endswith(("ForSequenceClassification", "ForImageClassification")):
        inputs["labels"] = torch.randint(0, labels, (batch,), generator=torch.Generator().manual_seed(seed + 1))
    return {name: tensor.to(device) for name, tensor in inputs.items()}


def _loss(output: Any) -> torch.Tensor:
    loss = getattr(output, "loss", None)
    if loss is not None:
        return loss
    first = output[0] if isinstance(output, (tuple, list)) else next(iter(output.values()))
    return first.float().square().mean()


DECODE_PROMPT_TOKENS = 8
"""The prompt before decoding: short, so the timing is the new tokens' (its prefill is one
forward pass over 8 tokens, about what one decoding step costs on a CPU)."""


@dataclass(frozen=True)
class Generation:
    """What to time of a causal language model: prefill of ``prompt_tokens`` and greedy decoding
    of ``new_tokens`` with the KV cache, each at every batch size of ``batches``."""

    prompt_tokens: int = 128
    new_tokens: int = 32
    batches: tuple[int, ...] = (1, 8)

    def check(self, model: nn.Module) -> None:
        if self.prompt_tokens < 1 or self.new_tokens < 1 or not self.batches or min(self.batches) < 1:
            raise ConfigError("prompt_tokens, new_tokens and every generation batch must be >= 1")
        limit = position_limit(model)
        if limit is not None and self.prompt_tokens > limit:
            raise ConfigError(f"a prompt of {self.prompt_tokens} tokens (prompt_tokens) is longer than the model's {limit} positions")
        if limit is not None and DECODE_PROMPT_TOKENS + self.new_tokens > limit:
            raise ConfigError(f"decoding {self.new_tokens} tokens (new_tokens) after a prompt of {DECODE_PROMPT_TOKENS} is "
                              f"longer than the model's {limit} positions")


def _throughput(dense: Stat, monarch: Stat, batch: int, tokens: int) -> dict[str, float]:
    """A pair of timings with the tokens per second they mean; ``ratio`` (dense time ÷ Monarch
    time) is also Monarch's tokens per second ÷ dense's."""
    row = {"batch": batch, "tokens": tokens, **pair(dense, monarch)}
    row["dense_tokens_per_s"] = tokens / (dense.median / 1e3)
    row["monarch_tokens_per_s"] = tokens / (monarch.median / 1e3)
    return row


def _generation_stages(models: dict[str, nn.Module], generation: Generation, device: torch.device, seed: int,
                       time_stage: Callable[..., dict[str, Stat]]) -> dict[str, list[dict[str, float]]]:
    """Prefill (one forward pass over the prompt, filling the KV cache, as ``generate`` makes
    it) and decoding
    (``generate``, greedy, exactly ``new_tokens`` per sequence) at each batch size."""
    dense = models["dense"]
    pad = getattr(dense.config, "pad_token_id", None)
    if pad is None:  # never used (no sequence is padded), but generate asks for one
        eos = getattr(dense.config, "eos_token_id", None)
        pad = (eos[0] if isinstance(eos, list) else eos) if eos is not None else 0
    result: dict[str, list[dict[str, float]]] = {"prefill": [], "decode": []}
    # As generate() runs it: logits for the last position only, where the model can (computing
    # them for the whole prompt is vocabulary x prompt of work no user waits for).
    last_only = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(dense.forward).parameters else {}
    for batch in generation.batches:
        prompt = random_inputs(dense, batch, generation.prompt_tokens, seed)["input_ids"].to(device)

        def prefill(model: nn.Module) -> Callable[[], Any]:
            def run() -> Any:
                with torch.no_grad():
                    return model(input_ids=prompt, use_cache=True, **last_only)

            return run

        stats = time_stage({name: prefill(m) for name, m in models.items()}, f"prefill, batch {batch}")
        result["prefill"].append(_throughput(stats["dense"], stats["monarch"], batch, batch * generation.prompt_tokens))

        start = random_inputs(dense, batch, DECODE_PROMPT_TOKENS, seed)["input_ids"].to(device)
        produced: set[int] = set()

        def decode(model: nn.Module) -> Callable[[], Any]:
            def run() -> Any:
                with torch.no_grad():
                    out = model.generate(
                        input_ids=start, attention_mask=torch.ones_like(start), do_sample=False, use_cache=True,
                        max_new_tokens=generation.new_tokens, min_new_tokens=generation.new_tokens, pad_token_id=pad,
                    )
                produced.add(out.shape[1] - start.shape[1])
                return out

            return run

        stats = time_stage({name: decode(m) for name, m in models.items()}, f"decode, batch {batch}")
        if produced != {generation.new_tokens}:  # tokens per second would count tokens never made
            raise ConfigError(f"generation made {sorted(produced)} new tokens per sequence, not {generation.new_tokens}")
        row = _throughput(stats["dense"], stats["monarch"], batch, batch * generation.new_tokens)
        row["new_tokens_per_sequence"] = generation.new_tokens
        result["decode"].append(row)
    return result


def models_benchmark(
    dense: nn.Module,
    monarch: nn.Module,
    *,
    batch: int = 8,
    seq_len: int = 128,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = "auto",
    train: bool = True,
    generation: Generation | None = Generation(),
    warmup: int = 3,
    repeat: int = 10,
    seed: int = 0,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]:
    """Inference (eval, no autograd) and one training step (forward, backward, AdamW) of two
    models on the same random batch; for a causal language model also prefill and decoding
    speed (``generation``; ``None``: not timed). ``progress(stage, calls_done, calls_total)``
    follows every timed or untimed call."""
    device = resolve_device(device) if not isinstance(device, torch.device) else device
    if batch < 1 or seq_len < 1:
        raise ConfigError("batch and seq_len must be >= 1")
    if generation is not None and not is_causal_lm(dense):
        generation = None
    if generation is not None:
        generation.check(dense)
    stages = 1 + train + (2 * len(generation.batches) if generation else 0)
    total, done = stages * calls(2, warmup, repeat), [0]

    def time_stage(fns: dict[str, Callable[[], Any]], stage: str) -> dict[str, Stat]:
        def on_call() -> None:
            done[0] += 1
            if progress is not None:
                progress(stage, done[0], total)

        return compare(fns, device, warmup=warmup, repeat=repeat, on_call=on_call)
    models = {"dense": dense.to(device=device, dtype=dtype), "monarch": monarch.to(device=device, dtype=dtype)}
    inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in _sample_inputs(dense, batch, seq_len, device, seed).items()}
    forward_inputs = {k: v for k, v in inputs.items() if k != "labels"}

    def infer(model: nn.Module) -> Callable[[], Any]:
        def run() -> Any:
            with torch.no_grad():
                return model(**forward_inputs)

        return run

    for model in models.values():
        model.eval()
    result: dict[str, Any] = {
        "config": {"batch": batch, "seq_len": seq_len, "dtype": str(dtype).removeprefix("torch."), "warmup": warmup, "repeat": repeat},
        "environment": environment(device),
        "model": type(dense).__name__,
        "params": {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()},
        "monarch_layers": sum(isinstance(m, STRUCTURED_LAYERS) for m in monarch.modules()),  # (or low-rank ones)
        "structure": _structure(monarch),
    }
    if generation is not None:
        result["config"]["generation"] = {"prompt_tokens": generation.prompt_tokens, "new_tokens": generation.new_tokens,
                                          "decode_prompt_tokens": DECODE_PROMPT_TOKENS, "batches": list(generation.batches)}
    stats = time_stage({name: infer(m) for name, m in models.items()}, "inference")
    result["inference"] = pair(stats["dense"], stats["monarch"])
    if generation is not None:  # before training, which changes the weights and the mode
        result.update(_generation_stages(models, generation, device, seed, time_stage))
    if train:
        steps = {}
        for name, model in models.items():
            model.train()
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

            def step(model: nn.Module = model, optimizer: torch.optim.Optimizer = optimizer) -> None:
                _loss(model(**inputs)).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            steps[name] = step
        stats = time_stage(steps, "training step")
        result["train_step"] = pair(stats["dense"], stats["monarch"])
    return result


def _structure(model: nn.Module) -> str:
    """The word for the converted layers, so a low-rank folder is not reported as Monarch (the
    JSON keys stay `monarch` for the converted side whatever its structure)."""
    lowrank = [isinstance(m, LowRankLinear) for m in model.modules() if isinstance(m, STRUCTURED_LAYERS)]
    if lowrank and all(lowrank):
        return "low rank"
    return "Monarch and low rank" if any(lowrank) else "Monarch"


def model_benchmark(folder: str | os.PathLike[str], *, nblocks: int = 4, **kwargs: Any) -> dict[str, Any]:
    """:func:`models_benchmark` for a model folder: a dense checkpoint is converted at
    ``nblocks`` in memory; a converted checkpoint (Monarch or low rank) is compared with its
    multiplied-out twin."""
    from monarchify.hf.loading import load_model

    model = load_model(folder)
    checkpoint_is_monarch = any(isinstance(m, STRUCTURED_LAYERS) for m in model.modules())
    dense, monarch = model_pair(model, nblocks)
    result = models_benchmark(dense, monarch, **kwargs)
    result["source"] = os.fspath(folder)
    result["config"]["nblocks"] = None if checkpoint_is_monarch else nblocks
    result["config"]["converted_in_memory"] = not checkpoint_is_monarch
    return result
