"""The conversion report of a saved Monarch folder, read without building the model.

What the files really hold decides: layers, shapes and parameter counts come from
``config.json`` and the safetensors headers; only what cannot be read from the weights (errors
measured at conversion time, the functional check, the layers kept dense, notes) comes from the
``monarchify_report.json`` saved beside them, read by :meth:`ConversionReport.from_dict` (the
one reader of a saved report, which refuses a malformed one). Which stored tensors are a
layer's is :mod:`.stored_layers`' rule, the one ``densify`` follows too.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from monarchify.errors import ModelLoadError
from monarchify.hf.densify import DENSIFIED, densified_note
from monarchify.hf.loading import local_folder, read_config, short_error, tensor_shapes
from monarchify.hf.plugin import FORMAT_VERSION, LOWRANK, QUANT_METHODS, check_recipe
from monarchify.hf.saving import REPORT_FILE
from monarchify.hf.stored_layers import meta_model, stored_layers, undeclared_factors
from monarchify.monarch import MonarchLayout
from monarchify.report import ConversionReport, LayerReport, natural_key


def read_report(folder: str | os.PathLike[str]) -> ConversionReport:
    """The conversion report of a saved folder, without building the model.

    Layers, shapes and parameters come from ``config.json`` and the safetensors headers
    (so they describe what is really on disk); errors, the functional check and the rows of
    layers kept dense come from ``monarchify_report.json`` when the folder has it.
    """
    path = local_folder(folder)
    config = read_config(path)
    recipe = config.get("quantization_config") or {}
    if not isinstance(recipe, dict) or recipe.get("quant_method") not in QUANT_METHODS:
        densified = config.get(DENSIFIED)
        if isinstance(densified, dict):
            raise ModelLoadError(f"{densified_note(folder, densified)}, so it has no Monarch layers to report")
        raise ModelLoadError(f"'{folder}' is not a Monarch checkpoint (its config.json has no Monarch recipe)")
    check_recipe(recipe.get("modules"), recipe.get("format_version", FORMAT_VERSION), recipe.get("padding", "zero"))
    shapes = tensor_shapes(path)
    saved = _saved_report(path / REPORT_FILE)
    saved_layers = {layer.name: layer for layer in saved.layers} if saved is not None else {}

    # Model order: the saved report's, else the model's own module order (config.json sorts
    # its keys, so the recipe alone would list attention.output before attention.self.query).
    order = {name: i for i, name in enumerate(saved_layers)} or _module_order(path)
    modules = dict(sorted((recipe.get("modules") or {}).items(), key=lambda item: (order.get(item[0], len(order)), natural_key(item[0]))))
    stored = stored_layers(path, shapes, modules)
    layers = []
    for name, spec in modules.items():
        keys = stored[name].keys if stored[name] is not None else {}
        previous = saved_layers.get(name)
        row = (_lowrank_row if spec.get("structure") == LOWRANK else _monarch_row)(folder, name, spec, shapes, keys)
        if previous is not None:  # what the files cannot say
            row.kind, row.rel_error, row.extra = previous.kind, previous.rel_error, previous.extra
        layers.append(row)
    known = {layer.name for layer in layers}
    # A kept-dense layer is a plain nn.Linear on disk, so only the report knows it was selected;
    # without it, the totals would leave out what a budget spent on dense layers.
    layers += [layer for layer in saved_layers.values() if layer.kept_dense and layer.name not in known]
    layers.sort(key=lambda layer: (order.get(layer.name, len(order)), natural_key(layer.name)))
    stray = undeclared_factors(shapes, stored.values())
    if stray:
        raise ModelLoadError(f"'{folder}' has Monarch factors its config.json does not declare: {', '.join(stray[:3])}")
    after = sum(_numel(shape) for shape in shapes.values())
    # The files also hold persistent buffers (BART's final_logits_bias); the saved report
    # counted parameters only, so it is preferred when it is consistent with the files.
    if saved is not None and 0 < saved.model_params_after <= after:
        after = saved.model_params_after
    saved_dense = sum(layer.params_dense - layer.params_monarch for layer in layers)
    meta = dict(saved.meta) if saved is not None else {}
    meta.setdefault("recipe", recipe.get("recipe"))
    meta.setdefault("monarchify_version", recipe.get("monarchify_version"))
    return ConversionReport(layers, after + saved_dense, after, saved.functional_check if saved is not None else None, meta)


def _monarch_row(folder: Any, name: str, spec: dict[str, Any], shapes: dict[str, list[int]], keys: dict[str, str]) -> LayerReport:
    """The row of a Monarch layer (``L``, ``R``, low-rank ``U``, ``V`` if it has a rank, bias),
    checked against its ``config.json`` entry."""
    layout = MonarchLayout(spec["in_features"], spec["out_features"], spec["nblocks"])
    rank = spec.get("rank", 0)
    if "L" not in keys or "R" not in keys:
        raise ModelLoadError(f"'{folder}': the weights of Monarch layer '{name}' are missing")
    if shapes[keys["L"]] != list(layout.l_shape) or shapes[keys["R"]] != list(layout.r_shape):
        raise ModelLoadError(
            f"'{folder}': config.json says Monarch layer '{name}' is {layout.describe()}, but its factors have "
            f"shapes L {shapes[keys['L']]} and R {shapes[keys['R']]}"
        )
    if not rank and ("U" in keys or "V" in keys):
        raise ModelLoadError(f"'{folder}': Monarch layer '{name}' has low-rank factors U, V its config.json does not declare")
    if rank and ("U" not in keys or "V" not in keys or shapes[keys["U"]] != [layout.d_out, rank]
                 or shapes[keys["V"]] != [rank, layout.d_in]):
        raise ModelLoadError(f"'{folder}': the low-rank factors U, V of Monarch layer '{name}' (rank {rank}) are missing or misshapen")
    bias = _numel(shapes[keys["bias"]]) if "bias" in keys else 0
    factors = sum(_numel(shapes[keys[part]]) for part in ("L", "R", *(("U", "V") if rank else ())))
    return LayerReport(
        name=name, kind="Linear", shape=[layout.d_out, layout.d_in], nblocks=layout.nblocks, padded=layout.padded,
        bias=bias > 0, params_dense=layout.d_out * layout.d_in + bias, params_monarch=factors + bias, rank=rank,
    )


def _lowrank_row(folder: Any, name: str, spec: dict[str, Any], shapes: dict[str, list[int]], keys: dict[str, str]) -> LayerReport:
    """The row of a low-rank layer (``U``, ``V``, bias), checked against its ``config.json`` entry."""
    d_in, d_out, rank = spec["in_features"], spec["out_features"], spec["rank"]
    if "U" not in keys or "V" not in keys or shapes[keys["U"]] != [d_out, rank] or shapes[keys["V"]] != [rank, d_in]:
        raise ModelLoadError(f"'{folder}': the factors U, V of low-rank layer '{name}' (rank {rank}) are missing or misshapen")
    if "L" in keys or "R" in keys:
        raise ModelLoadError(f"'{folder}': low-rank layer '{name}' has Monarch factors L, R its config.json does not declare")
    bias = _numel(shapes[keys["bias"]]) if "bias" in keys else 0
    return LayerReport(
        name=name, kind="Linear", shape=[d_out, d_in], nblocks=1, padded=False, bias=bias > 0,
        params_dense=d_out * d_in + bias, params_monarch=rank * (d_in + d_out) + bias, rank=rank, structure=LOWRANK,
    )


def _module_order(folder: Path) -> dict[str, int]:
    """Module name -> position in the model, from an empty (meta-device) model of the folder's
    class; {} when it cannot be built (the caller then sorts names naturally)."""
    model = meta_model(folder)
    return {} if model is None else {name: i for i, (name, _) in enumerate(model.named_modules())}


def _saved_report(file: Path) -> ConversionReport | None:
    """The ``monarchify_report.json`` beside the weights (``None`` if absent), read by
    :meth:`ConversionReport.from_dict`: errors and notes come from it, shapes never do."""
    if not file.is_file():
        return None
    try:
        return ConversionReport.from_dict(json.loads(file.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"'{file}' is not valid JSON: {short_error(exc)}") from None
    except ValueError as exc:
        raise ModelLoadError(f"'{file}' is not a monarchify report ({exc})") from None


def _numel(shape: list[int]) -> int:
    n = 1
    for dim in shape:
        n *= dim
    return n
