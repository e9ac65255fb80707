"""``atomic_output_dir``: an output folder appears whole or not at all, and replacing one with
``force`` never leaves the destination empty, whatever is interrupted and where."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from monarchify.atomic import atomic_output_dir, check_output_dir
from monarchify.errors import OutputExistsError, OutputNotEmptyError


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name)


def contents(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in folder.iterdir()}


@pytest.fixture
def existing(tmp_path) -> Path:
    """An output folder from an earlier run, which ``force`` is asked to replace."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.txt").write_text("old model")
    (out / "report.txt").write_text("old report")
    return out


def write_new(staging: Path) -> None:
    (staging / "model.txt").write_text("new model")


def is_staging(name: str) -> bool:
    return ".partial-" in name


def interrupt_renames_of(monkeypatch, hit, exc: type[BaseException] = KeyboardInterrupt) -> list[str]:
    """Make every ``Path.rename`` of a folder whose name satisfies ``hit`` raise ``exc`` (as
    Ctrl-C arriving there would); returns the names renamed, so a test can check that the
    step it means to interrupt was really reached."""
    real = Path.rename
    seen: list[str] = []

    def rename(self, target):
        seen.append(self.name)
        if hit(self.name):
            raise exc
        return real(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    return seen


def test_a_new_folder_appears_whole_with_no_staging_left(tmp_path):
    out = tmp_path / "out"
    with atomic_output_dir(out) as staging:
        assert staging.parent == out.parent.resolve() and staging.name.startswith(".out.partial-")
        assert not out.exists()  # nothing at the destination until the end
        write_new(staging)
    assert contents(out) == {"model.txt": "new model"}
    assert leftovers(tmp_path) == []


def test_an_error_while_writing_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_output_dir(out) as staging:
            write_new(staging)
            raise RuntimeError("disk full")
    assert not out.exists() and leftovers(tmp_path) == []


def test_force_replaces_an_existing_folder_only_once_the_new_one_is_complete(tmp_path, existing):
    with atomic_output_dir(existing, force=True) as staging:
        write_new(staging)
        assert contents(existing) == {"model.txt": "old model", "report.txt": "old report"}
    assert contents(existing) == {"model.txt": "new model"}
    assert leftovers(tmp_path) == []


def test_an_interrupt_while_writing_keeps_the_old_folder(tmp_path, existing):
    with pytest.raises(KeyboardInterrupt):
        with atomic_output_dir(existing, force=True) as staging:
            write_new(staging)
            raise KeyboardInterrupt
    assert contents(existing) == {"model.txt": "old model", "report.txt": "old report"}
    assert leftovers(tmp_path) == []


def test_an_interrupt_between_the_two_renames_puts_the_old_folder_back(tmp_path, existing, monkeypatch):
    """The old folder has been moved aside and the new one is not yet in place: the old one
    must come back (the new one is then dropped), never both be lost."""
    with pytest.raises(KeyboardInterrupt):
        with atomic_output_dir(existing, force=True) as staging:
            write_new(staging)
            seen = interrupt_renames_of(monkeypatch, is_staging)
    assert seen[0] == "out" and ".partial-" in seen[1]  # moved aside, then interrupted
    assert existing.is_dir(), f"nothing at the destination; beside it: {leftovers(tmp_path)}"
    assert contents(existing) == {"model.txt": "old model", "report.txt": "old report"}
    assert leftovers(tmp_path) == []


def test_a_failing_rename_into_place_also_puts_the_old_folder_back(tmp_path, existing, monkeypatch):
    with pytest.raises(OSError):
        with atomic_output_dir(existing, force=True) as staging:
            write_new(staging)
            interrupt_renames_of(monkeypatch, is_staging, OSError)
    assert contents(existing) == {"model.txt": "old model", "report.txt": "old report"}
    assert leftovers(tmp_path) == []


def test_an_interrupt_before_the_old_folder_moves_changes_nothing(tmp_path, existing, monkeypatch):
    with pytest.raises(KeyboardInterrupt):
        with atomic_output_dir(existing, force=True) as staging:
            write_new(staging)
            interrupt_renames_of(monkeypatch, lambda name: name == "out")
    assert contents(existing) == {"model.txt": "old model", "report.txt": "old report"}
    assert leftovers(tmp_path) == []


def test_if_the_old_folder_cannot_come_back_neither_folder_is_deleted(tmp_path, existing, monkeypatch):
    """The worst case: the new folder cannot move in and the old one cannot move back. Both
    stay on disk, hidden but whole, so the user can recover either by hand."""
    real = Path.rename

    def rename(self, target):
        if ".partial-" in self.name:
            raise KeyboardInterrupt
        if ".old-" in self.name:
            raise OSError(5, "Input/output error")
        return real(self, target)

    with pytest.raises((KeyboardInterrupt, OSError)):
        with atomic_output_dir(existing, force=True) as staging:
            write_new(staging)
            monkeypatch.setattr(Path, "rename", rename)
    monkeypatch.undo()
    kept = {name.split("-")[0]: contents(tmp_path / name) for name in leftovers(tmp_path)}
    assert kept == {".out.old": {"model.txt": "old model", "report.txt": "old report"},
                    ".out.partial": {"model.txt": "new model"}}


def test_an_unwritable_output_location_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(OutputExistsError, match="cannot write to"):
        check_output_dir(tmp_path / "out")
    monkeypatch.undo()

    def refuse(self, *args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(Path, "mkdir", refuse)
    with pytest.raises(OutputExistsError, match="Read-only file system"):
        with atomic_output_dir(tmp_path / "out"):
            pass


def test_a_non_empty_folder_needs_force_and_a_file_is_never_replaced(tmp_path, existing):
    with pytest.raises(OutputNotEmptyError, match="exists and is not empty"):
        with atomic_output_dir(existing):
            pass
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputExistsError, match="is not a folder"):
        check_output_dir(tmp_path / "file", force=True)
    assert contents(existing) == {"model.txt": "old model", "report.txt": "old report"}
    assert leftovers(tmp_path) == []


def test_missing_parent_folders_are_created(tmp_path):
    out = tmp_path / "runs" / "mrpc" / "seed0"
    assert check_output_dir(out) == out  # nothing is created by the early check
    assert not (tmp_path / "runs").exists()
    with atomic_output_dir(out) as staging:
        (staging / "model.txt").write_text("new model")
    assert contents(out) == {"model.txt": "new model"}
    assert leftovers(out.parent) == []


def test_a_parent_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "runs").write_text("not a folder")
    with pytest.raises(OutputExistsError, match="is a file"):
        check_output_dir(tmp_path / "runs" / "out")
