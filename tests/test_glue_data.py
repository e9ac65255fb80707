"""GLUE loading: the real MRPC files, generated files in every task's layout, quirks, errors."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from monarchify.errors import ConfigError
from monarchify.glue import TASK_NAMES, DataError, get_task, load_glue, load_test_tsv, load_tsv
from monarchify.glue.data import NO_LABEL

BOM = "\ufeff"
# Unbalanced double quotes, as in the real files: a csv reader with quoting on would swallow lines.
QUOTED = '"It will rain, he said and left'


# ---------------------------------------------------------------------- the real MRPC files


def test_real_mrpc(glue_dir):
    task = get_task("mrpc")
    raw = (glue_dir / "MRPC" / "train.tsv").read_bytes()
    assert raw.startswith(BOM.encode()), "the shared train.tsv should start with a byte-order mark"
    data = load_tsv(task, glue_dir)
    assert data.sizes() == {"train": 3668, "validation": 408}
    assert data.skipped == {}
    dev = data.eval["validation"]
    assert dev.features["label"].names == ["not_equivalent", "equivalent"]
    # The documented majority rate: always answering 1 scores 0.684 on dev.
    assert round(sum(dev["label"]) / len(dev), 3) == 0.684
    first = data.train[0]
    assert first["label"] == 1 and first["sentence1"].startswith("Amrozi accused his brother")
    # Fields with quotes survive intact (QUOTE_NONE) and no line was merged into another.
    texts = list(data.train["sentence1"]) + list(data.train["sentence2"])
    assert any(s.count('"') % 2 for s in texts), "expected fields with unbalanced quotes"
    lines = raw.decode("utf-8-sig").splitlines()
    assert len(lines) - 1 == len(data.train)
    assert all("\t" not in s and "\n" not in s for s in texts)


def test_real_mrpc_test_split_has_no_labels(glue_dir):
    test = load_test_tsv(get_task("mrpc"), glue_dir)
    assert len(test) == 1725
    assert set(test["label"]) == {NO_LABEL}
    assert test[0]["sentence1"].startswith("PCCW's chief operating officer")


def test_real_mrpc_files_unchanged(glue_dir):
    digest = hashlib.sha256((glue_dir / "MRPC" / "dev.tsv").read_bytes()).hexdigest()
    assert digest == "81c8a1a9e1dfe461dd2c1a4f98f43fe18bece44d2bf9e3d0b245b88e5aa5eaf7"


# ---------------------------------------------------------------- generated files, every task

MNLI_LEFT = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
             "sentence1_parse", "sentence2_parse", "sentence1", "sentence2"]
STSB_LEFT = ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2"]


def _pair(prefix: list[str], a: str, b: str) -> list[str]:
    """A row of a header whose text columns are named sentence1/sentence2 (filler elsewhere)."""
    row = [f"x{i}" for i in range(len(prefix))]
    row[prefix.index("sentence1")], row[prefix.index("sentence2")] = a, b
    return row


# task -> (train/dev header or None, row(a, b, label), dev header (if other), test header, test row(a, b))
LAYOUTS = {
    "cola": (None, lambda a, b, y: ["gj04", y, "" if y == "1" else "*", a], None,
             ["index", "sentence"], lambda a, b: ["0", a]),
    "sst2": (["sentence", "label"], lambda a, b, y: [a, y], None,
             ["index", "sentence"], lambda a, b: ["0", a]),
    "mrpc": (["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"], lambda a, b, y: [y, "1", "2", a, b], None,
             ["index", "#1 ID", "#2 ID", "#1 String", "#2 String"], lambda a, b: ["0", "1", "2", a, b]),
    "qqp": (["id", "qid1", "qid2", "question1", "question2", "is_duplicate"], lambda a, b, y: ["7", "1", "2", a, b, y], None,
            ["id", "question1", "question2"], lambda a, b: ["0", a, b]),
    "stsb": (STSB_LEFT + ["score"], lambda a, b, y: _pair(STSB_LEFT, a, b) + [y], None,
             STSB_LEFT, lambda a, b: _pair(STSB_LEFT, a, b)),
    "mnli": (MNLI_LEFT + ["label1", "gold_label"], lambda a, b, y: _pair(MNLI_LEFT, a, b) + [y, y],
             MNLI_LEFT + ["label1", "label2", "label3", "label4", "label5", "gold_label"],
             MNLI_LEFT, lambda a, b: _pair(MNLI_LEFT, a, b)),
    "qnli": (["index", "question", "sentence", "label"], lambda a, b, y: ["0", a, b, y], None,
             ["index", "question", "sentence"], lambda a, b: ["0", a, b]),
    "rte": (["index", "sentence1", "sentence2", "label"], lambda a, b, y: ["0", a, b, y], None,
            ["index", "sentence1", "sentence2"], lambda a, b: ["0", a, b]),
    "wnli": (["index", "sentence1", "sentence2", "label"], lambda a, b, y: ["0", a, b, y], None,
             ["index", "sentence1", "sentence2"], lambda a, b: ["0", a, b]),
}


def raw_labels(task_name: str, n: int) -> list[str]:
    task = get_task(task_name)
    if task.is_regression:
        return [f"{(i * 1.3) % 5:.3f}" for i in range(n)]
    return [task.label_values[i % len(task.label_values)] for i in range(n)]


def write_split(path: Path, task_name: str, labels: list[str], *, bom: bool = False, dev: bool = False) -> list[tuple[str, str]]:
    header, row, dev_header, _, _ = LAYOUTS[task_name]
    texts = [(QUOTED if i == 1 else f"first {i}", f"second {i}") for i in range(len(labels))]
    lines = []
    if header is not None:
        lines.append(dev_header if (dev and dev_header) else header)
    for (a, b), y in zip(texts, labels):
        cells = row(a, b, y)
        if dev and dev_header and task_name == "mnli":  # five annotator labels before gold_label
            cells = cells[:-2] + [y] * 5 + [y]
        lines.append(cells)
    text = "\n".join("\t".join(cells) for cells in lines) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text((BOM if bom else "") + text, encoding="utf-8")
    return texts


def write_task(root: Path, task_name: str, n: int = 6) -> dict[str, tuple[list[tuple[str, str]], list[str]]]:
    task = get_task(task_name)
    written = {}
    for split, filename in task.files.items():
        labels = raw_labels(task_name, n)
        texts = write_split(root / task.folder / filename, task_name, labels, bom=split == "train", dev=split != "train")
        written[split] = (texts, labels)
    return written


@pytest.mark.parametrize("name", TASK_NAMES)
def test_every_task_layout(tmp_path, name):
    task = get_task(name)
    written = write_task(tmp_path, name)
    data = load_tsv(task, tmp_path)
    assert set(data.eval) == set(task.eval_files)
    splits = {"train": data.train, **data.eval}
    for split, (texts, labels) in written.items():
        ds = splits[split]
        assert len(ds) == len(texts)
        fields = task.text_fields
        for example, (a, b), y in zip(ds, texts, labels):
            assert example[fields[0]] == a
            if len(fields) == 2:
                assert example[fields[1]] == b
            if task.is_regression:
                assert example["label"] == pytest.approx(float(y), abs=1e-6)
            else:
                assert task.label_values[example["label"]] == y
    # The BOM did not leak into the first header name or the first text.
    assert not any(str(v).startswith(BOM) for v in data.train[0].values())
    assert data.train[1][task.text_fields[0]] == QUOTED


def test_mnli_has_matched_and_mismatched_dev(tmp_path):
    write_task(tmp_path, "mnli")
    data = load_tsv(get_task("mnli"), tmp_path)
    assert sorted(data.eval) == ["validation_matched", "validation_mismatched"]
    assert data.train.features["label"].names == ["entailment", "neutral", "contradiction"]


@pytest.mark.parametrize("name", TASK_NAMES)
def test_test_split_without_labels(tmp_path, name):
    task = get_task(name)
    _, _, _, header, row = LAYOUTS[name]
    path = tmp_path / task.folder / "test.tsv"
    path.parent.mkdir(parents=True)
    path.write_text("\t".join(header) + "\n" + "\n".join("\t".join(row(f"a{i}", f"b{i}")) for i in range(3)) + "\n")
    test = load_test_tsv(task, tmp_path)
    assert len(test) == 3 and set(test["label"]) == {NO_LABEL}
    assert test[2][task.text_fields[0]] == "a2"


def test_folder_spellings(tmp_path):
    write_task(tmp_path / "glue", "sst2")
    (tmp_path / "glue" / "SST-2").rename(tmp_path / "glue" / "sst2")
    assert len(load_tsv(get_task("SST-2"), tmp_path / "glue").train) == 6
    # --data-dir may also point at the task folder itself.
    assert len(load_tsv(get_task("sst2"), tmp_path / "glue" / "sst2").train) == 6


def test_short_rows_are_skipped_and_counted(tmp_path):
    write_task(tmp_path, "rte")
    path = tmp_path / "RTE" / "train.tsv"
    path.write_text(path.read_text() + "9\tonly one sentence\n\n")
    data = load_tsv(get_task("rte"), tmp_path)
    assert data.skipped == {"train": 1} and len(data.train) == 6


# ---------------------------------------------------------------------------------- errors


def test_unknown_task_lists_the_valid_ones():
    with pytest.raises(ConfigError) as info:
        get_task("mrcp")
    assert "'mrcp'" in str(info.value)
    for name in TASK_NAMES:
        assert name in str(info.value)


def test_missing_files_are_named(tmp_path):
    write_task(tmp_path, "mrpc")
    (tmp_path / "MRPC" / "dev.tsv").unlink()
    with pytest.raises(DataError, match=r"MRPC/dev\.tsv"):
        load_tsv(get_task("mrpc"), tmp_path)
    with pytest.raises(DataError, match=r"dev_matched\.tsv.*dev_mismatched\.tsv"):
        load_tsv(get_task("mnli"), tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        load_tsv(get_task("mrpc"), tmp_path / "nowhere")


@pytest.mark.parametrize(
    ("name", "bad", "expected"),
    [("mrpc", "2", "expected one of 0, 1"), ("mnli", "maybe", "entailment, neutral, contradiction"),
     ("stsb", "7.5", "from 0 to 5"), ("stsb", "high", "from 0 to 5"), ("cola", "yes", "expected one of 0, 1")],
)
def test_labels_that_do_not_fit(tmp_path, name, bad, expected):
    write_task(tmp_path, name)
    task = get_task(name)
    labels = raw_labels(name, 4)
    labels[2] = bad
    write_split(tmp_path / task.folder / "train.tsv", name, labels)
    with pytest.raises(DataError) as info:
        load_tsv(task, tmp_path)
    message = str(info.value)
    line = 4 if task.header else 3  # the header, where there is one, is line 1
    assert f"line {line}" in message and repr(bad) in message and expected in message


def test_missing_columns_are_named(tmp_path):
    write_task(tmp_path, "qnli")
    path = tmp_path / "QNLI" / "dev.tsv"
    path.write_text(path.read_text().replace("question", "query", 1))
    with pytest.raises(DataError, match=r"no column\(s\) 'question'.*its header: index, query"):
        load_tsv(get_task("qnli"), tmp_path)


def test_offline_without_data_dir_says_what_to_pass(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError) as info:
        load_glue(get_task("mrpc"), None)
    message = str(info.value)
    assert "data folder (data_dir)" in message and "MRPC/train.tsv" in message and "\n" not in message
