"""The conversion report of a saved Monarch folder, read without building the model.

What the files really hold decides: layers, shapes and parameter counts come from
``config.json`` and the safetensors headers; only what cannot be read from the weights (errors
measured at conversion time, the functional check, notes) comes from the
``monarchify_report.json`` saved beside them, after checking it is well formed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import transformers

from monarchify.errors import ModelLoadError
from monarchify.hf.densify import DENSIFIED, densified_note
from monarchify.hf.loading import empty_model, local_folder, read_config, short_error, tensor_shapes
from monarchify.hf.plugin import FORMAT_VERSION, LOWRANK, QUANT_METHODS, check_recipe
from monarchify.hf.saving import REPORT_FILE
from monarchify.monarch import MonarchLayout
from monarchify.report import ConversionReport, LayerReport, natural_key


def read_report(folder: str | os.PathLike[str]) -> ConversionReport:
    """The conversion report of a saved folder, without building the model.

    Layers, shapes and parameters come from ``config.json`` and the safetensors headers
    (so they describe what is really on disk); errors and the functional check come from
    ``monarchify_report.json`` when the folder has it.
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
    saved_layers = {layer["name"]: layer for layer in saved.get("layers", [])}

    # Model order: the saved report's, else the model's own module order (config.json sorts
    # its keys, so the recipe alone would list attention.output before attention.self.query).
    order = {name: i for i, name in enumerate(saved_layers)} or _module_order(path)
    modules = sorted((recipe.get("modules") or {}).items(), key=lambda item: (order.get(item[0], len(order)), natural_key(item[0])))
    if any(_find_key(shapes, name, "U" if spec.get("structure") == LOWRANK else "L") is None for name, spec in modules):
        shapes = _as_loaded(path, shapes)
    layers = []
    declared: set[str] = set()
    for name, spec in modules:
        if spec.get("structure") == LOWRANK:
            layers.append(_lowrank_row(folder, name, spec, shapes, saved_layers.get(name, {}), declared))
            continue
        layout = MonarchLayout(spec["in_features"], spec["out_features"], spec["nblocks"])
        rank = spec.get("rank", 0)
        keys = {suffix: _find_key(shapes, name, suffix) for suffix in ("L", "R", "bias", *(("U", "V") if rank else ()))}
        declared.update(key for key in (keys["L"], keys["R"], keys.get("U"), keys.get("V")) if key)
        if keys["L"] is None or keys["R"] is None:
            raise ModelLoadError(f"'{folder}': the weights of Monarch layer '{name}' are missing")
        if shapes[keys["L"]] != list(layout.l_shape) or shapes[keys["R"]] != list(layout.r_shape):
            raise ModelLoadError(
                f"'{folder}': config.json says Monarch layer '{name}' is {layout.describe()}, but its factors have "
                f"shapes L {shapes[keys['L']]} and R {shapes[keys['R']]}"
            )
        if not rank and (_find_key(shapes, name, "U") or _find_key(shapes, name, "V")):
            raise ModelLoadError(f"'{folder}': Monarch layer '{name}' has low-rank factors U, V its config.json does not declare")
        if rank and (keys["U"] is None or keys["V"] is None or shapes[keys["U"]] != [layout.d_out, rank]
                     or shapes[keys["V"]] != [rank, layout.d_in]):
            raise ModelLoadError(f"'{folder}': the low-rank factors U, V of Monarch layer '{name}' (rank {rank}) are missing or misshapen")
        numel = {s: _numel(shapes[k]) if k else 0 for s, k in keys.items()}
        previous = saved_layers.get(name, {})
        layers.append(
            LayerReport(
                name=name,
                kind=previous.get("kind", "Linear"),
                shape=[layout.d_out, layout.d_in],
                nblocks=layout.nblocks,
                padded=layout.padded,
                bias=numel["bias"] > 0,
                params_dense=layout.d_out * layout.d_in + numel["bias"],
                params_monarch=sum(numel.values()),
                rel_error=previous.get("rel_error"),
                extra=previous.get("extra", {}),
                rank=rank,
            )
        )
    layers = _with_kept_dense(layers, saved.get("layers", []), order)
    stray = sorted(key for key in shapes if key.endswith((".L", ".R")) and key not in declared)
    if stray:
        raise ModelLoadError(f"'{folder}' has Monarch factors its config.json does not declare: {', '.join(stray[:3])}")
    after = sum(_numel(shape) for shape in shapes.values())
    # The files also hold persistent buffers (BART's final_logits_bias); the saved report
    # counted parameters only, so it is preferred when it is consistent with the files.
    counted = saved.get("totals", {}).get("model_params")
    if isinstance(counted, int) and 0 < counted <= after:
        after = counted
    saved_dense = sum(layer.params_dense - layer.params_monarch for layer in layers)
    meta = dict(saved.get("meta", {}))
    meta.setdefault("recipe", recipe.get("recipe"))
    meta.setdefault("monarchify_version", recipe.get("monarchify_version"))
    return ConversionReport(layers, after + saved_dense, after, saved.get("functional_check"), meta)


def _lowrank_row(
    folder: Any, name: str, spec: dict[str, Any], shapes: dict[str, list[int]], previous: dict[str, Any], declared: set[str]
) -> LayerReport:
    """The row of a low-rank layer (``U``, ``V``, bias), checked against its ``config.json`` entry."""
    d_in, d_out, rank = spec["in_features"], spec["out_features"], spec["rank"]
    keys = {suffix: _find_key(shapes, name, suffix) for suffix in ("U", "V", "bias")}
    if keys["U"] is None or keys["V"] is None or shapes[keys["U"]] != [d_out, rank] or shapes[keys["V"]] != [rank, d_in]:
        raise ModelLoadError(f"'{folder}': the factors U, V of low-rank layer '{name}' (rank {rank}) are missing or misshapen")
    if _find_key(shapes, name, "L") or _find_key(shapes, name, "R"):
        raise ModelLoadError(f"'{folder}': low-rank layer '{name}' has Monarch factors L, R its config.json does not declare")
    declared.update((keys["U"], keys["V"]))
    bias = _numel(shapes[keys["bias"]]) if keys["bias"] else 0
    return LayerReport(
        name=name, kind=previous.get("kind", "Linear"), shape=[d_out, d_in], nblocks=1, padded=False, bias=bias > 0,
        params_dense=d_out * d_in + bias, params_monarch=rank * (d_in + d_out) + bias, rel_error=previous.get("rel_error"),
        extra=previous.get("extra", {}), rank=rank, structure=LOWRANK,
    )


def _with_kept_dense(layers: list[LayerReport], saved: list[dict[str, Any]], order: dict[str, int]) -> list[LayerReport]:
    """The Monarch layers plus the selected layers the conversion kept dense, in model order.

    Why from the saved report: a kept-dense layer is a plain ``nn.Linear`` on disk, so only the
    report knows it was selected; without it, the totals would leave out what a budget spent
    on dense layers. Rows that do not read as a layer are skipped, never guessed."""
    known = {layer.name for layer in layers}
    fields = ("shape", "params_dense")
    for row in saved:
        if not row.get("kept_dense") or row["name"] in known or not all(isinstance(row.get(f), (int, list)) for f in fields):
            continue
        shape = row["shape"]
        if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(d, int) for d in shape)):
            continue
        layers.append(LayerReport(
            name=row["name"], kind=str(row.get("kind", "Linear")), shape=list(shape), nblocks=1, padded=False,
            bias=bool(row.get("bias", False)), params_dense=int(row["params_dense"]), params_monarch=int(row["params_dense"]),
            kept_dense=True, reason=row.get("reason") if isinstance(row.get("reason"), str) else None,
            extra=row.get("extra", {}),
        ))
    return sorted(layers, key=lambda layer: (order.get(layer.name, len(order)), natural_key(layer.name)))


def _module_order(folder: Path) -> dict[str, int]:
    """Module name -> position in the model, from an empty (meta-device) model of the folder's
    class; {} when it cannot be built (the caller then sorts names naturally)."""
    model = _meta_model(folder)
    return {} if model is None else {name: i for i, (name, _) in enumerate(model.named_modules())}


def _meta_model(folder: Path) -> Any:
    """An empty model of the folder's architecture on the meta device (no weights, no memory),
    or ``None`` where transformers cannot build one."""
    try:
        return empty_model(transformers.AutoConfig.from_pretrained(str(folder)))
    except Exception:  # noqa: BLE001 - an unknown architecture, a config it cannot read: no order
        return None


def _saved_report(file: Path) -> dict[str, Any]:
    """The ``monarchify_report.json`` beside the weights ({} if absent), checked for the
    fields :func:`read_report` uses: errors and notes come from it, shapes never do."""
    if not file.is_file():
        return {}
    try:
        saved = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"'{file}' is not valid JSON: {short_error(exc)}") from None
    layers = saved.get("layers", []) if isinstance(saved, dict) else None
    valid = (
        isinstance(layers, list)
        and all(isinstance(layer, dict) and isinstance(layer.get("name"), str) for layer in layers)
        and all(isinstance(layer.get("rel_error"), (int, float, type(None))) and not isinstance(layer.get("rel_error"), bool)
                and isinstance(layer.get("extra", {}), dict) for layer in layers)
        and isinstance(saved.get("functional_check"), (dict, type(None)))
        and isinstance(saved.get("meta", {}), dict)
        and isinstance(saved.get("totals", {}), dict)
    )
    if not valid:
        raise ModelLoadError(f"'{file}' is not a monarchify report (its layers, totals, functional_check or meta are malformed)")
    return saved


def _as_loaded(folder: Path, shapes: dict[str, list[int]]) -> dict[str, list[int]]:
    """The saved tensors under the names ``from_pretrained`` loads them as.

    transformers 5 renames the modules of some architectures (ViT's
    ``encoder.layer.0.attention.attention.query`` is ``layers.0.attention.q_proj``) and saves
    under the original names, while the recipe names modules as loaded. The renaming rules
    belong to the model class, so an empty (meta-device) model of it is built to read them.
    Without rules, or where that fails, the names stay as saved.
    """
    model = _meta_model(folder)
    if model is None:
        return shapes
    try:
        from transformers.conversion_mapping import WeightRenaming, get_model_conversion_mapping

        renamings = [rule for rule in get_model_conversion_mapping(model) if isinstance(rule, WeightRenaming)]
    except Exception:  # noqa: BLE001 - an older transformers: keep the names
        return shapes
    renamed = {}
    for key, shape in shapes.items():
        for rule in renamings:
            key, _ = rule.rename_source_key(key)
        renamed[key] = shape
    return renamed


def _numel(shape: list[int]) -> int:
    n = 1
    for dim in shape:
        n *= dim
    return n


def _find_key(shapes: dict[str, list[int]], module: str, suffix: str) -> str | None:
    """The tensor key of ``module.suffix``, allowing for a base-model prefix on either side."""
    wanted = f"{module}.{suffix}"
    if wanted in shapes:
        return wanted
    for key in shapes:
        if key.endswith("." + wanted) or wanted.endswith("." + key):
            return key
    return None
