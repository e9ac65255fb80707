"""Which implementation computes a Monarch product, chosen per call.

* ``triton``: fused kernels (both block products and the permutations in one pass),
  used automatically for CUDA tensors when Triton is importable and the shape fits;
* ``strided``: strided BLAS calls with a hand-written backward (:mod:`.strided`), used on
  the CPU and as the fallback anywhere else;
* ``reference``: the plain two-``bmm`` version (:mod:`.reference`), the yardstick.

``use("name")`` forces one inside a ``with`` block (benchmarks and tests compare them);
the default ``auto`` picks as above. Under ``torch.compile`` the plain path is traced (the
compiler fuses its copies itself). Triton is imported only when a CUDA tensor arrives, so
importing monarchify never touches the GPU stack.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
from collections.abc import Iterator
from functools import lru_cache

import torch

from monarchify.monarch.kernels.reference import monarch_reference
from monarchify.monarch.kernels.strided import monarch_strided

IMPLEMENTATIONS = ("auto", "triton", "strided", "reference")
_choice: contextvars.ContextVar[str] = contextvars.ContextVar("monarch_impl", default="auto")


@contextlib.contextmanager
def use(name: str) -> Iterator[None]:
    """Force one implementation for the Monarch layers called inside the block."""
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"unknown Monarch implementation {name!r}; choose from {', '.join(IMPLEMENTATIONS)}")
    token = _choice.set(name)
    try:
        yield
    finally:
        _choice.reset(token)


@lru_cache(maxsize=1)
def triton_available() -> bool:
    """Whether Triton can be imported (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def auto_choice(x: torch.Tensor) -> str:
    """What ``auto`` runs for this input: the fused kernel on CUDA when possible."""
    if x.is_cuda and triton_available():
        from monarchify.monarch.kernels import triton_monarch

        if triton_monarch.supports(x):
            return "triton"
    return "strided"


def monarch_matmul(
    x: torch.Tensor, R: torch.Tensor, L: torch.Tensor, bias: torch.Tensor | None = None, *, blocked: bool = True
) -> torch.Tensor:
    """``M x + bias`` for a 2-D ``x`` of width ``b·p``; returns ``(N, b·s)`` with outputs in
    the blocked (``o = l·s + r``) or interleaved (``o = r·b + l``) order.

    Under autocast the inputs are cast to the autocast dtype first (as ``nn.Linear`` is) and
    the product runs with autocast off, so forward and backward see one dtype.
    """
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        x, R, L = x.to(dtype), R.to(dtype), L.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        with torch.autocast(device_type, enabled=False):
            return monarch_matmul(x, R, L, bias, blocked=blocked)
    if torch.compiler.is_compiling():
        # Under torch.compile the compiler fuses the plain path's copies itself; the
        # hand-written paths (out= views, Triton launches) are for eager mode.
        name = "reference"
    else:
        name = _choice.get()
        if name == "auto":
            name = auto_choice(x)
    if name == "triton":
        from monarchify.monarch.kernels import triton_monarch

        return triton_monarch.monarch_triton(x, R, L, bias, blocked=blocked)
    if name == "reference":
        y = monarch_reference(x, R, L, blocked=blocked)
        return y if bias is None else y + bias
    return monarch_strided(x, R, L, bias, blocked=blocked)


__all__ = ["IMPLEMENTATIONS", "auto_choice", "monarch_matmul", "monarch_reference", "monarch_strided", "triton_available", "use"]
