"""The run manifest: stages reused only with the options they were made with."""

import json

import pytest

from monarchify.errors import ConfigError
from monarchify.manifest import MANIFEST_FILE, RunManifest


def _run(folder, teacher, convert, student, finish=("a", "b", "c")):
    """One run of three stages; returns how each stood when checked."""
    manifest = RunManifest.load(folder)
    seen = {}
    for name, options in (("a", teacher), ("b", convert), ("c", student)):
        seen[name] = manifest.check(name, options)
        if seen[name] != "done":
            manifest.start(name, options)
        if name in finish:
            manifest.finish(name)
    return seen


def test_a_rerun_with_the_same_options_reuses_every_stage(tmp_path):
    assert _run(tmp_path, {"lr": 1e-4}, {"budget": 0.4}, {"lr": 5e-5}) == {"a": "new", "b": "new", "c": "new"}
    assert _run(tmp_path, {"lr": 1e-4}, {"budget": 0.4}, {"lr": 5e-5}) == {"a": "done", "b": "done", "c": "done"}


def test_a_changed_option_makes_its_stage_and_every_later_one_stale(tmp_path):
    _run(tmp_path, {"lr": 1e-4}, {"budget": 0.4}, {"lr": 5e-5})
    seen = _run(tmp_path, {"lr": 1e-4}, {"budget": 0.376}, {"lr": 5e-5})
    # c was dropped when b started again: whatever it held was made from the old b
    assert seen == {"a": "done", "b": "stale", "c": "new"}
    # and the next run with the new budget reuses what this one made
    assert _run(tmp_path, {"lr": 1e-4}, {"budget": 0.376}, {"lr": 5e-5}) == {"a": "done", "b": "done", "c": "done"}


def test_changes_name_the_option_and_both_values(tmp_path):
    _run(tmp_path, {"lr": 1e-4}, {"budget": 0.4, "objective": "layers"}, {"lr": 5e-5})
    manifest = RunManifest.load(tmp_path)
    assert manifest.changes("b", {"budget": 0.376, "objective": "layers"}) == ["budget (was 0.4, now 0.376)"]
    assert manifest.changes("b", {"budget": 0.4, "objective": "layers", "ranks": [8]}) == ["ranks (new: [8])"]
    assert manifest.changes("b", {"budget": 0.4, "objective": "layers"}) == []


def test_an_unfinished_stage_reads_as_started_and_continues(tmp_path):
    assert _run(tmp_path, {"x": 1}, {"y": 2}, {"z": 3}, finish=("a",))["b"] == "new"
    seen = _run(tmp_path, {"x": 1}, {"y": 2}, {"z": 3})
    assert seen == {"a": "done", "b": "started", "c": "new"}


def test_restart_from_a_stage_forgets_it_and_the_later_ones(tmp_path):
    _run(tmp_path, {"x": 1}, {"y": 2}, {"z": 3})
    RunManifest.load(tmp_path).forget("b")
    assert _run(tmp_path, {"x": 1}, {"y": 2}, {"z": 3}) == {"a": "done", "b": "new", "c": "new"}


def test_tuples_and_paths_compare_as_they_read_back(tmp_path):
    _run(tmp_path, {"files": ("a.txt", "b.txt")}, {"out": tmp_path / "x"}, {})
    assert _run(tmp_path, {"files": ["a.txt", "b.txt"]}, {"out": str(tmp_path / "x")}, {})["b"] == "done"


def test_a_damaged_or_newer_manifest_is_refused_in_one_line(tmp_path):
    (tmp_path / MANIFEST_FILE).write_text("{not json", encoding="utf-8")
    with pytest.raises(ConfigError, match="cannot read the run manifest"):
        RunManifest.load(tmp_path)
    (tmp_path / MANIFEST_FILE).write_text(json.dumps({"version": 99, "stages": {}}), encoding="utf-8")
    with pytest.raises(ConfigError, match="newer monarchify"):
        RunManifest.load(tmp_path)


def test_start_without_check_is_a_programming_error(tmp_path):
    with pytest.raises(RuntimeError):
        RunManifest.load(tmp_path).start("a", {})


def test_the_manifest_file_follows_the_umask_and_leaves_no_temporary_file(tmp_path):
    _run(tmp_path, {"x": 1}, {"y": 2}, {"z": 3})
    assert [p.name for p in tmp_path.iterdir()] == [MANIFEST_FILE]
    assert (tmp_path / MANIFEST_FILE).stat().st_mode & 0o044 == 0o044  # readable by others under umask 022


def test_a_change_upstream_makes_a_stage_stale_whose_own_options_did_not_change(tmp_path):
    _run(tmp_path, {"lr": 1e-4}, {"budget": 0.4}, {"lr": 5e-5})
    manifest = RunManifest.load(tmp_path)
    assert manifest.check("a", {"lr": 2e-4}) == "stale"
    assert manifest.check("b", {"budget": 0.4}) == "stale"
    assert manifest.changes("b", {"budget": 0.4}) == []


def test_a_change_inside_nested_options_is_named_by_its_dotted_path(tmp_path):
    _run(tmp_path, {"x": 1}, {"recipe": {"budget": 0.4, "calibration": {"samples": 128}}}, {})
    manifest = RunManifest.load(tmp_path)
    assert manifest.changes("b", {"recipe": {"budget": 0.4, "calibration": {"samples": 256}}}) == [
        "recipe.calibration.samples (was 128, now 256)"]
def test_a_resume_with_other_options_is_refused_in_one_line_naming_them(tmp_path):
    _run(tmp_path, {"lr": 1e-4, "seed": 0}, {}, {}, finish=())
    manifest = RunManifest.load(tmp_path)
    with pytest.raises(ConfigError) as caught:
        manifest.check_resume("a", {"lr": 1e-4, "seed": 1})
    message = str(caught.value)
    assert "seed (was 0, now 1)" in message and "lr" not in message.split("options:")[1] and "\n" not in message
    assert RunManifest.load(tmp_path).check_resume("a", {"lr": 1e-4, "seed": 0}) == "started"
    assert RunManifest.load(tmp_path / "none").check_resume("a", {}) == "new"


def test_a_change_inside_a_nested_group_names_the_field(tmp_path):
    _run(tmp_path, {"monarch": {"nblocks": 4, "include": None}}, {}, {})
    manifest = RunManifest.load(tmp_path)
    assert manifest.changes("a", {"monarch": {"nblocks": 2, "include": None}}) == ["monarch.nblocks (was 4, now 2)"]
    assert manifest.changes("a", {"monarch": None}) == ["monarch (was {'include': None, 'nblocks': 4}, now None)"]


def test_a_whole_float_is_the_same_option_as_its_integer(tmp_path):
    _run(tmp_path, {"epochs": 2, "lr": 2e-3}, {"ranks": [8.0]}, {})
    assert _run(tmp_path, {"epochs": 2.0, "lr": 0.002}, {"ranks": (8,)}, {}) == {"a": "done", "b": "done", "c": "done"}
