"""Reading TSV files the way the GLUE download script wrote them.

Some files start with a UTF-8 byte-order mark (``utf-8-sig`` drops it) and fields contain
unbalanced double quotes, so quoting is off: a quote is just a character. The default csv
dialect would silently merge lines instead.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def tsv_rows(path: str | os.PathLike[str]) -> Iterator[Iterator[list[str]]]:
    """The rows of a TSV file, streamed; the caller maps ``OSError``/``UnicodeDecodeError``."""
    with open(path, encoding="utf-8-sig", newline="") as handle:
        yield csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
