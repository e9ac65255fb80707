"""GLUE examples as ``datasets.Dataset`` objects, from the original TSV files or the Hub.

The TSV reader follows the files as the GLUE download script wrote them, quirks included:
a UTF-8 byte-order mark at the start of some files (``encoding="utf-8-sig"``), fields with
unbalanced double quotes (read with ``csv.QUOTE_NONE``: a quote is just a character), CoLA's
train/dev files without a header, and test files without a label column (their examples get
label ``-1``, the hub copy's convention). A row too short to hold the needed columns is skipped
and counted; a label the task does not know stops the run with the file and line.

Without a data folder the ``datasets`` hub copy (``nyu-mll/glue``) is used, which needs network
access (or a local ``datasets`` cache); when it cannot be reached the error says to pass a
data folder instead (``data_dir``).
"""

from __future__ import annotations

import logging
import math
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import datasets

from monarchify.errors import MonarchifyError
from monarchify.glue.tasks import GlueTask
from monarchify.tsv import tsv_rows

HUB_DATASET = "nyu-mll/glue"
NO_LABEL = -1


class DataError(MonarchifyError):
    """A GLUE data folder or file that cannot be used (missing files, bad columns or labels)."""


@dataclass
class GlueData:
    """The splits of one task, with the hub's field names and label encoding."""

    task: GlueTask
    train: datasets.Dataset | None
    eval: dict[str, datasets.Dataset]
    source: str
    skipped: dict[str, int] = field(default_factory=dict)

    def sizes(self) -> dict[str, int]:
        splits = {"train": self.train, **self.eval}
        return {name: len(ds) for name, ds in splits.items() if ds is not None}


def features(task: GlueTask) -> datasets.Features:
    columns: dict[str, datasets.features.FeatureType] = {name: datasets.Value("string") for name in task.text_fields}
    if task.is_regression:
        columns["label"] = datasets.Value("float32")
    else:
        columns["label"] = datasets.ClassLabel(names=list(task.label_names))
    columns["idx"] = datasets.Value("int32")
    return datasets.Features(columns)


# ---------------------------------------------------------------------------------------- TSV


def task_folder(task: GlueTask, data_dir: str | os.PathLike[str]) -> Path:
    """The folder holding the task's files: ``<data_dir>/<TASK>`` as GLUE lays it out (any
    spelling: ``SST-2``, ``sst2``), or ``data_dir`` itself when it already holds them."""
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DataError(f"data folder '{data_dir}' does not exist")
    wanted = task.folder.lower().replace("-", "")
    candidates = [root / task.folder] + sorted(
        child for child in root.iterdir() if child.is_dir() and child.name.lower().replace("-", "").replace("_", "") == wanted
    )
    for folder in candidates:
        if (folder / "train.tsv").is_file() or any((folder / f).is_file() for f in task.eval_files.values()):
            return folder
    if all((root / f).is_file() for f in task.files.values()):
        return root
    return root / task.folder


def _check_files(task: GlueTask, folder: Path, splits: list[str]) -> dict[str, Path]:
    files = {split: folder / task.files[split] for split in splits}
    missing = [str(path) for path in files.values() if not path.is_file()]
    if missing:
        raise DataError(
            f"missing GLUE file(s) {', '.join(missing)}: the data folder (data_dir) must hold {task.describe_layout()} "
            "as the GLUE download script lays them out", field="data_dir",
        )
    return files


def _label(task: GlueTask, raw: str, where: str) -> int | float:
    raw = raw.strip()
    if task.is_regression:
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and 0.0 <= value <= 5.0):
            raise DataError(f"{where}: label {raw!r} does not fit {task.name} (expected a similarity score from 0 to 5)")
        return value
    if raw not in task.label_values:
        expected = ", ".join(task.label_values)
        raise DataError(f"{where}: label {raw!r} does not fit {task.name} (expected one of {expected})")
    return task.label_values.index(raw)


def read_tsv(task: GlueTask, path: str | os.PathLike[str], *, labelled: bool = True) -> tuple[dict[str, list], int]:
    """Read one GLUE TSV file into columns (hub field names, ``label``, ``idx``).

    ``labelled=False`` reads a test file: no label column expected, labels are ``-1``.
    Returns the columns and the number of malformed (too short) rows skipped.
    """
    path = Path(path)
    positional = not task.header and labelled
    try:
        with tsv_rows(path) as reader:
            rows = list(reader)
    except UnicodeDecodeError as exc:
        raise DataError(f"'{path}' is not UTF-8 text: {exc.reason} at byte {exc.start}") from None
    except OSError as exc:
        raise DataError(f"cannot read '{path}': {exc.strerror or exc}") from None

    first_line = 1
    if positional:
        columns = dict(task.fields)
        label_col = task.label_column
    else:
        if not rows:
            raise DataError(f"'{path}' is empty (expected a header line)")
        header = [name.strip() for name in rows[0]]
        rows = rows[1:]
        first_line = 2
        # Header-less tasks (CoLA) still name their test columns with the hub field names.
        wanted = {f: (col if isinstance(col, str) else f) for f, col in task.fields.items()}
        if labelled:
            wanted_label = task.label_column if isinstance(task.label_column, str) else "label"
        missing = [col for col in wanted.values() if col not in header]
        if labelled and wanted_label not in header:
            missing.append(wanted_label)
        if missing:
            raise DataError(
                f"'{path}' has no column(s) {', '.join(repr(m) for m in missing)} for {task.name} "
                f"(its header: {', '.join(header) or 'empty'})"
            )
        columns = {f: header.index(col) for f, col in wanted.items()}
        label_col = header.index(wanted_label) if labelled else None

    needed = max(list(columns.values()) + ([label_col] if label_col is not None else [])) + 1
    out: dict[str, list] = {name: [] for name in task.text_fields}
    out["label"] = []
    out["idx"] = []
    skipped = 0
    for offset, row in enumerate(rows):
        if not row or (len(row) == 1 and not row[0].strip()):
            continue  # blank line
        if len(row) < needed:
            skipped += 1
            continue
        for name, col in columns.items():
            out[name].append(row[col])
        where = f"'{path}' line {first_line + offset}"
        out["label"].append(_label(task, row[label_col], where) if label_col is not None else NO_LABEL)
        out["idx"].append(len(out["idx"]))
    if not out["idx"]:
        raise DataError(f"'{path}' holds no usable {task.name} examples ({skipped} malformed rows)")
    return out, skipped


def _dataset(task: GlueTask, columns: dict[str, list], labelled: bool) -> datasets.Dataset:
    feats = features(task)
    if not labelled and not task.is_regression:
        feats["label"] = datasets.Value("int64")  # -1 is not a class
    return datasets.Dataset.from_dict(columns, features=feats)


def load_tsv(task: GlueTask, data_dir: str | os.PathLike[str], splits: list[str] | None = None) -> GlueData:
    """Train and eval splits (or the named ``splits``) of ``task`` from a GLUE TSV folder."""
    splits = splits or list(task.files)
    folder = task_folder(task, data_dir)
    files = _check_files(task, folder, splits)
    loaded: dict[str, datasets.Dataset] = {}
    skipped: dict[str, int] = {}
    for split, path in files.items():
        columns, bad = read_tsv(task, path)
        loaded[split] = _dataset(task, columns, labelled=True)
        if bad:
            skipped[split] = bad
    train = loaded.pop("train", None)
    return GlueData(task, train, loaded, source=f"TSV files in {folder}", skipped=skipped)


def load_test_tsv(task: GlueTask, data_dir: str | os.PathLike[str], filename: str = "test.tsv") -> datasets.Dataset:
    """An unlabelled test file of the task (labels ``-1``), e.g. for leaderboard predictions."""
    path = task_folder(task, data_dir) / filename
    if not path.is_file():
        raise DataError(f"missing GLUE file {path}")
    columns, _ = read_tsv(task, path, labelled=False)
    return _dataset(task, columns, labelled=False)


# ---------------------------------------------------------------------------------------- Hub


def _offline() -> bool:
    return any(os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on") for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))


@contextmanager
def _quiet_hub() -> Iterator[None]:
    """Silence the Hub client's per-retry warnings: a failure ends in one error line."""
    loggers = [logging.getLogger(name) for name in ("huggingface_hub", "datasets")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


HUB_PROBE_SECONDS = 3.0
"""How long :func:`hub_reachable` waits for a connection to the Hub."""


def hub_reachable(timeout: float = HUB_PROBE_SECONDS) -> bool:
    """Whether a TCP connection to the Hub's endpoint opens within ``timeout`` seconds.

    Why a probe of its own: without a network, ``load_dataset`` retries for about half a
    minute before failing; a refused or silent connection answers in at most ``timeout``. The
    probe runs in a thread because the name lookup before it has no timeout of its own."""
    import threading
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    opened: list[bool] = []

    def connect() -> None:
        try:
            with socket.create_connection((url.hostname or "huggingface.co", port), timeout=timeout):
                opened.append(True)
        except OSError:
            pass

    probe = threading.Thread(target=connect, daemon=True)
    probe.start()
    probe.join(timeout)
    return bool(opened)


def hub_cached(task: GlueTask) -> bool:
    """Whether the local ``datasets`` cache holds the hub copy of the task (usable offline)."""
    root = Path(datasets.config.HF_DATASETS_CACHE) / HUB_DATASET.replace("/", "___") / task.name
    return root.is_dir() and any(path.is_dir() for path in root.glob("*/*"))


def _hub_error(task: GlueTask, why: str) -> DataError:
    return DataError(
        f"could not get GLUE '{task.name}' from the Hugging Face Hub ({why}): "
        f"pass a data folder (data_dir) holding the GLUE TSV files {task.describe_layout()}", field="data_dir",
    )


def load_hub(task: GlueTask) -> GlueData:
    """The ``datasets`` hub copy of the task (needs network or a local ``datasets`` cache).

    Without the cache, offline mode or an unreachable Hub fails at once, before
    ``load_dataset`` spends half a minute retrying."""
    if not hub_cached(task):
        if _offline():
            raise _hub_error(task, "offline mode is on and it is not in the local datasets cache")
        if not hub_reachable():
            raise _hub_error(task, "the Hub cannot be reached; is the network down?")
    try:
        with _quiet_hub():
            dataset = datasets.load_dataset(HUB_DATASET, task.name)
    except Exception as exc:  # ConnectionError, OfflineModeIsEnabled, DatasetNotFoundError, ...
        why = "offline mode is on" if _offline() else "is the network down?"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(".")
        raise _hub_error(task, f"{first}; {why}") from None
    missing = [s for s in ["train", *task.eval_files] if s not in dataset]
    if missing:
        raise DataError(f"the hub copy of GLUE '{task.name}' has no split(s) {', '.join(missing)}")
    evals = {split: dataset[split] for split in task.eval_files}
    return GlueData(task, dataset["train"], evals, source=f"{HUB_DATASET} ({task.name}) from the Hugging Face Hub")


def load_glue(task: GlueTask, data_dir: str | os.PathLike[str] | None = None) -> GlueData:
    """The task's data: from ``data_dir`` when given, else from the Hub."""
    return load_tsv(task, data_dir) if data_dir is not None else load_hub(task)
