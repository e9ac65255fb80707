"""The fused Triton kernel, run on CPU tensors through Triton's interpreter.

The CI machine has no GPU, so the kernel's arithmetic (index maps for both permutations,
masks, the middle it writes for the weight gradients) is checked under
``TRITON_INTERPRET=1`` in a subprocess (the variable must be set before ``triton.jit``
runs) on tiny shapes, against float64 with every output buffer poisoned. Performance,
and the compiled path, are for ``benchmarks/gpu_check.py`` on a GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton", reason='the fused kernel needs triton: pip install -e ".[gpu]"')

from monarchify.monarch.kernels import check, strided  # noqa: E402
from monarchify.monarch.kernels import triton_monarch  # noqa: E402


@pytest.fixture(scope="module")
def interpreted():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "monarchify.monarch.kernels.check"], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.stdout.strip(), proc.stderr[-3000:]
    return proc.returncode, json.loads(proc.stdout)


@pytest.mark.slow
def test_interpreter_covers_every_case_and_dtype(interpreted):
    _, results = interpreted
    cases = len(check.INTERPRETER_CASES) + len(check.INTERPRETER_DECODE_CASES)
    assert len(results) == cases * 3 * 2  # dtypes × output orders
    assert {r["dtype"] for r in results} == {"float32", "float16", "bfloat16"}
    decoding = [r for r in results if r["shape"].endswith("inference")]
    assert len(decoding) == len(check.INTERPRETER_DECODE_CASES) * 3 * 2
    assert all(set(r["errors"]) == {"y"} for r in decoding)
    assert all(set(r["errors"]) == {"y", "dx", "dR", "dL", "dbias"} for r in results if r not in decoding)


@pytest.mark.slow
def test_fused_kernel_matches_float64_forward_and_backward(interpreted):
    code, results = interpreted
    bad = [r for r in results if not r["ok"]]
    assert not bad, json.dumps(bad, indent=1)
    assert code == 0
    # float32 through the interpreter is exact arithmetic up to rounding: hold it tighter.
    assert max(e for r in results if r["dtype"] == "float32" for e in r["errors"].values()) < 1e-6


def check_strided():
    """The check on the CPU path, in float32."""
    return check.check_case("strided", 2, 8, 8, 5, torch.float32, "cpu", seed=0)


def test_the_check_passes_the_working_cpu_path():
    """Without this, the two tests below would pass for a check that always fails."""
    result = check_strided()
    assert result.ok, result.errors


@pytest.mark.parametrize("order", ["blocked", "interleaved"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_the_check_passes_the_working_cpu_path_in_every_dtype(dtype, order):
    """Regression: the float64 reference once used an upstream gradient the kernel never saw."""
    result = check.check_case("strided", 3, 8, 12, 7, dtype, "cpu", seed=1, output_order=order)
    assert result.ok, result.to_dict()


def test_the_check_catches_a_wrong_kernel(monkeypatch):
    """Guard against a check that cannot fail: break the CPU path's interleave and the same
    routine must flag the output (the hand-written backward never sees the broken output,
    so the gradients stay right and must still pass)."""
    real = strided._forward

    def swapped(*args):
        y, h = real(*args)
        return y.roll(1, dims=1), h

    monkeypatch.setattr(strided, "_forward", swapped)
    result = check_strided()
    assert not result.ok and result.errors["y"] > 0.1
    assert max(e for name, e in result.errors.items() if name != "y") <= result.tolerance


def test_the_check_catches_an_unwritten_output(monkeypatch):
    real = strided._forward

    def partial(*args):
        y, h = real(*args)
        out = strided._empty(y.shape, dtype=y.dtype)
        out[:, :-1] = y[:, :-1]  # last column never written
        return out, h

    monkeypatch.setattr(strided, "_forward", partial)
    result = check_strided()
    assert result.errors["y"] != result.errors["y"] and not result.ok  # NaN from the poison


def test_only_cuda_tensors_and_divisible_layouts_go_to_the_kernel():
    assert not triton_monarch.supports(torch.zeros(2, 8))
    R = torch.zeros(4, 8, 16)
    assert triton_monarch.layout_supported(R, torch.zeros(4, 8, 8))
    assert not triton_monarch.layout_supported(torch.zeros(4, 6, 16), torch.zeros(4, 6, 6))  # q % b != 0
    assert not triton_monarch.layout_supported(torch.zeros(4, 2, 16), torch.zeros(4, 2, 2))  # q < b


def test_inference_launches_the_kernel_without_the_autograd_function(monkeypatch):
    """Decoding is launch-bound on a GPU: without gradients the forward kernel is launched
    bare (no Function context, no middle kept); with them the Function runs."""
    launches = []
    monkeypatch.setattr(triton_monarch, "_forward", lambda x, R, L, bias, keep, blocked: launches.append(keep) or (x, None))
    monkeypatch.setattr(triton_monarch.TritonMonarch, "apply", lambda *args: launches.append("function") or args[0])
    R, L, x = torch.zeros(4, 8, 16), torch.zeros(4, 8, 8), torch.zeros(1, 64)
    with torch.no_grad():
        triton_monarch.monarch_triton(x, R, L)
    triton_monarch.monarch_triton(x, R.requires_grad_(), L)
    assert launches == [False, "function"]


def test_layouts_the_kernel_skips_fall_back_to_the_strided_path():
    gen = torch.Generator().manual_seed(0)
    R, L = torch.randn(4, 6, 5, generator=gen), torch.randn(4, 6, 6, generator=gen)
    x = torch.randn(3, 20, generator=gen)
    torch.testing.assert_close(triton_monarch.monarch_triton(x, R, L), strided.monarch_strided(x, R, L))


def _tiles(config) -> tuple[int, int, int, int]:
    return tuple(config.kwargs[k] for k in ("BLOCK_M", "BLOCK_J", "BLOCK_T", "BLOCK_I"))


@pytest.mark.parametrize("rows", [1, 2, 8, 16, 32, 64, 128, 4096, 16384])
@pytest.mark.parametrize("dims", [(48, 192, 192), (48, 768, 192), (256, 2752, 1024), (2, 6, 12), (16, 16, 64)])
def test_the_autotuner_times_only_configs_that_fit_the_shape(rows, dims):
    """Every candidate is compiled before it is timed: the pruning keeps 16-row tiles for a
    few tokens only, none for many, no tile wider than the dimension it covers where a
    narrower one exists, and never nothing."""
    t, out_block, in_block = dims
    configs = triton_monarch._configs()
    bucket = 1 << (rows - 1).bit_length()
    kept = triton_monarch._prune(configs, {"n_bucket": bucket}, T=t, OUT_BLOCK=out_block, IN_BLOCK=in_block)
    assert kept and all(c in configs for c in kept)
    rows_kept = {_tiles(c)[0] for c in kept}
    if bucket <= 16:
        assert rows_kept == {16}
    elif bucket <= 64:
        assert max(rows_kept) <= 64
    else:
        assert min(rows_kept) > 16
    caps = [max(16, 1 << (width - 1).bit_length()) for width in (out_block, t, in_block)]

    def fits(config) -> bool:
        return all(tile <= cap for tile, cap in zip(_tiles(config)[1:], caps))

    if any(fits(c) for c in configs if _tiles(c)[0] in rows_kept):
        assert all(fits(c) for c in kept)
    assert len(kept) < len(configs)


def test_a_pinned_config_is_one_of_the_pruned_candidates_and_restored_after():
    assert triton_monarch._pinned is None
    with triton_monarch.pinned(-1):
        assert triton_monarch._pinned == -1
        with triton_monarch.pinned(0):
            assert triton_monarch._pinned == 0
        assert triton_monarch._pinned == -1
    assert triton_monarch._pinned is None


def test_the_gpu_check_pins_first_and_last_configs_by_turns(monkeypatch):
    """Correctness on a GPU covers different tile shapes without autotuning every variant."""
    seen = []
    monkeypatch.setattr(check, "check_case", lambda *a, **k: seen.append(triton_monarch._pinned) or None)
    monkeypatch.setattr(torch, "device", lambda d: type("D", (), {"type": "cuda"})())
    check.run([(2, 8, 8, 1), (2, 8, 8, 2)], (torch.float32, torch.bfloat16), "cuda")
    assert len(seen) == 2 * 2 * 2 and set(seen) == {0, -1}
    assert triton_monarch._pinned is None


def test_a_forced_fused_kernel_hands_what_it_cannot_take_to_the_strided_path(monkeypatch):
    """Without a GPU (and outside the interpreter) ``use("triton")`` still computes the product."""
    from monarchify.monarch import kernels

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(triton_monarch, "monarch_triton", lambda *a, **k: pytest.fail("the kernel was launched"))
    torch.manual_seed(0)
    x, R, L = torch.randn(3, 16, dtype=torch.float64), torch.randn(4, 4, 4, dtype=torch.float64), torch.randn(4, 8, 4, dtype=torch.float64)
    with kernels.use("triton"):
        got = kernels.monarch_matmul(x, R, L)
    with kernels.use("reference"):
        want = kernels.monarch_matmul(x, R, L)
    torch.testing.assert_close(got, want)
