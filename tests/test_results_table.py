"""``benchmarks/mrpc_table.py``: runs grouped over seeds, mean and spread computed right."""

from __future__ import annotations

import importlib.util
import json
import statistics

from conftest import REPO

spec = importlib.util.spec_from_file_location("mrpc_table", REPO / "benchmarks" / "mrpc_table.py")
mrpc_table = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mrpc_table)


def write_run(root, name, accuracy, f1, seconds, params=1000):
    folder = root / name
    folder.mkdir(parents=True)
    results = {
        "metrics": {"validation": {"accuracy": accuracy, "f1": f1, "loss": 0.5}},
        "train": {"seconds": seconds},
        "params": {"monarch": params, "monarch_layers": 3},
    }
    (folder / "eval_results.json").write_text(json.dumps(results))


def test_groups_seeds_and_computes_the_spread(tmp_path, capsys):
    for seed, (acc, f1, sec) in enumerate([(0.70, 0.80, 100), (0.74, 0.82, 300), (0.72, 0.81, 200)]):
        write_run(tmp_path, f"nb4-lr5e-5-s{seed}", acc, f1, sec)
    write_run(tmp_path, "dense-s0", 0.8, 0.85, 50, params=5000)
    write_run(tmp_path, "not-seeded", 0.1, 0.1, 1)  # no -s<seed> suffix: ignored

    assert mrpc_table.main([str(tmp_path), "--json"]) == 0
    rows = {row["group"]: row for row in json.loads(capsys.readouterr().out)}
    assert set(rows) == {"nb4-lr5e-5", "dense"}
    row = rows["nb4-lr5e-5"]
    assert row["seeds"] == [0, 1, 2] and row["train_seconds_median"] == 200 and row["params"] == 1000
    acc = row["metrics"]["accuracy"]
    assert abs(acc["mean"] - 0.72) < 1e-12 and abs(acc["std"] - statistics.stdev([0.70, 0.74, 0.72])) < 1e-12
    assert (acc["min"], acc["max"]) == (0.70, 0.74) and "loss" not in row["metrics"]
    assert rows["dense"]["metrics"]["f1"]["std"] == 0.0

    assert mrpc_table.main([str(tmp_path), "--only", "dense", "nb4-lr5e-5"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[2].startswith("| dense | 0 |") and "0.720 ± 0.020 (0.700–0.740)" in table[3]
    assert mrpc_table.main([str(tmp_path), "--only", "nope"]) == 1
