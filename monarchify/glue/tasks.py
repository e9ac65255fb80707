"""The nine GLUE tasks: where their files are, which columns hold what, how they are scored.

Each task is described once, for both data sources: the original TSV files as the GLUE
download script wrote them (``<TASK>/train.tsv``, ``dev.tsv``...) and the ``datasets`` hub copy
(``nyu-mll/glue``). Examples get the hub's field names whichever source they come from, so a
model trained from one source scores the same on the other.

TSV layouts (``col`` = a header name; CoLA's train/dev files have no header, hence positions):

==========  =====================================  ==========================  ===============
task        text columns                           label column: values        dev files
==========  =====================================  ==========================  ===============
CoLA        position 3                             position 1: 0, 1            dev.tsv
SST-2       ``sentence``                           ``label``: 0, 1             dev.tsv
MRPC        ``#1 String``, ``#2 String``           ``Quality``: 0, 1           dev.tsv
QQP         ``question1``, ``question2``           ``is_duplicate``: 0, 1      dev.tsv
STS-B       ``sentence1``, ``sentence2``           ``score``: 0.0 to 5.0       dev.tsv
MNLI        ``sentence1``, ``sentence2``           ``gold_label``: 3 words     dev_matched.tsv,
                                                                               dev_mismatched.tsv
QNLI        ``question``, ``sentence``             ``label``: 2 words          dev.tsv
RTE         ``sentence1``, ``sentence2``           ``label``: 2 words          dev.tsv
WNLI        ``sentence1``, ``sentence2``           ``label``: 0, 1             dev.tsv
==========  =====================================  ==========================  ===============

Test files have a header everywhere (CoLA's too) and no label column.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from monarchify.errors import ConfigError


@dataclass(frozen=True)
class GlueTask:
    """One GLUE task.

    * ``fields``: hub field name -> TSV header name (or column position for header-less files).
    * ``label_values``: the raw TSV label of class ``i`` at position ``i`` (empty: regression).
    * ``label_names``: the hub's class names, same order (these become ``id2label``).
    * ``eval_files``: eval split name -> TSV file in the task folder.
    * ``metrics``: what the GLUE metric module reports for the task; ``main_metric`` is the
      one headline number (the GLUE leaderboard averages F1/accuracy and Pearson/Spearman).
    """

    name: str
    folder: str
    fields: dict[str, str | int]
    label_column: str | int
    label_values: tuple[str, ...]
    label_names: tuple[str, ...]
    metrics: tuple[str, ...]
    eval_files: dict[str, str] = field(default_factory=lambda: {"validation": "dev.tsv"})
    header: bool = True

    @property
    def is_regression(self) -> bool:
        return not self.label_values

    @property
    def num_labels(self) -> int:
        return 1 if self.is_regression else len(self.label_values)

    @property
    def text_fields(self) -> tuple[str, ...]:
        return tuple(self.fields)

    @property
    def main_metric(self) -> str:
        return self.metrics[0]

    @property
    def files(self) -> dict[str, str]:
        """Every split this tool reads: ``train`` plus the eval splits."""
        return {"train": "train.tsv", **self.eval_files}

    def describe_layout(self) -> str:
        """The files this tool reads, relative to a GLUE data folder."""
        return ", ".join(f"{self.folder}/{f}" for f in self.files.values())


_BINARY = ("0", "1")

TASKS: dict[str, GlueTask] = {
    task.name: task
    for task in (
        GlueTask(
            name="cola",
            folder="CoLA",
            fields={"sentence": 3},
            label_column=1,
            label_values=_BINARY,
            label_names=("unacceptable", "acceptable"),
            metrics=("matthews_correlation",),
            header=False,
        ),
        GlueTask(
            name="sst2",
            folder="SST-2",
            fields={"sentence": "sentence"},
            label_column="label",
            label_values=_BINARY,
            label_names=("negative", "positive"),
            metrics=("accuracy",),
        ),
        GlueTask(
            name="mrpc",
            folder="MRPC",
            fields={"sentence1": "#1 String", "sentence2": "#2 String"},
            label_column="Quality",
            label_values=_BINARY,
            label_names=("not_equivalent", "equivalent"),
            metrics=("f1", "accuracy"),
        ),
        GlueTask(
            name="qqp",
            folder="QQP",
            fields={"question1": "question1", "question2": "question2"},
            label_column="is_duplicate",
            label_values=_BINARY,
            label_names=("not_duplicate", "duplicate"),
            metrics=("f1", "accuracy"),
        ),
        GlueTask(
            name="stsb",
            folder="STS-B",
            fields={"sentence1": "sentence1", "sentence2": "sentence2"},
            label_column="score",
            label_values=(),
            label_names=(),
            metrics=("pearson", "spearmanr"),
        ),
        GlueTask(
            name="mnli",
            folder="MNLI",
            fields={"premise": "sentence1", "hypothesis": "sentence2"},
            label_column="gold_label",
            label_values=("entailment", "neutral", "contradiction"),
            label_names=("entailment", "neutral", "contradiction"),
            metrics=("accuracy",),
            eval_files={"validation_matched": "dev_matched.tsv", "validation_mismatched": "dev_mismatched.tsv"},
        ),
        GlueTask(
            name="qnli",
            folder="QNLI",
            fields={"question": "question", "sentence": "sentence"},
            label_column="label",
            label_values=("entailment", "not_entailment"),
            label_names=("entailment", "not_entailment"),
            metrics=("accuracy",),
        ),
        GlueTask(
            name="rte",
            folder="RTE",
            fields={"sentence1": "sentence1", "sentence2": "sentence2"},
            label_column="label",
            label_values=("entailment", "not_entailment"),
            label_names=("entailment", "not_entailment"),
            metrics=("accuracy",),
        ),
        GlueTask(
            name="wnli",
            folder="WNLI",
            fields={"sentence1": "sentence1", "sentence2": "sentence2"},
            label_column="label",
            label_values=_BINARY,
            label_names=("not_entailment", "entailment"),
            metrics=("accuracy",),
        ),
    )
}

TASK_NAMES = tuple(TASKS)


def _canonical(name: str) -> str:
    return name.strip().lower().replace("-", "").replace("_", "")


def get_task(name: str) -> GlueTask:
    """The task called ``name`` (case, ``-`` and ``_`` ignored: ``SST-2`` is ``sst2``)."""
    task = TASKS.get(_canonical(name))
    if task is None:
        raise ConfigError(f"unknown GLUE task {name!r}; valid tasks: {', '.join(TASK_NAMES)}")
    return task
