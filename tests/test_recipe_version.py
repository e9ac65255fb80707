"""Recipe versions: a newer recipe is refused in one line rather than carried out without the
fields this version does not know, and every older recipe still reads as it meant."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_bert
from monarchify.config import RECIPE_VERSION, CalibrationConfig, MonarchConfig, SpeedGateConfig
from monarchify.errors import ConfigError
from monarchify.hf.loading import load_model
from monarchify.hf.saving import recipe_of, save_model
from monarchify.monarch import MonarchLinear
from monarchify.pipeline import convert

# What the code wrote before output orders existed (version 1, no output_order: interleaved),
# with a calibration record as convert saved it.
VERSION_1_BEFORE_ORDERS = {
    "nblocks": 4, "include": [], "exclude": [], "overrides": {"query": 2}, "allow_structural_zeros": False,
    "budget": None, "budget_keep_dense": True,
    "calibration": {"source": "calib.txt", "kind": "text", "columns": None, "samples": 20, "heldout": 5,
                    "method": "whitened (block-diagonal)", "damping": 0.01, "sweeps": 0, "max_length": 128},
    "version": 1,
}
# What the last version-1 writer wrote for a recipe with a low-rank term.
VERSION_1_WITH_RANKS = {
    "nblocks": 4, "include": [], "exclude": [], "overrides": {}, "allow_structural_zeros": False, "budget": None,
    "budget_keep_dense": True, "ranks": {"query": 2}, "calibration": None, "output_order": "blocked", "version": 1,
}


def _one_line_upgrade(exc: pytest.ExceptionInfo, *words: str) -> None:
    message = str(exc.value)
    assert "\n" not in message and "upgrade monarchify" in message
    assert all(word in message for word in words), message


def test_the_recipe_grew_so_its_version_did():
    """Recipes with low-rank terms or an output-weighted budget must not claim the version that
    older readers (which drop those fields) accept."""
    recipe = MonarchConfig(ranks={"query": 2}).to_dict()
    assert recipe["version"] > 1 and MonarchConfig.from_dict(json.loads(json.dumps(recipe))).ranks == {"query": 2}


@pytest.mark.parametrize("change", [
    {"version": RECIPE_VERSION + 1},
    {"sparsity_pattern": "butterfly"},  # a field from the future
])
def test_a_newer_recipe_is_refused_not_weakened(change):
    recipe = {**MonarchConfig(ranks={"query": 2}).to_dict(), **change}
    with pytest.raises(ConfigError) as exc:
        MonarchConfig.from_dict(recipe)
    _one_line_upgrade(exc, *(str(v) if k == "version" else repr(k) for k, v in change.items()))


def test_unknown_fields_inside_calibration_and_speed_gate_are_refused_too():
    with pytest.raises(ConfigError) as exc:
        MonarchConfig.from_dict({**VERSION_1_BEFORE_ORDERS, "calibration": {"samples": 8, "rotate": True}})
    _one_line_upgrade(exc, "calibration", "'rotate'")
    with pytest.raises(ConfigError) as exc:
        SpeedGateConfig.from_dict({"tokens": 64, "device": "cuda"})
    _one_line_upgrade(exc, "speed_gate", "'device'")


@pytest.mark.parametrize("version", ["1", 1.0, True, None])
def test_a_version_that_is_not_a_number_is_refused(version):
    with pytest.raises(ConfigError, match="recipe version"):
        MonarchConfig.from_dict({"nblocks": 4, "version": version})


def test_version_1_recipes_mean_what_they_meant():
    old = MonarchConfig.from_dict(VERSION_1_BEFORE_ORDERS)
    assert old.output_order == "interleaved"  # the only order there was
    assert old.overrides == {"query": 2} and old.ranks == {} and old.budget_objective == "layers" and old.speed_gate is None
    assert old.calibration == CalibrationConfig(samples=20, heldout=5, sweeps=0, damping=0.01, max_length=128)
    assert old.version == RECIPE_VERSION  # read as the current version, and written so
    later = MonarchConfig.from_dict(VERSION_1_WITH_RANKS)
    assert later.ranks == {"query": 2} and later.output_order == "blocked"
    # Carried out, the old recipe builds interleaved layers with its override.
    model = tiny_bert()
    convert(model, MonarchConfig.from_dict({**VERSION_1_BEFORE_ORDERS, "calibration": None}))
    query = model.get_submodule("encoder.layer.0.attention.self.query")
    assert isinstance(query, MonarchLinear) and query.output_order == "interleaved" and query.nblocks == 2


def test_constructing_an_old_version_directly_points_to_from_dict():
    with pytest.raises(ConfigError, match="from_dict"):
        MonarchConfig(version=1)
    with pytest.raises(ConfigError, match="upgrade monarchify"):
        MonarchConfig(version=RECIPE_VERSION + 1)


def test_a_folder_saved_with_a_version_1_recipe_round_trips(tmp_path):
    """config.json's recipe of a folder written before the bump: it loads, reads, and a folder
    saved from it (fine-tuning re-saves the loaded model's recipe) keeps it as it was."""
    model = tiny_bert()
    report = convert(model, MonarchConfig.from_dict({**VERSION_1_BEFORE_ORDERS, "calibration": None}))
    save_model(model, tmp_path / "old", report=report)
    config_path = tmp_path / "old" / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"]["recipe"] = VERSION_1_BEFORE_ORDERS
    config_path.write_text(json.dumps(config))

    loaded = load_model(tmp_path / "old")
    ids = torch.randint(0, 100, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids)[0], model(ids)[0])
    assert recipe_of(loaded) == VERSION_1_BEFORE_ORDERS
    assert MonarchConfig.from_dict(recipe_of(loaded)) == MonarchConfig.from_dict(VERSION_1_BEFORE_ORDERS)
    save_model(loaded, tmp_path / "again", recipe=recipe_of(loaded))
    again = json.loads((tmp_path / "again" / "config.json").read_text())["quantization_config"]["recipe"]
    assert again == VERSION_1_BEFORE_ORDERS
    # A new conversion's recorded recipe (report and config.json) reads back as what it did.
    saved = json.loads((tmp_path / "old" / "monarchify_report.json").read_text())["meta"]["recipe"]
    assert saved["version"] == RECIPE_VERSION
    assert MonarchConfig.from_dict(saved).output_order == "interleaved"
