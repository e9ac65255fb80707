"""Dense vs Monarch timing on the current device: the clock, and single layers.

Every comparison is measured in one run with the contenders interleaved round-robin (so a
slow patch of a shared machine hits all of them alike), after warm-up, and summarised by
medians; ratios are ``dense time / Monarch time`` (above 1: Monarch is faster). GPU timings
synchronise the device around every call, so launch overhead counts, as it does for a
user.

Torch, :mod:`monarchify.monarch` and the training core's load reading only, so the pipeline's
speed gate can time layers with it; whole models are timed in :mod:`monarchify.hf.model_bench` on the same clock. Plain library
code: the ``monarchify bench`` command and the scripts in ``benchmarks/`` call it; it knows
nothing of either.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from monarchify import training
from monarchify.errors import ConfigError
from monarchify.monarch import MonarchLinear, kernels

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ConfigError(f"unknown dtype {name!r}; choose from {', '.join(DTYPES)}") from None


def resolve_device(name: str | None = "auto") -> torch.device:
    """``auto``: the GPU when there is one, else the CPU."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r} (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but this machine has no usable CUDA GPU")
    return device


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def plural(count: int | None, word: str) -> str:
    """``1 thread``, ``4 threads``."""
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{_cpu_name()}, {plural(os.cpu_count(), 'core')}, {plural(torch.get_num_threads(), 'thread')}"


def load_average() -> float | None:
    """The 1-minute load average (runnable processes, this one included), where the OS has one:
    the first of the training core's reading, which every run records."""
    loads = training.load_average()
    return loads[0] if loads else None


def is_busy(load: float | None, threads: int) -> bool:
    """Whether other work is running besides a benchmark on ``threads`` threads: the 1-minute
    load average is above what those threads alone account for (above 1.0 for one thread,
    above ``threads`` for more). No reading (``None``) counts as not busy."""
    return load is not None and load > max(threads, 1)


@dataclass
class Stat:
    """Timings of one contender, in milliseconds."""

    runs: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.runs)

    @property
    def best(self) -> float:
        return min(self.runs)


def _timer(device: torch.device) -> Callable[[Callable[[], Any]], float]:
    if device.type == "cuda":

        def cuda_time(fn: Callable[[], Any]) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            return start.elapsed_time(end)

        return cuda_time

    def cpu_time(fn: Callable[[], Any]) -> float:
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3

    return cpu_time


def calls(contenders: int, warmup: int, repeat: int) -> int:
    """How many calls :func:`compare` makes: each contender's warm-up, then an untimed and a
    timed call per repeat."""
    return contenders * (warmup + 2 * repeat)


def compare(fns: dict[str, Callable[[], Any]], device: torch.device, *, warmup: int = 3, repeat: int = 10,
            on_call: Callable[[], None] | None = None) -> dict[str, Stat]:
    """Time every callable ``repeat`` times, round-robin, after ``warmup`` calls of each;
    ``on_call()`` follows every call (a progress bar).

    Round-robin spreads a shared machine's slow patches over all contenders; each timed
    call directly follows an untimed call of the same contender, so it runs with its own
    data in cache (as when one layer is called repeatedly) rather than with whatever the
    previous contender left there.
    """
    if repeat < 1 or warmup < 0:
        raise ConfigError("repeat must be >= 1 and warmup >= 0")
    timer = _timer(device)
    tick = on_call or (lambda: None)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
            tick()
    runs: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for i in range(repeat):
        for name in names[i % len(names):] + names[: i % len(names)]:  # rotate who goes first
            fns[name]()
            tick()
            runs[name].append(timer(fns[name]))
            tick()
    return {name: Stat(r) for name, r in runs.items()}


def pair(dense: Stat, monarch: Stat, extra: dict[str, Stat] | None = None) -> dict[str, float]:
    """A result row: both medians in milliseconds and their ratio (dense / Monarch: above 1, Monarch
    is faster), and the same for each ``extra`` contender."""
    row = {"dense_ms": dense.median, "monarch_ms": monarch.median, "ratio": dense.median / monarch.median}
    for name, stat in (extra or {}).items():
        row[f"{name}_ms"] = stat.median
        row[f"ratio_{name}"] = dense.median / stat.median
    return row


def environment(device: torch.device) -> dict[str, Any]:
    """What a result records of where it was measured: the device, torch, and on a CPU its
    threads and load (a busy machine's timings are not to be trusted)."""
    env = {"device": str(device), "device_name": describe_device(device), "torch": torch.__version__}
    if device.type == "cpu":
        env["threads"] = torch.get_num_threads()
        env["load_avg_1min"] = load_average()
        env["busy"] = is_busy(env["load_avg_1min"], env["threads"])
    return env


# --- single layers ------------------------------------------------------------------------


def layer_benchmark(
    d_in: int,
    d_out: int,
    nblocks: int,
    tokens: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = "auto",
    bias: bool = True,
    backward: bool = True,
    reference: bool = False,
    implementations: tuple[str, ...] = (),
    warmup: int = 5,
    repeat: int = 20,
    seed: int = 0,
    output_order: str = "blocked",
    rank: int = 0,
) -> dict[str, Any]:
    """``nn.Linear`` vs ``MonarchLinear`` at one shape (with a rank-``rank`` low-rank term when
    ``rank > 0``): forward (inference: eval mode, no autograd, as when generating) and
    forward+backward (training mode, gradients for the input and every parameter, as inside
    a model).

    ``monarch`` is what the layer picks by itself (see :mod:`monarchify.monarch.kernels`).
    ``reference`` also times the plain two-``bmm`` path, to show what the fast paths gain
    over it; ``implementations`` adds any others by name (e.g. ``("strided",)`` on a GPU).
    """
    device = resolve_device(device) if not isinstance(device, torch.device) else device
    if tokens < 1:
        raise ConfigError("tokens must be >= 1")
    torch.manual_seed(seed)
    factory = {"device": device, "dtype": dtype}
    dense = nn.Linear(d_in, d_out, bias=bias, **factory)
    monarch = MonarchLinear(d_in, d_out, nblocks, bias=bias, output_order=output_order, rank=rank, **factory)
    x = torch.randn(tokens, d_in, **factory)
    x_grad = x.clone().requires_grad_()
    grad_out = torch.randn(tokens, d_out, **factory)

    def forward(layer: nn.Module, impl: str = "auto") -> Callable[[], Any]:
        def run() -> Any:
            layer.eval()
            with torch.no_grad(), kernels.use(impl):
                return layer(x)

        return run

    def train(layer: nn.Module, impl: str = "auto") -> Callable[[], Any]:
        def run() -> None:
            layer.train()
            with kernels.use(impl):
                layer(x_grad).backward(grad_out)
            x_grad.grad = None
            for param in layer.parameters():
                param.grad = None

        return run

    extras = tuple(dict.fromkeys((("reference",) if reference else ()) + tuple(implementations)))
    for name in extras:
        if name not in kernels.IMPLEMENTATIONS or name == "auto":
            raise ConfigError(f"unknown Monarch implementation {name!r}")
    fwd = {"dense": forward(dense), "monarch": forward(monarch)}
    fwd.update({name: forward(monarch, name) for name in extras})
    result: dict[str, Any] = {
        "config": {"d_in": d_in, "d_out": d_out, "nblocks": nblocks, "output_order": output_order, "tokens": tokens,
                   "dtype": str(dtype).removeprefix("torch."), "bias": bias, "warmup": warmup, "repeat": repeat,
                   **({"rank": rank} if rank else {})},
        "environment": environment(device),
        "implementation": kernels.auto_choice(x, inference=True, weights=monarch.R.numel() + monarch.L.numel()),
        "implementation_train": kernels.auto_choice(x),
        "params": {"dense": sum(p.numel() for p in dense.parameters()), "monarch": sum(p.numel() for p in monarch.parameters())},
        "flops_ratio": (d_in * d_out) / (monarch.layout.weight_params + rank * (d_in + d_out)),
    }
    stats = compare(fwd, device, warmup=warmup, repeat=repeat)
    result["forward"] = pair(stats["dense"], stats["monarch"], {k: stats[k] for k in extras})
    if backward:
        bwd = {"dense": train(dense), "monarch": train(monarch)}
        bwd.update({name: train(monarch, name) for name in extras})
        stats = compare(bwd, device, warmup=warmup, repeat=repeat)
        result["forward_backward"] = pair(stats["dense"], stats["monarch"], {k: stats[k] for k in extras})
    return result
