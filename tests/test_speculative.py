"""Speculative Jacobi Decoding is lossless: its samples follow the exact AR distribution."""
import itertools

import pytest
import torch
from conftest import make_gpt
from scipy.stats import chisquare

from vargen.decoding import SamplingConfig, decode_ar, logits_to_probs
from vargen.decoding.acceptance import ExactAcceptance, couple, residual
from vargen.decoding.speculative import decode_sjd

N_SAMPLES = 4000


@pytest.fixture(scope="module")
def small():
    """2 x 2 tokens over a 4-token vocabulary: 256 images whose probabilities can be enumerated."""
    return make_gpt("c2i", vocab=4, block=4, seed=3)


def exact_distribution(model, label: int, sampling: SamplingConfig) -> torch.Tensor:
    """P(image) for all V^N token sequences, by teacher forcing through the same sampling transforms."""
    V, N = model.vocab_size, model.num_tokens
    seqs = torch.tensor(list(itertools.product(range(V), repeat=N)))
    with torch.no_grad():
        logits = model.forward_train(seqs, torch.full((len(seqs),), label))
        if sampling.uses_cfg:
            logits = torch.cat([logits, model.forward_train(seqs, torch.full((len(seqs),), label), null=True)])
        probs = logits_to_probs(logits, sampling)
    return probs.gather(-1, seqs[..., None]).squeeze(-1).prod(1).double()


def chi_square_p(tokens: torch.Tensor, expected: torch.Tensor, vocab: int) -> float:
    """Goodness of fit of sampled sequences to ``expected``; cells with < 5 expected counts are pooled."""
    index = (tokens * vocab ** torch.arange(tokens.shape[1] - 1, -1, -1)).sum(1)
    observed = torch.bincount(index, minlength=len(expected)).double()
    exp = expected / expected.sum() * len(tokens)
    big = exp >= 5
    f_obs, f_exp = observed[big], exp[big]
    if observed[exp == 0].sum() > 0:  # a sequence the sampling config makes impossible
        return 0.0
    if not big.all() and exp[~big].sum() > 0:  # (cells of probability 0 only, never drawn: nothing to pool)
        f_obs = torch.cat([f_obs, observed[~big].sum()[None]])
        f_exp = torch.cat([f_exp, exp[~big].sum()[None]])
    return float(chisquare(f_obs.numpy(), f_exp.numpy()).pvalue)


class AlwaysAccept(ExactAcceptance):
    """A deliberately broken rule: every draft passes."""

    def accept(self, p, q, drafts, coins):
        return torch.ones_like(drafts, dtype=torch.bool)


SHARP = SamplingConfig(temperature=0.6)


def test_the_reference_distribution_is_far_from_uniform_and_ar_matches_it(small):
    expected = exact_distribution(small, 1, SHARP)
    assert abs(float(expected.sum()) - 1) < 1e-5
    assert float(expected.max()) > 4 / 256 and float(expected.min()) < 0.25 / 256  # far from uniform
    tokens, _ = decode_ar(small, torch.full((N_SAMPLES,), 1), SHARP, seeds=range(N_SAMPLES))
    assert chi_square_p(tokens, expected, 4) > 1e-3


@pytest.mark.parametrize("init,coupling,window,sampling", [
    ("random", "none", 2, SHARP), ("left", "none", 3, SHARP), ("above", "none", 2, SHARP),
    ("left-dist", "none", 2, SHARP), ("left", "maximal", 2, SHARP), ("random", "gumbel", 2, SHARP),
    ("left-dist", "maximal", 3, SamplingConfig(cfg_scale=2.0, temperature=0.8, top_k=3)),
])
def test_sjd_samples_follow_the_exact_ar_distribution(small, init, coupling, window, sampling):
    expected = exact_distribution(small, 1, sampling)
    tokens, stats = decode_sjd(small, torch.full((N_SAMPLES,), 1), sampling, seeds=range(N_SAMPLES),
                               window=window, init=init, coupling=coupling)
    assert chi_square_p(tokens, expected, 4) > 1e-3
    assert min(stats.per_sample_forward_passes) >= 2 and stats.extra["step_compression"] > 1.0


def test_the_chi_square_test_has_power_against_a_broken_rule(small):
    expected = exact_distribution(small, 1, SHARP)
    tokens, _ = decode_sjd(small, torch.full((N_SAMPLES,), 1), SHARP, seeds=range(N_SAMPLES), window=2,
                           init="random", acceptance=AlwaysAccept())
    assert chi_square_p(tokens, expected, 4) < 1e-6


@pytest.mark.parametrize("coupling", ["none", "maximal", "gumbel"])
def test_greedy_sjd_is_greedy_ar(c2i, coupling):
    """Temperature 0 makes SJD plain Jacobi decoding: a fixed point equal to greedy AR."""
    cond = torch.tensor([0, 1, 2, 3])
    for sampling in (SamplingConfig(temperature=0), SamplingConfig(cfg_scale=3.0, temperature=0)):
        ar, _ = decode_ar(c2i, cond, sampling)
        for init in ("random", "left", "above", "left-dist"):
            sjd, _ = decode_sjd(c2i, cond, sampling, window=5, init=init, coupling=coupling)
            assert torch.equal(ar, sjd), init


def test_each_sample_advances_by_its_own_accepted_length(c2i):
    """A sample's tokens and pass count depend only on its seed, not on its batch neighbours."""
    cond, sampling = torch.tensor([0, 1, 2, 3]), SamplingConfig(top_k=8, temperature=0.7)
    batch, stats = decode_sjd(c2i, cond, sampling, seeds=[10, 11, 12, 13], window=4)
    passes = stats.per_sample_forward_passes
    assert len(set(passes)) > 1  # samples finish after different numbers of passes
    for i in range(4):
        alone, s = decode_sjd(c2i, cond[i:i + 1], sampling, seeds=[10 + i], window=4)
        assert torch.equal(alone[0], batch[i]) and s.per_sample_forward_passes == [passes[i]]
    assert sum(k * v for k, v in stats.accepted_hist.items()) == 4 * c2i.num_tokens


def test_residual_and_coupling_are_exact():
    p = torch.tensor([[0.5, 0.3, 0.2]])
    q = torch.tensor([[0.2, 0.6, 0.2]])
    torch.testing.assert_close(residual(p, q), torch.tensor([[1.0, 0.0, 0.0]]))
    torch.testing.assert_close(residual(p, p), p)  # zero-probability rejection: fall back to p
    # coupling: marginal is new_q, and the old draft is kept as often as possible (sum of min = 0.7)
    g = torch.Generator().manual_seed(0)
    n = 200_000
    old = torch.multinomial(q.expand(n, 3), 1, generator=g)[:, 0]
    coins = torch.rand(n, generator=g)
    u = torch.rand(n, generator=g)
    new = couple(p.expand(n, 3), q.expand(n, 3), old, coins, u)
    freq = torch.bincount(new, minlength=3).double() / n
    torch.testing.assert_close(freq, p[0].double(), atol=5e-3, rtol=0)
    assert abs(float((new == old).double().mean()) - 0.7) < 5e-3


def test_bad_arguments_fail_clearly(c2i):
    with pytest.raises(ValueError, match="window must be >= 1"):
        decode_sjd(c2i, torch.tensor([0]), window=0)
    with pytest.raises(ValueError, match="unknown draft initialisation 'zeros'"):
        decode_sjd(c2i, torch.tensor([0]), init="zeros")
    with pytest.raises(ValueError, match="unknown coupling 'copula'"):
        decode_sjd(c2i, torch.tensor([0]), coupling="copula")


def test_codebook_neighbours_are_the_nearest_other_codes():
    from vargen.decoding.acceptance import codebook_neighbours

    codes = torch.randn(40, 3, generator=torch.Generator().manual_seed(0))
    nb = codebook_neighbours(codes, k=5)
    assert nb.shape == (40, 5) and not (nb == torch.arange(40)[:, None]).any()
    dist = torch.cdist(codes, codes) + torch.diag(torch.full((40,), float("inf")))
    torch.testing.assert_close(dist.gather(1, nb), dist.sort(1).values[:, :5])
    assert codebook_neighbours(codes, k=1000).shape == (40, 39)  # k capped at V - 1


def test_lantern_pools_neighbour_mass_within_delta():
    from vargen.decoding.acceptance import LanternAcceptance

    nb = torch.tensor([[1, 2, 3], [0, 2, 3], [1, 3, 0], [2, 1, 0]])
    p = torch.tensor([[0.1, 0.05, 0.3, 0.55]])
    delta_rule = LanternAcceptance(nb, delta=0.2)
    # code 0: neighbours 1 (0.05), 2 (0.3): only the first fits in 0.2
    torch.testing.assert_close(delta_rule.pooled_mass(p, torch.tensor([0])), torch.tensor([0.05]))
    lam_rule = LanternAcceptance(nb, lam=5.0)  # budget (5 - 1) * p(3) = 2.2: all three neighbours
    torch.testing.assert_close(lam_rule.pooled_mass(p, torch.tensor([3])), torch.tensor([0.45]))
    with pytest.raises(ValueError, match="delta must be in"):
        LanternAcceptance(nb, delta=1.5)


@pytest.mark.parametrize("delta", [0.05, 0.1, 0.3])
def test_lantern_with_a_deterministic_draft_stays_within_delta_of_p(delta):
    """Committed-token distribution of one verification (one-hot draft) vs p: TV <= delta."""
    from vargen.decoding.acceptance import LanternAcceptance, codebook_neighbours
    from vargen.decoding.sampling import sample_categorical

    g = torch.Generator().manual_seed(1)
    V, n = 32, 200_000
    rule = LanternAcceptance(codebook_neighbours(torch.randn(V, 4, generator=g)), delta=delta)
    for trial in range(5):
        p = torch.softmax(2 * torch.randn(V, generator=g), -1)
        x = int(torch.randint(V, (), generator=g))
        q = torch.nn.functional.one_hot(torch.tensor(x), V).float()
        draft = torch.full((n,), x)
        accepted = rule.accept(p.expand(n, V), q.expand(n, V), draft, torch.rand(n, generator=g))
        fallback = sample_categorical(rule.resample(p, q).expand(n, V).contiguous())
        out = torch.where(accepted, draft, fallback)
        tv = 0.5 * float((torch.bincount(out, minlength=V) / n - p).abs().sum())
        pooled = float(rule.pooled_mass(p[None], torch.tensor([x])))
        assert pooled <= delta and tv <= delta + 0.005
        assert abs(tv - min(pooled, 1 - float(p[x]))) < 0.005  # the TV is exactly the pooled mass


def test_lantern_with_zero_delta_is_sjd_and_more_delta_accepts_more(c2i):
    from vargen.decoding.acceptance import LanternAcceptance, codebook_neighbours

    nb = codebook_neighbours(torch.randn(c2i.vocab_size, 4, generator=torch.Generator().manual_seed(0)))
    cond, sampling = torch.arange(4), SamplingConfig(top_k=10)
    exact, s0 = decode_sjd(c2i, cond, sampling, window=6)
    zero, s1 = decode_sjd(c2i, cond, sampling, window=6, acceptance=LanternAcceptance(nb, delta=0.0))
    assert torch.equal(exact, zero) and s1.method == "sjd+lantern"
    _, relaxed = decode_sjd(c2i, cond, sampling, window=6, acceptance=LanternAcceptance(nb, delta=0.5))
    assert relaxed.extra["step_compression"] > s0.extra["step_compression"]


def test_gsd_groups_by_rank_probability_and_embedding():
    from vargen.decoding.acceptance import GroupedAcceptance

    emb = torch.tensor([[0.0, 0.0], [0.1, 0.0], [5.0, 0.0], [0.0, 0.2], [0.3, 0.1]])
    p = torch.tensor([[0.30, 0.25, 0.24, 0.01, 0.20]])
    rule = GroupedAcceptance(emb, rank_window=2, prob_gap=0.15, emb_dist=0.5)
    members, in_group = rule.group(p, torch.tensor([1]))
    group = set(members[0][in_group[0]].tolist())
    # token 2 is close in rank and probability but far in embedding; token 3 is far in probability
    assert group == {0, 1, 4}
    q = torch.tensor([[0.0, 1.0, 0.0, 0.0, 0.0]])  # one-hot draft: accept prob = p(G) = 0.75
    coins = torch.rand(100_000, generator=torch.Generator().manual_seed(0))
    rate = rule.accept(p.expand(len(coins), 5), q.expand(len(coins), 5), torch.ones(len(coins), dtype=torch.long),
                       coins).double().mean()
    assert abs(float(rate) - 0.75) < 0.01


def test_gsd_with_no_gap_is_exact_sjd_and_runs_by_name(c2i):
    from vargen.decoding import get_method
    from vargen.decoding.acceptance import GroupedAcceptance

    cond, sampling = torch.arange(3), SamplingConfig(top_k=10)
    exact, _ = decode_sjd(c2i, cond, sampling, window=4, init="random")
    alone, s = decode_sjd(c2i, cond, sampling, window=4, init="random",
                          acceptance=GroupedAcceptance(c2i.tok_embeddings.weight, prob_gap=0.0))
    assert torch.equal(exact, alone) and s.method == "gsd"  # the registry's name from every entry point
    tokens, stats = get_method("gsd", window=4)(c2i, cond, sampling)
    assert tokens.shape == (3, 16) and stats.extra["acceptance"] == "gsd" and stats.method == "gsd"


def test_plain_jacobi_is_greedy_ar_in_fewer_passes(c2i):
    from vargen.decoding import decode_jacobi

    sampling = SamplingConfig(cfg_scale=2.0, temperature=0.7, top_k=5)  # Jacobi replaces these by argmax
    greedy, _ = decode_ar(c2i, torch.arange(4), SamplingConfig(cfg_scale=2.0, temperature=0))
    tokens, stats = decode_jacobi(c2i, torch.arange(4), sampling, window=4, init="up")
    assert torch.equal(tokens, greedy) and stats.method == "jacobi"
    assert stats.extra["init"] == "above" and stats.extra["step_compression"] >= 1.0


def test_method_flags_compose_to_method_names():
    from vargen.decoding.methods import compose_method

    assert compose_method("sjd", "maximal", "lantern") == "sjd+coupling+lantern"
    assert compose_method("sjd", "gumbel") == "sjd+gumbel" and compose_method("sjd", relax="gsd") == "gsd"
    assert compose_method("zipar") == "zipar"
    with pytest.raises(ValueError, match="not a defined combination"):
        compose_method("sjd", "gumbel", "lantern")
    with pytest.raises(ValueError, match="apply to --method sjd"):
        compose_method("ar", "maximal")
    with pytest.raises(ValueError, match="unknown relaxation 'eagle'"):
        compose_method("sjd", relax="eagle")
