"""Stage 2, observe: run calibration text through the *dense* model and accumulate every
selected layer's input second-moment matrix ``XᵀX / N`` (only when the recipe calibrates).

The statistics are accumulated in float64 without keeping activations, and padded tokens
are left out (they are not part of any real input). Layers fed the same tensor in a forward
pass (query/key/value) share one accumulator. Memory is one ``d_in × d_in`` float64 matrix
per distinct input (~110 MB for all of BERT-base's encoder). Held-out samples get statistics
of their own: the project stage measures each layer's output error on them.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from monarchify.config import DEFAULT_MAX_LENGTH, CalibrationConfig
from monarchify.samples import SampleError, TextSamples, model_device, tokenize


@dataclass
class InputStatistics:
    """``XᵀX`` and row counts per distinct layer input, and which layers share an input."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    owner: dict[str, str] = field(default_factory=dict)
    """Layer name -> the name whose accumulator holds its input (itself unless shared)."""
    cross: dict[str, torch.Tensor] = field(default_factory=dict)
    """Sequential calibration only: ``X_dᵀX_c`` per input, the dense model's inputs ``X_d``
    against the inputs ``X_c`` of ``sums`` (what the converted earlier blocks produce)."""
    dense: dict[str, torch.Tensor] = field(default_factory=dict)
    """Sequential calibration only: ``X_dᵀX_d`` per input."""

    def _key(self, name: str) -> str:
        key = self.owner.get(name)
        if key is None or not self.counts.get(key):
            raise KeyError(f"no calibration statistics for layer '{name}' (did the forward pass reach it?)")
        return key

    def covariance(self, name: str) -> torch.Tensor:
        key = self._key(name)
        return self.sums[key] / self.counts[key]

    def cross_covariances(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(C_dd, C_dc)`` when the layer's inputs differ from the dense model's, else None."""
        key = self._key(name)
        if key not in self.cross:
            return None
        return self.dense[key] / self.counts[key], self.cross[key] / self.counts[key]

    def drop(self, key: str) -> None:
        """Free one input's matrices (its layers are projected)."""
        for table in (self.sums, self.cross, self.dense):
            table.pop(key, None)


def _rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The input vectors of real tokens: padded positions are dropped when the shape allows."""
    if mask is not None and x.ndim == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        return x[mask]
    if mask is not None and x.ndim == 2 and x.shape[0] == mask.numel():
        return x[mask.reshape(-1)]
    return x.reshape(-1, x.shape[-1])


class Collector:
    """Forward pre-hooks on ``modules`` accumulating ``XᵀX`` per distinct input tensor; the
    caller runs the forward passes, one :meth:`batch` each. The whole dense model runs them in
    memory (:func:`collect`); a streaming conversion runs one block at a time
    (:mod:`monarchify.hf.blockwise`), and both must count the same rows in the same order."""

    def __init__(self, modules: dict[str, nn.Module], *, keep_rows: bool = False, reference: Collector | None = None) -> None:
        """``keep_rows``: hold each input's rows of the current batch (what ``reference`` reads);
        ``reference``: a collector that ran the same batch through the dense block just
        before, whose rows are paired token by token with this pass's (sequential calibration:
        ``X_dᵀX_c`` is accumulated next to ``X_cᵀX_c``)."""
        self.stats = InputStatistics()
        self.names = list(modules)
        self.mask: torch.Tensor | None = None
        self.seen: dict[int, tuple[torch.Tensor, str]] = {}
        self.keep_rows, self.reference = keep_rows, reference
        self.rows: dict[str, torch.Tensor] = {}
        self.active = False
        self.handles = [module.register_forward_pre_hook(self.hook(name)) for name, module in modules.items()]

    def hook(self, name: str):
        def pre_hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if not self.active:  # another collector's pass over the same modules
                return
            x = args[0]
            shared = self.seen.get(id(x))
            if shared is not None:  # the same tensor object: keep it alive so ids stay unique
                self.stats.owner.setdefault(name, shared[1])
            else:
                key = self.stats.owner.setdefault(name, name)
                self.seen[id(x)] = (x, key)
                rows = _rows(x.detach(), self.mask).float()
                _accumulate(self.stats.sums, key, gram(rows))
                self.stats.counts[key] = self.stats.counts.get(key, 0) + rows.shape[0]
                if self.keep_rows:
                    self.rows[key] = rows
                if self.reference is not None:
                    _accumulate(self.stats.cross, key, self.reference.rows[key].T @ rows)

        return pre_hook

    @contextmanager
    def batch(self, attention_mask: torch.Tensor | None) -> Iterator[None]:
        """One forward pass: padded positions of ``attention_mask`` are left out, and only
        tensors of this pass count as shared."""
        self.mask = _mask(attention_mask)
        self.seen.clear()
        self.rows.clear()
        self.active = True
        try:
            yield
        finally:
            self.active = False
            self.seen.clear()

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def finish(self) -> InputStatistics:
        """The statistics, once every module was reached (else a one-line error)."""
        self.close()
        missing = [name for name in self.names if name not in self.stats.owner]
        if missing:
            raise SampleError(f"the calibration forward pass never reached layer(s) {', '.join(missing[:4])}")
        return self.stats


GRAM_SLAB = 256
"""Columns per slab of :func:`gram`: wide enough for an efficient matrix product, narrow
enough that the skipped lower triangle is most of the saving."""


def gram(rows: torch.Tensor) -> torch.Tensor:
    """``rowsᵀ rows``, exactly symmetric, for about half the work of the general product.

    torch has no symmetric rank-k update, and these products are as much work as the forward
    pass they hook into (a 1,536-wide MLP input costs 1,536² multiply-adds a token, more than
    the layer it feeds). So the upper triangle is computed slab by slab and mirrored: on this
    2-core CPU, one thread, 8,192 rows of width 1,536 took 0.66 s whole and 0.35 s in slabs."""
    d = rows.shape[-1]
    if d <= 2 * GRAM_SLAB:
        return rows.T @ rows
    out = rows.new_empty(d, d)
    for start in range(0, d, GRAM_SLAB):
        stop = min(start + GRAM_SLAB, d)
        slab = rows[:, start:stop].T @ rows[:, start:]
        out[start:stop, start:] = slab
        out[stop:, start:stop] = slab[:, stop - start:].T
    return out


def _accumulate(table: dict[str, torch.Tensor], key: str, product: torch.Tensor) -> None:
    """Add one batch's product (float32: a few thousand rows, ample precision, and several
    times faster than float64 on CPU) to a float64 sum across batches."""
    product = product.to(torch.float64)
    if key in table:
        table[key] += product
    else:
        table[key] = product


@torch.no_grad()
def collect(
    model: nn.Module,
    modules: dict[str, nn.Module],
    batches: Iterable[dict[str, torch.Tensor]],
) -> InputStatistics:
    """Run ``batches`` through ``model`` and accumulate the input statistics of ``modules``."""
    collector = Collector(modules)
    was_training = model.training
    model.eval()
    device = model_device(model)
    try:
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            with collector.batch(batch.get("attention_mask")):
                model(**batch)
    finally:
        collector.close()
        model.train(was_training)
    return collector.finish()


SENSITIVITY_NOISE = 0.05
"""Relative size of the noise :func:`output_sensitivity` adds: small enough that the model
answers linearly, large enough to stand far above float32 rounding."""
SENSITIVITY_SAMPLES = 128
"""Fitting samples :func:`output_sensitivity` runs (one forward pass per layer each)."""


def _first_output(output: Any) -> torch.Tensor:
    """The model's main output (logits of a head, else the last hidden states)."""
    return (output[0] if not isinstance(output, torch.Tensor) else output).float()


@torch.no_grad()
def output_sensitivity(
    model: nn.Module,
    modules: dict[str, nn.Module],
    batches: Iterable[dict[str, torch.Tensor]],
    noise: float = SENSITIVITY_NOISE,
    seed: int = 0,
) -> dict[str, float]:
    """How far the model's output moves per unit of relative squared error at each layer's
    output: ``||Δz||² / ||z||²`` divided by ``noise²`` when that layer's output gets Gaussian
    noise of relative energy ``noise²`` (``z``: logits, or the last hidden states; padded
    positions left out).

    To first order a layer whose relative output error is ``r`` then moves the model's output
    by ``weight · r``, so the budget can minimise the sum of those instead of the sum of ``r``.
    One forward pass per layer and batch, on the dense model; noise directions are random,
    while a projection's error has a direction of its own: a first-order guide, not a promise.
    """
    was_training = model.training
    model.eval()
    device = model_device(model)
    batches = [{k: v.to(device) for k, v in batch.items()} for batch in batches]
    try:
        reference = [_rows(_first_output(model(**batch)), _mask(batch.get("attention_mask"))) for batch in batches]
        energy = sum(float(z.pow(2).sum()) for z in reference) or 1.0
        weights = {}
        for index, (name, module) in enumerate(modules.items()):
            generator = torch.Generator(device=device).manual_seed(seed * 100_003 + index)

            def perturb(_module: nn.Module, _args: Any, out: Any) -> Any:
                if not isinstance(out, torch.Tensor):
                    return out
                scale = noise * out.detach().float().pow(2).mean().sqrt()
                draw = torch.randn(out.shape, generator=generator, device=out.device, dtype=torch.float32)
                return out + (scale * draw).to(out.dtype)

            handle = module.register_forward_hook(perturb)
            try:
                moved = sum(float((_rows(_first_output(model(**batch)), _mask(batch.get("attention_mask"))) - z).pow(2).sum())
                            for batch, z in zip(batches, reference))
            finally:
                handle.remove()
            weights[name] = moved / energy / noise**2
    finally:
        model.train(was_training)
    return weights


FISHER_SAMPLES = 64
"""Fitting samples :func:`output_fisher` runs (one forward and one backward pass each)."""
FISHER_ROWS = 4
"""Samples per backward pass: a language model's logits are ``rows × tokens × vocabulary``."""


def _sampled_log_likelihood(output: Any, mask: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
    """The log-likelihood, under the model's own output distribution, of an output drawn from
    it: categorical over the logits of a classifier or language model, unit Gaussian around a
    single score or hidden states. Its gradient ``g`` has ``E[g gᵀ]`` = the Fisher information
    of that distribution: the curvature of the divergence from the dense model's output."""
    logits = getattr(output, "logits", None)
    z = (logits if logits is not None else _first_output(output)).float()
    keep = torch.ones(z.shape[:-1], dtype=torch.bool, device=z.device)
    if mask is not None and mask.shape == keep.shape:
        keep = mask
    if logits is not None and z.shape[-1] > 1:
        logp = torch.log_softmax(z, dim=-1)
        with torch.no_grad():
            drawn = torch.multinomial(logp.exp().reshape(-1, z.shape[-1]), 1, generator=generator).view(z.shape[:-1])
        picked = logp.gather(-1, drawn.unsqueeze(-1)).squeeze(-1)
        return picked[keep].sum()
    with torch.no_grad():  # Gaussian: d log p / dz at a drawn z' is the drawn deviation itself
        deviation = torch.randn(z.shape, generator=generator, device=z.device)
    return (z * deviation)[keep].sum()


def output_fisher(
    model: nn.Module,
    modules: dict[str, nn.Module],
    batches: Iterable[dict[str, torch.Tensor]],
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Per output channel ``j`` of every layer: ``s_j``, the mean over real tokens of the squared
    gradient of the model's sampled log-likelihood (:func:`_sampled_log_likelihood`) with
    respect to that layer's output.

    A layer's weight error ``ΔW`` on inputs with second moment ``C`` then moves the model's
    output distribution (its KL divergence from the dense one, to second order) by about
    ``½ Σ_j s_j (ΔW C ΔWᵀ)_jj`` per token, the diagonal Fisher approximation that FWSVD-style
    methods use. The estimate is in one unit for every layer, so a budget can add it up across
    layers: what the *model* loses, not each layer's relative error, which on a language model
    is dominated by a few tokens of enormous activation. One forward and backward pass per batch
    of the dense model; weights get no gradients."""
    was_training = model.training
    model.eval()
    device = model_device(model)
    generator = torch.Generator(device=device).manual_seed(seed)
    sums: dict[str, torch.Tensor] = {}
    tokens = 0

    def capture(name: str):
        def hook(_module: nn.Module, _args: Any, out: Any) -> None:
            if isinstance(out, torch.Tensor) and out.requires_grad:
                def accumulate(grad: torch.Tensor) -> None:
                    square = grad.detach().to(torch.float64).reshape(-1, grad.shape[-1]).square().sum(dim=0)
                    sums[name] = sums[name] + square if name in sums else square
                out.register_hook(accumulate)
        return hook

    def leaf(_module: nn.Module, _args: Any, out: Any) -> Any:  # gradients start here, none reach the weights
        return out.detach().requires_grad_(True) if isinstance(out, torch.Tensor) and out.is_floating_point() else out

    # Every embedding module, not only get_input_embeddings(): an encoder-decoder (BART) shares
    # that table with per-stack embedding modules, which are what its forward pass calls.
    embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    try:
        given = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        given = None
    if isinstance(given, nn.Module) and all(given is not m for m in embeddings):
        embeddings.append(given)
    if not embeddings:
        raise SampleError("the Fisher weights need the model's input embeddings (get_input_embeddings)")
    needed = {p: p.requires_grad for p in model.parameters()}
    handles = [module.register_forward_hook(capture(name)) for name, module in modules.items()]
    handles += [module.register_forward_hook(leaf) for module in embeddings]
    try:
        for p in needed:
            p.requires_grad_(False)
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            rows = len(next(iter(batch.values())))
            for start in range(0, rows, FISHER_ROWS):
                part = {k: v[start:start + FISHER_ROWS] for k, v in batch.items()}
                mask = _mask(part.get("attention_mask"))
                with torch.enable_grad():
                    _sampled_log_likelihood(model(**part), mask, generator).backward()
                tokens += int(mask.sum()) if mask is not None else part["input_ids"].numel()
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in needed.items():
            p.requires_grad_(flag)
        model.train(was_training)
    missing = [name for name in modules if name not in sums]
    if missing:
        raise SampleError(f"no gradient reached layer '{missing[0]}' on the calibration text")
    return {name: total / max(tokens, 1) for name, total in sums.items()}


def _mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """Which positions are real tokens (``None``: all of them)."""
    return attention_mask.bool() if attention_mask is not None else None


def first_samples(batches: list[dict[str, torch.Tensor]], samples: int) -> list[dict[str, torch.Tensor]]:
    """Leading batches holding at least ``samples`` samples (all when there are fewer)."""
    taken, count = [], 0
    for batch in batches:
        if count >= samples:
            break
        taken.append(batch)
        count += len(next(iter(batch.values())))
    return taken


@dataclass
class Observation:
    """Input statistics of the selected layers on the fitting and on the held-out samples."""

    samples: TextSamples
    config: CalibrationConfig
    fit: InputStatistics
    heldout: InputStatistics
    tokens: dict[str, int]
    seconds: float
    sensitivity: dict[str, float] | None = None
    """Per-layer output sensitivity (:func:`output_sensitivity`), when the budget weighs by it."""
    fisher: dict[str, torch.Tensor] | None = None
    """Per-layer, per-output-channel Fisher weights (:func:`output_fisher`), when the budget
    prices by them."""

    def record(self) -> dict[str, Any]:
        """What the saved recipe says about how the factors were obtained (enough to repeat it)."""
        c = self.config
        record = {**self.samples.describe(), "method": c.method, "damping": c.damping, "sweeps": c.sweeps, "max_length": c.max_length}
        return {**record, "sequential": True} if c.sequential else record


def calibration_batches(
    model: nn.Module, samples: TextSamples, tokenizer: Any, config: CalibrationConfig
) -> tuple[dict[str, list[dict[str, torch.Tensor]]], dict[str, int]]:
    """The fitting and the held-out samples as model inputs (``{"fit": ..., "heldout": ...}``),
    and their token counts (padding excluded)."""
    max_length = min(config.max_length, _position_limit(model, tokenizer))
    batches, tokens = {}, {}
    for part, texts in (("fit", samples.fit), ("heldout", samples.heldout)):
        batches[part] = tokenize(texts, tokenizer, batch_size=config.batch_size, max_length=max_length)
        tokens[part] = sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel() for b in batches[part])
    return batches, tokens


def observe(
    model: nn.Module, modules: dict[str, nn.Module], samples: TextSamples, tokenizer: Any, config: CalibrationConfig,
    *, sensitivity: bool = False, fisher: bool = False,
) -> Observation:
    """Run the dense model on the fitting and the held-out samples, collecting the inputs of
    ``modules`` (and with ``sensitivity``, how far each one's output errors move the model's;
    with ``fisher``, the Fisher weights of their output channels)."""
    start = time.perf_counter()
    batches, tokens = calibration_batches(model, samples, tokenizer, config)
    stats = {part: collect(model, modules, part_batches) for part, part_batches in batches.items()}
    weights = (output_sensitivity(model, modules, first_samples(batches["fit"], SENSITIVITY_SAMPLES))
               if sensitivity else None)
    channels = output_fisher(model, modules, first_samples(batches["fit"], FISHER_SAMPLES)) if fisher else None
    return Observation(samples, config, stats["fit"], stats["heldout"], tokens, time.perf_counter() - start, weights,
                       channels)


def _position_limit(model: nn.Module, tokenizer: Any) -> int:
    """The longest input the model and tokenizer accept (position embeddings run out)."""
    config = getattr(model, "config", None)
    limits = [getattr(config, key, None) for key in ("max_position_embeddings", "n_positions")]
    limits.append(getattr(tokenizer, "model_max_length", None))
    return min([n for n in limits if isinstance(n, int) and n > 0] or [DEFAULT_MAX_LENGTH])
