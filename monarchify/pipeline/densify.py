"""The way back: multiply every Monarch layer out into the ``nn.Linear`` it computes.

Used after fine-tuning in Monarch form (for runtimes that know nothing of Monarch) and in the
middle of training (the paper's sparse-to-dense switch). The dense layer computes what the
Monarch layer computed, up to float rounding, so the loss right after the switch equals the
loss right before.
"""

from __future__ import annotations

import torch
from torch import nn

from monarchify.monarch import STRUCTURED_LAYERS, LowRankLinear, MonarchLinear
from monarchify.monarch.projection import assemble
from monarchify.pipeline.apply import replace_module


@torch.no_grad()
def dense_linear(layer: MonarchLinear | LowRankLinear) -> nn.Linear:
    """The ``nn.Linear`` with ``layer``'s product as its weight, on its device and in its dtype;
    the result trains (``requires_grad`` as the factors had it)."""
    dense = nn.Linear(
        layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta"
    )
    first = layer.U if isinstance(layer, LowRankLinear) else layer.L
    # Multiplied out in at least float32: a bf16 product of bf16 factors would add its own rounding.
    work = torch.promote_types(first.dtype, torch.float32)
    if isinstance(layer, LowRankLinear):
        weight = layer.U.to(work) @ layer.V.to(work)
    else:
        weight = assemble(layer.L.to(work), layer.R.to(work), layer.layout)
        if layer.rank:  # Monarch plus low rank: the low-rank term is part of the product
            weight = weight + layer.U.to(work) @ layer.V.to(work)
    weight = weight.to(first.dtype)
    dense.weight = nn.Parameter(weight.contiguous(), requires_grad=first.requires_grad)
    if layer.bias is not None:
        dense.bias = nn.Parameter(layer.bias.detach().clone(), requires_grad=layer.bias.requires_grad)
    return dense


def densify_(model: nn.Module) -> list[str]:
    """Replace every :class:`MonarchLinear` (and low-rank layer) in ``model`` by its
    :func:`dense_linear`, in place; the names replaced, in model order."""
    names = [name for name, module in model.named_modules() if isinstance(module, STRUCTURED_LAYERS)]
    for name in names:
        replace_module(model, name, dense_linear(model.get_submodule(name)))
    return names
