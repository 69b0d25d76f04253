"""The csrc/cpu/ bf16 kernel for decode steps of <= 4 rows, and the Linear path that takes it."""
import pytest
import torch
import torch.nn.functional as F

from vargen.models.linear import Linear
from vargen.ops import _build, cpu_kernels


@pytest.fixture(scope="module")
def kernels():
    module = cpu_kernels.kernels()
    if module is None:
        pytest.skip(f"CPU kernels not in use: {cpu_kernels.status()}")
    return module


def bf16_reference(x, w):
    """fp32 matmul of the bf16 inputs: what both kernels approximate before their one rounding to bf16."""
    return F.linear(x.float(), w.float())


@pytest.mark.parametrize("rows", [1, 2, 3, 4])
@pytest.mark.parametrize("k, n", [(32, 4), (384, 1152), (1024, 384)])
def test_kernel_matches_an_fp32_matmul_to_one_bf16_rounding(kernels, rows, k, n):
    g = torch.Generator().manual_seed(rows * k + n)
    x = torch.randn(rows, k, generator=g).bfloat16()
    w = torch.randn(n, k, generator=g).bfloat16()
    ref = bf16_reference(x, w)
    y = kernels.linear(x, kernels.pack_weight(w))
    assert y.dtype == torch.bfloat16 and y.shape == (rows, n)
    # one rounding to bf16 (relative 2^-8) plus fp32 summation-order error
    tol = ref.abs() * 2 ** -8 + 1e-3 * k ** 0.5
    assert bool(((y.float() - ref).abs() <= tol).all())
    # the unpacked weight read as if packed is a different matrix (control: the layout is what makes it right)
    if n > 4:
        wrong = kernels.linear(x, w.contiguous())
        assert not bool(((wrong.float() - ref).abs() <= tol).all())


def test_kernel_keeps_leading_dimensions_and_refuses_what_it_cannot_take(kernels):
    w = torch.randn(8, 64).bfloat16()
    x = torch.randn(2, 1, 64).bfloat16()
    assert kernels.linear(x, kernels.pack_weight(w)).shape == (2, 1, 8)
    with pytest.raises(RuntimeError, match="at most 4 rows, got 5"):
        kernels.linear(torch.randn(5, 64).bfloat16(), kernels.pack_weight(w))
    with pytest.raises(RuntimeError, match="multiple of 4 .* of 32, got 6 x 64"):
        kernels.pack_weight(torch.randn(6, 64).bfloat16())
    with pytest.raises(RuntimeError, match="input has 32 features, the weight 64"):
        kernels.linear(torch.randn(1, 32).bfloat16(), kernels.pack_weight(w))


def test_linear_takes_the_kernel_for_few_rows_only_and_repacks_a_changed_weight(kernels, monkeypatch):
    torch.manual_seed(0)
    lin = Linear(64, 32, bias=False).bfloat16().eval()
    calls = []
    real = kernels.linear
    monkeypatch.setattr(kernels, "linear", lambda x, p: calls.append(x.shape) or real(x, p), raising=False)
    with torch.no_grad():
        few, many = torch.randn(1, 2, 64).bfloat16(), torch.randn(1, 5, 64).bfloat16()
        out = lin(few)
        assert calls == [(1, 2, 64)]
        assert torch.allclose(out.float(), bf16_reference(few, lin.weight), rtol=2 ** -7, atol=1e-2)
        lin(many)  # 5 rows: oneDNN
        assert len(calls) == 1
        lin.weight.mul_(-2.0)  # an in-place change (a load_state_dict or an optimiser step) must be seen
        again = lin(few)
        assert torch.allclose(again.float(), -2.0 * out.float(), rtol=2 ** -6, atol=2e-2)
    lin.weight.requires_grad_(True)
    grad_out = lin(few)  # training (grad enabled) keeps F.linear: no kernel, gradients flow
    assert len(calls) == 2 and grad_out.requires_grad


def test_disabled_extension_leaves_every_matmul_on_onednn(monkeypatch):
    monkeypatch.setenv("VARGEN_NO_EXT", "1")
    monkeypatch.setattr(cpu_kernels, "build", lambda verbose=False: pytest.fail("must not build"))
    assert cpu_kernels.kernels() is None and "VARGEN_NO_EXT" in cpu_kernels.status()
    lin = Linear(64, 32, bias=False).bfloat16().eval()
    x = torch.randn(2, 64).bfloat16()
    with torch.no_grad():
        assert torch.equal(lin(x), torch.ops.mkldnn._linear_pointwise(x, lin.packed_weight(), None, "none", [], ""))


def test_a_failed_build_warns_once_and_falls_back(monkeypatch):
    monkeypatch.delenv("VARGEN_NO_EXT", raising=False)
    monkeypatch.setattr(cpu_kernels, "_state", {"tried": False, "module": None, "status": None})
    calls = []

    def failing(verbose=False):
        calls.append(1)
        raise RuntimeError("g++: fatal error: simulated")

    monkeypatch.setattr(cpu_kernels, "build", failing)
    with pytest.warns(RuntimeWarning, match="simulated"):
        assert cpu_kernels.kernels() is None
    assert cpu_kernels.kernels() is None and calls == [1]
    assert cpu_kernels.status().startswith("unavailable: RuntimeError: g++: fatal error: simulated")


def test_sources_ship_apart_from_the_cuda_extension():
    assert [p.rsplit("/", 1)[-1] for p in cpu_kernels.sources()] == ["gemv_bf16.cpp"]
    assert not any("/cpu/" in p for p in _build.sources())  # nvcc's extension does not compile them


def test_speed_reports_say_whether_the_kernel_ran(monkeypatch):
    from vargen.eval.speed import _device_name

    monkeypatch.delenv("VARGEN_NO_EXT", raising=False)
    monkeypatch.setattr(cpu_kernels, "_state", {"tried": True, "module": object(), "status": "loaded from x.so"})
    assert _device_name("cpu").endswith(" threads, vargen CPU kernel)")
    monkeypatch.setenv("VARGEN_NO_EXT", "1")
    assert _device_name("cpu").endswith(" threads, oneDNN only)")
