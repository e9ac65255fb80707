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


def sharded() -> bool:
    """Whether the launch asked for fully sharded data parallelism (FSDP) instead of copies of
    the model: accelerate's FSDP configuration (``accelerate launch --use_fsdp``, or a config
    file with ``distributed_type: FSDP``) sets ``ACCELERATE_USE_FSDP`` in every process, and
    Trainer shards on it; the healing loop reads the same variable, so one launch configuration
    decides for every command."""
    return launched() and os.environ.get("ACCELERATE_USE_FSDP", "").strip().lower() in ("1", "true", "yes")


def broadcast_from_main(tensors: Any) -> None:
    """Overwrite ``tensors`` in every process with the main process's values (nothing to do alone).

    For tensors every process computed from identical inputs (a densified weight): equal by
    construction, and after this equal by fact, as DistributedDataParallel assumes."""
    dist = _group()
    if dist is None:
        return
    import torch

    with torch.no_grad():
        for tensor in tensors:
            dist.broadcast(tensor.data, src=0)


def rebuild_ddp(wrapper: Any) -> None:
    """Make a ``DistributedDataParallel`` wrapper synchronise the parameters its module holds now.

    DDP's reducer, built once, lists the parameters whose gradients it averages; a module whose
    layers were replaced (the sparse-to-dense switch) holds parameters it does not know, whose
    gradients would then differ between processes, while it waits for the old ones. Trainer's
    loop keeps the wrapper object it made, so the wrapper is rebuilt in place rather than
    replaced: its old reducer lets go of the parameters it hooked, and a new one is built from
    the module's current parameters with the same settings, which is what unpickling a DDP
    wrapper does (``__getstate__`` keeps the settings, ``__setstate__`` builds the reducer)."""
    if getattr(wrapper, "_comm_hooks", None):
        raise RuntimeError("a DistributedDataParallel communication hook cannot be carried over a change of parameters")
    wrapper.reducer._remove_autograd_hooks()  # the kept parameters must not report to the old reducer
    wrapper.__setstate__(wrapper.__getstate__())
