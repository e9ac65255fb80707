"""Write an output folder all at once or not at all.

Everything is written into a hidden staging folder beside the destination
(``.<name>.partial-<id>``) and renamed into place at the end: an interrupted run leaves no
half-written output, and the staging folder is removed on any error. With ``force`` an
existing destination is replaced only after the new one is complete, and an interrupted
replacement puts the old one back: the destination never ends up empty.

Every file of the finished folder gets the mode the user's umask gives a new file (0644 under
the usual 022) before it is moved into place: some writers create private files (safetensors
writes its files 0600), and a model folder meant to be shared or served must not differ from
file to file.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from monarchify.errors import OutputExistsError, OutputNotEmptyError


def check_output_dir(out: str | os.PathLike[str], force: bool = False, *, inputs: tuple[str | os.PathLike[str], ...] = ()) -> Path:
    """Fail early (before any expensive work) if ``out`` cannot be written.

    ``inputs`` are the folders the run reads: replacing one of them (the output naming the
    model itself, or a folder that holds it) would destroy what is being converted, so that
    is refused even with ``force``. Missing parent folders are fine (they are created when
    the output is written), as long as the nearest existing one is writable.
    """
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"output '{path}' exists and is not a folder")
    dest = path.resolve()
    for source in inputs:
        src = Path(source).expanduser()
        if src.exists() and (src.resolve() == dest or dest in src.resolve().parents):
            raise OutputExistsError(f"output folder '{path}' would replace the input '{source}'; choose another output folder")
    if path.is_dir() and any(path.iterdir()) and not force:
        raise OutputNotEmptyError(f"output folder '{path}' exists and is not empty")
    existing = next(parent for parent in dest.parents if parent.exists())
    if not existing.is_dir():
        raise OutputExistsError(f"cannot create '{path}': '{existing}' is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputExistsError(f"cannot write to '{existing}' (read-only or no permission)")
    return path


@contextmanager
def atomic_output_dir(out: str | os.PathLike[str], force: bool = False) -> Iterator[Path]:
    """Yield a staging folder; on success it becomes ``out``."""
    dest = check_output_dir(out, force).resolve()
    token = uuid.uuid4().hex[:8]
    staging = dest.parent / f".{dest.name}.partial-{token}"
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging.mkdir()
    except OSError as exc:
        raise OutputExistsError(f"cannot write to '{dest.parent}': {exc.strerror or exc}") from None
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _move_into_place(staging, dest, dest.parent / f".{dest.name}.old-{token}")


def current_umask() -> int:
    """The process's umask (reading it means setting it: it is put straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def follow_umask(folder: Path) -> None:
    """Give every regular file under ``folder`` the mode a new file gets from the umask
    (executable ones keep their execute bits, as a new executable would)."""
    mask = current_umask()
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            mode = 0o777 if path.stat().st_mode & 0o111 else 0o666
            os.chmod(path, mode & ~mask)


def _move_into_place(staging: Path, dest: Path, old: Path, keep_staging: bool = False) -> None:
    """Rename the complete ``staging`` folder to ``dest``, replacing what is there.

    Replacing takes two renames (the old folder aside to ``old``, then ``staging`` in), and an
    error or Ctrl-C can fall between them. Then the old folder is renamed back, so ``dest``
    always holds one whole folder, the old or the new. If the old one cannot come back either,
    nothing is deleted: both stay on disk, hidden but whole, for the user to recover.
    ``keep_staging``: a failed rename leaves ``staging`` as it is (a resumable one is worth
    hours of work; the next run finishes it).
    """
    try:
        follow_umask(staging)
        if dest.exists():
            dest.rename(old)
        staging.rename(dest)
    except BaseException:
        if old.exists() and not dest.exists():
            old.rename(dest)
        if not keep_staging:
            shutil.rmtree(staging, ignore_errors=True)  # any old folder is back at dest by now
        shutil.rmtree(old, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def move_into_place(staging: Path, out: str | os.PathLike[str]) -> None:
    """Rename a complete staging folder that a caller managed itself (one kept across runs so
    that an interrupted conversion can resume) to ``out``, with the same guarantees as
    :func:`atomic_output_dir`; if the rename fails, the staging folder stays for the caller."""
    dest = Path(out).resolve()
    _move_into_place(staging, dest, dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:8]}", keep_staging=True)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write one small file so that a reader sees the old content or the new, never half of
    it: a temporary file beside it, renamed over it (permissions follow the umask)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
