"""Write an output folder all at once or not at all.

Everything is written into a hidden staging folder beside the destination
(``.<name>.partial-<id>``) and renamed into place at the end: an interrupted run leaves no
half-written output, and the staging folder is removed on any error. With ``force`` an
existing destination is replaced only after the new one is complete.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from monarchify.errors import OutputExistsError


def check_output_dir(out: str | os.PathLike[str], force: bool = False, *, inputs: tuple[str | os.PathLike[str], ...] = ()) -> Path:
    """Fail early (before any expensive work) if ``out`` cannot be written.

    ``inputs`` are the folders the run reads: replacing one of them (``--out`` naming the
    model itself, or a folder that holds it) would destroy what is being converted, so that
    is refused even with ``force``.
    """
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"output '{path}' exists and is not a folder")
    dest = path.resolve()
    for source in inputs:
        src = Path(source).expanduser()
        if src.exists() and (src.resolve() == dest or dest in src.resolve().parents):
            raise OutputExistsError(f"output folder '{path}' would replace the input '{source}'; choose another --out")
    if path.is_dir() and any(path.iterdir()) and not force:
        raise OutputExistsError(f"output folder '{path}' exists and is not empty (pass --force to replace it)")
    if not dest.parent.is_dir():
        raise OutputExistsError(f"the parent folder of '{path}' does not exist")
    if not os.access(dest.parent, os.W_OK | os.X_OK):
        raise OutputExistsError(f"cannot write to '{dest.parent}' (read-only or no permission)")
    return path


@contextmanager
def atomic_output_dir(out: str | os.PathLike[str], force: bool = False) -> Iterator[Path]:
    """Yield a staging folder; on success it becomes ``out``."""
    dest = check_output_dir(out, force).resolve()
    token = uuid.uuid4().hex[:8]
    staging = dest.parent / f".{dest.name}.partial-{token}"
    try:
        staging.mkdir()
    except OSError as exc:
        raise OutputExistsError(f"cannot write to '{dest.parent}': {exc.strerror or exc}") from None
    try:
        yield staging
        if dest.exists():
            old = dest.parent / f".{dest.name}.old-{token}"
            dest.rename(old)
            staging.rename(dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise

