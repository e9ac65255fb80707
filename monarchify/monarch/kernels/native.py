"""The Monarch product for one to a few tokens as one compiled C call (CPU decoding).

Why C: at one token a layer's product is two passes over its weights, and what BLAS gives
on the CPU is far from that. Through ``bmm`` each block is a separate small GEMV (a few
hundred kilobytes at LLM widths), fetched from memory at about half the rate a dense layer's
one long GEMV streams at, plus some ten dispatched ops per layer for the middle permutation
and the views (``docs/performance.md``). This kernel walks ``R`` then ``L`` once, in storage
order (one sequential stream each, which the hardware prefetcher follows across blocks),
does the middle permutation in a gather of a few kilobytes, and is one call from Python. Per
token it computes each output as a dot product of a weight row; tokens four at a time share
each load of the row. It reads the parameters as stored: no arranged copy.

With several threads each takes a contiguous run of the rows of each factor, so every
core streams its own part of the weights (OpenMP, torch's own thread pool: see :func:`_build`).

It is built on first use with the system C compiler (``cc``, well under a second) into the
user's cache directory and loaded with ``ctypes``, so monarchify needs no build step and no
compiler: where building or loading fails, or ``MONARCHIFY_NATIVE=0`` is set, the layer uses
the torch small-batch path (:mod:`.small`) instead. x86-64 builds carry an AVX2/FMA clone
chosen at load time by the CPU (GCC's ``target_clones``), so a cached library is safe on
any x86-64 machine. Summation order differs from BLAS (float32 results agree to rounding,
``tests/test_small_batch.py``) but does not depend on where the weights live, on the thread
count, or on how many tokens come together.
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
one thread: 2.0x dense per transformer block at 1 token, 2.7x at 2, 1.9x at 4, against 1.3-1.6x).
At 8 rows MKL's register-blocked products win (SmolLM2 at 4 blocks decoding 8 sequences, one
thread: 92 tokens/s here against 96 through the small path; two threads: even)."""

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

/* Below this many multiply-adds a layer runs on one thread: waking a second costs more. */
#define PARALLEL_WORK 32768L

int monarch_openmp(void)
{
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* Eight lanes of T, loadable from any T-aligned address and aliasing T (GCC and clang). */
typedef float f32x8 __attribute__((vector_size(32), aligned(4), may_alias));
typedef double f64x8 __attribute__((vector_size(64), aligned(8), may_alias));

/* out[t * ldo] = row[0 .. width) . in[t * ld + 0 .. width) for t < n. Eight partial sums a
   token, tokens four at a time so that each load of the row feeds four of them; a token's
   sum is added up in the same order however the tokens are grouped. */
#define DOTS(NAME, T, V)                                                                  \
static inline T NAME##_sum(V a, const T *row, const T *v, long i, long width)            \
{                                                                                         \
    T sum = ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]));            \
    for (; i < width; i++) sum += row[i] * v[i];                                          \
    return sum;                                                                           \
}                                                                                         \
static inline void NAME(const T *row, const T *in, long ld, int n, long width, T *out, long ldo) \
{                                                                                         \
    long full = width - width % 8;                                                        \
    int t = 0;                                                                            \
    for (; t + 4 <= n; t += 4) {                                                          \
        const T *v0 = in + t * ld, *v1 = v0 + ld, *v2 = v1 + ld, *v3 = v2 + ld;           \
        V a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};                                         \
        for (long i = 0; i < full; i += 8) {                                              \
            V r = *(const V *)(row + i);                                                  \
            a0 += r * *(const V *)(v0 + i); a1 += r * *(const V *)(v1 + i);               \
            a2 += r * *(const V *)(v2 + i); a3 += r * *(const V *)(v3 + i);               \
        }                                                                                 \
        out[t * ldo] = NAME##_sum(a0, row, v0, full, width);                              \
        out[(t + 1) * ldo] = NAME##_sum(a1, row, v1, full, width);                        \
        out[(t + 2) * ldo] = NAME##_sum(a2, row, v2, full, width);                        \
        out[(t + 3) * ldo] = NAME##_sum(a3, row, v3, full, width);                        \
    }                                                                                     \
    for (; t < n; t++) {                                                                  \
        const T *v0 = in + t * ld;                                                        \
        V a0 = {0};                                                                       \
        for (long i = 0; i < full; i += 8)                                                \
            a0 += *(const V *)(row + i) * *(const V *)(v0 + i);                           \
        out[t * ldo] = NAME##_sum(a0, row, v0, full, width);                              \
    }                                                                                     \
}                                                                                         \
/* out[u] = row u of w (4 rows, `width` apart) . v: four independent sums in flight, so that \
   one token is not held up by the latency of a single chain of multiply-adds. */         \
static inline void NAME##_rows4(const T *w, long width, const T *v, T *out)              \
{                                                                                         \
    long full = width - width % 8;                                                        \
    const T *w0 = w, *w1 = w + width, *w2 = w1 + width, *w3 = w2 + width;                 \
    V a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};                                             \
    for (long i = 0; i < full; i += 8) {                                                  \
        V x = *(const V *)(v + i);                                                        \
        a0 += *(const V *)(w0 + i) * x; a1 += *(const V *)(w1 + i) * x;                  \
        a2 += *(const V *)(w2 + i) * x; a3 += *(const V *)(w3 + i) * x;                   \
    }                                                                                     \
    out[0] = NAME##_sum(a0, w0, v, full, width); out[1] = NAME##_sum(a1, w1, v, full, width); \
    out[2] = NAME##_sum(a2, w2, v, full, width); out[3] = NAME##_sum(a3, w3, v, full, width); \
}

/* y[t, o] = bias[o] + (M x_t)[o] for t < n, M = P_out blockdiag(L) P_mid blockdiag(R):
   R is (b, q, p), L is (b, s, q), both contiguous; o = l*s + r (blocked) or r*b + l.
   Each stage is one loop over the factor's rows in storage order (row g of R is block g div q,
   row g of L block g div s), split into contiguous runs across `threads` OpenMP threads: every
   thread streams its own part of the weights once, and for several tokens reuses each row from
   L1 cache. An output is one row's dot product whatever the thread count, so results do not
   depend on it. Returns 0, or -1 when out of memory. */
#define MONARCH(NAME, DOT_FN, T)                                                          \
CLONES int NAME(const T *x, long ldx, const T *R, const T *L, const T *bias, T *y,       \
                long ldy, int n, int b, int p, int q, int s, int blocked, int threads)    \
{                                                                                         \
    long rows_r = (long)b * q, rows_l = (long)b * s, mid = (long)n * rows_r;              \
    T *h = malloc(sizeof(T) * 2 * mid);                                                   \
    if (!h) return -1;                                                                    \
    T *hb = h + mid;                                                                      \
    int parallel = threads > 1 && (rows_r * p + rows_l * q) * n >= PARALLEL_WORK;          \
    (void)parallel;                                                                       \
    _Pragma("omp parallel num_threads(threads) if(parallel)")                             \
    {                                                                                     \
        /* middle f = k*q + j of token t at h[t*b*q + f] */                               \
        _Pragma("omp for schedule(static)")                                               \
        for (long g4 = 0; g4 < (rows_r + 3) / 4; g4++) {                                  \
            long g = 4 * g4, end = g + 4 < rows_r ? g + 4 : rows_r;                       \
            if (n < 4 && end - g == 4 && g / q == (end - 1) / q) {                        \
                for (int t = 0; t < n; t++) {                                             \
                    T four[4];                                                            \
                    DOT_FN##_rows4(R + g * p, p, x + t * ldx + (g / q) * p, four);        \
                    for (int u = 0; u < 4; u++) h[t * rows_r + g + u] = four[u];          \
                }                                                                         \
            } else                                                                        \
                for (; g < end; g++)                                                      \
                    DOT_FN(R + g * p, x + (g / q) * p, ldx, n, p, h + g, rows_r);         \
        }                                                                                 \
        /* f feeds L block f mod b as its column f div b: hb[(l*n + t)*q + c] = h[t, c*b + l] */ \
        _Pragma("omp for schedule(static)")                                               \
        for (long lt = 0; lt < (long)b * n; lt++) {                                       \
            long l = lt / n, t = lt % n;                                                  \
            for (int c = 0; c < q; c++)                                                   \
                hb[lt * q + c] = h[t * rows_r + (long)c * b + l];                         \
        }                                                                                 \
        _Pragma("omp for schedule(static)")                                               \
        for (long g4 = 0; g4 < (rows_l + 3) / 4; g4++) {                                  \
            long g = 4 * g4, end = g + 4 < rows_l ? g + 4 : rows_l;                       \
            if (n < 4 && end - g == 4 && g / s == (end - 1) / s) {                        \
                long l = g / s;                                                           \
                for (int t = 0; t < n; t++) {                                             \
                    T four[4];                                                            \
                    DOT_FN##_rows4(L + g * q, q, hb + (l * n + t) * q, four);             \
                    for (int u = 0; u < 4; u++) {                                         \
                        long o = blocked ? g + u : ((g + u) % s) * b + l;                 \
                        y[t * ldy + o] = bias ? four[u] + bias[o] : four[u];              \
                    }                                                                     \
                }                                                                         \
            } else                                                                        \
                for (; g < end; g++) {                                                    \
                    long l = g / s, o = blocked ? g : (g % s) * b + l;                    \
                    DOT_FN(L + g * q, hb + l * n * q, q, n, q, y + o, ldy);               \
                    if (bias)                                                             \
                        for (int t = 0; t < n; t++) y[t * ldy + o] += bias[o];            \
                }                                                                         \
        }                                                                                 \
    }                                                                                     \
    free(h);                                                                              \
    return 0;                                                                             \
}

DOTS(dots_f32, float, f32x8)
DOTS(dots_f64, double, f64x8)
MONARCH(monarch_f32, dots_f32, float)
MONARCH(monarch_f64, dots_f64, double)
"""

FUNCTIONS = {torch.float32: "monarch_f32", torch.float64: "monarch_f64"}
_ARGS = [ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
         ctypes.c_long] + [ctypes.c_int] * 7


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "monarchify"


def _build(compiler: str, target: Path) -> None:
    """Compile into a private temporary folder, then move into place atomically (two
    processes building at once both succeed; a reader never sees half a library).

    With OpenMP where the compiler has it: the library then needs ``libgomp.so.1``, which the
    dynamic linker finds already loaded by torch (its CPU wheels ship their own under that
    name), so the kernel's threads are torch's, counted by ``torch.set_num_threads``. Without
    (e.g. a clang with no OpenMP runtime), a single-threaded build."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as work:
        src = Path(work) / "monarch_native.c"
        src.write_text(SOURCE, encoding="utf-8")
        out = Path(work) / target.name
        command = [compiler, "-O3", "-shared", "-fPIC", str(src), "-o", str(out)]
        try:
            subprocess.run([*command, "-fopenmp"], check=True, capture_output=True, timeout=120)
        except subprocess.CalledProcessError:
            subprocess.run(command, check=True, capture_output=True, timeout=120)
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
    lib.monarch_openmp.restype = ctypes.c_int
    lib.openmp = bool(lib.monarch_openmp())
    return lib


def threaded() -> bool:
    """Whether the built kernel splits its work over torch's threads (an OpenMP build)."""
    return bool(getattr(library(), "openmp", False))


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
    factors must be contiguous, everything in ``fn``'s dtype on the CPU (unchecked here).
    It runs on ``torch.get_num_threads()`` threads where the build is threaded."""
    n = y.numel() // (b * s)
    status = fn(x.data_ptr(), ldx, R.data_ptr(), L.data_ptr(), None if bias is None else bias.data_ptr(), y.data_ptr(),
                b * s, n, b, p, q, s, 1 if blocked else 0, torch.get_num_threads())
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
