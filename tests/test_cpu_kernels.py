"""The csrc/cpu/ kernels: the bf16 matmul (decode steps, verify windows, batches) and the Linear path that takes it,
the attention and layer ops, and the fp32 sampling ops of a verify step."""
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


def cached_decode(gpt):
    """A bf16 GPT's cached decode of 2 samples: the condition prefix, then 1-, 5- and 1-token steps. Returns every
    call's logits and the cache."""
    cache = gpt.new_cache(2)
    tokens = torch.randint(0, 64, (2, gpt.num_tokens), generator=torch.Generator().manual_seed(1))
    cond = gpt.condition_embeddings(torch.tensor([1, 2]))
    prefix = torch.arange(gpt.prefix_len).expand(2, -1)
    outs = [gpt(embeds=cond, positions=torch.full_like(prefix, -1), slots=prefix, cache=cache)]
    n = 0
    for width in (1, 5, 1):
        pos = torch.arange(n, n + width).expand(2, -1)
        outs.append(gpt(tokens=tokens[:, n:n + width], positions=pos, slots=pos + gpt.prefix_len, cache=cache))
        n += width
    return outs, cache


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


def attention_reference(q, k, v, mask, scale):
    """fp32 attention of q [B, T, H, D] over k / v [B, Hk, S, D] (kv heads repeated), mask [B, T, S]; a query
    with nothing to attend gets zeros."""
    rep = q.shape[2] // k.shape[1]
    keys, values = (t.float().repeat_interleave(rep, 1) for t in (k, v))
    scores = (q.float().transpose(1, 2) @ keys.transpose(-1, -2)) * scale
    probs = scores.masked_fill(~mask[:, None], float("-inf")).softmax(-1).nan_to_num(0.0)
    return (probs @ values).transpose(1, 2).flatten(2)


@pytest.mark.parametrize("b, t, h, hk, s, d", [
    (2, 1, 6, 6, 272, 64),   # an AR step of the default model under CFG
    (2, 17, 6, 6, 160, 64),  # a verify window
    (3, 72, 4, 2, 75, 32),   # grouped kv heads, slots not a multiple of 16 or 64
    (1, 3, 2, 1, 5, 128),    # odd slot count, a head wider than one panel
    (2, 4, 2, 2, 17, 16),
    (2, 8, 4, 2, 40, 48),    # the most queries read straight off the cache (no packing), a partial 64-feature block
    (2, 9, 4, 2, 40, 48),    # the fewest packed
])
def test_attention_matches_fp32_attention_over_cache_views(kernels, b, t, h, hk, s, d):
    g = torch.Generator().manual_seed(b * t * s + d)
    qk = torch.randn(b, t, h + hk, d, generator=g).bfloat16()  # q as the model has it: a view of q and k together
    q = qk[:, :, :h]
    cache_k, cache_v = (torch.randn(b, hk, s + 9, d, generator=g).bfloat16() for _ in range(2))
    k, v = cache_k[:, :, :s], cache_v[:, :, :s]  # the slots in use of a longer static cache
    mask = torch.rand(b, t, s, generator=g) < 0.6
    mask[..., 0] = True
    if t > 2:
        mask[0, 1] = False  # a query that sees nothing
    ref = attention_reference(q, k, v, mask, d ** -0.5)
    out = kernels.attention(q, k, v, mask, d ** -0.5)
    assert out.dtype == torch.bfloat16 and out.shape == (b, t, h * d)
    # bf16 probabilities (as SDPA's flash kernel) and one output rounding: a few bf16 ulps of values ~N(0, 1)
    assert float((out.float() - ref).abs().max()) < 0.03
    if t > 2:
        assert bool((out[0, 1] == 0).all())
    # control: the same call without the mask is a different function
    unmasked = kernels.attention(q, k, v, torch.ones_like(mask), d ** -0.5)
    assert float((unmasked.float() - ref).abs().max()) > 0.1


def test_attention_refuses_what_it_cannot_take(kernels):
    q, k = torch.randn(1, 2, 2, 24).bfloat16(), torch.randn(1, 2, 5, 24).bfloat16()
    with pytest.raises(RuntimeError, match="head dim must be a multiple of 16, got 24"):
        kernels.attention(q, k, k, torch.ones(1, 2, 5, dtype=torch.bool), 0.2)
    q, k = torch.randn(1, 2, 2, 32).bfloat16(), torch.randn(1, 2, 5, 32).bfloat16()
    with pytest.raises(RuntimeError, match=r"mask must be \[1, 2, 5\]"):
        kernels.attention(q, k, k, torch.ones(1, 2, 4, dtype=torch.bool), 0.2)
    with pytest.raises(RuntimeError, match="bf16 CPU q, k, v and a bool mask"):
        kernels.attention(q.float(), k, k, torch.ones(1, 2, 5, dtype=torch.bool), 0.2)


def test_gpt_decode_steps_on_the_attention_kernel_match_sdpa(kernels, monkeypatch):
    """Cached decoding (prefix, then 1- and 5-token steps) of a bf16 GPT: the attention kernel against SDPA and
    the single-query path (kernel disabled), to bf16 rounding."""
    from conftest import make_gpt
    from vargen.models.llamagen import TransformerBlock

    gpt = make_gpt(vocab=64).to(torch.bfloat16).eval()
    monkeypatch.setattr(TransformerBlock, "_fused", lambda *a: None)  # the module path, which calls the kernel here
    calls = []
    real = kernels.attention
    monkeypatch.setattr(kernels, "attention", lambda *a: calls.append(a[0].shape) or real(*a), raising=False)

    def decode():
        outs, _ = cached_decode(gpt)
        return torch.cat([o.float().flatten(1) for o in outs], 1)

    with torch.no_grad():
        ours = decode()
        assert len(calls) == 4 * len(gpt.layers)
        monkeypatch.setenv("VARGEN_NO_EXT", "1")
        reference = decode()
    assert len(calls) == 4 * len(gpt.layers)
    assert float((ours - reference).abs().max()) <= 0.05 * float(reference.abs().max())


@pytest.mark.parametrize("n_kv_head", [None, 2])
def test_fused_block_gives_the_module_path_bit_for_bit(kernels, monkeypatch, n_kv_head):
    """A whole transformer block as one op (csrc/cpu/block_bf16.cpp) runs the modules' kernels in their order: the
    logits and every cache entry of a cached decode (prefix, 1-, 5- and 1-token steps, grouped-query heads too) are
    the same bits as the module path's, and the op runs once per layer and step. Control: a block with other
    weights changes the logits."""
    from conftest import make_gpt
    from vargen.models.llamagen import TransformerBlock

    gpt = make_gpt(vocab=64, **({} if n_kv_head is None else {"n_kv_head": n_kv_head})).to(torch.bfloat16).eval()
    calls = []
    real = kernels.block
    monkeypatch.setattr(kernels, "block", lambda *a: calls.append(a[0].shape) or real(*a), raising=False)

    def decode():
        return cached_decode(gpt)

    with torch.no_grad():
        fused, fused_cache = decode()
        assert len(calls) == 4 * len(gpt.layers)
        with monkeypatch.context() as m:
            m.setattr(TransformerBlock, "_fused", lambda *a: None)
            modules, module_cache = decode()
        assert len(calls) == 4 * len(gpt.layers)  # the module path did not call it
        assert all(torch.equal(a, b) for a, b in zip(fused, modules))
        assert all(torch.equal(a, b) for a, b in zip(fused_cache.k + fused_cache.v, module_cache.k + module_cache.v))
        gpt.layers[1].feed_forward.w2.weight.mul_(1.5)  # control
        changed, _ = decode()
    assert not torch.equal(changed[-1], fused[-1])


def test_layer_ops_match_the_pytorch_code_they_replace(kernels):
    """RMSNorm, RoPE (on q and k as the strided view the model has) and SwiGLU's gate against the modules'
    PyTorch code in bf16: the same roundings, so at most a last-place difference from an fp32 sum's order."""
    from vargen.models.llamagen import RMSNorm
    from vargen.models.rope import apply_rope, rope_factors

    g = torch.Generator().manual_seed(3)
    x = (torch.randn(2, 17, 70, generator=g) * 3).bfloat16()
    norm = RMSNorm(70).bfloat16()
    with torch.no_grad():
        norm.weight.copy_(torch.randn(70, generator=g) * 0.5 + 1)
        torch.set_grad_enabled(True)
        reference = norm(x)  # grad enabled: the PyTorch path
        torch.set_grad_enabled(False)
        assert torch.equal(norm(x), kernels.rms_norm(x, norm.weight, norm.eps))  # no grad: the module uses it
    assert float((kernels.rms_norm(x, norm.weight, norm.eps).float() - reference.float()).abs().max()) <= \
        2 ** -7 * float(reference.float().abs().max())
    qkv = torch.randn(2, 17, 7, 64, generator=g).bfloat16()
    factors = rope_factors(torch.randn(2, 17, 32, 2, generator=g))
    qk = qkv[:, :, :5]  # heads 0-4 of every token: tokens strided
    ours, theirs = kernels.rope(qk, *factors), apply_rope(qk, factors)
    assert ours.is_contiguous() and float((ours.float() - theirs.float()).abs().max()) <= 2 ** -7 * 8
    assert float((ours != theirs).float().mean()) < 0.01
    assert not torch.equal(kernels.rope(qkv[:, :, 1:6], *factors), theirs)  # control: other heads differ
    a, b = (torch.randn(3, 5, 96, generator=g) * 4).bfloat16(), torch.randn(3, 5, 96, generator=g).bfloat16()
    gate = kernels.silu_mul(a, b)
    assert float((gate.float() - (F.silu(a) * b).float()).abs().max()) <= 2 ** -7 * float(gate.float().abs().max())
    with pytest.raises(RuntimeError, match="weight has 3 features, the input 70"):
        kernels.rms_norm(x, torch.ones(3).bfloat16(), 1e-5)
    with pytest.raises(RuntimeError, match="shapes differ"):
        kernels.silu_mul(a, b[:, :4])


def test_write_kv_matches_indexed_writes(kernels):
    g = torch.Generator().manual_seed(5)
    caches = [torch.randn(2, 3, 10, 16, generator=g).bfloat16() for _ in range(2)]
    kv = torch.randn(2, 4, 2, 3, 16, generator=g).bfloat16()  # k and v as one tensor's views: strided
    k, v = kv[:, :, 0], kv[:, :, 1]
    slots = torch.tensor([[0, 1, 2, 9], [5, 3, -1, 7]])
    expected = [c.clone() for c in caches]
    rows = torch.arange(2)[:, None]
    expected[0][rows, :, slots], expected[1][rows, :, slots] = k, v
    kernels.write_kv(caches[0], caches[1], slots, k, v)
    assert torch.equal(caches[0], expected[0]) and torch.equal(caches[1], expected[1])
    with pytest.raises(RuntimeError, match="slot 10 outside a cache of 10"):
        kernels.write_kv(caches[0], caches[1], torch.tensor([[0, 1, 2, 10], [0, 1, 2, 3]]), k, v)


def test_eager_ops_stay_off_under_autograd_autocast_and_other_dtypes(kernels):
    from conftest import make_gpt

    x = torch.ones(2, 16, dtype=torch.bfloat16)
    with torch.no_grad():
        assert cpu_kernels.for_eager(x) is kernels
        assert cpu_kernels.for_eager(x, x.float()) is None
        with torch.autocast("cpu", torch.bfloat16):
            assert cpu_kernels.for_eager(x) is None
    assert cpu_kernels.for_eager(x) is None  # autograd on
    # an fp32 model under bf16 autocast (bf16 activations, an fp32 cache) decodes on the PyTorch path
    gpt = make_gpt(vocab=64)
    cache = gpt.new_cache(1)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        prefix = torch.arange(gpt.prefix_len)[None]
        gpt(embeds=gpt.condition_embeddings(torch.tensor([1])), positions=torch.full_like(prefix, -1), slots=prefix,
            cache=cache)
        step = torch.tensor([[0]])
        logits = gpt(tokens=step, positions=step, slots=step + gpt.prefix_len, cache=cache)
    assert logits.shape == (1, 1, 64) and bool(torch.isfinite(logits).all())


def _window(seed, B=48, L=6, V=300):
    """Random verify-step inputs with sharp distributions, zero-probability tokens and drafts that often pass."""
    g = torch.Generator().manual_seed(seed)
    probs = torch.rand(B, L + 1, V, generator=g) ** 6
    probs[..., :5] = 0
    probs /= probs.sum(-1, keepdim=True)
    q = torch.rand(B, L, V, generator=g) ** 6
    q /= q.sum(-1, keepdim=True)
    drafts = torch.randint(5, V, (B, L), generator=g)
    q.scatter_(-1, drafts[..., None], probs[:, :L].gather(-1, drafts[..., None]) * 0.7)  # p > q there: passes
    coins, valid = torch.rand(B, L, generator=g), torch.rand(B, L, generator=g) < 0.95
    noise = -torch.rand(B, V, generator=g).log1p()
    return probs, q, drafts, coins, valid, noise, torch.rand(B, L, generator=g) * 0.01, g


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sampling_kernels_agree_with_the_reference(kernels, seed):
    from vargen import ops
    from vargen.ops import reference

    probs, q, drafts, coins, valid, noise, extra, g = _window(seed)
    for e in (None, extra):
        r, x = kernels.verify_window(probs, q, drafts, coins, valid, noise, e)
        r_ref, x_ref = reference.verify_window(probs, q, drafts, coins, valid, noise, e)
        assert torch.equal(r, r_ref) and torch.equal(x, x_ref)
        assert 0 < int((r > 0).sum()) and int((r < drafts.shape[1]).sum()) > 0  # accepts and rejects both occur
    p, old = probs[:, 1:], q.clone()
    old[:4] = p[:4]  # residuals without mass: drawn from p
    u, residual = torch.rand(p.shape[:-1], generator=g), torch.rand(p.shape[:-1], generator=g) < 0.5
    for args in ((None, None), (old, residual)):
        drawn = ops.draw_categorical(p, u, *args)
        assert torch.equal(drawn, reference.draw_categorical(p, u, *args))  # the running sums agree to the bit
        assert bool((p.gather(-1, drawn[..., None]) > 0).all())  # never a token of probability 0
    res = (p - old).clamp_min(0)
    picked = ops.draw_categorical(p, u, old, residual).masked_select(residual & (res.sum(-1) > 0))
    assert bool((res[residual & (res.sum(-1) > 0)].gather(-1, picked[:, None]) > 0).all())  # from the residual
    # control: the kernel really ran (the reference is not called while the extension is loaded)
    calls = []
    real = reference.draw_categorical
    reference.draw_categorical = lambda *a: calls.append(1) or real(*a)
    try:
        ops.draw_categorical(p, u)
    finally:
        reference.draw_categorical = real
    assert calls == []


def test_inverse_cdf_draws_follow_their_distribution(kernels):
    from vargen import ops
    from vargen.decoding.acceptance import residual

    p = torch.tensor([0.05, 0.0, 0.4, 0.25, 0.3])
    q = torch.tensor([0.2, 0.1, 0.1, 0.5, 0.1])
    n = 200_000
    g = torch.Generator().manual_seed(0)
    u = torch.rand(n, generator=g)
    for args, target in (((), p), ((q.expand(n, 5), torch.ones(n, dtype=torch.bool)), residual(p, q))):
        freq = torch.bincount(ops.draw_categorical(p.expand(n, 5), u, *args), minlength=5).double() / n
        assert float((freq - target.double()).abs().max()) < 4e-3
        assert not float((freq - p.roll(1).double()).abs().max()) < 4e-3  # control: another distribution fails


def test_sampling_kernels_only_run_on_loaded_cpu_tensors_outside_autograd(kernels, monkeypatch):
    x = torch.rand(2, 8)
    assert cpu_kernels.for_sampling(x, None) is kernels
    assert cpu_kernels.for_sampling(x, torch.rand(2, requires_grad=True)) is None  # the kernels have no backward
    assert cpu_kernels.for_sampling(x, torch.rand(2, device="meta")) is None
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert cpu_kernels.for_sampling(x) is None
    monkeypatch.undo()
    monkeypatch.setitem(cpu_kernels._state, "module", None)  # not loaded (an fp32 run): the reference
    assert cpu_kernels.for_sampling(x) is None


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
    names = lambda paths: [p.rsplit("/", 1)[-1] for p in paths]  # noqa: E731
    assert names(cpu_kernels.sources()) == ["attention_bf16.cpp", "block_bf16.cpp", "layer_ops_bf16.cpp",
                                            "matmul_bf16.cpp", "module.cpp", "sampling_cpu.cpp"]
    assert names(cpu_kernels.headers()) == ["kernels.h", "simd.h", "tile.h"]  # a changed header rebuilds too
    assert not any("/cpu/" in p for p in _build.sources())  # nvcc's extension does not compile them


def test_speed_reports_say_whether_the_kernel_ran(monkeypatch):
    from vargen.eval.speed import _device_name

    monkeypatch.delenv("VARGEN_NO_EXT", raising=False)
    monkeypatch.setattr(cpu_kernels, "_state", {"tried": True, "module": object(), "status": "loaded from x.so"})
    assert _device_name("cpu").endswith(" threads, vargen CPU kernel)")
    monkeypatch.setenv("VARGEN_NO_EXT", "1")
    assert _device_name("cpu").endswith(" threads, oneDNN only)")
