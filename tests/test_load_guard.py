"""No silent random weights: transformers without monarchify refuses a Monarch folder, loudly,
while loading with monarchify stays exact and quiet."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open

from conftest import tiny_bert, tiny_gpt2, tiny_llama
from monarchify.config import MonarchConfig
from monarchify.hf.guard import HINT_KEY
from monarchify.hf.loading import load_model
from monarchify.hf.saving import save_model
from monarchify.hf.stored_report import read_report
from monarchify.pipeline import convert

STOCK = textwrap.dedent(
    """
    import sys
    import transformers
    try:
        transformers.{cls}.from_pretrained(sys.argv[1])
    except Exception as exc:
        print("REFUSED", type(exc).__name__)
    else:
        print("LOADED")
    print("monarchify" in sys.modules)
    """
)


def _stock_load(folder, cls):
    """Load in a fresh interpreter that never imports monarchify (the repository is not on its path)."""
    result = subprocess.run(
        [sys.executable, "-c", STOCK.format(cls=cls), str(folder)], capture_output=True, text=True, timeout=300,
        env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}, cwd="/",
    )
    return result.stdout.split(), result.stderr


def _converted(tmp_path, make, shard=None):
    model = make()
    report = convert(model, MonarchConfig(nblocks=4))
    out = tmp_path / "monarch"
    save_model(model, out, report=report, **({"max_shard_size": shard} if shard else {}))
    return model, out


@pytest.mark.parametrize("make,cls", [(tiny_llama, "AutoModelForCausalLM"), (tiny_bert, "AutoModel")])
def test_stock_transformers_without_monarchify_refuses_and_says_what_to_do(tmp_path, make, cls):
    _, out = _converted(tmp_path, make)
    words, stderr = _stock_load(out, cls)
    assert words[:2] == ["REFUSED", "RuntimeError"] and words[-1] == "False"
    assert HINT_KEY in stderr  # the load report printed above the error names the remedy


FIRST = "import sys, transformers; transformers.{cls}.from_pretrained(sys.argv[1])"


@pytest.mark.parametrize("make,cls", [(tiny_llama, "AutoModelForCausalLM"), (tiny_bert, "AutoModel")])
def test_the_first_line_stock_transformers_prints_says_what_the_folder_is_and_what_to_do(tmp_path, make, cls):
    """A user who forgot ``import monarchify`` reads the remedy first, not advice that ends in
    random layers (delete ``quantization_config``, ``ignore_mismatched_sizes``)."""
    _, out = _converted(tmp_path, make)
    result = subprocess.run(
        [sys.executable, "-c", FIRST.format(cls=cls), str(out)], capture_output=True, text=True, timeout=300,
        env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}, cwd="/",
    )
    assert result.returncode != 0 and "Traceback" in result.stderr  # still refused
    first = next(line for line in result.stderr.splitlines() if line.strip())
    assert "this folder is a Monarch checkpoint; import monarchify before loading it" in first, first
    assert "monarchify densify FOLDER --out DENSE" in first
    assert "quantization_config" not in first and "ignore_mismatched_sizes" not in first


def test_folders_written_with_the_old_method_name_still_read(tmp_path):
    """Folders from before the stored method became a sentence say ``"monarch"``."""
    model, out = _converted(tmp_path, tiny_bert)
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    assert config["quantization_config"]["quant_method"] != "monarch"
    config["quantization_config"]["quant_method"] = "monarch"
    config_path.write_text(json.dumps(config))
    reloaded = load_model(out)
    ids = torch.randint(0, 100, (2, 7))
    with torch.no_grad():
        assert torch.equal(reloaded(ids)[0], model(ids)[0])
    assert len(read_report(out).layers) == len(config["quantization_config"]["modules"])
    from monarchify.hf.densify import densify_folder
    from monarchify.hf.convert import convert_pretrained
    from monarchify.errors import ConfigError

    assert len(densify_folder(out, tmp_path / "dense").layers) == len(config["quantization_config"]["modules"])
    with pytest.raises(ConfigError, match="Monarch checkpoint already"):
        convert_pretrained(out, tmp_path / "again", MonarchConfig())


def test_without_the_guard_stock_transformers_would_run_random_layers(tmp_path):
    """The reason the guard exists: the same folder minus the guard tensors loads silently."""
    from safetensors.torch import save_file

    _, out = _converted(tmp_path, tiny_llama)
    file = out / "model.safetensors"
    with safe_open(str(file), framework="pt") as handle:
        kept = {k: handle.get_tensor(k) for k in handle.keys() if handle.get_slice(k).get_shape() != [0]}
    save_file(kept, str(file), metadata={"format": "pt"})
    assert _stock_load(out, "AutoModelForCausalLM")[0][0] == "LOADED"


def test_every_monarch_layer_is_guarded_in_its_own_shard(tmp_path):
    model, out = _converted(tmp_path, tiny_llama, shard="20KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    modules = json.loads((out / "config.json").read_text())["quantization_config"]["modules"]
    assert len(set(index.values())) > 2
    for name in modules:
        assert index[f"{name}.weight"] == index[f"{name}.L"]
        with safe_open(str(out / index[f"{name}.weight"]), framework="pt") as handle:
            assert handle.get_slice(f"{name}.weight").get_shape() == [0]
    assert HINT_KEY in index


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2, tiny_bert])
def test_guarded_folders_load_through_monarchify_exactly_and_quietly(tmp_path, make):
    import transformers

    model, out = _converted(tmp_path, make, shard="30KB")
    reloaded, info = load_model(out, output_loading_info=True)
    assert not info["unexpected_keys"] and not info["missing_keys"]
    # stock from_pretrained with the plug-in, into a base model from a model with a head
    _, stock = transformers.AutoModel.from_pretrained(out, output_loading_info=True)
    assert set(stock["unexpected_keys"]) <= {"lm_head.weight"} and not stock["mismatched_keys"]  # the head, no guard
    ids = torch.randint(0, 100, (2, 7))
    with torch.no_grad():
        assert torch.equal(reloaded(ids)[0], model(ids)[0])
    report = read_report(out)
    assert {row.name for row in report.layers} == set(json.loads((out / "config.json").read_text())["quantization_config"]["modules"])
    assert report.model_params_after == sum(p.numel() for p in model.parameters())
