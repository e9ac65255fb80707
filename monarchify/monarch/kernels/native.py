"""The Monarch product for one to a few tokens as one compiled C call (CPU decoding).

Why C: at one token a layer's product is two passes over its weights, and what BLAS gives
on the CPU is far from that. Through ``bmm`` each block is a separate small GEMV (a few
hundred kilobytes at LLM widths), fetched from memory at about half the rate a dense layer's
one long GEMV streams at, plus some ten dispatched ops per layer for the middle permutation
and the views (``docs/performance.md``). This kernel walks ``R`` then ``L`` once, in storage
order (one sequential stream each, which the hardware prefetcher follows across blocks),
does the middle permutation in a gather of a few kilobytes, and is one call from Python. Per
token it computes each output as a dot product of a weight row; for several tokens the row
is reused from L1 cache. It reads the parameters as stored: no arranged copy.

It is built on first use with the system C compiler (``cc``, well under a second) into the
user's cache directory and loaded with ``ctypes``, so monarchify needs no build step and no
compiler: where building or loading fails, or ``MONARCHIFY_NATIVE=0`` is set, the layer uses
the torch small-batch path (:mod:`.small`) instead. x86-64 builds carry an AVX2/FMA clone
chosen at load time by the CPU (GCC's ``target_clones``), so a cached library is safe on
any x86-64 machine. Summation order differs from BLAS (float32 results agree to rounding,
``tests/test_small_batch.py``) but does not depend on where the weights live.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

MAX_TOKENS = 4
"""Up to this many rows the kernel beats the torch small path (on SmolLM2's layer shapes,
one thread: 2.0x dense per transformer block at 1 token, 2.7x at 2, 1.9x at 4, against 1.3-1.6x; at 8
rows its per-token dot products lose)."""

MAX_WEIGHTS = 1 << 22
"""Above this many factor entries (``R`` and ``L`` together) MKL's GEMVs in the torch small
path stream faster than this kernel's dot products (one thread, 1 token: 4096->4096 at 4
blocks, 8.4M entries, 3.2 ms small against 3.9 ms here; 4096->1024, 1.3M, 0.70 against 0.47)."""

SOURCE = r"""
#include <stdlib.h>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define CLONES
#endif

/* out[t * ld_out + r] = row r of w (rows x width, row-major) . in[t * ld_in + 0 .. width) */
#define STAGE(NAME, T)                                                                    \
static void NAME(const T *w, long rows, long width, const T *in, long ld_in, int n,      \
                 T *out, long ld_out)                                                     \
{                                                                                         \
    for (long r = 0; r < rows; r++) {                                                     \
        const T *row = w + r * width;                                                     \
        for (int t = 0; t < n; t++) {                                                     \
            const T *v = in + t * ld_in;                                                  \
            T acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};                                          \
            long i = 0;                                                                   \
            for (; i + 8 <= width; i += 8)                                                \
                for (int j = 0; j < 8; j++) acc[j] += row[i + j] * v[i + j];              \
            T sum = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])); \
            for (; i < width; i++) sum += row[i] * v[i];                                  \
            out[t * ld_out + r] = sum;                                                    \
        }                                                                                 \
    }                                                                                     \
}

/* y[t, o] = bias[o] + (M x_t)[o] for t < n, M = P_out blockdiag(L) P_mid blockdiag(R):
   R is (b, q, p), L is (b, s, q), both contiguous; o = l*s + r (blocked) or r*b + l.
   Returns 0, or -1 when out of memory. */
#define MONARCH(NAME, STAGE_FN, T)                                                        \
CLONES int NAME(const T *x, long ldx, const T *R, const T *L, const T *bias, T *y,       \
                long ldy, int n, int b, int p, int q, int s, int blocked)                 \
{                                                                                         \
    long mid = (long)n * b * q;                                                           \
    T *h = malloc(sizeof(T) * (2 * mid + (long)n * s));                                   \
    if (!h) return -1;                                                                    \
    T *hb = h + mid, *yl = hb + mid;                                                      \
    /* middle f = k*q + j of token t at h[t*b*q + f] */                                   \
    for (int k = 0; k < b; k++)                                                           \
        STAGE_FN(R + (long)k * q * p, q, p, x + (long)k * p, ldx, n, h + (long)k * q, (long)b * q); \
    /* f feeds L block f mod b as its column f div b: hb[(l*n + t)*q + c] = h[t, c*b + l] */ \
    for (int t = 0; t < n; t++)                                                           \
        for (int l = 0; l < b; l++)                                                       \
            for (int c = 0; c < q; c++)                                                   \
                hb[((long)l * n + t) * q + c] = h[(long)t * b * q + (long)c * b + l];     \
    for (int l = 0; l < b; l++) {                                                         \
        STAGE_FN(L + (long)l * s * q, s, q, hb + (long)l * n * q, q, n, yl, s);           \
        for (int t = 0; t < n; t++)                                                       \
            for (int r = 0; r < s; r++) {                                                 \
                long o = blocked ? (long)l * s + r : (long)r * b + l;                     \
                y[t * ldy + o] = bias ? yl[(long)t * s + r] + bias[o] : yl[(long)t * s + r]; \
            }                                                                             \
    }                                                                                     \
    free(h);                                                                              \
    return 0;                                                                             \
}

STAGE(stage_f32, float)
STAGE(stage_f64, double)
MONARCH(monarch_f32, stage_f32, float)
MONARCH(monarch_f64, stage_f64, double)
"""

FUNCTIONS = {torch.float32: "monarch_f32", torch.float64: "monarch_f64"}
_ARGS = [ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
         ctypes.c_long] + [ctypes.c_int] * 6


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "monarchify"


def _build(compiler: str, target: Path) -> None:
    """Compile into a private temporary folder, then move into place atomically (two
    processes building at once both succeed; a reader never sees half a library)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as work:
        src = Path(work) / "monarch_native.c"
        src.write_text(SOURCE, encoding="utf-8")
        out = Path(work) / target.name
        subprocess.run([compiler, "-O3", "-shared", "-fPIC", str(src), "-o", str(out)],
                       check=True, capture_output=True, timeout=120)
        os.replace(out, target)


@lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The compiled kernel, built on first use; None where it cannot be had (no compiler,
    no writable cache, a failed build or load, or ``MONARCHIFY_NATIVE=0``)."""
    if os.environ.get("MONARCHIFY_NATIVE", "1") == "0":
        return None
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        return None
    key = hashlib.sha256(f"{SOURCE}\0{compiler}\0{platform.machine()}".encode()).hexdigest()[:16]
    target = _cache_dir() / f"monarch_native-{key}.so"
    try:
        if not target.is_file():
            _build(compiler, target)
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError):
        return None
    for name in FUNCTIONS.values():
        fn = getattr(lib, name)
        fn.restype = ctypes.c_int
        fn.argtypes = _ARGS
    return lib


def supports(x: torch.Tensor) -> bool:
    """Whether the kernel takes this input (CPU, float32/float64, at most :data:`MAX_TOKENS`
    rows) and has been built."""
    return x.is_cpu and x.dtype in FUNCTIONS and 1 <= x.shape[0] <= MAX_TOKENS and library() is not None


def function(dtype: torch.dtype) -> Any | None:
    """The kernel for this dtype, or None (another dtype, or no library)."""
    lib = library()
    name = FUNCTIONS.get(dtype)
    return None if lib is None or name is None else getattr(lib, name)


def call(fn: Any, x: torch.Tensor, ldx: int, R: torch.Tensor, L: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor,
         b: int, p: int, q: int, s: int, blocked: bool) -> None:
    """Run ``fn`` on rows ``ldx`` apart in ``x`` into contiguous ``y`` (``b·s`` wide); the
    factors must be contiguous, everything in ``fn``'s dtype on the CPU (unchecked here)."""
    n = y.numel() // (b * s)
    status = fn(x.data_ptr(), ldx, R.data_ptr(), L.data_ptr(), None if bias is None else bias.data_ptr(), y.data_ptr(),
                b * s, n, b, p, q, s, 1 if blocked else 0)
    if status != 0:
        raise MemoryError("the native Monarch kernel could not allocate its middle buffer")


def monarch_native(
    x: torch.Tensor, R: torch.Tensor, L: torch.Tensor, bias: torch.Tensor | None = None, *, blocked: bool = True
) -> torch.Tensor:
    """``M x + bias`` for ``x`` of shape ``(N, b·p)`` (see :func:`supports`); no autograd."""
    dtype = x.dtype
    if not (R.dtype == dtype and L.dtype == dtype and R.is_cpu and L.is_cpu and (bias is None or (bias.dtype == dtype and bias.is_cpu))):
        raise RuntimeError(f"the native Monarch kernel needs the input and the factors on the CPU in one dtype, got {x.dtype} and "
                           f"{R.dtype}/{L.dtype}")
    b, q, p = R.shape
    s = L.shape[1]
    n = x.shape[0]
    x, R, L = x.contiguous(), R.contiguous(), L.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    y = torch.empty(n, b * s, dtype=x.dtype)
    call(getattr(library(), FUNCTIONS[x.dtype]), x, x.stride(0), R, L, bias, y, b, p, q, s, blocked)
    return y
