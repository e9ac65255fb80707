"""Pictures of what the library measures: a conversion's layers, a fine-tuning run's curves, a
model benchmark.

Each ``*_figure`` function takes plain data (report rows, Trainer's log history, a benchmark's
result dict) and returns a matplotlib ``Figure``, so tests can count what is drawn;
:func:`save_figure` writes it as PNG or SVG. matplotlib is an optional extra: it is imported
only here, inside the functions, with the Agg backend (no display needed).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from monarchify.errors import ConfigError
from monarchify.report import LayerReport

FORMATS = (".png", ".svg")
DPI = 100
"""Pixels per inch of a PNG: a figure of ``w × h`` inches is ``100 w × 100 h`` pixels."""
DENSE, MONARCH = "#7f7f7f", "#1f77b4"
MISSING_MATPLOTLIB = 'pictures need matplotlib: pip install "monarchify[plot]"'


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend, or a one-line error saying how to install it."""
    try:
        import matplotlib
    except ImportError:
        raise ConfigError(MISSING_MATPLOTLIB) from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def check_picture_path(path: str | os.PathLike[str]) -> Path:
    """The path, if its extension names a format this module writes. Checked before any work,
    so a typo fails in one line instead of after a long computation."""
    path = Path(path)
    if path.suffix.lower() not in FORMATS:
        raise ConfigError(f"'{path}': a picture must end in {' or '.join(FORMATS)}")
    if path.parent != Path("") and not path.parent.is_dir():
        raise ConfigError(f"'{path}': folder '{path.parent}' does not exist")
    return path


def save_figure(figure: Any, path: str | os.PathLike[str]) -> Path:
    """Write ``figure`` as PNG or SVG (by the extension) and release its memory."""
    path = check_picture_path(path)
    plt = pyplot()
    try:
        figure.savefig(path, dpi=DPI, format=path.suffix.lower().lstrip("."))
    finally:
        plt.close(figure)
    return path


def figure_bytes(figure: Any, fmt: str = "png") -> bytes:
    """The figure as PNG (or SVG) bytes, for a file written atomically with others."""
    import io

    plt = pyplot()
    buffer = io.BytesIO()
    try:
        figure.savefig(buffer, dpi=DPI, format=fmt)
    finally:
        plt.close(figure)
    return buffer.getvalue()


# ------------------------------------------------------------------------------ conversion

_BLOCK = re.compile(r"^(.*?\.)?(\d+)\.(.+)$")


def _block_of(name: str) -> tuple[str, str]:
    """(block, name inside it): ``encoder.layer.3.attention.self.query`` → (``3``, ``attention.self.query``)."""
    match = _BLOCK.match(name)
    return (match.group(2), match.group(3)) if match else ("", name)


def _short_names(inner: Sequence[str]) -> list[str]:
    """Tick labels: each name's shortest dotted tail that no other layer of the list shares,
    once a generic last part is dropped (BERT's ``attention.output.dense`` and ``output.dense``
    become ``attention.output`` and ``output``; ``attention.self.query`` becomes ``query``)."""
    parts = [name.split(".") for name in inner]
    parts = [p[:-1] if len(p) > 1 and p[-1] in ("dense", "weight") else p for p in parts]
    distinct = set(map(tuple, parts))

    def label(p: list[str]) -> str:
        for size in range(1, len(p)):
            if sum(1 for other in distinct if other[-size:] == tuple(p[-size:])) == 1:
                return ".".join(p[-size:])
        return ".".join(p)

    return [label(p) for p in parts]


def layers_figure(layers: Sequence[LayerReport], title: str | None = None) -> Any:
    """Per layer, in the order given (model order): the relative error of its projection
    (top) and the share of its dense parameters it keeps (bottom), grouped by transformer
    block; layers kept dense are grey and marked ``dense``, unknown errors ``?``."""
    plt = pyplot()
    n = len(layers)
    figure, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(max(6.0, 0.28 * n + 2.0), 5.6))
    x = list(range(n))
    colors = [DENSE if layer.kept_dense else MONARCH for layer in layers]
    errors = [0.0 if layer.kept_dense or layer.rel_error is None else layer.rel_error for layer in layers]
    kept = [1.0 if layer.kept_dense else layer.params_monarch / max(layer.params_dense, 1) for layer in layers]
    top.bar(x, errors, color=colors, width=0.8)
    bottom.bar(x, kept, color=colors, width=0.8)
    top_limit = max([*errors, 0.1]) * 1.18
    top.set_ylim(0, top_limit)
    for i, layer in enumerate(layers):
        if layer.kept_dense or layer.rel_error is None:
            top.text(i, top_limit * 0.02, "dense" if layer.kept_dense else "?", rotation=90, ha="center", va="bottom",
                     fontsize=7, color=DENSE)
    top.set_ylabel("relative error\n‖W − M‖ / ‖W‖")
    bottom.set_ylabel("parameters kept")
    bottom.set_ylim(0, 1.08)
    bottom.yaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:.0%}"))
    blocks = [_block_of(layer.name) for layer in layers]
    bottom.set_xticks(x)
    bottom.set_xticklabels(_short_names([inner for _, inner in blocks]), rotation=90, fontsize=7)
    bottom.set_xlim(-0.6, n - 0.4)
    # Block boundaries and names, so 36 bars read as 6 blocks of 6.
    starts = [i for i in range(n) if i == 0 or blocks[i][0] != blocks[i - 1][0]]
    for start, end in zip(starts, [*starts[1:], n]):
        for axis in (top, bottom):
            if start:
                axis.axvline(start - 0.5, color="black", linewidth=0.6, alpha=0.4)
        if blocks[start][0]:
            top.text((start + end - 1) / 2, top_limit * 0.97, f"block {blocks[start][0]}", ha="center", va="top", fontsize=8)
    for axis in (top, bottom):
        axis.grid(axis="y", alpha=0.3)
        axis.set_axisbelow(True)
    handles = [plt.Rectangle((0, 0), 1, 1, color=MONARCH), plt.Rectangle((0, 0), 1, 1, color=DENSE)]
    figure.legend(handles, ["Monarch", "kept dense"], loc="upper right", ncol=2, fontsize=8, frameon=False)
    top.set_title(title or "", fontsize=10, loc="left")
    figure.tight_layout(rect=(0, 0, 1, 0.96))
    return figure


# ----------------------------------------------------------------------------- fine-tuning


def _metric_series(history: Sequence[dict[str, Any]]) -> dict[str, list[tuple[float, float]]]:
    """``eval_<split>_<metric>`` (or ``eval_<metric>``) entries as ``<split> <metric>`` → [(step, value)]."""
    series: dict[str, list[tuple[float, float]]] = {}
    for entry in history:
        step = entry.get("step")
        for key, value in entry.items():
            if not key.startswith("eval_") or not isinstance(value, (int, float)) or step is None:
                continue
            name = key.removeprefix("eval_").replace("_", " ")
            if name.endswith(("runtime", "per second", "epoch", "samples per second", "steps per second")):
                continue
            series.setdefault(name, []).append((float(step), float(value)))
    return series


def training_figure(history: Sequence[dict[str, Any]], title: str | None = None) -> Any:
    """Training loss per logged step (left) and each evaluation (right: metrics and loss per
    split, one point per evaluation, the last one the saved model)."""
    plt = pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(10.0, 4.0))
    steps = [(float(e["step"]), float(e["loss"])) for e in history if "loss" in e and "step" in e]
    if steps:
        left.plot(*zip(*steps), color=MONARCH, linewidth=1.2, label="training loss")
    series = _metric_series(history)
    losses = [name for name in series if name.endswith("loss")]
    for index, name in enumerate(losses, 1):  # colours after the training loss's
        left.plot(*zip(*series[name]), marker="o", linestyle="--", linewidth=1, color=f"C{index}", label=name)
    left.set_xlabel("step")
    left.set_ylabel("loss")
    left.grid(alpha=0.3)
    if left.lines:
        left.legend(fontsize=8)
    metrics = {name: points for name, points in series.items() if not name.endswith("loss")}
    for name, points in metrics.items():
        right.plot(*zip(*points), marker="o", linewidth=1, label=name)
        last_step, last = points[-1]
        right.annotate(f"{last:.3f}", (last_step, last), textcoords="offset points", xytext=(4, 4), fontsize=7)
    right.margins(y=0.15)  # room for the labels of the top points
    right.set_xlabel("step")
    right.set_ylabel("dev metric")
    right.grid(alpha=0.3)
    if metrics:
        right.legend(fontsize=8)
    else:
        right.text(0.5, 0.5, "no evaluation", ha="center", va="center", transform=right.transAxes)
    if steps:
        right.set_xlim(left.get_xlim())
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return figure


# ------------------------------------------------------------------------------- benchmark

STAGES = {"inference": "inference", "train_step": "training step", "forward": "forward", "forward_backward": "forward + backward"}


def bench_figure(result: dict[str, Any], title: str | None = None) -> Any:
    """Dense against Monarch milliseconds per stage of a benchmark result (``bench model`` or
    ``bench layer``), each pair labelled with its speed-up (dense time / Monarch time)."""
    plt = pyplot()
    stages = [key for key in STAGES if isinstance(result.get(key), dict)]
    figure, axis = plt.subplots(figsize=(max(4.5, 2.2 * len(stages) + 1.5), 4.0))
    width = 0.38
    for offset, (kind, color, label) in zip((-width / 2, width / 2), (("dense", DENSE, "dense"), ("monarch", MONARCH, "Monarch"))):
        values = [result[stage][f"{kind}_ms"] for stage in stages]
        bars = axis.bar([i + offset for i in range(len(stages))], values, width, color=color, label=label)
        axis.bar_label(bars, fmt="%.1f", fontsize=8, padding=2)
    top = max([result[s][k] for s in stages for k in ("dense_ms", "monarch_ms")], default=1.0)
    for i, stage in enumerate(stages):  # the speed-up just above its pair's taller bar and its label
        ratio = result[stage]["ratio"]
        pair = max(result[stage]["dense_ms"], result[stage]["monarch_ms"])
        axis.text(i, pair + top * 0.1, f"{ratio:.2f}× faster" if ratio >= 1 else f"{1 / ratio:.2f}× slower",
                  ha="center", fontsize=9, fontweight="bold")
    axis.set_ylim(0, top * 1.25)
    axis.set_xticks(range(len(stages)))
    axis.set_xticklabels([STAGES[stage] for stage in stages])
    axis.set_ylabel("milliseconds (median)")
    axis.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, fontsize=8, frameon=False)
    axis.grid(axis="y", alpha=0.3)
    axis.set_axisbelow(True)
    if title:
        axis.set_title(title, fontsize=9)
    figure.tight_layout()
    return figure
