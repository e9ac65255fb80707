"""Stage 4, project: turn each allocated layer's dense weight into its replacement module.

A *projector* is the extension point: ``projector(layer, layout) -> Projected``. Two ship:

* :class:`PlainProjector`: the Frobenius-optimal Monarch projection (a blockwise truncated
  SVD, :func:`monarchify.monarch.project`);
* :class:`WhitenedProjector`: the output-optimal one on calibration activations (block-diagonal
  whitening plus full-covariance refinement, :mod:`monarchify.monarch.whitening`), which also
  measures every layer's output error on held-out samples, next to the plain projection's.

The low-rank baseline (``MonarchConfig.structure = "lowrank"``) is the third:
:class:`LowRankProjector` returns a :class:`~monarchify.monarch.LowRankLinear` fitted by the
truncated SVD, whitened on the calibration activations when there are some; the allocation gives
it each layer's rank (and the ``layout`` it is called with only names the block count that rank
matches).

The projectors that ship are thread-safe (``thread_safe = True``): on a CPU with several threads
:func:`project_layers` projects that many layers at once, each single-threaded. A projection is a
chain of small LAPACK calls (SVDs and Cholesky solves of a few hundred columns) that gain little
from threads of their own, so layers side by side use the cores where one layer at a time left
them idle; and a layer's factors no longer depend on the thread count.

Monarch plus low rank is built in: when the allocation gives a layer a rank, both projectors
are called with ``rank=`` and fit ``M + U V`` (:func:`monarchify.monarch.lowrank.project_lowrank`);
a custom projector only sees ``rank`` when the recipe asks for one. Another structure is a
projector that returns its own module; the apply stage swaps in whatever module it gets. Every
layer is projected before any is swapped, so a failure leaves the model untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from torch import nn

from monarchify.errors import NonFiniteWeightError
from monarchify.monarch import LowRankLinear, MonarchLayout, MonarchLinear, Projection, project
from monarchify.monarch.lowrank import LowRank, MonarchLowRank, project_lowrank, truncated_svd
from monarchify.monarch.threads import torch_threads
from monarchify.monarch.whitening import (
    assemble, cross_rel_error, cross_target, output_rel_error, output_sq_error, project_whitened, refine_full,
)
from monarchify.pipeline.allocate import Allocation
from monarchify.pipeline.observe import Observation
from monarchify.pipeline.plan import PlannedLayer


@dataclass
class Projected:
    """A layer's replacement, and what it cost."""

    module: nn.Module
    rel_error: float
    """``||W - M||_F / ||W||_F`` of the replacement's weight."""
    extra: dict[str, float] = field(default_factory=dict)
    """Further per-layer measurements for the report (e.g. held-out output errors)."""


Projector = Callable[[PlannedLayer, MonarchLayout], Projected]


def monarch_module(projection: Projection, like: nn.Module, lowrank: LowRank | None = None) -> MonarchLinear:
    """A ``MonarchLinear`` holding ``projection``'s factors (and ``lowrank``'s, when given), on
    ``like``'s device and dtype, with ``like``'s bias and trainability."""
    weight = like.weight
    lay = projection.layout
    bias = getattr(like, "bias", None)
    with torch.device("meta"):
        layer = MonarchLinear(
            lay.d_in, lay.d_out, lay.nblocks, bias=bias is not None, allow_structural_zeros=True, output_order=lay.output_order,
            rank=lowrank.rank if lowrank is not None else 0,
        )
    layer = layer.to_empty(device=weight.device).to(weight.dtype)
    with torch.no_grad():
        layer.L.copy_(projection.L)
        layer.R.copy_(projection.R)
        if lowrank is not None and lowrank.rank:
            layer.U.copy_(lowrank.U)
            layer.V.copy_(lowrank.V)
        if bias is not None:
            layer.bias.copy_(bias)
    layer.requires_grad_(weight.requires_grad)
    layer.dense_class = type(like)
    return layer


class PlainProjector:
    """The Frobenius-optimal projection of each weight on its own."""

    thread_safe = True

    def __init__(self, allow_structural_zeros: bool = False) -> None:
        self.allow_structural_zeros = allow_structural_zeros

    def __call__(self, layer: PlannedLayer, layout: MonarchLayout, *, rank: int = 0) -> Projected:
        if rank:
            result = project_lowrank(
                layer.weight, layout.nblocks, rank, allow_structural_zeros=self.allow_structural_zeros,
                output_order=layout.output_order,
            )
            return Projected(monarch_module(result.projection, layer.module, result.lowrank), result.rel_error)
        projection = project(
            layer.weight, layout.nblocks, allow_structural_zeros=self.allow_structural_zeros, output_order=layout.output_order
        )
        return Projected(monarch_module(projection, layer.module), projection.rel_error)


class WhitenedProjector:
    """Minimises each layer's output error on the calibration activations.

    With dense-model statistics the objective is ``||(W - M) Xᵀ||``. With sequential ones
    (:class:`~monarchify.pipeline.observe.InputStatistics` carrying ``cross``: the layer sees
    what the converted earlier blocks produce) it is ``||W X_dᵀ - M X_cᵀ||``: reproduce the
    dense outputs from the converted inputs, through the same whitened projection of a
    corrected target (:func:`~monarchify.monarch.whitening.cross_target`). Held-out errors are
    measured in the same terms.
    """

    thread_safe = True

    def __init__(self, observation: Observation, allow_structural_zeros: bool = False) -> None:
        self.observation = observation
        self.allow_structural_zeros = allow_structural_zeros

    def __call__(self, layer: PlannedLayer, layout: MonarchLayout, *, rank: int = 0) -> Projected:
        if rank:
            return self._lowrank(layer, layout, rank)
        settings = self.observation.config
        weight = layer.weight
        cov = self.observation.fit.covariance(layer.name)
        target = self._target(layer.name, weight)
        zeros, order = self.allow_structural_zeros, layout.output_order
        result = project_whitened(
            target, cov, layout.nblocks, damping=settings.damping, allow_structural_zeros=zeros, output_order=order
        )
        if settings.sweeps:
            result = refine_full(target, cov, result, sweeps=settings.sweeps, damping=settings.damping, measure=False)
        plain = project(weight, layout.nblocks, allow_structural_zeros=zeros, output_order=order)
        w = weight.detach().to(torch.float64)
        approx = assemble(result.projection.L, result.projection.R, layout)
        extra = self._heldout_errors(layer.name, w, approx, assemble(plain.L.to(w.dtype), plain.R.to(w.dtype), layout))
        error = result.projection.rel_error if target is weight else _rel_error(w, approx)
        return Projected(monarch_module(result.projection, layer.module), error, extra)

    def _target(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """What the projection fits: ``weight`` itself, or with sequential statistics the
        dense map that best reproduces the dense outputs from the converted inputs."""
        fit = self.observation.fit
        pair = fit.cross_covariances(name)
        if pair is None:
            return weight
        return cross_target(weight, fit.covariance(name), pair[1], self.observation.config.damping)

    def _heldout_errors(self, name: str, weight: torch.Tensor, approx: torch.Tensor, plain: torch.Tensor) -> dict[str, float]:
        """The held-out output errors of the fit and of the plain projection, for the report."""
        held = self.observation.heldout
        cov, pair = held.covariance(name), held.cross_covariances(name)
        if pair is None:
            energy = output_sq_error(weight, torch.zeros_like(weight), cov)  # once for both
            errors = [output_rel_error(weight, m, cov, energy) for m in (approx, plain)]
        else:
            errors = [cross_rel_error(weight, m, pair[0], pair[1], cov) for m in (approx, plain)]
        return {"output_rel_error": errors[0], "output_rel_error_plain": errors[1]}

    def _lowrank(self, layer: PlannedLayer, layout: MonarchLayout, rank: int) -> Projected:
        """Monarch plus low rank, fitted on the calibration activations; the comparison is the
        same structure fitted to the weight alone."""
        settings = self.observation.config
        options = {"allow_structural_zeros": self.allow_structural_zeros, "output_order": layout.output_order}
        cov = self.observation.fit.covariance(layer.name)
        weight = layer.weight
        target = self._target(layer.name, weight)
        result = project_lowrank(
            target, layout.nblocks, rank, cov, damping=settings.damping, sweeps=settings.sweeps, **options
        )
        plain: MonarchLowRank = project_lowrank(weight, layout.nblocks, rank, **options)
        w = weight.detach().to(torch.float64)
        extra = self._heldout_errors(layer.name, w, result.dense(), plain.dense())
        error = result.rel_error if target is weight else _rel_error(w, result.dense())
        return Projected(monarch_module(result.projection, layer.module, result.lowrank), error, extra)


def _rel_error(weight: torch.Tensor, approx: torch.Tensor) -> float:
    """``||W - M||_F / ||W||_F``."""
    norm = float(weight.norm())
    return float((weight - approx.to(weight.dtype)).norm()) / norm if norm > 0 else 0.0


def lowrank_module(lowrank: LowRank, like: nn.Module) -> LowRankLinear:
    """A ``LowRankLinear`` holding ``lowrank``'s factors, on ``like``'s device and dtype, with
    ``like``'s bias and trainability."""
    weight = like.weight
    bias = getattr(like, "bias", None)
    with torch.device("meta"):
        layer = LowRankLinear(weight.shape[1], weight.shape[0], lowrank.rank, bias=bias is not None)
    layer = layer.to_empty(device=weight.device).to(weight.dtype)
    with torch.no_grad():
        layer.U.copy_(lowrank.U)
        layer.V.copy_(lowrank.V)
        if bias is not None:
            layer.bias.copy_(bias)
    layer.requires_grad_(weight.requires_grad)
    return layer


class LowRankProjector:
    """The low-rank baseline: each weight's truncated SVD at the allocated rank, whitened by the
    layer's calibration covariance when an observation is given (the output-optimal rank-``r``
    matrix, :func:`~monarchify.monarch.lowrank.truncated_svd`); then, like
    :class:`WhitenedProjector`, the held-out output errors of it and of the plain SVD."""

    thread_safe = True

    def __init__(self, observation: Observation | None = None) -> None:
        self.observation = observation

    def __call__(self, layer: PlannedLayer, layout: MonarchLayout, *, rank: int) -> Projected:
        observation = self.observation
        if observation is None:
            result = truncated_svd(layer.weight, rank)
            return Projected(lowrank_module(result.lowrank, layer.module), result.rel_error)
        damping = observation.config.damping
        result = truncated_svd(layer.weight, rank, observation.fit.covariance(layer.name), damping=damping)
        plain = truncated_svd(layer.weight, rank)
        held = observation.heldout.covariance(layer.name)
        w = layer.weight.detach().to(torch.float64)
        extra = {
            "output_rel_error": output_rel_error(w, result.lowrank.dense(), held),
            "output_rel_error_plain": output_rel_error(w, plain.lowrank.dense(), held),
        }
        return Projected(lowrank_module(result.lowrank, layer.module), result.rel_error, extra)


def default_projector(observation: Observation | None, allow_structural_zeros: bool, structure: str = "monarch") -> Projector:
    """Whitened when the recipe calibrated, plain otherwise; low rank for that structure."""
    if structure == "lowrank":
        return LowRankProjector(observation)
    if observation is not None:
        return WhitenedProjector(observation, allow_structural_zeros)
    return PlainProjector(allow_structural_zeros)


def project_layers(
    layers: Sequence[PlannedLayer],
    allocation: Allocation,
    projector: Projector,
    on_layer: Callable[[str], None] | None = None,
    *,
    workers: int | None = None,
) -> dict[str, Projected]:
    """Every layer the allocation makes Monarch, projected; ``on_layer(name)`` after each
    planned layer, in the plan's order (kept-dense ones included, so a progress bar over the
    plan completes, and a caller freeing a layer's statistics frees them only once every
    layer before it is done).

    ``workers``: layers projected at once. Default: torch's thread count for a thread-safe
    projector (``projector.thread_safe``) on CPU weights, else one; with several, each layer
    runs single-threaded."""
    todo = [layer for layer in layers if layer.name in allocation.nblocks]
    if workers is None:
        cpu = all(not layer.weight.is_cuda for layer in todo)
        workers = torch.get_num_threads() if cpu and getattr(projector, "thread_safe", False) else 1
    workers = max(1, min(workers, len(todo)))
    if workers == 1:
        return _in_plan_order(layers, allocation, on_layer, lambda layer: _project_one(projector, layer, allocation))
    with torch_threads(1):  # before the pool starts: its threads take torch's count from here
        pool = ThreadPoolExecutor(workers, thread_name_prefix="monarchify-project")
        try:
            futures: dict[str, Future[Projected]] = {layer.name: pool.submit(_project_one, projector, layer, allocation)
                                                     for layer in sorted(todo, key=_work, reverse=True)}
            return _in_plan_order(layers, allocation, on_layer, lambda layer: futures[layer.name].result())
        finally:  # on a failure (or Ctrl-C) the layers not started are dropped, the running ones finish
            pool.shutdown(wait=True, cancel_futures=True)


def _work(layer: PlannedLayer) -> int:
    """How long a layer's projection takes, up to a factor: its refinement multiplies a
    ``d_out × d_in`` matrix by the ``d_in × d_in`` covariance. The pool starts the longest first:
    in plan order a Llama block's 576 × 1,536 ``down_proj`` came last and ran alone on one core
    (longest-first scheduling keeps the workers' finishing times within one small layer)."""
    return layer.d_out * layer.d_in * layer.d_in


def _in_plan_order(layers: Sequence[PlannedLayer], allocation: Allocation, on_layer: Callable[[str], None] | None,
                   result: Callable[[PlannedLayer], Projected]) -> dict[str, Projected]:
    """Each projected layer's ``result`` (computed now or awaited), then ``on_layer``, layer by layer."""
    projected = {}
    for layer in layers:
        if layer.name in allocation.nblocks:
            projected[layer.name] = result(layer)
        if on_layer is not None:
            on_layer(layer.name)
    return projected


def _project_one(projector: Projector, layer: PlannedLayer, allocation: Allocation) -> Projected:
    rank = allocation.ranks.get(layer.name, 0)
    try:
        layout = allocation.layout(layer)
        return projector(layer, layout, rank=rank) if rank else projector(layer, layout)
    except NonFiniteWeightError as exc:
        raise NonFiniteWeightError(f"layer '{layer.name}': {exc}") from None
