"""The way back: multiply every Monarch layer out into the ``nn.Linear`` it computes.

Used after fine-tuning in Monarch form (for runtimes that know nothing of Monarch) and in the
middle of training (the paper's sparse-to-dense switch). The dense layer computes what the
Monarch layer computed, up to float rounding, so the loss right after the switch equals the
loss right before. The dense layer is of the kind the Monarch layer replaced: an ``nn.Linear``,
or GPT-2's ``Conv1D`` with its weight stored ``(in, out)``, so a densified model saves the
folder its architecture loads (recognised by name and shape, like :func:`plan.is_conv1d`,
because the pipeline never imports transformers).
"""

from __future__ import annotations

import torch
from torch import nn

from monarchify.monarch import STRUCTURED_LAYERS, LowRankLinear, MonarchLinear
from monarchify.monarch.projection import assemble
from monarchify.pipeline.apply import replace_module
from monarchify.pipeline.plan import is_conv1d


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


@torch.no_grad()
def dense_module(layer: MonarchLinear | LowRankLinear) -> nn.Module:
    """:func:`dense_linear`, in the class of the layer ``layer`` replaced when that was a
    ``Conv1D`` (``layer.dense_class``): same product, weight stored transposed."""
    linear = dense_linear(layer)
    cls = getattr(layer, "dense_class", None)
    if cls is None or cls.__name__ != "Conv1D":
        return linear
    with torch.device("meta"):
        conv = cls(layer.out_features, layer.in_features)  # Conv1D(nf, nx), as transformers defines it
    weight = linear.weight
    conv.weight = nn.Parameter(weight.detach().t().contiguous(), requires_grad=weight.requires_grad)
    conv.bias = linear.bias if linear.bias is not None else nn.Parameter(  # Conv1D always adds one
        torch.zeros(layer.out_features, dtype=weight.dtype, device=weight.device), requires_grad=weight.requires_grad
    )
    if not is_conv1d(conv):
        raise TypeError(f"{cls.__qualname__} is not a GPT-2 style Conv1D(nf, nx): cannot densify into it")
    return conv


def densify_(model: nn.Module) -> list[str]:
    """Replace every :class:`MonarchLinear` (and low-rank layer) in ``model`` by its
    :func:`dense_module`, in place; the names replaced, in model order."""
    names = [name for name, module in model.named_modules() if isinstance(module, STRUCTURED_LAYERS)]
    for name in names:
        replace_module(model, name, dense_module(model.get_submodule(name)))
    return names
