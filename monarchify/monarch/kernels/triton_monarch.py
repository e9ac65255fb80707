"""Fused Triton kernels for the Monarch product on GPUs.

On a GPU in bf16 the plain version is slower than dense (``docs/performance.md``): its two
small batched products and the transposes between them move more bytes than the FLOPs
save. Here one kernel does both products and both permutations, keeping the middle in
registers.

Why it fuses: sub-block ``(l, k)`` of a Monarch matrix is a rank-``t`` product
``L_lk · R_kl`` with ``t = q/b``, where ``R_kl`` is rows ``c·b + l`` of ``R[k]`` and
``L_lk`` is columns ``k·t + c`` of ``L[l]`` (the layout's pair rule). So output block ``l``
is ``Σ_k (x_k · R_klᵀ) · L_lkᵀ``: a program that owns a tile of tokens and a tile of output
block ``l`` loops over the input blocks ``k``, computes the small middle tile
``x_k · R_klᵀ`` (``BLOCK_M × t``) and immediately multiplies it into its accumulator. The
permutations become address arithmetic in the loads and the store (outputs of block ``l``
are the columns ``l·s + r`` in the blocked output order, ``r·b + l`` in the interleaved one).

One kernel, two uses. The gradient with respect to the input is the same structure with
the roles swapped (``dx_k = Σ_l (dy_l · L_lk) · R_kl``), so the kernel takes every stride
as an argument. It can also write the middle it computes, which is all the weight
gradients need on top of the inputs: ``dL[l] = dy_lᵀ · H_l`` and ``dR[k] = dH_kᵀ · x_k``
are then two ordinary batched products (cuBLAS).

Under ``TRITON_INTERPRET=1`` (the CI machine has no GPU) the same kernel runs on CPU
tensors. Triton 3.9's interpreter multiplies the raw bits of bfloat16 ``tl.dot`` operands
(it stores bf16 as uint16 and only converts fp8), so there the operands are widened to
float32 first: exact for bf16 values, and the same float32 accumulation the GPU does.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

_empty = torch.empty
"""Allocates every buffer the kernels write; tests swap in a NaN-filling one."""

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _fused_kernel(
    inp, w1, w2, out, mid, bias, n_rows, n_bucket,
    s_in_m, s_in_blk, s_in_i,
    s_w1_ib, s_w1_ob, s_w1_c, s_w1_i,
    s_w2_ob, s_w2_ib, s_w2_j, s_w2_c,
    s_out_m, s_out_blk, s_out_j,
    s_mid_m, s_mid_ib, s_mid_ob, s_mid_c,
    s_bias_blk, s_bias_j,
    NB: tl.constexpr, IN_BLOCK: tl.constexpr, OUT_BLOCK: tl.constexpr, T: tl.constexpr,
    HAS_BIAS: tl.constexpr, STORE_MID: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_I: tl.constexpr,
):
    """``out[m, (ob, j)] = Σ_ib Σ_c (Σ_i inp[m, (ib, i)] · w1[ib, ob, c, i]) · w2[ob, ib, j, c]``.

    One program: a ``BLOCK_M`` tile of rows, one output block ``ob``, a ``BLOCK_J`` tile of
    that block's columns. ``mid`` (when ``STORE_MID``) receives the middle values
    ``[m, ib, ob, c]``, written once by the programs of the first column tile.
    """
    pid_m = tl.program_id(0)
    ob = tl.program_id(1)
    pid_j = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)
    cols = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    col_ok = cols < OUT_BLOCK
    acc = tl.zeros((BLOCK_M, BLOCK_J), dtype=tl.float32)
    for ib in range(NB):
        for c0 in range(0, T, BLOCK_T):
            cs = c0 + tl.arange(0, BLOCK_T)
            c_ok = cs < T
            middle = tl.zeros((BLOCK_M, BLOCK_T), dtype=tl.float32)
            for i0 in range(0, IN_BLOCK, BLOCK_I):
                ii = i0 + tl.arange(0, BLOCK_I)
                i_ok = ii < IN_BLOCK
                a = tl.load(
                    inp + rows64[:, None] * s_in_m + ib * s_in_blk + ii[None, :] * s_in_i,
                    mask=row_ok[:, None] & i_ok[None, :], other=0.0,
                )
                w = tl.load(
                    w1 + ib * s_w1_ib + ob * s_w1_ob + cs[None, :] * s_w1_c + ii[:, None] * s_w1_i,
                    mask=i_ok[:, None] & c_ok[None, :], other=0.0,
                )
                if UPCAST:
                    a = a.to(tl.float32)
                    w = w.to(tl.float32)
                middle = tl.dot(a, w, acc=middle, input_precision=PRECISION)
            if STORE_MID:
                if pid_j == 0:
                    tl.store(
                        mid + rows64[:, None] * s_mid_m + ib * s_mid_ib + ob * s_mid_ob + cs[None, :] * s_mid_c,
                        middle.to(mid.dtype.element_ty), mask=row_ok[:, None] & c_ok[None, :],
                    )
            v = tl.load(
                w2 + ob * s_w2_ob + ib * s_w2_ib + cols[None, :] * s_w2_j + cs[:, None] * s_w2_c,
                mask=c_ok[:, None] & col_ok[None, :], other=0.0,
            )
            h = middle.to(inp.dtype.element_ty)  # the middle is rounded like the plain path's bmm output
            if UPCAST:
                h = h.to(tl.float32)
                v = v.to(tl.float32)
            acc = tl.dot(h, v, acc=acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias + ob * s_bias_blk + cols * s_bias_j, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(
        out + rows64[:, None] * s_out_m + ob * s_out_blk + cols[None, :] * s_out_j,
        acc.to(out.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :],
    )


def _configs() -> list[triton.Config]:
    """A small search space for the GPU; the script in ``benchmarks/`` warms it up.

    ``BLOCK_T`` 64 covers a whole pair (t = 48 at BERT-base widths, b = 4) in one middle
    tile, so each input tile is loaded once per input block; 16 and 32 avoid padding it.
    ``BLOCK_J`` 256 covers a whole output block of 192 (no recomputed middle). The 16-row
    tiles are for decoding (one to a few tokens; ``tl.dot``'s minimum): there a 64-row tile
    would be 63 rows of masked work, and small column tiles give the GPU enough programs.
    """
    configs = []
    for bm, bj, bt, bi, warps, stages in [
        (16, 64, 16, 64, 4, 2), (16, 128, 32, 64, 4, 3), (16, 32, 16, 128, 2, 2),
        (64, 128, 16, 64, 4, 3), (64, 256, 16, 64, 8, 3), (128, 128, 16, 64, 8, 3),
        (128, 256, 16, 32, 8, 3), (64, 64, 32, 64, 4, 3), (128, 64, 32, 64, 4, 4),
        (32, 64, 16, 64, 4, 2), (64, 256, 32, 32, 8, 3), (128, 128, 32, 32, 8, 4),
        (64, 128, 64, 64, 4, 3), (128, 128, 64, 32, 8, 3), (64, 256, 64, 32, 8, 3),
    ]:
        configs.append(triton.Config(dict(BLOCK_M=bm, BLOCK_J=bj, BLOCK_T=bt, BLOCK_I=bi), num_warps=warps, num_stages=stages))
    return configs


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """The configs worth timing for one shape: every one is compiled before it is timed, and
    compiling dominates a short GPU session. Row tiles follow the token count (16-row tiles
    only for a few tokens, none for many), and no tile is wider than the (power-of-two
    rounded) dimension it covers, where a narrower one exists."""
    shape = {**named_args, **kwargs}
    rows, dims = shape["n_bucket"], {"BLOCK_T": shape["T"], "BLOCK_J": shape["OUT_BLOCK"], "BLOCK_I": shape["IN_BLOCK"]}
    row_fits = (lambda m: m == 16) if rows <= 16 else (lambda m: m <= 64) if rows <= 64 else (lambda m: m > 16)
    kept = [c for c in configs if row_fits(c.kwargs["BLOCK_M"])
            and all(c.kwargs[k] <= max(16, triton.next_power_of_2(n)) for k, n in dims.items())]
    return kept or [c for c in configs if row_fits(c.kwargs["BLOCK_M"])] or configs


_fused_tuned = triton.autotune(configs=_configs(), key=["NB", "IN_BLOCK", "OUT_BLOCK", "T", "n_bucket"],
                               prune_configs_by={"early_config_prune": _prune})(_fused_kernel)


_pinned: int | None = None
"""Index into a shape's pruned configs to launch without autotuning (:func:`pinned`)."""


@contextlib.contextmanager
def pinned(index: int) -> Iterator[None]:
    """Launch one config of each shape's pruned list (``0``: the first, ``-1``: the last)
    instead of autotuning: a correctness check compiles one variant per case rather than
    every candidate, and alternating indices covers different tile shapes."""
    global _pinned
    saved, _pinned = _pinned, index
    try:
        yield
    finally:
        _pinned = saved


def _interpreter_blocks(in_block: int, out_block: int, t: int) -> dict[str, int]:
    """Tiles for the interpreter: small, powers of two, at least 16 (``tl.dot``'s minimum)."""

    def fit(n: int, cap: int) -> int:
        return max(16, min(cap, triton.next_power_of_2(n)))

    return dict(BLOCK_M=16, BLOCK_J=fit(out_block, 32), BLOCK_T=fit(t, 16), BLOCK_I=fit(in_block, 32))


def _launch(inp_strides, inp, w1, w1_strides, w2, w2_strides, out, out_strides, n_rows, *, nb, in_block, out_block, t,
            bias=None, bias_strides=(0, 0), mid=None, mid_strides=(0, 0, 0, 0)):
    if n_rows == 0:
        return
    upcast = interpreting() and inp.dtype == torch.bfloat16
    # float32 follows torch's own switch (off by default: full precision); 16-bit operands
    # ignore it, "tf32" is just Triton's default value there.
    precision = "ieee" if inp.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32 else "tf32"
    n_bucket = triton.next_power_of_2(n_rows)  # the autotuner's key, not every batch size
    args = (
        inp, w1, w2, out, mid if mid is not None else out, bias if bias is not None else out,
        n_rows, n_bucket,
        *inp_strides, *w1_strides, *w2_strides, *out_strides, *mid_strides, *bias_strides,
    )
    flags = dict(NB=nb, IN_BLOCK=in_block, OUT_BLOCK=out_block, T=t, HAS_BIAS=bias is not None,
                 STORE_MID=mid is not None, UPCAST=upcast, PRECISION=precision)
    if interpreting() or _pinned is not None:
        if interpreting():
            blocks, launch = _interpreter_blocks(in_block, out_block, t), {}
        else:
            config = _prune(_fused_tuned.configs, dict(n_bucket=n_bucket, IN_BLOCK=in_block, OUT_BLOCK=out_block, T=t))[_pinned]
            blocks, launch = config.kwargs, dict(num_warps=config.num_warps, num_stages=config.num_stages)
        grid = (triton.cdiv(n_rows, blocks["BLOCK_M"]), nb, triton.cdiv(out_block, blocks["BLOCK_J"]))
        _fused_kernel[grid](*args, **flags, **blocks, **launch)
    else:
        def grid(meta):
            return (triton.cdiv(n_rows, meta["BLOCK_M"]), nb, triton.cdiv(out_block, meta["BLOCK_J"]))

        _fused_tuned[grid](*args, **flags)


def supports(x: torch.Tensor) -> bool:
    """Whether the fused kernel handles this input (else the strided path runs)."""
    return x.is_cuda and x.dtype in SUPPORTED_DTYPES


def layout_supported(R: torch.Tensor, L: torch.Tensor) -> bool:
    """The kernel needs every pair to own exactly ``t = q/b`` middle indices."""
    b, q, _ = R.shape
    return q >= b and q % b == 0


def _forward(x, R, L, bias, keep_middle: bool, blocked: bool):
    b, q, p = R.shape
    s = L.shape[1]
    t = q // b
    n = x.shape[0]
    y = _empty((n, b * s), dtype=x.dtype, device=x.device)
    middle = _empty((n, b, q), dtype=x.dtype, device=x.device) if keep_middle else None
    # output j of block l: column l·s + j (blocked) or j·b + l (interleaved)
    block_strides = (s, 1) if blocked else (1, b)
    # w1[k, l, c, i] = R[k, c·b + l, i];  w2[l, k, j, c] = L[l, j, k·t + c]
    _launch(
        (x.stride(0), p, 1), x, R, (q * p, p, b * p, 1), L, (s * q, t, q, 1),
        y, (y.stride(0), *block_strides), n, nb=b, in_block=p, out_block=s, t=t,
        bias=bias, bias_strides=block_strides,
        mid=middle, mid_strides=(b * q, t, q, 1),  # middle[n, l, k·t + c]
    )
    return y, middle


def _grad_input(g, R, L, want_dx: bool):
    """``dx`` (when wanted) and the middle gradient ``dH[n, k, c·b + l]`` from the output
    gradient by block, ``g[l, n, r]`` (``b, N, s``, any strides with a unit last one)."""
    b, q, p = R.shape
    s = L.shape[1]
    t = q // b
    n = g.shape[1]
    dx = _empty((n, b * p), dtype=g.dtype, device=g.device)
    dmid = _empty((n, b, q), dtype=g.dtype, device=g.device)
    # inputs are the blocks of g; w1[l, k, c, r] = L[l, r, k·t + c];  w2[k, l, i, c] = R[k, c·b + l, i]
    _launch(
        (g.stride(1), g.stride(0), g.stride(2)), g, L, (s * q, t, 1, q), R, (q * p, p, 1, b * p),
        dx, (dx.stride(0), p, 1), n, nb=b, in_block=s, out_block=p, t=t,
        mid=dmid, mid_strides=(b * q, 1, q, b),
    )
    return (dx if want_dx else None), dmid


class TritonMonarch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, R, L, bias, keep_middle, blocked):
        y, middle = _forward(x, R, L, bias, keep_middle, blocked)
        ctx.save_for_backward(x, R, L, middle)
        ctx.has_bias = bias is not None
        ctx.blocked = blocked
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, R, L, middle = ctx.saved_tensors
        b, q, p = R.shape
        s = L.shape[1]
        n = x.shape[0]
        need_x, need_r, need_l, need_bias, _, _ = ctx.needs_input_grad
        if ctx.blocked:  # g[l, n, r] = dy[n, l·s + r]: a view
            g = grad_y.contiguous().view(n, b, s).transpose(0, 1)
        else:  # g[l, n, r] = dy[n, r·b + l]: one copy
            g = grad_y.reshape(n, s, b).permute(2, 0, 1).contiguous()
        grad_x = grad_r = grad_l = grad_bias = None
        if need_l:
            grad_l = torch.bmm(g.transpose(1, 2), middle.permute(1, 0, 2))  # (b, s, N) @ (b, N, q)
        if need_x or need_r:
            grad_x, dmid = _grad_input(g, R, L, need_x)
            if need_r:  # (b, q, N) @ (b, N, p)
                grad_r = torch.bmm(dmid.permute(1, 2, 0), x.view(n, b, p).transpose(0, 1))
        if need_bias and ctx.has_bias:
            grad_bias = grad_y.sum(0)
        return grad_x, grad_r, grad_l, grad_bias, None, None


def monarch_triton(
    x: torch.Tensor, R: torch.Tensor, L: torch.Tensor, bias: torch.Tensor | None = None, *, blocked: bool = True
) -> torch.Tensor:
    """``M x + bias`` with the fused kernels; ``x`` is ``(N, b·p)``. Layouts the kernel does
    not cover (``q`` not a multiple of ``b``) go to the strided path."""
    if not layout_supported(R, L):
        from monarchify.monarch.kernels.strided import monarch_strided

        return monarch_strided(x, R, L, bias, blocked=blocked)
    R, L = R.contiguous(), L.contiguous()
    x, bias = x.contiguous(), None if bias is None else bias.contiguous()
    # The weight gradients need the middle: keep it only when a backward pass can follow
    # (decided out here: inside Function.forward grad mode is always off).
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, R, L, bias))):
        # Inference (decoding: a launch-bound step per token): the launch alone, without the
        # autograd Function's context and saved tensors around it.
        return _forward(x, R, L, bias, False, blocked)[0]
    return TritonMonarch.apply(x, R, L, bias, True, blocked)
