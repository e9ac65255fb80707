"""Loading Monarch checkpoints through stock ``from_pretrained``.

A converted folder's ``config.json`` carries a ``quantization_config`` with
``quant_method`` :data:`STORED_METHOD` (``"monarch"`` in older folders) and the list of replaced
modules. Importing ``monarchify``
registers a config class and an ``HfQuantizer`` for that method with transformers' public
plug-in points (``register_quantization_config``, ``register_quantizer``); the quantizer
swaps the listed modules for ``MonarchLinear`` (or, for the low-rank baseline structure,
``LowRankLinear``) on the meta device before the weights load, and transformers then fills
``L``, ``R`` (``U``, ``V``) and ``bias`` from the safetensors files.

Every line that touches this plug-in API lives in this file: its hooks changed across
transformers releases, and ``tests/test_roundtrip.py`` (save -> stock ``from_pretrained``
-> identical outputs) is the tripwire when they change again.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.quantizers.base import HfQuantizer  # not the package: it may be mid-import (see registration.py)
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.utils.quantization_config import QuantizationConfigMixin

from monarchify.errors import ConfigError, ModelLoadError
from monarchify.hf.guard import ignore_patterns
from monarchify.monarch import LowRankLinear, MonarchLinear
from monarchify.monarch.kernels.strided import aligned
from monarchify.monarch.layout import INTERLEAVED, OUTPUT_ORDERS
from monarchify.monarch.lowrank import check_rank
from monarchify.pipeline.apply import replace_module, resolve_name

QUANT_METHOD = "monarch"
"""The method's name in memory (what transformers' quantizer mapping and ``Trainer`` see), and
the ``quant_method`` folders carried before :data:`STORED_METHOD`; still read."""
STORED_METHOD = (
    "monarch: this folder is a Monarch checkpoint; import monarchify before loading it "
    "(or make it a plain folder with: monarchify densify FOLDER --out DENSE)\n"
)
"""The ``quant_method`` a folder's ``config.json`` carries: a sentence, because it is the one
thing from the folder that transformers without monarchify prints first. Its first line on
stderr is then ``Unknown quantization type, got <this>``, and the newline pushes the rest
(the supported types, and its advice to delete ``quantization_config``, which leads to random
layers) to the next line. ASCII only. In memory the method stays :data:`QUANT_METHOD`."""
QUANT_METHODS = (STORED_METHOD, QUANT_METHOD)
FORMAT_VERSION = 4
"""2: layers record their ``output_order`` (format 1 had only the interleaved one). 3: a layer
may carry a low-rank term (``"rank"``, Monarch plus low rank). 4: a layer may be low rank
alone (``"structure": "lowrank"``: ``U``, ``V``, no ``nblocks``). A checkpoint is written in
the lowest format that describes it, so that an older reader refuses what it cannot build
(instead of loading ``M`` and dropping ``U V`` as unexpected tensors) and every other
checkpoint stays readable by earlier monarchify versions."""
READS_FORMATS = (1, 2, 3, 4)
STRUCTURE_FORMAT = 4
LOWRANK_FORMAT = 3
PLAIN_FORMAT = 2
LOWRANK = "lowrank"
"""The ``structure`` of a low-rank layer's entry in ``modules`` (absent: Monarch)."""


def lowest_format(modules: Any) -> int:
    """The format a checkpoint with these layers is written in (see :data:`FORMAT_VERSION`)."""
    specs = [spec for spec in (modules.values() if isinstance(modules, dict) else ()) if isinstance(spec, dict)]
    if any("structure" in spec for spec in specs):
        return STRUCTURE_FORMAT
    return LOWRANK_FORMAT if any(spec.get("rank") for spec in specs) else PLAIN_FORMAT


def _check_lowrank(name: str, spec: dict[str, Any], format_version: Any) -> None:
    """A low-rank layer's entry: positive ``in_features``, ``out_features`` and ``rank`` (at
    most the smaller width), in a format that knows the structure."""
    fields = ("in_features", "out_features", "rank")
    if not all(isinstance(spec.get(f), int) and not isinstance(spec.get(f), bool) and spec[f] >= 1 for f in fields) \
            or not isinstance(spec.get("bias", True), bool) or spec["rank"] > min(spec["in_features"], spec["out_features"]):
        raise ModelLoadError(
            f"config.json: low-rank layer '{name}' needs positive integer in_features, out_features and a rank up to "
            f"the smaller of them, got {spec!r}"
        )
    if format_version < STRUCTURE_FORMAT:
        raise ModelLoadError(
            f"config.json: layer '{name}' is low rank, which format {format_version} cannot hold "
            f"(format {STRUCTURE_FORMAT} can): the checkpoint is damaged"
        )


def check_recipe(modules: Any, format_version: Any = FORMAT_VERSION, padding: Any = "zero") -> None:
    """Refuse a ``config.json`` Monarch recipe this version cannot build layers from.

    The recipe decides the shape of every layer before any weight is read, so a damaged one
    must fail here, as one line, rather than deep inside model construction.
    """
    if format_version not in READS_FORMATS:
        raise ModelLoadError(
            f"this checkpoint uses Monarch format {format_version}; this monarchify reads formats "
            f"{', '.join(map(str, READS_FORMATS))}"
        )
    if padding != "zero":
        raise ModelLoadError(f"config.json: unknown Monarch padding {padding!r} (this monarchify pads with zeros)")
    if modules is not None and not isinstance(modules, dict):
        raise ModelLoadError("config.json: the Monarch recipe's 'modules' must map layer names to their shapes")
    for name, spec in (modules or {}).items():
        if isinstance(spec, dict) and "structure" in spec:
            if spec["structure"] != LOWRANK:
                raise ModelLoadError(
                    f"config.json: layer '{name}' has structure {spec['structure']!r}; this monarchify knows {LOWRANK!r} "
                    "(and Monarch, written without a structure)"
                )
            _check_lowrank(name, spec, format_version)
            continue
        fields = ("in_features", "out_features", "nblocks")
        if not isinstance(spec, dict) or not all(
            isinstance(spec.get(f), int) and not isinstance(spec.get(f), bool) and spec[f] >= 1 for f in fields
        ) or not isinstance(spec.get("bias", True), bool):
            raise ModelLoadError(
                f"config.json: Monarch layer '{name}' needs positive integer in_features, out_features and nblocks, got {spec!r}"
            )
        rank = spec.get("rank", 0)
        try:
            check_rank(rank, spec["in_features"], spec["out_features"])
        except ConfigError:
            raise ModelLoadError(
                f"config.json: Monarch layer '{name}' has rank {rank!r}; it must be an integer from 0 to "
                "min(in_features, out_features)"
            ) from None
        if rank and format_version < LOWRANK_FORMAT:
            raise ModelLoadError(
                f"config.json: Monarch layer '{name}' has a low-rank term (rank {rank}), which format {format_version} "
                f"cannot hold (format {LOWRANK_FORMAT} can): the checkpoint is damaged"
            )
        if spec.get("output_order", INTERLEAVED) not in OUTPUT_ORDERS:
            raise ModelLoadError(
                f"config.json: Monarch layer '{name}' has output_order {spec['output_order']!r}; "
                f"this monarchify knows {', '.join(OUTPUT_ORDERS)}"
            )


def layer_spec(in_features: int, out_features: int, nblocks: int, bias: bool, output_order: str, rank: int = 0) -> dict[str, Any]:
    """One layer's entry in ``modules``: written in one place for every path that saves (a
    model in memory, the streaming converter), so they cannot drift apart. ``rank`` appears
    only when non-zero (format 3)."""
    spec: dict[str, Any] = {
        "in_features": in_features, "out_features": out_features, "nblocks": nblocks, "bias": bias,
        "output_order": output_order,
    }
    if rank:
        spec["rank"] = rank
    return spec


def lowrank_spec(in_features: int, out_features: int, rank: int, bias: bool) -> dict[str, Any]:
    """A low-rank layer's entry in ``modules`` (format 4)."""
    return {"structure": LOWRANK, "in_features": in_features, "out_features": out_features, "rank": rank, "bias": bias}


def module_spec(module: nn.Module) -> dict[str, Any] | None:
    """The ``modules`` entry of a converted layer, or None for any other module."""
    if isinstance(module, MonarchLinear):
        m = module
        return layer_spec(m.in_features, m.out_features, m.nblocks, m.bias is not None, m.output_order, m.rank)
    if isinstance(module, LowRankLinear):
        return lowrank_spec(module.in_features, module.out_features, module.rank, module.bias is not None)
    return None


class MonarchQuantizationConfig(QuantizationConfigMixin):
    """The self-description a converted checkpoint carries in its ``config.json``.

    ``modules`` maps each replaced module's qualified name to
    ``{"in_features", "out_features", "nblocks", "bias", "output_order"}``, plus ``"rank"`` for a
    layer with a low-rank term (format 3; absent means 0), or for a low-rank layer to
    ``{"structure": "lowrank", "in_features", "out_features", "rank", "bias"}`` (format 4); ``recipe`` is the
    :class:`~monarchify.config.MonarchConfig` that chose them; ``padding`` states the rule for
    widths the block count does not divide.
    """

    def __init__(
        self,
        modules: dict[str, dict[str, Any]] | None = None,
        recipe: dict[str, Any] | None = None,
        monarchify_version: str | None = None,
        format_version: int | None = None,
        padding: str = "zero",
        quant_method: str = QUANT_METHOD,
        **kwargs: Any,
    ) -> None:
        if format_version is None:  # a new recipe: the lowest format that holds it
            format_version = lowest_format(modules)
        check_recipe(modules, format_version, padding)
        self.quant_method = QUANT_METHOD
        self.modules = dict(modules or {})
        self.recipe = dict(recipe or {})
        self.monarchify_version = monarchify_version
        self.format_version = format_version
        self.padding = padding

    def to_dict(self) -> dict[str, Any]:
        """What ``config.json`` gets: the method under its stored name (:data:`STORED_METHOD`)."""
        data = super().to_dict()
        data["quant_method"] = STORED_METHOD
        return data


def _resolve(model: nn.Module, name: str) -> str:
    """The module's name in ``model``: a checkpoint saved from a base model (``BertModel``)
    loads into a model with a head (``BertForSequenceClassification``), whose names carry the
    base-model prefix, and the other way round."""
    resolved = resolve_name(model, name)
    if resolved is not None:
        return resolved
    raise ModelLoadError(f"the checkpoint lists Monarch layer '{name}', which this model does not have")


class MonarchHfQuantizer(HfQuantizer):
    requires_calibration = False

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        targets = []
        for name, spec in self.quantization_config.modules.items():
            target = _resolve(model, name)
            targets.append(target)
            old = model.get_submodule(target)
            dtype = getattr(old, "weight", torch.empty(0)).dtype
            with torch.device("meta"):
                layer = LowRankLinear(
                    spec["in_features"], spec["out_features"], spec["rank"], bias=spec.get("bias", True), dtype=dtype,
                ) if spec.get("structure") == LOWRANK else MonarchLinear(
                    spec["in_features"],
                    spec["out_features"],
                    spec["nblocks"],
                    bias=spec.get("bias", True),
                    allow_structural_zeros=True,
                    output_order=spec.get("output_order", INTERLEAVED),  # format 1 knew only this one
                    rank=spec.get("rank", 0),
                    dtype=dtype,
                )
            layer.dense_class = type(old)
            replace_module(model, target, layer)
        # The guard tensors that make stock transformers refuse the folder mean nothing here.
        prefix = getattr(model, "base_model_prefix", "") or ""
        names = [t[len(prefix) + 1:] if prefix and t.startswith(prefix + ".") else t for t in targets]
        model._keys_to_ignore_on_load_unexpected = set(model._keys_to_ignore_on_load_unexpected or ()) | ignore_patterns(names)
        return model

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        """Give the structured layers' parameters storage of their own at aligned addresses.

        Loaded from a memory-mapped safetensors file they sit wherever the file puts them, and
        the CPU product copies misaligned factors on every call (:func:`~monarchify.monarch.kernels.strided.aligned`:
        MKL rounds differently by address): a decoding step would read every factor twice
        more. One copy here, at load, instead.
        """
        for module in model.modules():
            if isinstance(module, (MonarchLinear, LowRankLinear)):
                for param in module.parameters():
                    param.data = aligned(param.data)
        return model

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        # Monarch factors are ordinary float parameters: training them is the point.
        return True

    @property
    def is_qat_trainable(self) -> bool:
        # Trainer refuses a "purely quantized" model unless this is true.
        return True

    @property
    def is_compileable(self) -> bool:
        return True


def register() -> None:
    """Register the plug-in once (``import monarchify`` arranges it; see :mod:`.registration`)."""
    for name in QUANT_METHODS:  # the config.json of a folder, new or old, names one of them
        if name not in AUTO_QUANTIZATION_CONFIG_MAPPING:
            register_quantization_config(name)(MonarchQuantizationConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(MonarchHfQuantizer)


register()  # importing the plug-in is using it
