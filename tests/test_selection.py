"""Which layers get converted: the matching rules as a table, and the defaults per architecture."""

from __future__ import annotations

import pytest
import torch

from monarchify import MonarchConfig, convert
from monarchify.config import parse_override
from monarchify.errors import ConfigError, NoMatchError
from monarchify.monarch import MonarchLinear
from monarchify.pipeline.plan import name_matches, plan

from conftest import tiny_bert, tiny_gpt2, tiny_llama


@pytest.mark.parametrize(
    "pattern,name,expected",
    [
        ("query", "encoder.layer.0.attention.self.query", True),
        ("query", "encoder.layer.0.attention.self.query_proj", False),
        ("self\\.query", "encoder.layer.0.attention.self.query", True),
        ("uery", "encoder.layer.0.attention.self.query", False),
        ("layer\\.1\\..*", "encoder.layer.1.output.dense", True),
        ("layer\\.1\\..*", "encoder.layer.10.output.dense", False),
        ("encoder\\.layer\\.1\\..*", "encoder.layer.1.output.dense", True),
        (".*attention.*", "encoder.layer.3.attention.output.dense", True),
        ("attention\\..*", "encoder.layer.3.attention.output.dense", True),
        ("attention", "encoder.layer.3.attention.output.dense", False),
        ("dense", "encoder.layer.3.attention.output.dense", True),
        ("output\\.dense", "encoder.layer.3.intermediate.dense", False),
        ("h\\.[01]\\.mlp\\.c_fc", "transformer.h.1.mlp.c_fc", True),
        ("h\\.[01]\\.mlp\\.c_fc", "transformer.h.11.mlp.c_fc", False),
        ("classifier", "classifier", True),
        ("q_proj|k_proj", "model.layers.0.self_attn.k_proj", True),
    ],
)
def test_name_matching_is_anchored_to_whole_components(pattern, name, expected):
    assert name_matches(pattern, name) is expected


def names(model, config=None):
    return [layer.name for layer in plan(model, config or MonarchConfig())]


def test_bert_default_is_the_six_encoder_linears_per_layer_and_nothing_else():
    model = tiny_bert(with_head=True)
    chosen = names(model)
    assert len(chosen) == 2 * 6
    assert all(n.startswith("bert.encoder.layer.") for n in chosen)
    assert not any("pooler" in n or "classifier" in n for n in chosen)


def test_gpt2_default_takes_conv1d_in_blocks_and_never_the_lm_head():
    chosen = names(tiny_gpt2())
    assert chosen == [f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]


def test_llama_default_takes_all_seven_projections():
    chosen = names(tiny_llama())
    assert len(chosen) == 2 * 7 and "lm_head" not in chosen


def test_include_replaces_the_default_so_a_head_can_be_converted():
    model = tiny_bert(with_head=True, hidden_size=64)
    assert names(model, MonarchConfig(nblocks=2, include=["pooler\\.dense"])) == ["bert.pooler.dense"]


def test_exclude_and_overrides():
    model = tiny_bert()
    config = MonarchConfig(nblocks=4, exclude=["layer\\.1\\..*"], overrides={"attention\\..*": 2, "query": 3})
    chosen = plan(model, config)
    assert all(".layer.0." in layer.name for layer in chosen)
    blocks = {layer.name.split("layer.0.")[1]: layer.nblocks for layer in chosen}
    assert blocks["attention.self.query"] == 3  # last matching override wins
    assert blocks["attention.self.key"] == 2
    assert blocks["intermediate.dense"] == 4
    pinned = {layer.name.split("layer.0.")[1]: layer.pinned for layer in chosen}
    assert blocks["output.dense"] == 4 and not pinned["output.dense"] and pinned["attention.output.dense"]
    later = plan(model, MonarchConfig(nblocks=4, overrides={"query": 3, ".*": 2}))
    assert {layer.nblocks for layer in later} == {2} and all(layer.pinned for layer in later)


def test_a_pattern_that_matches_nothing_names_what_exists():
    with pytest.raises(NoMatchError, match="matches no linear layer.*encoder.layer.0"):
        plan(tiny_bert(), MonarchConfig(include=["nonexistent_layer"]))
    with pytest.raises(NoMatchError, match="override"):
        plan(tiny_bert(), MonarchConfig(overrides={"nonexistent": 2}))
    with pytest.raises(NoMatchError, match="matches no layer"):
        plan(tiny_bert(), MonarchConfig(exclude=[".*"]))


@pytest.mark.parametrize(
    "kwargs",
    [{"nblocks": 0}, {"nblocks": -1}, {"nblocks": "4"}, {"include": ["("]}, {"overrides": {"x": 0}}],
)
def test_bad_configs_are_refused(kwargs):
    with pytest.raises(ConfigError):
        MonarchConfig(**kwargs)


def test_parse_override():
    assert parse_override("attention\\..*=2") == ("attention\\..*", 2)
    assert parse_override("a=b=3") == ("a=b", 3)
    for bad in ("nope", "=3", "x=abc", "x=0"):
        with pytest.raises(ConfigError):
            parse_override(bad)


def test_convert_swaps_in_place_and_a_failure_leaves_the_model_untouched():
    model = tiny_bert()
    with torch.no_grad():
        model.encoder.layer[1].output.dense.weight[0, 0] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(Exception, match="encoder.layer.1.output.dense"):
        convert(model, MonarchConfig(nblocks=2))
    assert not any(isinstance(m, MonarchLinear) for m in model.modules())
    torch.testing.assert_close(model.state_dict(), before, rtol=0, atol=0, equal_nan=True)

    model = tiny_bert()
    report = convert(model, MonarchConfig(nblocks=2))
    assert len(report.layers) == 12
    assert sum(isinstance(m, MonarchLinear) for m in model.modules()) == 12
    assert report.model_params_after < report.model_params_before


def test_filter_fn_replaces_the_default():
    model = tiny_bert()
    report = convert(model, MonarchConfig(nblocks=2), filter_fn=lambda module, name: name.endswith("query"))
    assert [layer.name for layer in report.layers] == ["encoder.layer.0.attention.self.query", "encoder.layer.1.attention.self.query"]


def test_filter_fn_and_include_both_apply():
    """Regression: ``include`` used to make ``filter_fn`` silently ignored."""
    only_layer_0 = lambda module, name: ".layer.0." in name  # noqa: E731
    chosen = [layer.name for layer in plan(tiny_bert(), MonarchConfig(include=["query", "key"]), only_layer_0)]
    assert chosen == ["encoder.layer.0.attention.self.query", "encoder.layer.0.attention.self.key"]
    with pytest.raises(NoMatchError, match="matches no layer"):
        plan(tiny_bert(), MonarchConfig(include=["query"]), lambda module, name: False)


def test_an_already_converted_model_says_so():
    model = tiny_bert()
    convert(model, MonarchConfig(nblocks=2))
    with pytest.raises(NoMatchError, match="already Monarch"):
        plan(model, MonarchConfig(nblocks=2))
