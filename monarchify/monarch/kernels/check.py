"""Correctness of a Monarch implementation against float64, forward and backward.

One routine serves the CI machine (Triton's interpreter on CPU tensors, tiny shapes) and a
GPU session (``benchmarks/gpu_check.py``, real shapes): fresh random inputs per case,
every buffer the kernels allocate poisoned with NaN beforehand, and each of ``y``, ``dx``,
``dR``, ``dL``, ``dbias`` compared with autograd through a float64 dense matrix built
from the layout rules (not from any kernel).

Run ``python -m monarchify.monarch.kernels.check`` (with ``TRITON_INTERPRET=1`` on a
machine without a GPU) to print the results as JSON; the exit status is 1 if any fails.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch

# Relative Frobenius error allowed against float64: a few units of the dtype's rounding,
# scaled for sums of a few hundred terms.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


@contextlib.contextmanager
def poisoned(*modules) -> Iterator[None]:
    """Make every ``_empty`` allocation of the given kernel modules start as NaN."""
    saved = [m._empty for m in modules]

    def nan_empty(*args, **kwargs):
        return torch.empty(*args, **kwargs).fill_(float("nan"))

    for m in modules:
        m._empty = nan_empty
    try:
        yield
    finally:
        for m, original in zip(modules, saved):
            m._empty = original


@dataclass
class CaseResult:
    impl: str
    dtype: str
    shape: str
    """``b x p -> b x s, N tokens``."""
    errors: dict[str, float]
    tolerance: float

    @property
    def ok(self) -> bool:
        return all(e == e and e <= self.tolerance for e in self.errors.values())  # NaN fails

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    a = a.detach().double()
    ref = ref.detach().to(a.device)
    norm = float(ref.norm())
    return float((a - ref).norm()) / norm if norm else float((a - ref).norm())


def check_case(
    impl: str, b: int, p: int, s: int, n: int, dtype: torch.dtype, device: str | torch.device, seed: int,
    output_order: str = "blocked", inference: bool = False,
) -> CaseResult:
    """Forward and backward of ``impl`` on one shape and output order, against float64;
    ``inference``: the forward pass alone, without autograd (the path decoding takes)."""
    from monarchify.monarch import kernels
    from monarchify.monarch.kernels import strided
    from monarchify.monarch.layout import MonarchLayout
    from monarchify.monarch.projection import assemble

    modules = [strided]
    if impl == "triton":
        from monarchify.monarch.kernels import triton_monarch

        modules.append(triton_monarch)
    q = min(p, s)
    gen = torch.Generator().manual_seed(seed)
    R64 = torch.randn(b, q, p, generator=gen, dtype=torch.float64) / p**0.5
    L64 = torch.randn(b, s, q, generator=gen, dtype=torch.float64) / q**0.5
    bias64 = torch.randn(b * s, generator=gen, dtype=torch.float64)
    x64 = torch.randn(n, b * p, generator=gen, dtype=torch.float64)
    upstream = torch.randn(n, b * s, generator=gen, dtype=torch.float64)
    leaves = [t.to(device=device, dtype=dtype).requires_grad_(not inference) for t in (x64, R64, L64, bias64)]
    x, R, L, bias = leaves
    with poisoned(*modules), kernels.use(impl):
        if inference:
            with torch.no_grad():
                y = kernels.monarch_matmul(x, R, L, bias, blocked=output_order == "blocked")
        else:
            y = kernels.monarch_matmul(x, R, L, bias, blocked=output_order == "blocked")
            (y.float() * upstream.to(device=device, dtype=torch.float32)).sum().backward()

    # The reference runs in float64 on the same device (fast on a GPU), from the same
    # (rounded) inputs the kernel saw.
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    xr, Rr, Lr, br = ref_leaves
    ref = xr @ assemble(Lr, Rr, MonarchLayout(b * p, b * s, b, output_order)).T + br
    # The same (rounded) upstream gradient the kernel was given, so a float64 case is exact.
    (ref * upstream.to(device=device, dtype=torch.float32).double()).sum().backward()
    errors = {"y": _rel(y, ref)}
    for name, got, want in zip(("dx", "dR", "dL", "dbias"), leaves, ref_leaves):
        if not inference:
            errors[name] = _rel(got.grad, want.grad)
    shape = f"{b}x{p} -> {b}x{s}, N={n}, {output_order}" + (", inference" if inference else "")
    return CaseResult(impl, str(dtype).removeprefix("torch."), shape, errors, TOLERANCE[dtype])


# Tiny shapes the interpreter gets through in seconds, chosen to hit every edge: a pair
# rank below the 16-wide dot tile (t = 2), several input-column and output-column tiles
# (recomputed middles, the middle written once), token counts off the tile size.
INTERPRETER_CASES = [(3, 12, 6, 7), (2, 48, 40, 19), (4, 16, 64, 33), (4, 64, 16, 5)]
# What a GPU session checks: the shapes (b = 4, BERT-base widths) and an LLM-like one.
GPU_CASES = [(4, 192, 768, 4096), (4, 768, 192, 4096), (4, 192, 192, 256), (4, 1024, 3584, 1024)]
# Decoding (inference, one to a few tokens: the launch without autograd, 16-row tiles mostly
# masked): tiny for the interpreter; SmolLM2's 576->1536 and Llama-7B-like widths on a GPU.
INTERPRETER_DECODE_CASES = [(4, 16, 64, 1), (2, 48, 40, 3), (3, 12, 6, 1)]
GPU_DECODE_CASES = [(4, 144, 384, 1), (4, 1024, 2752, 1), (4, 1024, 1024, 8), (4, 1024, 256, 1)]


def run(cases, dtypes, device, impl: str = "triton", inference: bool = False) -> list[CaseResult]:
    """Every case in every dtype and output order. On a GPU each launch takes one tile
    config, the first or the last of the autotuner's candidates for its shape by turns, not
    the autotuned one: compiling every candidate of every variant would take minutes."""
    from monarchify.monarch.layout import OUTPUT_ORDERS

    results = []
    for i, (b, p, s, n) in enumerate(cases):
        for j, dtype in enumerate(dtypes):
            for k, order in enumerate(OUTPUT_ORDERS):
                with _one_config((i + j + k) % 2 - 1, impl, device):
                    results.append(check_case(impl, b, p, s, n, dtype, device, seed=i, output_order=order,
                                              inference=inference))
    return results


def _one_config(index: int, impl: str, device) -> contextlib.AbstractContextManager:
    if impl != "triton" or torch.device(device).type != "cuda":
        return contextlib.nullcontext()
    from monarchify.monarch.kernels import triton_monarch

    return triton_monarch.pinned(index)


def main(argv: list[str] | None = None) -> int:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cases, decode = (GPU_CASES, GPU_DECODE_CASES) if device == "cuda" else (INTERPRETER_CASES, INTERPRETER_DECODE_CASES)
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    results = run(cases, dtypes, device) + run(decode, dtypes, device, inference=True)
    print(json.dumps([r.to_dict() for r in results], indent=2))
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
