"""A projector that keeps no weights: freshly initialised Monarch layers, for training from scratch.

The paper's first two uses (sparse training from scratch, and sparse-to-dense) start from a
model whose selected layers are Monarch from step 0. Building that through the same pipeline
as a conversion (plan → allocate → project → apply) keeps one selection rule, one layout check
and one report, so a model built from scratch saves and loads exactly like a converted one.

Initialisation: :meth:`MonarchLinear.reset_parameters` already gives ``nn.Linear``'s default
output variance, but architectures draw their own dense init (GPT-2 and BERT use
``N(0, 0.02²)``, GPT-2 scales its residual projections further down). A Monarch layer that
replaced such a layer with ``nn.Linear``'s variance would change the model's activation scale
at step 0, and with it the comparison against dense training. So each fresh layer is scaled to
the Frobenius norm of the dense weight the architecture drew for that position: the same
expected output variance as the dense model, layer by layer.
"""

from __future__ import annotations

import torch
from torch import nn

from monarchify.config import MonarchConfig
from monarchify.errors import ConfigError
from monarchify.monarch import MonarchLayout, MonarchLinear
from monarchify.pipeline.plan import PlannedLayer
from monarchify.pipeline.project import Projected


def check_fresh_recipe(config: MonarchConfig) -> None:
    """Refuse the parts of a recipe that need trained weights: a budget weighs projection
    errors and calibration fits real activations, and a fresh layer has neither."""
    if config.budget is not None:
        raise ConfigError("a parameter budget chooses block counts from trained weights; a model built from a config has none (set nblocks or overrides)")
    if config.calibration is not None:
        raise ConfigError("calibration fits trained weights to real activations; a model built from a config has none to fit")


@torch.no_grad()
def fresh_monarch(like: nn.Module, layout: MonarchLayout, weight: torch.Tensor) -> MonarchLinear:
    """A randomly initialised ``MonarchLinear`` in place of ``like`` (dense weight ``weight``,
    ``(d_out, d_in)``): same device, dtype, bias values and trainability, and the Frobenius
    norm of ``weight``."""
    bias = getattr(like, "bias", None)
    layer = MonarchLinear(
        layout.d_in, layout.d_out, layout.nblocks, bias=bias is not None, allow_structural_zeros=True,
        output_order=layout.output_order, device=weight.device, dtype=torch.float32,
    )
    target = weight.detach().float().norm()
    drawn = layer.to_dense().norm()
    if target > 0 and drawn > 0:  # a zero-initialised dense layer would give a dead Monarch one
        layer.L.mul_(target / drawn)
    if bias is not None:
        layer.bias.copy_(bias)
    layer = layer.to(weight.dtype)
    layer.requires_grad_(weight.requires_grad)
    layer.dense_class = type(like)
    return layer


class FreshProjector:
    """Projects nothing: each planned layer becomes a freshly initialised Monarch layer.

    The report's ``rel_error`` stays empty (``None``): there is no dense weight being
    approximated, only an initialisation.
    """

    def __call__(self, layer: PlannedLayer, layout: MonarchLayout) -> Projected:
        return Projected(fresh_monarch(layer.module, layout, layer.weight), rel_error=None)  # type: ignore[arg-type]
