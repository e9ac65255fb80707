"""``benchmarks/robust_summary.py``: every run set against its own teacher, levers summarised."""

from __future__ import annotations

import importlib.util
import json

import pytest

from conftest import REPO

spec = importlib.util.spec_from_file_location("robust_summary", REPO / "benchmarks" / "robust_summary.py")
robust_summary = importlib.util.module_from_spec(spec)
spec.loader.exec_module(robust_summary)


def write_run(root, name, student, teacher, minutes=10.0):
    folder = root / name
    folder.mkdir(parents=True)
    results = {
        "main_metric": {"validation": student["f1"]},
        "metrics": {"validation": {**student, "loss": 0.5}},
        "compress": {"dense": {"metrics": {"validation": {**teacher, "loss": 0.4}}}},
        "train": {"seconds": 60 * minutes},
    }
    (folder / "eval_results.json").write_text(json.dumps(results))


def test_each_run_is_measured_against_its_own_teacher(tmp_path, capsys):
    teachers = [{"accuracy": 0.80, "f1": 0.86}, {"accuracy": 0.75, "f1": 0.83}]
    write_run(tmp_path, "today-s0", {"accuracy": 0.76, "f1": 0.85}, teachers[0])
    write_run(tmp_path, "today-s1", {"accuracy": 0.75, "f1": 0.84}, teachers[1])
    write_run(tmp_path, "holdout-augment-s0", {"accuracy": 0.79, "f1": 0.86}, teachers[0], minutes=12)
    levers = robust_summary.levers(robust_summary.rows(tmp_path))
    assert levers["today"]["accuracy"]["mean"] == pytest.approx(-2.0)  # (-4 + 0) / 2
    assert levers["today"]["accuracy"]["worst"] == pytest.approx(-4.0)
    assert levers["today"]["f1"]["worst"] == pytest.approx(-1.0)
    assert levers["holdout-augment"]["accuracy"] == {"mean": pytest.approx(-1.0), "worst": pytest.approx(-1.0), "seeds": 1}

    robust_summary.main([str(tmp_path)])
    out = capsys.readouterr().out
    assert "today-s0" in out and "(-4.00)" in out and "mean -2.00, worst -4.00 points over 2 seeds" in out
    robust_summary.main([str(tmp_path), "--json"])
    assert json.loads(capsys.readouterr().out)["runs"][0]["stage3_minutes"] == pytest.approx(12.0)
