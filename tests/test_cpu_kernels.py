"""The csrc/cpu/ bf16 matmul kernel (decode steps, verify windows, batches), and the Linear path that takes it."""
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


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 17, 34])
@pytest.mark.parametrize("k, n", [(32, 16), (24, 48), (384, 1152), (1024, 384), (64, 112)])
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
    if n > 16:
        wrong = kernels.linear(x, w.contiguous())
        assert not bool(((wrong.float() - ref).abs() <= tol).all())


def test_kernel_keeps_leading_dimensions_and_refuses_what_it_cannot_take(kernels):
    w = torch.randn(16, 64).bfloat16()
    x = torch.randn(2, 1, 64).bfloat16()
    assert kernels.linear(x, kernels.pack_weight(w)).shape == (2, 1, 16)
    assert kernels.linear(x[:0], kernels.pack_weight(w)).shape == (0, 1, 16)
    with pytest.raises(RuntimeError, match="multiple of 16 and in features even, got 8 x 64"):
        kernels.pack_weight(torch.randn(8, 64).bfloat16())
    with pytest.raises(RuntimeError, match="multiple of 16 and in features even, got 16 x 63"):
        kernels.pack_weight(torch.randn(16, 63).bfloat16())
    with pytest.raises(RuntimeError, match="input has 32 features, the weight 64"):
        kernels.linear(torch.randn(1, 32).bfloat16(), kernels.pack_weight(w))


def test_linear_takes_the_kernel_for_the_shapes_it_fits_and_repacks_a_changed_weight(kernels, monkeypatch):
    torch.manual_seed(0)
    lin = Linear(64, 32, bias=False).bfloat16().eval()
    odd = Linear(64, 40, bias=False).bfloat16().eval()  # 40 outputs: not a multiple of 16, oneDNN
    calls = []
    real = kernels.linear
    monkeypatch.setattr(kernels, "linear", lambda x, p: calls.append(x.shape) or real(x, p), raising=False)
    with torch.no_grad():
        few, many = torch.randn(1, 2, 64).bfloat16(), torch.randn(3, 34, 64).bfloat16()
        out = lin(few)
        assert calls == [(1, 2, 64)]
        assert torch.allclose(out.float(), bf16_reference(few, lin.weight), rtol=2 ** -7, atol=1e-2)
        wide = lin(many)  # a batch of verify windows: the same kernel
        assert calls == [(1, 2, 64), (3, 34, 64)]
        assert torch.allclose(wide.float(), bf16_reference(many, lin.weight), rtol=2 ** -7, atol=1e-2)
        odd(many)
        assert len(calls) == 2 and "_packed" in odd.__dict__ and "_packed" not in lin.__dict__
        lin.weight.mul_(-2.0)  # an in-place change (a load_state_dict or an optimiser step) must be seen
        again = lin(few)
        assert torch.allclose(again.float(), -2.0 * out.float(), rtol=2 ** -6, atol=2e-2)
    lin.weight.requires_grad_(True)
    grad_out = lin(few)  # training (grad enabled) keeps F.linear: no kernel, gradients flow
    assert len(calls) == 3 and grad_out.requires_grad


def test_bf16_gpt_on_the_kernel_matches_onednn_to_bf16_rounding(kernels, monkeypatch):
    """A whole forward (every linear on the kernel, GPT-tiny's head of 48 outputs in a 16-wide last panel) against
    the same model on oneDNN (which copy of the weights each made shows which path ran): equal up to the last bf16
    place of each matmul, the same most likely tokens."""
    from conftest import make_gpt

    gpt = make_gpt().to(torch.bfloat16).eval()
    tokens = torch.randint(0, gpt.vocab_size, (3, gpt.num_tokens), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = gpt.forward_train(tokens, torch.tensor([0, 1, 2]), train=False).float()
        assert "_stream" in gpt.output.__dict__ and "_packed" not in gpt.output.__dict__
        monkeypatch.setenv("VARGEN_NO_EXT", "1")
        onednn = gpt.forward_train(tokens, torch.tensor([0, 1, 2]), train=False).float()
    assert "_packed" in gpt.output.__dict__
    scale = onednn.abs().max()
    assert float((ours - onednn).abs().max()) <= 0.05 * scale  # a few bf16 roundings through 2 layers
    assert float((ours.argmax(-1) == onednn.argmax(-1)).float().mean()) >= 0.9


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
    assert [p.rsplit("/", 1)[-1] for p in cpu_kernels.sources()] == ["matmul_bf16.cpp"]
    assert not any("/cpu/" in p for p in _build.sources())  # nvcc's extension does not compile them


def test_speed_reports_say_whether_the_kernel_ran(monkeypatch):
    from vargen.eval.speed import _device_name

    monkeypatch.delenv("VARGEN_NO_EXT", raising=False)
    monkeypatch.setattr(cpu_kernels, "_state", {"tried": True, "module": object(), "status": "loaded from x.so"})
    assert _device_name("cpu").endswith(" threads, vargen CPU kernel)")
    monkeypatch.setenv("VARGEN_NO_EXT", "1")
    assert _device_name("cpu").endswith(" threads, oneDNN only)")
