"""The fast CPU path (strided BLAS + hand-written backward) and the dispatch between paths.

Every check is against a float64 dense matrix assembled here from the layout rules, with
the kernel's buffers poisoned (NaN) beforehand so an unwritten element cannot pass.
"""

from __future__ import annotations

import pytest
import torch

from monarchify.monarch import MonarchLinear
from monarchify.monarch import kernels
from monarchify.monarch.kernels import strided
from monarchify.monarch.kernels.strided import StridedMonarch

F64 = torch.float64


def dense_from_factors(R: torch.Tensor, L: torch.Tensor, blocked: bool = True) -> torch.Tensor:
    """Differentiable ``(b·s, b·p)`` matrix: ``L_full @ blockdiag(R)`` with
    ``L_full[o, c·b + l] = L[l, r, c]`` (middle ``f = c·b + l`` feeds L block ``l``), output
    ``o = l·s + r`` (blocked) or ``r·b + l`` (interleaved), written out entry by entry."""
    b, s, q = L.shape
    l_full = torch.zeros(b * s, b * q, dtype=L.dtype, device=L.device)
    for l in range(b):
        for r in range(s):
            o = l * s + r if blocked else r * b + l
            l_full[o, l::b] = L[l, r]
    return l_full @ torch.block_diag(*R)


ORDERS = pytest.mark.parametrize("blocked", [True, False], ids=["blocked", "interleaved"])


@pytest.fixture
def poisoned(monkeypatch):
    """Every buffer the strided kernel allocates starts as NaN."""

    def nan_empty(*args, **kwargs):
        return torch.empty(*args, **kwargs).fill_(float("nan"))

    monkeypatch.setattr(strided, "_empty", nan_empty)


def factors(b, p, s, dtype=F64, seed=0, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    q = min(p, s)
    R = torch.randn(b, q, p, generator=gen, dtype=dtype).requires_grad_(requires_grad)
    L = torch.randn(b, s, q, generator=gen, dtype=dtype).requires_grad_(requires_grad)
    bias = torch.randn(b * s, generator=gen, dtype=dtype).requires_grad_(requires_grad)
    return R, L, bias


SHAPES = [(1, 5, 7), (2, 6, 3), (3, 4, 4), (4, 8, 2), (4, 3, 12), (2, 16, 16)]  # (b, p, s)


@ORDERS
def test_the_test_assembly_agrees_with_to_dense(blocked):
    layer = MonarchLinear(16, 24, 4, dtype=F64, output_order="blocked" if blocked else "interleaved")
    torch.testing.assert_close(dense_from_factors(layer.R, layer.L, blocked).detach(), layer.to_dense(), rtol=0, atol=0)


def test_the_two_output_orders_are_row_permutations_of_each_other():
    R, L, _ = factors(4, 6, 5)
    blocked, interleaved = dense_from_factors(R, L, True), dense_from_factors(R, L, False)
    assert not torch.equal(blocked, interleaved)
    rows = [r * 4 + l for l in range(4) for r in range(5)]  # blocked row l·s + r is interleaved row r·b + l
    torch.testing.assert_close(interleaved[rows], blocked, rtol=0, atol=0)


@ORDERS
@pytest.mark.parametrize("b,p,s", SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_strided_forward_matches_float64_dense(poisoned, b, p, s, with_bias, blocked):
    R, L, bias = factors(b, p, s)
    bias = bias if with_bias else None
    x = torch.randn(9, b * p, dtype=F64)
    expected = x @ dense_from_factors(R, L, blocked).T + (0 if bias is None else bias)
    torch.testing.assert_close(strided.monarch_strided(x, R, L, bias, blocked=blocked), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(kernels.monarch_reference(x, R, L, blocked=blocked) + (0 if bias is None else bias), expected)


@ORDERS
@pytest.mark.parametrize("b,p,s", [(2, 6, 3), (3, 4, 4), (4, 3, 8)])
def test_strided_gradcheck_float64(poisoned, b, p, s, blocked):
    R, L, bias = factors(b, p, s, requires_grad=True)
    x = torch.randn(5, b * p, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(StridedMonarch.apply, (x, R, L, bias, blocked))
    assert torch.autograd.gradcheck(StridedMonarch.apply, (x, R, L, None, blocked))


@ORDERS
def test_float32_gradients_match_autograd_through_the_dense_matrix(poisoned, blocked):
    b, p, s, n = 4, 12, 24, 33
    R, L, bias = factors(b, p, s, dtype=torch.float32, seed=1, requires_grad=True)
    x = torch.randn(n, b * p, requires_grad=True)
    upstream = torch.randn(n, b * s)
    got = torch.autograd.grad((strided.monarch_strided(x, R, L, bias, blocked=blocked) * upstream).sum(), (x, R, L, bias))
    x64, R64, L64, b64 = (t.detach().double().requires_grad_() for t in (x, R, L, bias))
    ref = (x64 @ dense_from_factors(R64, L64, blocked).T + b64) * upstream.double()
    want = torch.autograd.grad(ref.sum(), (x64, R64, L64, b64))
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-4)


@ORDERS
@pytest.mark.parametrize("wanted", ["x", "params", "weights_only"])
def test_only_the_gradients_asked_for_are_computed(poisoned, wanted, blocked):
    b, p, s = 3, 4, 5
    R, L, bias = factors(b, p, s)
    x = torch.randn(6, b * p, dtype=F64)
    if wanted == "x":
        x.requires_grad_()
    elif wanted == "params":
        for t in (R, L, bias):
            t.requires_grad_()
    else:
        R.requires_grad_()
        L.requires_grad_()
    y = strided.monarch_strided(x, R, L, bias, blocked=blocked)
    y.square().sum().backward()
    for t in (x, R, L, bias):
        if t.requires_grad:
            x0, R0, L0, b0 = (u.detach().requires_grad_() for u in (x, R, L, bias))
            (x0 @ dense_from_factors(R0, L0, blocked).T + b0).square().sum().backward()
            ref = {id(x): x0, id(R): R0, id(L): L0, id(bias): b0}[id(t)].grad
            torch.testing.assert_close(t.grad, ref)
        else:
            assert t.grad is None


@pytest.mark.parametrize("order", ["blocked", "interleaved"])
@pytest.mark.parametrize("impl", ["auto", "strided", "reference"])
def test_layer_agrees_with_to_dense_under_every_cpu_implementation(poisoned, impl, order):
    torch.manual_seed(0)
    layer = MonarchLinear(30, 17, 4, dtype=F64, output_order=order)  # padded on both sides
    x = torch.randn(2, 3, 30, dtype=F64, requires_grad=True)
    with kernels.use(impl):
        y = layer(x)
        (y * torch.arange(17, dtype=F64)).sum().backward()
    assert y.shape == (2, 3, 17)
    torch.testing.assert_close(y, x @ layer.to_dense().T + layer.bias, rtol=1e-12, atol=1e-12)
    dense = layer.to_dense()
    torch.testing.assert_close(x.grad, torch.arange(17, dtype=F64).expand(2, 3, 17) @ dense)


def test_empty_batch_and_no_bias():
    layer = MonarchLinear(16, 8, 2, bias=False)
    assert layer(torch.randn(0, 16)).shape == (0, 8)
    x = torch.randn(4, 16, dtype=torch.float32)
    torch.testing.assert_close(layer(x), x @ layer.to_dense().T)


def test_cpu_autocast_runs_in_bfloat16_and_trains_float32_parameters():
    torch.manual_seed(0)
    layer = MonarchLinear(64, 128, 4)
    x = torch.randn(16, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    ref = x.double() @ layer.to_dense().double().T + layer.bias.detach().double()
    assert float((y.detach().double() - ref).norm() / ref.norm()) < 2e-2
    y.float().square().sum().backward()
    assert layer.L.grad.dtype == torch.float32 and torch.isfinite(layer.L.grad).all()


def test_unknown_implementation_is_refused():
    with pytest.raises(ValueError, match="unknown Monarch implementation"):
        with kernels.use("fastest"):
            pass


class _FakeCuda:
    is_cuda, is_cpu, shape = True, False, (1, 4)


def test_auto_takes_the_strided_path_on_a_gpu_even_where_the_fused_kernel_could_run():
    """The fused kernel lost to the strided path on an H200 everywhere it was timed, so the
    automatic choice never takes it, only a forced ``use("triton")`` does."""
    assert kernels.auto_choice(torch.zeros(2, 4)) == "strided"
    for inference in (False, True):
        assert kernels.auto_choice(_FakeCuda(), inference=inference) == "strided"


@pytest.mark.slow
def test_torch_compile_traces_the_layer_with_full_graph():
    """Under torch.compile the plain path is traced (no graph break, correct gradients)."""
    torch.manual_seed(0)
    layer = MonarchLinear(32, 48, 4)
    x = torch.randn(6, 32, requires_grad=True)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    y = compiled(x)
    y.square().sum().backward()
    dense = layer.to_dense()
    torch.testing.assert_close(y.detach(), x.detach() @ dense.T + layer.bias.detach())
    torch.testing.assert_close(x.grad, 2 * y.detach() @ dense)


def _misaligned(t: torch.Tensor) -> torch.Tensor:
    """The same values at an address 8 bytes off a 64-byte boundary (as a memory-mapped
    safetensors file can give)."""
    buf = torch.empty(t.numel() + 16, dtype=t.dtype)
    view = buf[2 : 2 + t.numel()].view(t.shape)
    view.copy_(t)
    return view


@pytest.mark.parametrize("tokens", [1, 3, 7, 33])
def test_outputs_do_not_depend_on_where_the_weights_live(tokens):
    """Bit-identical results for weights at another address: MKL's small-matrix kernels are
    alignment-dependent, and a reloaded checkpoint must reproduce the converted model."""
    R, L, bias = factors(4, 96, 96, dtype=torch.float32, seed=4)
    x = torch.randn(tokens, 4 * 96)
    y = strided.monarch_strided(x, R, L, bias)
    assert torch.equal(strided.monarch_strided(x, _misaligned(R), _misaligned(L), _misaligned(bias)), y)
