"""One line per `robust_runs.sh` run against its own teacher, then each lever's mean and worst seed.

    python benchmarks/robust_summary.py runs/robust-mrpc [--json]

Accuracy is what the targets are stated in (every GLUE classification task reports it); the
task's other headline metric (MRPC's F1, CoLA's Matthews correlation) is printed beside it.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

OTHER = ("f1", "matthews_correlation", "pearson", "spearmanr")


def rows(runs: Path) -> list[dict]:
    found = []
    for results in sorted(runs.glob("*/eval_results.json")):
        data = json.loads(results.read_text())
        lever, seed = results.parent.name.rsplit("-s", 1)
        split = next(iter(data["main_metric"]))
        student, teacher = data["metrics"][split], data["compress"]["dense"]["metrics"][split]
        names = [n for n in ("accuracy", *OTHER) if n in student and n in teacher]
        found.append({"run": results.parent.name, "lever": lever, "seed": int(seed), "split": split,
                      "teacher": {n: teacher[n] for n in names}, "student": {n: student[n] for n in names},
                      "gap_points": {n: 100 * (student[n] - teacher[n]) for n in names},
                      "stage3_minutes": data["train"]["seconds"] / 60})
    return found


def levers(found: list[dict]) -> dict[str, dict[str, dict[str, float]]]:
    by_lever: dict[str, list[dict]] = {}
    for row in found:
        by_lever.setdefault(row["lever"], []).append(row)
    return {lever: {name: {"mean": statistics.mean(r["gap_points"][name] for r in group),
                           "worst": min(r["gap_points"][name] for r in group), "seeds": len(group)}
                    for name in group[0]["gap_points"]}
            for lever, group in by_lever.items()}


def main(argv: list[str]) -> None:
    runs = Path(argv[0])
    found = rows(runs)
    if "--json" in argv:
        print(json.dumps({"runs": found, "levers": levers(found)}, indent=2))
        return
    for row in found:
        scores = "  ".join(f"{n} {row['teacher'][n]:.4f} -> {row['student'][n]:.4f} ({row['gap_points'][n]:+.2f})"
                           for n in row["gap_points"])
        print(f"{row['run']:22s} {scores}  stage 3 {row['stage3_minutes']:.1f} min")
    for lever, names in levers(found).items():
        for name, s in names.items():
            print(f"{lever:22s} {name:9s} mean {s['mean']:+.2f}, worst {s['worst']:+.2f} points over {s['seeds']} seeds")


if __name__ == "__main__":
    main(sys.argv[1:])
