"""The decoding paths, torch (small) and compiled (native): same outputs as the reference
path, chosen only where they are meant to run, the pre-arranged factors never stale, and
the native kernel built or given up without fuss.

References are a float64 dense matrix written out entry by entry from the layout rules
(``dense_from_factors`` in test_speed_kernels.py) or the plain two-``bmm`` path.
"""

from __future__ import annotations

import pytest
import torch

from monarchify.monarch import MonarchLinear, kernels
from monarchify.monarch.kernels import native, small

from test_speed_kernels import F64, ORDERS, dense_from_factors, factors


@pytest.fixture(autouse=True)
def one_thread():
    """Where the native kernel is built without OpenMP it is chosen for one thread only (more:
    MKL's threaded path); the tests here pin the thread count so that no choice depends on the
    machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("openmp", [True, False])
def test_with_more_threads_auto_keeps_the_native_kernel_only_where_it_is_threaded(monkeypatch, openmp):
    layer = MonarchLinear(64, 64, nblocks=4).eval()
    x = torch.randn(1, 64)
    with torch.no_grad():
        want = layer(x)
        monkeypatch.setattr(native, "threaded", lambda: openmp)
        torch.set_num_threads(2)
        spy = Spy(monkeypatch)
        got = layer(x)
    built = native.library() is not None
    expected = "native" if openmp and built else "small"
    assert kernels.auto_choice(x, inference=True, weights=layer.R.numel() + layer.L.numel()) == expected
    assert spy.calls == {"native": int(expected == "native"), "small": int(expected == "small")}
    torch.testing.assert_close(got, want)


# (b, p, s): square, wider, narrower, a GQA-like 4:1 projection, structural zeros (q = 3 < b = 4)
SHAPES = [(4, 8, 8), (4, 6, 16), (4, 16, 6), (4, 16, 4), (4, 3, 12), (1, 5, 7), (3, 4, 4)]


def reference(x, R, L, bias, blocked):
    """The layer's output through its dense matrix, what every decoding path must reproduce."""
    return x @ dense_from_factors(R, L, blocked).T + (0 if bias is None else bias)


@ORDERS
@pytest.mark.parametrize("b,p,s", SHAPES)
@pytest.mark.parametrize("tokens", [1, 3, 8])
@pytest.mark.parametrize("with_bias", [True, False])
def test_small_path_matches_the_float64_dense_matrix(b, p, s, tokens, with_bias, blocked):
    R, L, bias = factors(b, p, s)
    bias = bias if with_bias else None
    x = torch.randn(tokens, b * p, dtype=F64)
    expected = reference(x, R, L, bias, blocked)
    Rt, Lt = small.arrange(R, L)
    torch.testing.assert_close(small.monarch_small(x, Rt, Lt, bias, blocked=blocked), expected, rtol=1e-12, atol=1e-12)


class Spy:
    """Counts the calls of the decoding paths, torch (small) and compiled (native), and
    still runs them."""

    def __init__(self, monkeypatch):
        self.calls = {"small": 0, "native": 0}

        def counting(name, original):
            def run(*args, **kwargs):
                self.calls[name] += 1
                return original(*args, **kwargs)

            return run

        monkeypatch.setattr(kernels, "monarch_small", counting("small", kernels.monarch_small))
        monkeypatch.setattr(native, "call", counting("native", native.call))

    @property
    def total(self) -> int:
        return sum(self.calls.values())


needs_native = pytest.mark.skipif(native.library() is None, reason="no C compiler here to build the native kernel")


LAYERS = {
    "square": dict(in_features=64, out_features=64, nblocks=4),
    "mlp_up": dict(in_features=48, out_features=128, nblocks=4),
    "gqa_kv": dict(in_features=64, out_features=16, nblocks=4),  # like 4096 -> 1024
    "padded": dict(in_features=30, out_features=17, nblocks=4),
    "structural_zeros": dict(in_features=12, out_features=48, nblocks=4, allow_structural_zeros=True),
    "low_rank": dict(in_features=64, out_features=96, nblocks=4, rank=5),
    "no_bias": dict(in_features=64, out_features=96, nblocks=2, bias=False),
}
TOLERANCE = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=2e-5, atol=2e-5)}


@pytest.mark.parametrize("order", ["blocked", "interleaved"])
@pytest.mark.parametrize("name", sorted(LAYERS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_eval_decoding_takes_the_small_path_and_agrees_with_the_reference(monkeypatch, name, order, dtype):
    torch.manual_seed(0)
    layer = MonarchLinear(**LAYERS[name], output_order=order, dtype=dtype).eval()
    if layer.rank:
        torch.nn.init.normal_(layer.U)  # the fresh U is zero: make the low-rank term count
    spy = Spy(monkeypatch)
    inputs = [
        torch.randn(1, 1, layer.in_features, dtype=dtype),  # one decoding step: (batch, 1, width)
        torch.randn(layer.in_features, 3, dtype=dtype).t(),  # not contiguous
        torch.randn(kernels.SMALL_BATCH_TOKENS, layer.in_features, dtype=dtype),
    ]
    for x in inputs:
        with torch.no_grad():
            got = layer(x)
            with kernels.use("reference"):
                want = layer(x)
        torch.testing.assert_close(got, want, **TOLERANCE[dtype])
    assert spy.total == 3
    if native.library() is not None:  # 1 and 3 rows natively, 8 through torch
        assert spy.calls == {"native": 2, "small": 1}


def test_more_tokens_gradients_and_training_mode_keep_the_other_paths(monkeypatch):
    torch.manual_seed(0)
    layer = MonarchLinear(64, 96, 4).eval()
    spy = Spy(monkeypatch)
    with torch.no_grad():
        layer(torch.randn(kernels.SMALL_BATCH_TOKENS + 1, 64))  # above the threshold
    x = torch.randn(3, 64, requires_grad=True)
    y = layer(x)  # eval, but autograd wants gradients
    y.square().sum().backward()
    layer.train()
    with torch.no_grad():
        layer(torch.randn(1, 64))
    assert spy.total == 0
    assert "_arranged_cache" not in layer.__dict__
    dense = layer.to_dense()
    torch.testing.assert_close(x.grad, 2 * y.detach() @ dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["small", "native"])
def test_a_forced_decoding_path_still_differentiates_correctly(impl):
    """With gradients wanted, ``use("small")`` arranges the factors per call, through
    autograd, and ``use("native")`` (no backward of its own) runs that same torch path."""
    torch.manual_seed(0)
    layer = MonarchLinear(30, 17, 4, dtype=F64, output_order="interleaved").eval()
    x = torch.randn(2, 30, dtype=F64, requires_grad=True)
    upstream = torch.randn(2, 17, dtype=F64)
    with kernels.use(impl):
        (layer(x) * upstream).sum().backward()
    got = [t.grad.clone() for t in (x, layer.R, layer.L, layer.bias)]
    for t in (x, layer.R, layer.L, layer.bias):
        t.grad = None
    with kernels.use("reference"):
        (layer(x) * upstream).sum().backward()
    for g, t in zip(got, (x, layer.R, layer.L, layer.bias)):
        torch.testing.assert_close(g, t.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("change", ["in_place", "optimizer_step", "load_state_dict", "dtype"])
def test_the_arranged_factors_follow_every_change_of_the_parameters(change):
    torch.manual_seed(0)
    layer = MonarchLinear(32, 48, 4).eval()
    x = torch.randn(kernels.SMALL_BATCH_TOKENS, 32)  # the torch small path's (the native kernel takes fewer rows)
    with torch.no_grad():
        layer(x)
    assert "_arranged_cache" in layer.__dict__
    if change == "in_place":
        with torch.no_grad():
            layer.L.mul_(-2.0)
    elif change == "optimizer_step":
        layer.train()
        optimizer = torch.optim.SGD(layer.parameters(), lr=0.5)
        layer(torch.randn(4, 32)).square().sum().backward()
        optimizer.step()
        layer.eval()
    elif change == "load_state_dict":
        other = MonarchLinear(32, 48, 4)
        layer.load_state_dict(other.state_dict())
    else:
        layer.double()
        x = x.double()
    with torch.no_grad():
        got = layer(x)
    torch.testing.assert_close(got, x @ layer.to_dense().T + layer.bias.detach(), rtol=1e-5, atol=1e-5)


def test_auto_chooses_the_decoding_paths_only_for_cpu_inference_over_few_rows(monkeypatch):
    few, many = torch.zeros(kernels.SMALL_BATCH_TOKENS, 4), torch.zeros(kernels.SMALL_BATCH_TOKENS + 1, 4)
    assert kernels.auto_choice(few, inference=True) == "small"
    assert kernels.auto_choice(few) == "strided"
    assert kernels.auto_choice(many, inference=True) == "strided"
    one = torch.zeros(1, 4)
    monkeypatch.setattr(native, "library", lambda: object())  # built
    assert kernels.auto_choice(one, inference=True) == "native"
    assert kernels.auto_choice(one.to(torch.bfloat16), inference=True) == "small"
    assert kernels.auto_choice(torch.zeros(native.MAX_TOKENS + 1, 4), inference=True) == "small"
    assert kernels.auto_choice(one, inference=True, weights=native.MAX_WEIGHTS + 1) == "small"  # MKL streams big ones faster
    monkeypatch.setattr(native, "library", lambda: None)  # no compiler, or MONARCHIFY_NATIVE=0
    assert kernels.auto_choice(one, inference=True) == "small"


# --- the native kernel ----------------------------------------------------------------------


@needs_native
@ORDERS
@pytest.mark.parametrize("b,p,s", SHAPES + [(4, 19, 9)])  # widths off the 8-wide unrolled loop
@pytest.mark.parametrize("tokens", [1, 2, native.MAX_TOKENS])
@pytest.mark.parametrize("with_bias", [True, False])
def test_native_kernel_matches_the_float64_dense_matrix(b, p, s, tokens, with_bias, blocked):
    R, L, bias = factors(b, p, s)
    bias = bias if with_bias else None
    x = torch.randn(tokens, b * p, dtype=F64)
    expected = reference(x, R, L, bias, blocked)
    torch.testing.assert_close(native.monarch_native(x, R, L, bias, blocked=blocked), expected, rtol=1e-12, atol=1e-12)


@needs_native
def test_native_float32_agrees_with_the_reference_and_reads_strided_inputs():
    R, L, bias = factors(4, 96, 160, dtype=torch.float32, seed=2)
    x = torch.randn(4 * 96, 3).t()  # three rows, not contiguous
    want = kernels.monarch_reference(x.contiguous(), R, L) + bias
    got = native.monarch_native(x, R, L, bias)
    assert float((got - want).norm() / want.norm()) < 1e-6  # float32 rounding, summed in another order


@needs_native
def test_native_outputs_do_not_depend_on_where_the_weights_live():
    from test_speed_kernels import _misaligned

    R, L, bias = factors(4, 96, 96, dtype=torch.float32, seed=4)
    x = torch.randn(2, 4 * 96)
    y = native.monarch_native(x, R, L, bias)
    assert torch.equal(native.monarch_native(x, _misaligned(R), _misaligned(L), _misaligned(bias)), y)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_native_outputs_do_not_depend_on_the_thread_count_or_how_many_rows_come_together(dtype):
    """Each output is one weight row's dot product, summed in one order: the same bits on one
    thread or two, for a token alone or in a group of four (the layer is wide enough that two
    threads share it; widths off the 8-wide lanes)."""
    R, L, bias = factors(4, 101, 163, dtype=dtype, seed=5)
    x = torch.randn(native.MAX_TOKENS, 4 * 101, dtype=dtype)
    torch.set_num_threads(1)
    alone = torch.cat([native.monarch_native(row[None], R, L, bias, blocked=False) for row in x])
    together = native.monarch_native(x, R, L, bias, blocked=False)
    torch.set_num_threads(2)
    shared = native.monarch_native(x, R, L, bias, blocked=False)
    assert torch.equal(together, alone) and torch.equal(shared, alone)
    want = x.double() @ dense_from_factors(R.double(), L.double(), False).T + bias.double()
    torch.testing.assert_close(shared.double(), want, rtol=1e-5 if dtype == torch.float32 else 1e-12,
                               atol=1e-4 if dtype == torch.float32 else 1e-12)


@needs_native
def test_native_refuses_mixed_dtypes():
    R, L, bias = factors(2, 4, 4, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="one dtype"):
        native.monarch_native(torch.randn(1, 8, dtype=F64), R, L, bias)


def test_the_native_library_is_built_into_the_cache_or_given_up_cleanly(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    native.library.cache_clear()
    try:
        monkeypatch.setenv("MONARCHIFY_NATIVE", "0")
        assert native.library() is None
        native.library.cache_clear()
        monkeypatch.delenv("MONARCHIFY_NATIVE")
        monkeypatch.setenv("CC", "no-such-compiler")
        monkeypatch.setattr(native.shutil, "which", lambda name: None)
        assert native.library() is None and not (tmp_path / "monarchify").exists()
        monkeypatch.undo()
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
        native.library.cache_clear()
        if native.shutil.which("cc") or native.shutil.which("gcc"):
            assert native.library() is not None
            assert [p.suffix for p in (tmp_path / "monarchify").iterdir()] == [".so"]  # no temporary left behind
    finally:
        native.library.cache_clear()


@needs_native
def test_a_compiler_without_openmp_builds_the_single_threaded_kernel(monkeypatch, tmp_path):
    """Where ``-fopenmp`` fails (a clang with no OpenMP runtime) the kernel is still built, runs
    on one thread, and auto then takes it for one thread only."""
    run = native.subprocess.run

    def no_openmp(command, **kwargs):
        if "-fopenmp" in command:
            raise native.subprocess.CalledProcessError(1, command)
        return run(command, **kwargs)

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(native.subprocess, "run", no_openmp)
    native.library.cache_clear()
    try:
        assert native.library() is not None and not native.threaded()
        R, L, bias = factors(4, 96, 96, dtype=F64, seed=6)
        x = torch.randn(2, 4 * 96, dtype=F64)
        torch.testing.assert_close(native.monarch_native(x, R, L, bias), reference(x, R, L, bias, True), rtol=1e-12, atol=1e-12)
        torch.set_num_threads(2)
        assert kernels.auto_choice(x, inference=True) == "small"
    finally:
        native.library.cache_clear()


@needs_native
def test_the_layers_direct_native_route_respects_forced_paths_and_autocast(monkeypatch):
    """``forward`` calls the native kernel before any reshaping; a forced implementation,
    autocast, gradients, padding or a low-rank term send it the general way."""
    torch.manual_seed(0)
    layer = MonarchLinear(64, 96, 4).eval()
    x = torch.randn(2, 1, 64)
    spy = Spy(monkeypatch)
    with torch.no_grad():
        direct = layer(x)
        assert spy.calls == {"native": 1, "small": 0} and direct.shape == (2, 1, 96)
        with kernels.use("small"):
            forced = layer(x)
        assert spy.calls == {"native": 1, "small": 1}
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert layer(x).dtype == torch.bfloat16
        assert spy.calls["native"] == 1
        padded = MonarchLinear(30, 17, 4).eval()
        padded(torch.randn(1, 30))
        assert spy.calls["native"] == 2  # through monarch_matmul, after padding
    torch.testing.assert_close(direct, forced, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(direct, x @ layer.to_dense().T + layer.bias.detach(), rtol=2e-5, atol=2e-5)


@needs_native
def test_big_layers_decode_through_torch(monkeypatch):
    """Past ``MAX_WEIGHTS`` factor entries the layer's direct route and ``auto`` both leave
    the product to the torch small path."""
    monkeypatch.setattr(native, "MAX_WEIGHTS", 1000)
    layer = MonarchLinear(64, 96, 4).eval()  # 4·16·(16 + 24) = 2560 entries
    spy = Spy(monkeypatch)
    with torch.no_grad():
        layer(torch.randn(1, 64))
    assert spy.calls == {"native": 0, "small": 1}
