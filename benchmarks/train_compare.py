"""Compare ``monarchify train`` runs: step-time speed-up over the first (dense) run (its median
step time / theirs), held-out perplexity at equal steps and at equal training time, and a
loss-against-time picture.

    python benchmarks/train_compare.py runs/train/dense runs/train/nb4 runs/train/nb4-dense \\
        --png docs/images/train_loss_time.png

Time is the time spent inside optimisation steps (``step_seconds`` of each run), so evaluations
and checkpoints do not count. "Equal time" is the training time of the fastest run: the other
runs' held-out loss is read off their evaluation curve at that time (linear between evaluations).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

RESULTS_FILE = "train_results.json"


def load(folder: str | Path) -> dict[str, Any]:
    return json.loads((Path(folder) / RESULTS_FILE).read_text(encoding="utf-8"))


def label(results: dict[str, Any]) -> str:
    options = results["options"]
    if not options.get("monarch"):
        return "dense"
    name = f"Monarch nb{options['monarch']['nblocks']}"
    if results.get("switch"):
        return f"{name} → dense at step {results['switch']['step']}"
    return name


def value_at(points: list[tuple[float, float]], x: float) -> float | None:
    """``y`` at ``x`` on the polyline ``points`` (sorted by x); ``None`` outside it."""
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return points[-1][1] if points and math.isclose(points[-1][0], x) else None


def eval_points(results: dict[str, Any], key: str = "seconds") -> list[tuple[float, float]]:
    return [(e[key], e["eval_loss"]) for e in results["curve"] if "eval_loss" in e]


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per run; ratios against the first run."""
    base = runs[0]["train"]["median_step_ms"]
    equal_time = min(r["train"]["step_seconds_total"] for r in runs)
    rows = []
    for r in runs:
        at_time = value_at(eval_points(r), equal_time)
        t = r["train"]
        rows.append({
            "run": label(r),
            "steps": t["steps"],
            "median_step_ms": t["median_step_ms"],
            "median_step_ms_monarch": t.get("median_step_ms_monarch"),
            "median_step_ms_dense": t.get("median_step_ms_dense"),
            "speedup_vs_first": base / t["median_step_ms"],
            "seconds_in_steps": t["step_seconds_total"],
            "params": r["model"]["params"]["total"],
            "params_at_start": r["model"]["params_at_start"]["total"],
            "eval_perplexity": r["eval"]["perplexity"],
            "equal_time_seconds": equal_time,
            "eval_perplexity_at_equal_time": math.exp(at_time) if at_time is not None else None,
            "switch": r.get("switch"),
            "load_average_at_start": t.get("load_average_at_start"),
        })
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"{'run':<34} {'steps':>5} {'step ms':>8} {'speedup':>7} {'s in steps':>10} {'ppl':>8} {'ppl @ ' + format(rows[0]['equal_time_seconds'], '.0f') + ' s':>12}")
    for row in rows:
        at = row["eval_perplexity_at_equal_time"]
        print(f"{row['run']:<34} {row['steps']:>5} {row['median_step_ms']:>8.0f} {row['speedup_vs_first']:>6.2f}× "
              f"{row['seconds_in_steps']:>10.0f} {row['eval_perplexity']:>8.1f} {at if at is None else format(at, '.1f'):>12}")


def smooth(values: list[float], window: int = 5) -> list[float]:
    return [sum(values[max(0, i - window + 1) : i + 1]) / len(values[max(0, i - window + 1) : i + 1]) for i in range(len(values))]


def plot(runs: list[dict[str, Any]], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for r in runs:
        train = [e for e in r["curve"] if "loss" in e]
        line, = axes[0].plot([e["seconds"] for e in train], smooth([e["loss"] for e in train]), label=label(r), lw=1.3)
        axes[1].plot([e["step"] for e in train], smooth([e["loss"] for e in train]), color=line.get_color(), lw=1.3)
        ev = [e for e in r["curve"] if "eval_loss" in e]
        axes[0].plot([e["seconds"] for e in ev], [e["eval_loss"] for e in ev], "o", color=line.get_color(), ms=4)
        axes[1].plot([e["step"] for e in ev], [e["eval_loss"] for e in ev], "o", color=line.get_color(), ms=4)
        if r.get("switch"):
            step = r["switch"]["step"]
            seconds = sum(r["step_seconds"][:step])
            axes[0].axvline(seconds, color=line.get_color(), ls=":", lw=1)
            axes[1].axvline(step, color=line.get_color(), ls=":", lw=1)
    axes[0].set_xlabel("seconds inside training steps")
    axes[1].set_xlabel("step")
    axes[0].set_ylabel("loss (lines: training, smoothed; dots: held-out)")
    axes[0].legend()
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle("Training from scratch: dense vs Monarch vs Monarch then dense")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    print(f"wrote {png}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="output folders of monarchify train; the first is the reference (dense)")
    parser.add_argument("--png", type=Path, help="write the loss-against-time picture here")
    parser.add_argument("--json", type=Path, help="write the table as JSON here")
    args = parser.parse_args()
    runs = [load(folder) for folder in args.runs]
    rows = summarise(runs)
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    if args.png:
        plot(runs, args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
