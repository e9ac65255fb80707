"""``densify``: a Monarch folder multiplied back out loads with transformers alone and computes
what the Monarch model computed."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import tiny_bert, tiny_gpt2, tiny_llama
from monarchify.cli.app import main
from monarchify.config import MonarchConfig
from monarchify.errors import ModelLoadError
from monarchify.hf.densify import DENSIFIED, densify_folder
from monarchify.hf.loading import load_model
from monarchify.hf.saving import save_model
from monarchify.pipeline import convert
from monarchify.pipeline.densify import densify_
from monarchify.pipeline.plan import is_conv1d

MAKERS = {"llama": (tiny_llama, "AutoModelForCausalLM"), "gpt2": (tiny_gpt2, "AutoModelForCausalLM"), "bert": (tiny_bert, "AutoModel")}

STOCK = textwrap.dedent(
    """
    import sys, torch, transformers
    from safetensors.torch import save_file
    model = transformers.{cls}.from_pretrained(sys.argv[1]).eval()
    ids = torch.arange(2 * 7).reshape(2, 7) % 90 + 3
    with torch.no_grad():
        out = model(ids)[0]
    save_file({{"out": out.contiguous()}}, sys.argv[2])
    print("monarchify" in sys.modules, out.dtype)
    """
)


def monarch_folder(tmp_path, arch, dtype=torch.float64):
    make, _ = MAKERS[arch]
    model = make().to(dtype)
    report = convert(model, MonarchConfig(nblocks=4, overrides={"(layers|layer|h)\\.1\\..*": 2}))
    save_model(model, tmp_path / "monarch", report=report, max_shard_size="20KB")
    return model, tmp_path / "monarch"


@pytest.mark.parametrize("arch", sorted(MAKERS))
def test_densified_folder_loads_without_monarchify_and_matches_the_monarch_model(tmp_path, arch):
    model, folder = monarch_folder(tmp_path, arch)
    result = densify_folder(folder, tmp_path / "dense", max_shard_size="20KB")
    dense = tmp_path / "dense"
    config = json.loads((dense / "config.json").read_text())
    assert "quantization_config" not in config and config[DENSIFIED]["layers"] == len(result.layers) > 0
    assert len(list(dense.glob("*.safetensors"))) > 1 and (dense / "model.safetensors.index.json").is_file()

    env = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    run = subprocess.run([sys.executable, "-c", STOCK.format(cls=MAKERS[arch][1]), str(dense), str(tmp_path / "out.st")],
                         capture_output=True, text=True, timeout=300, env=env, cwd="/")
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["False", "torch.float64"]  # stock transformers, no monarchify
    assert "MISSING" not in run.stderr and "UNEXPECTED" not in run.stderr and "MISMATCH" not in run.stderr
    ids = torch.arange(2 * 7).reshape(2, 7) % 90 + 3
    with torch.no_grad():
        expected = model(ids)[0]
    torch.testing.assert_close(load_file(str(tmp_path / "out.st"))["out"], expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_streamed_weights_equal_the_in_memory_densify_bit_for_bit(tmp_path, arch):
    _, folder = monarch_folder(tmp_path, arch, torch.bfloat16)
    densify_folder(folder, tmp_path / "dense")
    reference = load_model(folder)
    names = densify_(reference)
    stored = {}
    for file in (tmp_path / "dense").glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as handle:
            stored.update({k: handle.get_tensor(k) for k in handle.keys()})
    base = getattr(reference, "base_model_prefix", "")
    for name in names:
        weight = reference.get_submodule(name).weight.detach()
        key = next(k for k in (f"{name}.weight", f"{name.removeprefix(base + '.')}.weight") if k in stored)
        value = stored[key]  # both in the architecture's layout: GPT-2's Conv1D stores (in, out)
        assert value.dtype == torch.bfloat16 and torch.equal(value, weight), name


def test_gpt2_conv1d_weights_are_stored_in_their_own_layout(tmp_path):
    import transformers

    _, folder = monarch_folder(tmp_path, "gpt2")
    densify_folder(folder, tmp_path / "dense")
    dense = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "dense")
    assert is_conv1d(dense.transformer.h[0].attn.c_attn)  # (in, out), as GPT-2 keeps it


def test_densify_json_names_the_layers_it_multiplied_out(tmp_path, capsys):
    """``--json``, as every command has: stdout holds only the JSON, the layers are the
    Monarch layers the folder's report lists, and the bytes are the weights written."""
    _, folder = monarch_folder(tmp_path, "bert", torch.float32)
    capsys.readouterr()
    assert main(["densify", str(folder), "-o", str(tmp_path / "dense"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    monarch_layers = [row["name"] for row in json.loads((folder / "monarchify_report.json").read_text())["layers"]]
    assert sorted(result["layers"]) == sorted(monarch_layers) and len(monarch_layers) == 12
    weights = sum(path.stat().st_size for path in (tmp_path / "dense").glob("*.safetensors"))
    assert 0 < result["bytes_written"] <= weights
    assert result["out"] == str(tmp_path / "dense") and result["source"] == str(folder)


def test_report_and_convert_recognise_a_densified_folder(tmp_path, capsys):
    _, folder = monarch_folder(tmp_path, "bert", torch.float32)
    assert main(["densify", str(folder), "-o", str(tmp_path / "dense")]) == 0
    assert "densified 12 Monarch layers" in " ".join(capsys.readouterr().err.split())
    assert main(["report", str(tmp_path / "dense")]) == 1
    assert "is a densified Monarch model" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "dense"), "-o", str(tmp_path / "again"), "--no-check"]) == 0
    assert "is a densified Monarch model" in " ".join(capsys.readouterr().err.split())
    with pytest.raises(ModelLoadError, match="densified already"):
        densify_folder(tmp_path / "dense", tmp_path / "twice")


@pytest.mark.parametrize("command", [["report"], ["densify", "-o", "out"]])
def test_report_and_densify_of_a_file_say_it_is_a_file(tmp_path, capsys, command):
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"")
    capsys.readouterr()
    assert main([command[0], str(file), *command[1:]]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Error:") and "is a file; expected a model folder" in err and "does not exist" not in err, err


def test_densify_refuses_a_dense_folder_and_keeps_the_output_rules(tmp_path):
    tiny_bert().save_pretrained(tmp_path / "plain")
    with pytest.raises(ModelLoadError, match="not a Monarch checkpoint"):
        densify_folder(tmp_path / "plain", tmp_path / "out")
    _, folder = monarch_folder(tmp_path, "bert")
    with pytest.raises(Exception, match="would replace the input"):
        densify_folder(folder, folder, force=True)
    assert not (tmp_path / "out").exists()


SQUARE_ONLY = MonarchConfig(nblocks=4, include=["attn\\.c_proj"])
"""GPT-2's only square layer: a weight saved transposed would load without any error."""
RECIPES = {"gpt2": MonarchConfig(nblocks=4), "gpt2-square": SQUARE_ONLY, "bert": MonarchConfig(nblocks=4)}


def plain_load(folder, arch):
    import transformers

    cls = getattr(transformers, MAKERS[arch][1])
    model, info = cls.from_pretrained(folder, output_loading_info=True)
    assert not any(info.values()), info  # nothing missing, unexpected or of the wrong shape
    return model.eval()


@pytest.mark.parametrize("case", sorted(RECIPES))
@pytest.mark.parametrize("path", ["in-memory", "folder"])
def test_every_densify_path_saves_what_plain_from_pretrained_loads_as_the_monarch_model(tmp_path, case, path):
    arch = case.split("-")[0]
    model = MAKERS[arch][0]().double()
    report = convert(model, RECIPES[case])
    ids = torch.arange(2 * 7).reshape(2, 7) % 90 + 3
    with torch.no_grad():
        expected = model(ids)[0]
    if path == "in-memory":  # what train's switch does, then save
        assert densify_(model) == [row.name for row in report.converted]
        save_model(model, tmp_path / "dense")
    else:
        save_model(model, tmp_path / "monarch", report=report)
        densify_folder(tmp_path / "monarch", tmp_path / "dense")
    loaded = plain_load(tmp_path / "dense", arch)
    if arch == "gpt2":
        assert all(is_conv1d(m) for n, m in loaded.named_modules() if n.endswith(("c_attn", "c_proj", "c_fc")))
        if path == "in-memory":  # the model densified in memory is the architecture's own, layer by layer
            assert {type(m) for m in model.modules()} == {type(m) for m in loaded.modules()}
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids)[0], expected, rtol=1e-10, atol=1e-10)
