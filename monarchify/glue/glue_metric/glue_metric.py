"""The GLUE metrics as a local ``evaluate`` module: load it by path, no network needed.

    >>> import evaluate
    >>> metric = evaluate.load("path/to/glue_metric.py", config_name="mrpc")
    >>> metric.compute(predictions=[0, 1, 1], references=[0, 1, 0])
    {'accuracy': 0.666..., 'f1': 0.666...}

Per task (``config_name``): CoLA Matthews correlation; STS-B Pearson and Spearman correlation
(predictions are real-valued scores); MRPC and QQP accuracy and F1 of the positive class;
every other task (SST-2, MNLI and its matched/mismatched dev sets, QNLI, RTE, WNLI) accuracy.
The computations are scikit-learn's and SciPy's.
"""

import datasets
import evaluate
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

_DESCRIPTION = __doc__

_CITATION = """\
@inproceedings{wang2019glue,
  title={{GLUE}: A Multi-Task Benchmark and Analysis Platform for Natural Language Understanding},
  author={Wang, Alex and Singh, Amanpreet and Michael, Julian and Hill, Felix and Levy, Omer and Bowman, Samuel R.},
  booktitle={International Conference on Learning Representations},
  year={2019}
}
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: predicted class ids (float scores for stsb).
    references: gold class ids (float scores for stsb).
Returns:
    cola: {"matthews_correlation"}; stsb: {"pearson", "spearmanr"};
    mrpc, qqp: {"accuracy", "f1"}; the others: {"accuracy"}.
"""

CONFIGS = (
    "cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "mnli_matched", "mnli_mismatched",
    "qnli", "rte", "wnli", "ax",
)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class GlueMetric(evaluate.Metric):
    def _info(self):
        if self.config_name not in CONFIGS:
            raise KeyError(f"unknown GLUE metric config {self.config_name!r}; use one of {', '.join(CONFIGS)}")
        kind = "float32" if self.config_name == "stsb" else "int64"
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value(kind), "references": datasets.Value(kind)}),
            format="numpy",
        )

    def _compute(self, predictions, references):
        name = self.config_name
        if name == "cola":
            return {"matthews_correlation": float(matthews_corrcoef(references, predictions))}
        if name == "stsb":
            return {
                "pearson": float(pearsonr(references, predictions)[0]),
                "spearmanr": float(spearmanr(references, predictions)[0]),
            }
        accuracy = float(accuracy_score(references, predictions))
        if name in ("mrpc", "qqp"):
            return {"accuracy": accuracy, "f1": float(f1_score(references, predictions))}
        return {"accuracy": accuracy}
