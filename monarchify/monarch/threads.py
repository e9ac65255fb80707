"""torch's CPU thread count, changed for a block of code and always put back.

Batched LAPACK calls (eigh, svd) on many small matrices run fastest with torch's own
threading off: its threaded batch loop calling a threaded LAPACK oversubscribes the cores
(``docs/performance.md``). The setting is process-wide, so the library changes it only for
the duration of such a call and restores what the caller had, even when the call fails.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(count)``; restore the caller's setting after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
