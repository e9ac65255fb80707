"""Which implementation computes a Monarch product, chosen per call.

* ``triton``: fused kernels (both block products and the permutations in one pass), on
  request only: timed on an H200 it lost to the strided path at every shape and token count
  tried, training and inference (``docs/performance.md``);
* ``native``: for CPU inference over at most :data:`.native.MAX_TOKENS` rows (decoding), one
  compiled C call that streams the factors once (:mod:`.native`, built on first use);
* ``small``: for CPU inference over at most :data:`SMALL_BATCH_TOKENS` rows, or where the
  native kernel is not available, two batched products over factors pre-arranged once by the
  layer (:mod:`.small`);
* ``strided``: strided BLAS calls with a hand-written backward (:mod:`.strided`), used on
  the GPU, for training and many rows on the CPU, and as the fallback anywhere else;
* ``reference``: the plain two-``bmm`` version (:mod:`.reference`), the yardstick.

``use("name")`` forces one inside a ``with`` block (benchmarks and tests compare them);
the default ``auto`` picks as above. Under ``torch.compile`` the plain path is traced (the
compiler fuses its copies itself). Triton is imported only when the fused kernel is asked for, so
importing monarchify never touches the GPU stack.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator

import torch

from monarchify.monarch.kernels import native
from monarchify.monarch.kernels.reference import monarch_reference
from monarchify.monarch.kernels.small import arrange, monarch_small
from monarchify.monarch.kernels.strided import monarch_strided, needs_grad

IMPLEMENTATIONS = ("auto", "triton", "native", "small", "strided", "reference")
SMALL_BATCH_TOKENS = 8
"""Up to this many rows the small path beats the strided one on the CPU, at every LLM shape
measured (576->192 to 4096->11008); at 16 they are even (``docs/performance.md``)."""
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


def auto_choice(x: torch.Tensor, *, inference: bool = False, weights: int = 0) -> str:
    """What ``auto`` runs for this input: on the CPU for ``inference`` (no gradient wanted,
    arranged factors on offer) over a few rows the native kernel for layers of at most
    :data:`.native.MAX_WEIGHTS` factor entries (``weights``) or the small path, else (and on
    any GPU) the strided one. The fused Triton kernel is not chosen: on an H200 in bf16 the
    strided path beat it everywhere measured (1 to 16,384 tokens, 576 to 14,336 wide,
    forward and backward; ``benchmarks/gpu_check.py``), by 1.3x to 9x.

    With more than one thread the native kernel is chosen only where it was built with OpenMP
    (it then shares torch's threads): a single-threaded build loses to MKL's threaded small
    path there (SmolLM2 at 4 blocks, two threads, one sequence: 25.0 tokens/s against 33.3,
    dense 27.6; the threaded build 36.0 against dense 27.4)."""
    if inference and x.is_cpu and x.shape[0] <= SMALL_BATCH_TOKENS:
        native_fits = weights <= native.MAX_WEIGHTS and (native.threaded() or torch.get_num_threads() == 1) and native.supports(x)
        return "native" if native_fits else "small"
    return "strided"


def decode_native(x: torch.Tensor, R: torch.Tensor, L: torch.Tensor, bias: torch.Tensor | None, out_features: int,
                  blocked: bool) -> torch.Tensor | None:
    """What :func:`monarch_matmul` would return through ``auto`` for a decoding step's input
    (any leading shape, no padding, no gradient wanted: the caller checks those), computed by
    the native kernel; None when ``auto`` would not pick it.

    The same choice as ``monarch_matmul`` makes, with the checks in the order that rejects
    fastest and no reshapes: a decoding step pays this 200 times, and the general route's
    Python costs as much as a small layer's product (``docs/performance.md``).
    """
    width = x.shape[-1]
    if not (x.is_cpu and x.numel() <= native.MAX_TOKENS * width and R.numel() + L.numel() <= native.MAX_WEIGHTS and x.dtype in native.FUNCTIONS and x.is_contiguous()
            and _choice.get() == "auto" and (native.threaded() or torch.get_num_threads() == 1) and not torch.compiler.is_compiling()
            and not torch.is_autocast_enabled("cpu")):
        return None
    dtype = x.dtype
    fn = native.function(dtype)
    if fn is None or x.numel() == 0 or not all(
        t is None or (t.dtype == dtype and t.is_cpu and t.is_contiguous()) for t in (R, L, bias)
    ):  # (what torch would refuse or copy: the general route says so, or copies)
        return None
    b, q, p = R.shape
    s = L.shape[1]
    y = torch.empty(*x.shape[:-1], out_features, dtype=x.dtype)
    native.call(fn, x, width, R, L, bias, y, b, p, q, s, blocked)
    return y


def monarch_matmul(
    x: torch.Tensor, R: torch.Tensor, L: torch.Tensor, bias: torch.Tensor | None = None, *, blocked: bool = True,
    arranged: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> torch.Tensor:
    """``M x + bias`` for a 2-D ``x`` of width ``b·p``; returns ``(N, b·s)`` with outputs in
    the blocked (``o = l·s + r``) or interleaved (``o = r·b + l``) order.

    ``arranged()``, when given, returns ``R`` and ``L`` pre-arranged for the small path
    (:func:`.small.arrange`, kept by the caller across calls): ``auto`` takes that path only
    then, and only when no gradient is wanted, since the arranged copies are detached. Without
    it a forced ``small`` arranges them per call, differentiably.

    Under autocast the inputs are cast to the autocast dtype first (as ``nn.Linear`` is) and
    the product runs with autocast off, so forward and backward see one dtype (the arranged
    factors, in the parameters' dtype, are not used there).
    """
    device_type = "cpu" if x.is_cpu else x.device.type  # (is_cpu: a decoding step asks 200 times)
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        x, R, L = x.to(dtype), R.to(dtype), L.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        with torch.autocast(device_type, enabled=False):
            return monarch_matmul(x, R, L, bias, blocked=blocked)
    if arranged is not None and needs_grad(x, R, L, bias):
        arranged = None
    if torch.compiler.is_compiling():
        # Under torch.compile the compiler fuses the plain path's copies itself; the
        # hand-written paths (out= views, Triton launches) are for eager mode.
        name = "reference"
    else:
        name = _choice.get()
        if name == "auto":
            name = auto_choice(x, inference=arranged is not None, weights=R.numel() + L.numel())
            if name == "native":  # auto has checked what the kernel takes
                return native.monarch_native(x, R, L, bias, blocked=blocked)
    if name == "native":
        if native.supports(x) and not needs_grad(x, R, L, bias):
            return native.monarch_native(x, R, L, bias, blocked=blocked)
        name = "small"  # what it cannot take (gradients, more rows, no compiler): the same product in torch
    if name == "small":
        Rt, Lt = arranged() if arranged is not None else arrange(R, L)
        return monarch_small(x, Rt, Lt, bias, blocked=blocked)
    if name == "triton":
        from monarchify.monarch.kernels import triton_monarch

        if triton_monarch.supports(x) or triton_monarch.interpreting():
            return triton_monarch.monarch_triton(x, R, L, bias, blocked=blocked)
        name = "strided"  # what it cannot take (a CPU tensor, float64): the same product in torch
    if name == "reference":
        y = monarch_reference(x, R, L, blocked=blocked)
        return y if bias is None else y + bias
    return monarch_strided(x, R, L, bias, blocked=blocked)


__all__ = [
    "IMPLEMENTATIONS", "SMALL_BATCH_TOKENS", "arrange", "native", "auto_choice", "decode_native", "monarch_matmul", "monarch_reference", "monarch_small",
    "monarch_strided", "needs_grad", "use",
]
