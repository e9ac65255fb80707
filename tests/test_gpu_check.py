"""benchmarks/gpu_check.py runs on a lent GPU for a few minutes at a time, so what can break
there without a GPU (its imports, the section loop, the model it times when the real
checkpoint is absent) is run here first, on the CPU at toy sizes."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def gpu_check(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))  # it imports train_compare beside it
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tiny_llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def test_the_decoding_section_times_every_path_on_a_model_of_the_shape_when_none_is_given(gpu_check, monkeypatch):
    from monarchify.hf import model_bench

    monkeypatch.setattr(gpu_check, "DECODE_SHAPES", [(32, 64)])
    monkeypatch.setattr(gpu_check, "DECODE_TOKENS", [1, 3])
    monkeypatch.setattr(gpu_check, "smollm2_shaped", _tiny_llama)
    generation = model_bench.Generation(prompt_tokens=4, new_tokens=2, batches=(1, 2))
    result = gpu_check.decode(torch.device("cpu"), 1, 1, Path("/nonexistent"), generation=generation, paths=("strided", "small"))
    assert [r["config"]["tokens"] for r in result["layers"]] == [1, 3]
    assert all(r["forward"]["ratio_small"] > 0 and r["forward"]["ratio_strided"] > 0 for r in result["layers"])
    assert sorted(result["models"]) == ["auto", "small", "strided"]
    for path, model in result["models"].items():
        assert model["path"] == path and "random weights" in model["model"]
        assert [row["batch"] for row in model["decode"]] == [1, 2]
        assert all(row["monarch_tokens_per_s"] > 0 for row in model["decode"] + model["prefill"])


def test_the_shape_model_is_smollm2s(gpu_check):
    with torch.device("meta"):
        model = gpu_check.smollm2_shaped()
    config = model.config
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (30, 576, 1536)
    assert (config.num_attention_heads, config.num_key_value_heads, config.vocab_size) == (9, 3, 49152)
    assert config.tie_word_embeddings and sum(p.numel() for p in model.parameters()) == 134_515_008


def test_unknown_sections_are_refused_and_a_cpu_only_machine_is_told(gpu_check, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--sections", "decode,nonsense"])
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main()
    assert exit_info.value.code == 2 and "nonsense" in capsys.readouterr().err
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--out", str(tmp_path / "out.json")])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main() == 2
    assert "no CUDA GPU" in capsys.readouterr().err and not (tmp_path / "out.json").exists()


def test_a_failing_section_is_recorded_and_the_rest_still_run(gpu_check, monkeypatch, tmp_path):
    """A short GPU lease must not lose every number to one broken section."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "fake GPU")
    monkeypatch.setitem(sys.modules, "triton", type(sys)("triton"))
    sys.modules["triton"].__version__ = "0"
    monkeypatch.setattr(gpu_check, "decode", lambda *a, **k: 1 / 0)
    monkeypatch.setattr(gpu_check, "layers", lambda *a, **k: [{"shape": "ok"}])
    out = tmp_path / "out.json"
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--sections", "decode,layers", "--out", str(out)])
    assert gpu_check.main() == 1
    saved = json.loads(out.read_text())
    assert "ZeroDivisionError" in saved["errors"]["decode"] and saved["layers"] == [{"shape": "ok"}]
    assert set(saved["seconds"]) == {"decode", "layers"}
