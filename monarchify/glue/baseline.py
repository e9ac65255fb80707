"""Did the model learn anything? Its score next to what a constant answer scores.

A run that ends exactly at the majority-class score (MRPC: accuracy 0.684, F1 0.812) looks
like any other result in a table. :func:`trivial_baseline` scores, with the task's own GLUE
metric, every constant answer on the evaluation split's labels (always the same class; for
STS-B a constant score, whose correlation is undefined and counted as 0), takes the best of
them on the task's main metric, and says whether the model is no better: it gave a single
answer to everything, or on *every* metric the constant is scored on it is within ``tolerance``
of that constant (or below). Every metric, not the main one alone: on MRPC a model that
answers "equivalent" to nearly everything has F1 close to the constant's 0.812, yet one that
beats the constant's accuracy by a few points has learned something.

Pure and torch-free: lists of labels and predictions in, a dictionary out (what
``eval_results.json`` records under ``trivial_baseline``).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from monarchify.glue.tasks import GlueTask

TOLERANCE = 0.005
"""A main metric this close to the best constant answer's (or below it) counts as not learned."""

Scorer = Callable[[Sequence[Any], Sequence[Any]], dict[str, float]]
"""``(predictions, references) -> {metric: value}``, as the GLUE metric module computes them."""


def glue_scorer(task: GlueTask) -> Scorer:
    """The task's shipped GLUE metric (:func:`monarchify.glue.metrics.load_metric`), so the
    baseline is computed exactly as the model's own scores are."""
    from monarchify.glue.metrics import load_metric

    metric = load_metric(task)
    return lambda predictions, references: metric.compute(predictions=list(predictions), references=list(references))


def _finite(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def trivial_baseline(
    task: GlueTask,
    references: Sequence[Any],
    predictions: Sequence[Any],
    *,
    score: Scorer | None = None,
    tolerance: float = TOLERANCE,
) -> dict[str, Any]:
    """The best constant answer's scores on ``references`` and whether ``predictions`` beat it.

    Returns ``answer`` (the constant's class name; ``None`` for regression), ``scores`` (what
    always giving it scores, metric names as the GLUE metric's), ``main_metric``, the model's
    ``model_score`` on it (``None`` where undefined), ``single_answer`` (the class name, or for
    regression the value, when the model gave one answer to every example, else ``None``) and
    ``at_baseline``.
    """
    references = list(references)
    predictions = list(predictions)
    main = task.main_metric
    score = score or glue_scorer(task)
    if task.is_regression:
        answer = None
        scores = {name: 0.0 for name in task.metrics}  # a constant has no correlation with anything
        single = predictions[0] if predictions and len(set(predictions)) == 1 else None
        single_answer: Any = None if single is None else float(single)
    else:
        candidates = []
        counts = Counter(int(label) for label in references)
        for label in sorted(counts, key=lambda c: (-counts[c], c)):  # ties: the most frequent class first
            values = score([label] * len(references), references)
            candidates.append((label, {k: float(v) for k, v in values.items()}))
        label, scores = max(candidates, key=lambda item: _finite(item[1].get(main)) or 0.0) if candidates else (0, {})
        answer = task.label_names[label] if label < len(task.label_names) else str(label)
        classes = {int(p) for p in predictions}
        single_answer = None
        if len(classes) == 1:
            only = classes.pop()
            single_answer = task.label_names[only] if 0 <= only < len(task.label_names) else str(only)
    if task.is_regression and single_answer is not None:
        model_scores: dict[str, Any] = {}  # a constant has no correlation (the metric would warn and give nan)
    else:
        model_scores = dict(score(predictions, references)) if predictions else {}
    model_score = _finite(model_scores.get(main))
    no_better = all(
        _finite(model_scores.get(name)) is None or _finite(model_scores.get(name)) <= value + tolerance
        for name, value in scores.items()
    )
    at_baseline = single_answer is not None or model_score is None or no_better
    return {
        "answer": answer,
        "scores": scores,
        "main_metric": main,
        "model_score": model_score,
        "single_answer": single_answer,
        "at_baseline": at_baseline,
    }


def baseline_message(split: str, baseline: dict[str, Any]) -> str | None:
    """One sentence for a split whose model is at the trivial baseline (``None`` otherwise):
    what it scores, what constant answer scores the same, and that it learned nothing. The
    front end adds what to try, in its own words (its flags)."""
    if not baseline.get("at_baseline"):
        return None
    main = baseline["main_metric"]
    shown = ", ".join(f"{name} {value:.3f}" for name, value in baseline["scores"].items())
    answer = baseline["answer"]
    constant = f"always answering '{answer}'" if answer is not None else "a constant score"
    model = baseline.get("model_score")
    scored = f"{main} {model:.3f}" if model is not None else f"{main} undefined"
    single = baseline.get("single_answer")
    if single is not None:
        said = f"'{single}'" if isinstance(single, str) else f"{single:.3g}"
        return f"{split}: the model answers {said} to every example ({scored}; {constant} scores {shown}): it has not learned the task"
    return f"{split}: the model scores {scored}, no better than {constant} ({shown}): it has not learned the task"
