"""The few facts and steps every command needs to run under ``torchrun`` / ``accelerate launch``.

Why one module: a training command runs as N copies of itself, one per device. They must agree
on who writes the output (the main process, rank 0), wait for each other where one of them
writes something the others then read (a converted stage, a checkpoint's metadata), and add
up what each measured. Ad-hoc checks of environment variables in each command drifted apart
(one looked at ``RANK``, another at Trainer's view, which on a CPU-only machine said every
process was the main one), so every command asks here instead.

The rank and world size come from the process group once one is initialised, else from the
launcher's environment variables (``RANK``, ``WORLD_SIZE``), which are set before the process
starts: so :func:`is_main` is right even before any group exists, and the command-line front
end can ask it without importing torch (torch is imported only inside the functions that
talk to the group).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def _group() -> Any:
    """``torch.distributed`` when a process group of more than one process is running, else ``None``."""
    if world_size_from_env() < 2:
        return None
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def active() -> bool:
    """Whether this process is one of several in an initialised process group."""
    return _group() is not None


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def rank() -> int:
    dist = _group()
    return dist.get_rank() if dist is not None else int(os.environ.get("RANK", "0") or 0)


def world_size() -> int:
    dist = _group()
    return dist.get_world_size() if dist is not None else world_size_from_env()


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0") or 0)


def is_main() -> bool:
    """Whether this process writes outputs and prints: rank 0, or the only process."""
    return rank() == 0


def launched() -> bool:
    """Whether a launcher started several processes of this command."""
    return world_size_from_env() > 1


def init() -> bool:
    """Join the launcher's process group if there is one and it is not joined yet (gloo on
    CPU, nccl on CUDA GPUs); whether a group of several processes is running now.

    ``Trainer`` joins it itself; the plain-PyTorch healing loop and the steps around it
    (a conversion only the main process runs, while the others wait) need it earlier."""
    if not launched():
        return False
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank())
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return True


def barrier() -> None:
    """Wait until every process gets here (nothing to wait for in a single process)."""
    dist = _group()
    if dist is not None:
        dist.barrier()


@contextmanager
def main_process_first() -> Iterator[None]:
    """The main process runs the block first; the others run it after it finished.

    For a step whose first run writes what later runs read (a stage that is then found done,
    a folder that is then found to exist): the others see the main process's result."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def on_main(function: Any, *args: Any, **kwargs: Any) -> Any:
    """Run ``function`` on the main process only, while the others wait for it; its result
    on the main process, ``None`` on the others.

    If it fails on the main process, that process exits with the error, and the launcher
    (torchrun, accelerate launch) ends the waiting ones."""
    result = function(*args, **kwargs) if is_main() else None
    barrier()  # not reached by a main process that failed: the launcher ends the others
    return result


def all_reduce_sum(value: float) -> float:
    """``value`` summed over every process (itself in a single process)."""
    dist = _group()
    if dist is None:
        return float(value)
    import torch

    tensor = torch.tensor([float(value)], dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(tensor)
    return float(tensor.item())


def all_reduce_mean(value: float) -> float:
    """The mean of ``value`` over every process."""
    return all_reduce_sum(value) / world_size()
