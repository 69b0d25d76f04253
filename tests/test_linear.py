"""The prepacked oneDNN bf16 CPU linear: same outputs as F.linear, never stale, never on the training path.

It serves shapes vargen's CPU kernel does not take and CPUs without it; the kernel is disabled here so that every
shape runs this path (the kernel's own tests: test_cpu_kernels.py)."""
import copy

import pytest
import torch
import torch.nn.functional as F

import vargen.models.linear as linear_mod
from vargen.models.linear import Linear

from conftest import make_gpt

pytestmark = pytest.mark.skipif(not linear_mod._PACKED, reason="this PyTorch build has no oneDNN linear")


@pytest.fixture(autouse=True)
def onednn_only(monkeypatch):
    monkeypatch.setenv("VARGEN_NO_EXT", "1")


def _layer(seed=0):
    torch.manual_seed(seed)
    return Linear(64, 96).to(torch.bfloat16)


def test_packed_path_matches_f_linear_and_follows_weight_changes():
    layer, x = _layer(), torch.randn(5, 7, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        out = layer(x)
        assert "_packed" in layer.__dict__  # the packed path ran
        torch.testing.assert_close(out, F.linear(x, layer.weight, layer.bias), atol=0, rtol=0)
        layer.weight.mul_(-2)  # in place (an optimiser step): the packed copy must be remade
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), atol=0, rtol=0)
        assert not torch.equal(layer(x), out)  # control: serving the old packed copy would have returned `out`
        layer.load_state_dict(_layer(seed=1).state_dict())
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), atol=0, rtol=0)
    assert set(layer.state_dict()) == {"weight", "bias"}  # nothing packed is ever saved


def test_training_autocast_and_fp32_keep_f_linear():
    layer, x = _layer(), torch.randn(3, 64, dtype=torch.bfloat16)
    layer(x).sum().backward()  # grad enabled: F.linear, gradients flow
    assert layer.weight.grad is not None and "_packed" not in layer.__dict__
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        layer(x)
    assert "_packed" not in layer.__dict__
    with torch.no_grad():
        layer.float()(x.float())
    assert "_packed" not in layer.__dict__


def test_copies_and_moves_drop_the_packed_copy():
    layer, x = _layer(), torch.randn(3, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        out = layer(x)
        twin = copy.deepcopy(layer)  # a oneDNN tensor cannot be deep-copied: the copy repacks on use
        assert "_packed" not in twin.__dict__
        torch.testing.assert_close(twin(x), out, atol=0, rtol=0)
        packed = layer.packed_weight()
        torch.nn.Module.to(layer, dtype=torch.bfloat16)  # a no-op move (what decoders do before each decode)
        assert layer.packed_weight() is packed  # keeps the packed copy: no repack per decode
        layer.float()
        assert "_packed" not in layer.__dict__


def test_bf16_gpt_logits_identical_with_and_without_packing(monkeypatch):
    gpt = make_gpt().to(torch.bfloat16).eval()
    tokens = torch.randint(0, gpt.vocab_size, (2, gpt.num_tokens))
    with torch.no_grad():
        packed = gpt.forward_train(tokens, torch.tensor([0, 1]), train=False)
        assert "_packed" in gpt.output.__dict__
        monkeypatch.setattr(linear_mod, "_PACKED", False)
        plain = gpt.forward_train(tokens, torch.tensor([0, 1]), train=False)
    torch.testing.assert_close(packed, plain, atol=0, rtol=0)
