"""vargen.ops: each PyTorch reference equals an independent computation (CPU), the fallback switches,
and (on a GPU, with the extension built by `python -m vargen.ops.build`) each kernel equals its reference."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vargen import ops
from vargen.decoding import SamplingConfig, logits_to_probs
from vargen.decoding.acceptance import ExactAcceptance, GroupedAcceptance, LanternAcceptance, codebook_neighbours
from vargen.ops import _build, reference

CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


def gen(seed):
    return torch.Generator().manual_seed(seed)


def random_window(B, L, V, seed=0, sharp=3.0, device="cpu"):
    """Verifier probs [B, L+1, V], draft q [B, L, V] near them, drafts ~ q, coins, valid, noise, extra."""
    g = gen(seed)
    base = torch.randn(B, L + 1, V, generator=g) * sharp
    probs = base.softmax(-1)
    q = (base[:, :L] + torch.randn(B, L, V, generator=g)).softmax(-1)  # correlated, so windows get accepted
    drafts = torch.multinomial(q.reshape(-1, V), 1, generator=g).view(B, L)
    coins = torch.rand(B, L, generator=g)
    valid = torch.rand(B, L, generator=g) < 0.9
    noise = torch.empty(B, V).exponential_(generator=g)
    extra = torch.rand(B, L, generator=g) * 0.05
    return [t.to(device) for t in (probs, q, drafts, coins, valid, noise, extra)]


# ------------------------------------------------------------------------------------------ sampling
def direct_probs(logits, cfg_scale, temperature, top_k, top_p):
    """The definitions in float64: top-k keeps values >= the k-th largest; top-p keeps x iff the mass of
    tokens with a strictly larger logit is < top_p (ties at the boundary all kept, as the kernel does)."""
    x = logits.double()
    if cfg_scale != 1.0:
        c, u = x.chunk(2)
        x = u + cfg_scale * (c - u)
    if temperature == 0:
        return torch.zeros_like(x).scatter_(-1, x.argmax(-1, keepdim=True), 1.0)
    x = x / temperature
    keep = torch.ones_like(x, dtype=torch.bool)
    if 0 < top_k < x.shape[-1]:
        keep &= x >= x.topk(top_k, -1).values[..., -1:]
    if top_p < 1:
        p = torch.where(keep, x - x.max(-1, keepdim=True).values, -torch.inf).softmax(-1)
        s, order = x.sort(-1, descending=True)
        before = p.gather(-1, order).cumsum(-1) - p.gather(-1, order)  # mass before each sorted position
        first = torch.searchsorted(-s.contiguous(), -s.contiguous(), side="left")  # start of each tie group
        larger = torch.zeros_like(x).scatter(-1, order, before.gather(-1, first))
        keep &= larger < top_p
    return torch.where(keep, x, -torch.inf).softmax(-1)


@pytest.mark.parametrize("cfg_scale,temperature,top_k,top_p", [
    (1.0, 1.0, 0, 1.0), (1.0, 0.7, 20, 1.0), (1.0, 1.3, 0, 0.8), (2.5, 0.9, 50, 0.9), (4.0, 1.0, 1, 1.0),
    (1.0, 1.0, 0, 1e-4), (1.0, 0.0, 0, 1.0), (3.0, 0.0, 5, 0.5), (1.0, 1.0, 300, 1.0),
])
def test_sampling_probs_reference_matches_the_definition(cfg_scale, temperature, top_k, top_p):
    logits = torch.randn(8 if cfg_scale != 1 else 4, 300, generator=gen(1)) * 3
    got = ops.sampling_probs(logits, cfg_scale, temperature, top_k, top_p)
    want = direct_probs(logits, cfg_scale, temperature, top_k, top_p)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert torch.equal(got > 0, want > 0)  # same support
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-5)


def test_sampling_probs_top_k_keeps_ties_and_greedy_takes_the_first_max():
    logits = torch.tensor([[1.0, 3.0, 2.0, 3.0, 2.0, -1.0]])
    assert (ops.sampling_probs(logits, top_k=2) > 0).tolist() == [[False, True, False, True, False, False]]
    assert (ops.sampling_probs(logits, top_k=3) > 0).tolist() == [[False, True, True, True, True, False]]
    assert ops.sampling_probs(logits, temperature=0).tolist() == [[0, 1, 0, 0, 0, 0]]
    cfg = ops.sampling_probs(torch.cat([logits, logits.flip(-1)]), cfg_scale=2.0, temperature=0)
    assert cfg.argmax().item() == (2 * logits - logits.flip(-1)).argmax().item()


def test_logits_to_probs_is_the_op_and_keeps_its_nan_check():
    logits = torch.randn(6, 50, generator=gen(2)).half()
    for config in (SamplingConfig(cfg_scale=2.0, top_k=7, top_p=0.9, temperature=0.8), SamplingConfig(temperature=0)):
        want = ops.sampling_probs(logits, config.cfg_scale, config.temperature, config.top_k, config.top_p)
        assert torch.equal(logits_to_probs(logits, config), want)
        assert torch.equal(logits_to_probs(logits, config, check_finite=False), want)
    with pytest.raises(FloatingPointError, match="1 non-finite"):
        logits_to_probs(torch.tensor([[0.0, float("inf")], [0.0, 0.0]]), SamplingConfig(cfg_scale=2.0))


# ------------------------------------------------------------------------------------------ verification
def loop_verify(probs, q, drafts, coins, valid, noise, extra=None):
    """The SJD step written out per sample and per draft."""
    B, L, _ = q.shape
    rs, xs = [], []
    for b in range(B):
        r = 0
        for j in range(L):
            d = drafts[b, j]
            p_d = probs[b, j, d] + (extra[b, j] if extra is not None else 0)
            if not (valid[b, j] and coins[b, j] * q[b, j, d] < p_d):
                break
            r += 1
        p = probs[b, r]
        if r < L:
            res = (p - q[b, r]).clamp_min(0)
            dist = res / res.sum() if res.sum() > 0 else p
        else:
            dist = p
        rs.append(r)
        xs.append(int((dist / noise[b]).argmax()))
    return torch.tensor(rs), torch.tensor(xs)


@pytest.mark.parametrize("B,L,V", [(1, 1, 50), (8, 16, 200), (5, 4, 1000)])
@pytest.mark.parametrize("with_extra", [False, True])
def test_verify_window_reference_matches_a_loop_over_drafts(B, L, V, with_extra):
    probs, q, drafts, coins, valid, noise, extra = random_window(B, L, V, seed=B * L)
    extra = extra if with_extra else None
    r, x = ops.verify_window(probs, q, drafts, coins, valid, noise, extra)
    want_r, want_x = loop_verify(probs, q, drafts, coins, valid, noise, extra)
    assert torch.equal(r, want_r) and torch.equal(x, want_x)
    assert r.dtype == x.dtype == torch.long


def test_verify_window_edge_cases():
    probs, q, drafts, coins, valid, noise, _ = random_window(3, 4, 30, seed=5)
    r, _ = ops.verify_window(probs, q, drafts, coins, torch.zeros_like(valid), noise)
    assert r.tolist() == [0, 0, 0]  # nothing valid: reject at once
    q0 = probs[:, :4].clone()  # q == p: every draft is accepted with probability 1 ...
    r, x = ops.verify_window(probs, q0, drafts, torch.full_like(coins, 0.999), torch.ones_like(valid), noise)
    assert r.tolist() == [4, 4, 4]
    assert torch.equal(x, (probs[:, 4] / noise).argmax(-1))  # ... and the bonus token comes from p_L
    # a rejection where p <= q everywhere (only reachable through rounding): resample from p itself
    r, x = ops.verify_window(probs, q0, drafts, torch.full_like(coins, 2.0), torch.ones_like(valid), noise)
    assert r.tolist() == [0, 0, 0] and torch.equal(x, (probs[:, 0] / noise).argmax(-1))


def old_verify(rule, probs, q, drafts, coins, valid, noise):
    """decode_sjd's verify step before the fused op, verbatim."""
    L = q.shape[1]
    rows = lambda x, i: x.gather(1, i[..., None].expand(*i.shape, x.shape[-1]))  # noqa: E731
    ok = rule.accept(probs[:, :L], q, drafts, coins) & valid
    r = ok.long().cumprod(1).sum(1)
    p_r = rows(probs, r[:, None])[:, 0]
    q_r = rows(q, r.clamp(max=L - 1)[:, None])[:, 0]
    dist = torch.where((r < L)[:, None], rule.resample(p_r, q_r), rule.target(p_r))
    return r, (dist / noise).argmax(-1)


def test_every_acceptance_rule_verifies_as_before():
    V = 64
    g = gen(3)
    rules = [ExactAcceptance(), LanternAcceptance(codebook_neighbours(torch.randn(V, 4, generator=g), k=8), delta=0.2),
             LanternAcceptance(codebook_neighbours(torch.randn(V, 4, generator=g), k=8), lam=2.0),
             GroupedAcceptance(torch.randn(V, 3, generator=g), prob_gap=0.3, emb_dist=4.0)]
    for seed in range(5):
        window = random_window(6, 5, V, seed=seed)[:6]
        for rule in rules:
            got, want = rule.verify_window(*window), old_verify(rule, *window)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), rule.name
    assert ExactAcceptance().extra_mass(window[0], window[2]) is None


# ------------------------------------------------------------------------------------------ LANTERN
def loop_pooled_mass(p, drafts, neighbours, delta=None, lam=None):
    """Per row: walk the neighbours nearest first, keep the last running sum within the budget."""
    out = torch.zeros(drafts.shape)
    for idx in np.ndindex(*drafts.shape):
        row, d = p[idx], int(drafts[idx])
        budget = np.float32(np.float32(lam - 1) * row[d].numpy()) if lam is not None else np.float32(delta)
        acc, best = 0.0, np.float32(0)
        for t in neighbours[d].tolist():
            acc += float(row[t])  # float64 running sum rounded to float32, as torch's CPU cumsum
            if np.float32(acc) <= budget:
                best = max(best, np.float32(acc))
        out[idx] = float(best)
    return out


@pytest.mark.parametrize("mode", [{"delta": 0.1}, {"delta": 0.0}, {"delta": 1.0}, {"lam": 3.0}, {"lam": 1.0}])
def test_lantern_reference_matches_a_loop_over_neighbours(mode):
    V, k = 100, 30
    g = gen(4)
    nb = codebook_neighbours(torch.randn(V, 5, generator=g), k=k)
    p = (torch.randn(3, 7, V, generator=g) * 2).softmax(-1)
    drafts = torch.randint(V, (3, 7), generator=g)
    got = ops.lantern_pooled_mass(p, drafts, nb, **mode)
    assert torch.equal(got, loop_pooled_mass(p, drafts, nb, **mode))
    rule = LanternAcceptance(nb, **mode)
    assert torch.equal(rule.pooled_mass(p, drafts), got) and torch.equal(rule.extra_mass(p, drafts), got)


# ------------------------------------------------------------------------------------------ LIIF
def direct_corners(feat, coord, cell, local_ensemble=True, cell_decode=True):
    """The nearest cell by floor((c + 1) / 2 * n) instead of grid_sample."""
    B, C, h, w = feat.shape
    shifts = [(-1, -1), (-1, 1), (1, -1), (1, 1)] if local_ensemble else [(0, 0)]
    eps = 1e-6 if local_ensemble else 0.0
    inps, areas = [], []
    for vx, vy in shifts:
        c0 = (coord[..., 0] + vx / h + eps).clamp(-1 + 1e-6, 1 - 1e-6)
        c1 = (coord[..., 1] + vy / w + eps).clamp(-1 + 1e-6, 1 - 1e-6)
        iy = ((c0 + 1) / 2 * h).floor().long().clamp(0, h - 1)
        ix = ((c1 + 1) / 2 * w).floor().long().clamp(0, w - 1)
        f = feat.permute(0, 2, 3, 1)[torch.arange(B)[:, None], iy, ix]  # [B, Q, C]
        rel = torch.stack([(coord[..., 0] - (-1 + (2 * iy + 1) / h)) * h,
                           (coord[..., 1] - (-1 + (2 * ix + 1) / w)) * w], -1)
        parts = [f, rel] + ([cell * torch.tensor([h, w])] if cell_decode else [])
        inps.append(torch.cat(parts, -1))
        areas.append((rel[..., 0] * rel[..., 1]).abs() + 1e-9)
    return torch.stack(inps), torch.stack(areas)


@pytest.mark.parametrize("local_ensemble,cell_decode", [(True, True), (True, False), (False, True), (False, False)])
def test_liif_corners_reference_matches_a_direct_gather(local_ensemble, cell_decode):
    g = gen(6)
    feat = torch.randn(2, 5, 7, 9, generator=g)
    coord = torch.rand(2, 300, 2, generator=g) * 2 - 1
    cell = torch.rand(2, 300, 2, generator=g) * 0.1
    inp, areas = ops.liif_corners(feat, coord, cell, local_ensemble, cell_decode)
    want_inp, want_areas = direct_corners(feat, coord, cell, local_ensemble, cell_decode)
    S = 4 if local_ensemble else 1
    assert inp.shape == (S, 2, 300, 5 + (4 if cell_decode else 2)) and areas.shape == (S, 2, 300)
    assert torch.equal(inp[..., :5], want_inp[..., :5])  # the same feature vectors
    torch.testing.assert_close(inp, want_inp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(areas, want_areas, atol=1e-5, rtol=1e-5)


def test_liif_corners_reference_is_differentiable():
    feat = torch.randn(1, 3, 4, 4, requires_grad=True)
    coord = torch.rand(1, 10, 2) * 2 - 1
    inp, _ = ops.liif_corners(feat, coord, torch.full_like(coord, 0.5))
    inp.sum().backward()
    assert feat.grad is not None and feat.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------ fallback switches
@pytest.fixture
def fresh_build_state(monkeypatch):
    monkeypatch.setattr(_build, "_state", {"tried": False, "module": None, "status": None})
    return monkeypatch


def test_no_ext_forces_the_fallback(fresh_build_state):
    fresh_build_state.setenv("VARGEN_NO_EXT", "1")
    fresh_build_state.setattr(_build, "build", lambda verbose=False: pytest.fail("must not build"))
    assert ops.extension() is None and "VARGEN_NO_EXT" in ops.extension_status()
    probs, q, drafts, coins, valid, noise, extra = random_window(2, 3, 40)
    assert all(torch.equal(a, b) for a, b in zip(ops.verify_window(probs, q, drafts, coins, valid, noise, extra),
                                                 reference.verify_window(probs, q, drafts, coins, valid, noise,
                                                                         extra)))


def test_cpu_tensors_never_build_and_a_failed_build_is_cached(fresh_build_state):
    calls = []

    def failing_build(verbose=False):
        calls.append(1)
        raise RuntimeError("nvcc: fatal error: simulated")

    fresh_build_state.delenv("VARGEN_NO_EXT", raising=False)
    fresh_build_state.setattr(_build, "build", failing_build)
    ops.sampling_probs(torch.randn(2, 10), top_k=3)  # CPU: the extension is never asked for
    assert calls == []
    with pytest.warns(RuntimeWarning, match="simulated"):
        assert ops.extension() is None
    assert ops.extension() is None and calls == [1]  # cached: no second attempt
    assert ops.extension_status().startswith("unavailable: RuntimeError: nvcc: fatal error: simulated")


def test_build_locations(monkeypatch):
    assert (_build.csrc_dir() / "vargen_ops.cpp").exists()
    assert {p.rsplit("/", 1)[-1] for p in _build.sources()} >= {"vargen_ops.cpp", "sampling.cu", "verify.cu",
                                                                 "lantern.cu", "liif_query.cu"}
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/tmp/somewhere")
    assert str(_build.build_directory()).startswith("/tmp/somewhere/vargen_ops_")


@pytest.mark.skipif(not _build.library_path().exists(), reason="extension not built (python -m vargen.ops.build)")
def test_an_already_built_extension_imports():
    assert _build.extension_status().startswith(("built at", "loaded from"))
    module = _build.import_built()  # never compiles
    assert all(callable(getattr(module, f)) for f in _build.FUNCTIONS)


# ------------------------------------------------------------------------------------------ GPU: kernel == reference
@pytest.fixture(scope="module")
def ext():
    if not CUDA:
        pytest.skip("needs a CUDA GPU")
    status = _build.extension_status()
    if not status.startswith(("built at", "loaded from")) or "stale" in status:
        pytest.skip(f"extension not built or stale ({status}); run python -m vargen.ops.build first")
    module = ops.extension()
    if module is None:
        pytest.skip(ops.extension_status())
    return module


CONFIGS = [(1.0, 1.0, 0, 1.0), (1.0, 0.8, 50, 1.0), (1.0, 1.2, 0, 0.9), (3.0, 0.7, 100, 0.8), (2.0, 0.0, 0, 1.0),
           (1.0, 0.0, 0, 1.0), (1.0, 1.0, 1, 1.0), (1.0, 1.0, 0, 1e-3), (4.0, 1.0, 500, 0.95)]


@gpu
@pytest.mark.parametrize("V", [1000, 16384])
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_sampling_probs_kernel_matches_reference(ext, V, config, dtype):
    cfg_scale = config[0]
    rows = 17 * (2 if cfg_scale != 1 else 1)
    logits = (torch.randn(rows, V, generator=gen(V)) * 4).to("cuda", dtype)  # float32: no ties
    got = ops.sampling_probs(logits, *config)
    assert got.shape == (17, V) and got.dtype == torch.float32 and got.is_cuda
    # bf16 logits tie often; the reference's sort then cuts a tie group at the top-p boundary where the
    # kernel keeps it whole, so ties are judged against the (order-free) definition instead
    want = reference.sampling_probs(logits, *config) if dtype == torch.float32 else \
        direct_probs(logits.float(), *config).float()
    assert torch.equal(got > 0, want > 0)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@gpu
def test_gpu_sampling_probs_handles_cfg_on_3d_logits(ext):
    logits = torch.randn(6, 5, 1000, device="cuda") * 3  # [2B, T, V] from a verify pass
    got = ops.sampling_probs(logits, 2.5, 0.9, 40, 0.9)
    torch.testing.assert_close(got, reference.sampling_probs(logits, 2.5, 0.9, 40, 0.9), atol=1e-5, rtol=1e-5)
    assert got.shape == (3, 5, 1000)


@gpu
@pytest.mark.parametrize("V", [1000, 16384])
@pytest.mark.parametrize("B", [1, 8])
@pytest.mark.parametrize("L", [1, 16])
@pytest.mark.parametrize("with_extra", [False, True])
def test_gpu_verify_kernel_matches_reference(ext, V, B, L, with_extra):
    for seed in range(4):
        probs, q, drafts, coins, valid, noise, extra = random_window(B, L, V, seed=seed, device="cuda")
        extra = extra if with_extra else None
        r, x = ops.verify_window(probs, q, drafts, coins, valid, noise, extra)
        want_r, want_x = reference.verify_window(probs, q, drafts, coins, valid, noise, extra)
        assert torch.equal(r, want_r) and torch.equal(x, want_x)


@gpu
@pytest.mark.parametrize("V", [1000, 16384])
@pytest.mark.parametrize("mode", [{"delta": 0.05}, {"delta": 0.3}, {"lam": 2.0}])
def test_gpu_lantern_kernel_matches_the_cpu_reference_exactly(ext, V, mode):
    g = gen(V)
    nb = codebook_neighbours(torch.randn(V, 8, generator=g), k=100)
    window = (torch.randn(8, 17, V, generator=g) * 3).softmax(-1).cuda()
    p = window[:, :16]  # a strided view, as the SJD loop passes it
    drafts = torch.randint(V, (8, 16), generator=g).cuda()
    got = ops.lantern_pooled_mass(p, drafts, nb.cuda(), **mode)
    # CPU cumsum accumulates in float64 like the kernel; CUDA's cumsum does not
    assert torch.equal(got.cpu(), reference.lantern_pooled_mass(p.cpu(), drafts.cpu(), nb, **mode))


@gpu
@pytest.mark.parametrize("local_ensemble,cell_decode", [(True, True), (False, False)])
def test_gpu_liif_kernel_matches_reference(ext, local_ensemble, cell_decode):
    g = gen(7)
    feat = F.unfold(torch.randn(2, 16, 13, 11, generator=g), 3, padding=1).view(2, 144, 13, 11).cuda()
    coord = (torch.rand(2, 5000, 2, generator=g) * 2 - 1).cuda()
    cell = torch.full_like(coord, 2 / 40)
    got = ops.liif_corners(feat, coord, cell, local_ensemble, cell_decode)
    want = reference.liif_corners(feat, coord, cell, local_ensemble, cell_decode)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@gpu
def test_gpu_greedy_sjd_with_kernels_is_greedy_ar(ext):
    from conftest import make_gpt

    from vargen.decoding import decode_ar
    from vargen.decoding.speculative import decode_sjd

    model = make_gpt("c2i").cuda()
    cond = torch.arange(4, device="cuda")
    for sampling in (SamplingConfig(temperature=0), SamplingConfig(cfg_scale=3.0, temperature=0)):
        ar, _ = decode_ar(model, cond, sampling)
        sjd, _ = decode_sjd(model, cond, sampling, window=5)
        assert torch.equal(ar, sjd)
