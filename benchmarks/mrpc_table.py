"""Summarise fine-tuning runs over seeds: the tables of docs/results.md.

Reads every ``RUNS/<name>-s<seed>/eval_results.json`` written by ``monarchify finetune``, groups
the runs whose names differ only in the ``-s<seed>`` suffix, and prints per group the number of
seeds, mean ± sample standard deviation and range of the dev accuracy and F1 (or the task's
main metric), the median training time and the parameter count, as a Markdown table.

    python benchmarks/mrpc_table.py runs/mrpc
    python benchmarks/mrpc_table.py runs/mrpc --only dense-lr1e-4 nb4-lr5e-5 --json
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

SEEDED = re.compile(r"^(?P<group>.+)-s(?P<seed>\d+)$")


def load_runs(root: Path) -> dict[str, dict[int, dict[str, Any]]]:
    groups: dict[str, dict[int, dict[str, Any]]] = defaultdict(dict)
    for path in sorted(root.glob("*/eval_results.json")):
        match = SEEDED.match(path.parent.name)
        if match:
            groups[match["group"]][int(match["seed"])] = json.loads(path.read_text(encoding="utf-8"))
    return dict(groups)


def _spread(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
    }


def summarise(group: str, runs: dict[int, dict[str, Any]]) -> dict[str, Any]:
    first = next(iter(runs.values()))
    metrics = sorted(k for k, v in first["metrics"]["validation"].items() if k in ("accuracy", "f1", "matthews_correlation", "pearson", "spearmanr"))
    return {
        "group": group,
        "seeds": sorted(runs),
        "metrics": {m: _spread([r["metrics"]["validation"][m] for r in runs.values()]) for m in metrics},
        "train_seconds_median": statistics.median(r["train"]["seconds"] for r in runs.values()),
        "params": first["params"]["monarch"],
        "monarch_layers": first["params"]["monarch_layers"],
    }


def markdown(rows: list[dict[str, Any]]) -> str:
    metrics = sorted({m for row in rows for m in row["metrics"]})
    head = ["runs", "seeds", "params", *[f"{m} mean ± std (min–max)" for m in metrics], "train time (median)"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for row in rows:
        cells = [row["group"], ",".join(map(str, row["seeds"])), f"{row['params'] / 1e6:.2f}M"]
        for m in metrics:
            s = row["metrics"].get(m)
            cells.append(f"{s['mean']:.3f} ± {s['std']:.3f} ({s['min']:.3f}–{s['max']:.3f})" if s else "—")
        cells.append(f"{row['train_seconds_median']:.0f} s")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path, help="folder holding <name>-s<seed>/ run folders")
    parser.add_argument("--only", nargs="*", help="groups to show, in this order (default: all)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of Markdown")
    args = parser.parse_args(argv)
    groups = load_runs(args.runs)
    if not groups:
        print(f"no <name>-s<seed>/eval_results.json under {args.runs}", file=sys.stderr)
        return 1
    names = args.only or sorted(groups)
    missing = [n for n in names if n not in groups]
    if missing:
        print(f"no runs for: {', '.join(missing)}", file=sys.stderr)
        return 1
    rows = [summarise(name, groups[name]) for name in names]
    print(json.dumps(rows, indent=2) if args.json else markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
