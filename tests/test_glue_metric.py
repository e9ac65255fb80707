"""The shipped GLUE metric module: loads offline by path, equals scikit-learn/SciPy for every task."""

from __future__ import annotations

import evaluate
import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from monarchify.glue import METRIC_PATH, TASK_NAMES, get_task, load_metric
from monarchify.glue.metrics import compute_metrics_fn, predictions_from_logits


def expected(task_name: str, predictions: np.ndarray, references: np.ndarray) -> dict[str, float]:
    if task_name == "cola":
        return {"matthews_correlation": matthews_corrcoef(references, predictions)}
    if task_name == "stsb":
        return {"pearson": pearsonr(references, predictions)[0], "spearmanr": spearmanr(references, predictions)[0]}
    if task_name in ("mrpc", "qqp"):
        return {"accuracy": accuracy_score(references, predictions), "f1": f1_score(references, predictions)}
    return {"accuracy": accuracy_score(references, predictions)}


def random_case(task_name: str, seed: int, n: int = 200) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    task = get_task(task_name)
    if task.is_regression:
        references = rng.uniform(0, 5, n).astype(np.float32)
        return (references + rng.normal(0, 1.5, n)).astype(np.float32), references
    references = rng.integers(0, task.num_labels, n)
    # Agree with the references 60% of the time so the scores are far from both 0 and 1.
    predictions = np.where(rng.random(n) < 0.6, references, rng.integers(0, task.num_labels, n))
    return predictions, references


@pytest.mark.parametrize("name", TASK_NAMES)
def test_metric_equals_sklearn_scipy(name):
    metric = load_metric(get_task(name))
    for seed in range(3):
        predictions, references = random_case(name, seed)
        got = metric.compute(predictions=predictions, references=references)
        want = expected(name, predictions, references)
        assert set(got) == set(want)
        for key, value in want.items():
            assert got[key] == pytest.approx(float(value), abs=1e-6), (name, key)
        assert set(get_task(name).metrics) == set(got)


def test_metric_is_not_trivially_constant():
    metric = load_metric(get_task("mrpc"))
    perfect = metric.compute(predictions=[0, 1, 1, 0], references=[0, 1, 1, 0])
    wrong = metric.compute(predictions=[1, 0, 0, 1], references=[0, 1, 1, 0])
    assert perfect == {"accuracy": 1.0, "f1": 1.0} and wrong == {"accuracy": 0.0, "f1": 0.0}


def test_module_loads_by_path_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert METRIC_PATH.is_file()
    metric = evaluate.load(str(METRIC_PATH.parent), config_name="mnli_mismatched", keep_in_memory=True)
    assert metric.compute(predictions=[0, 2, 1], references=[0, 2, 2]) == {"accuracy": pytest.approx(2 / 3)}
    with pytest.raises(KeyError, match="unknown GLUE metric config"):
        evaluate.load(str(METRIC_PATH), config_name="squad", keep_in_memory=True)


def test_trainer_hook_argmax_and_regression():
    class Prediction:
        def __init__(self, predictions, label_ids):
            self.predictions, self.label_ids = predictions, label_ids

    logits = np.array([[2.0, -1.0], [0.1, 0.3], [-1.0, 0.0]])
    assert predictions_from_logits(get_task("rte"), logits).tolist() == [0, 1, 1]
    scores = compute_metrics_fn(get_task("stsb"))(Prediction(np.array([[1.0], [2.0], [3.5]]), np.array([1.0, 2.5, 3.0])))
    assert scores["spearmanr"] == pytest.approx(1.0)
    assert compute_metrics_fn(get_task("cola"))(Prediction(logits, np.array([0, 1, 1])))["matthews_correlation"] == 1.0
