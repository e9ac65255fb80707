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


def check_output_dir(out: str | os.PathLike[str], force: bool = False) -> Path:
    """Fail early (before any expensive work) if ``out`` cannot be written."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"output '{path}' exists and is not a folder")
    if path.is_dir() and any(path.iterdir()) and not force:
        raise OutputExistsError(f"output folder '{path}' exists and is not empty (pass --force to replace it)")
    if not path.resolve().parent.is_dir():
        raise OutputExistsError(f"the parent folder of '{path}' does not exist")
    return path


@contextmanager
def atomic_output_dir(out: str | os.PathLike[str], force: bool = False) -> Iterator[Path]:
    """Yield a staging folder; on success it becomes ``out``."""
    dest = check_output_dir(out, force).resolve()
    token = uuid.uuid4().hex[:8]
    staging = dest.parent / f".{dest.name}.partial-{token}"
    staging.mkdir()
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


def write_text_atomic(path: Path, text: str) -> None:
    """Replace one file atomically (write a sibling, then rename)."""
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
