"""SJD-PAC (proactive draft tree + adaptive continuation) is lossless, with and without coupling."""
import pytest
import torch
from conftest import make_gpt
from test_speculative import N_SAMPLES, SHARP, chi_square_p, exact_distribution

import vargen.decoding.speculative as speculative
from vargen.decoding import SamplingConfig, get_method
from vargen.decoding.acceptance import ExactAcceptance, drop_tokens
from vargen.decoding.methods import compose_method
from vargen.decoding.pac import pac_layout, sibling_drafts, tree_tokens
from vargen.decoding.speculative import decode_sjd
from vargen.ops import draw_categorical


@pytest.fixture(scope="module")
def small():
    return make_gpt("c2i", vocab=4, block=4, seed=3)


def sample(model, sampling, **options):
    return decode_sjd(model, torch.full((N_SAMPLES,), 1), sampling, seeds=range(N_SAMPLES), pac=True, **options)


@pytest.mark.parametrize("init,coupling,window,width,depth,chain,siblings,sampling", [
    ("random", "none", 3, 3, 2, 0, "left", SHARP), ("left", "maximal", 3, 3, 2, 0, "left", SHARP),
    ("random", "none", 3, 3, 2, 0, "q", SHARP), ("left", "maximal", 3, 4, 2, 0, "q", SHARP),
    ("random", "gumbel", 4, 2, 2, 0, "left", SHARP), ("random", "maximal", 3, 4, 2, 0, "left", SHARP),
    ("left-dist", "none", 2, 3, 1, 0, "left", SamplingConfig(cfg_scale=2.0, temperature=0.8, top_k=3)),
    ("left", "maximal", 4, 3, 2, 0, "left", SamplingConfig(temperature=0.9, top_p=0.9)),
    ("left", "maximal", 4, 3, 1, 2, "left", SHARP), ("random", "none", 4, 2, 1, 2, "q", SamplingConfig(top_k=3)),
])
def test_pac_samples_follow_the_exact_ar_distribution(one_thread, small, init, coupling, window, width, depth, chain,
                                                      siblings, sampling):
    expected = exact_distribution(small, 1, sampling)
    tokens, stats = sample(small, sampling, window=window, init=init, coupling=coupling, pac_width=width,
                           pac_depth=depth, pac_chain=chain, pac_siblings=siblings)
    # 1e-4, not 1e-3: seeds 0..3999 give p = 2e-4 for ("left", "maximal", 3, 4, 2, 0, "q") with the inverse-CDF
    # redraws, while 80,000 other seeds of it give p = 0.44; the broken controls below fail at < 1e-6
    assert chi_square_p(tokens, expected, 4) > 1e-4
    assert stats.method == speculative.sjd_method_name(coupling, "exact", True) and stats.extra["pac"]
    assert len(set(stats.per_sample_forward_passes)) > 1  # samples advance by different lengths in one batch


class KeepsRejected(ExactAcceptance):
    """Broken: a rejected tree candidate stays in the target (no residual), so the next sibling or the final draw
    can repeat it; the window past the tree keeps the exact rule, so only the tree walk is wrong."""

    def resample(self, p, q):
        return p

    def verify_window(self, *args):
        return ExactAcceptance().verify_window(*args)


class KeepsRejectedLeft(ExactAcceptance):
    """Broken: a rejected one-hot candidate (the left token) stays in the target, so the final draw can repeat it."""

    def verify_token(self, p, x, coins):
        return super().verify_token(p, x, coins)[0], p


@pytest.mark.parametrize("broken,siblings", [(KeepsRejected, "q"), (KeepsRejectedLeft, "left")])
def test_the_chi_square_test_catches_a_broken_tree_walk(one_thread, broken, siblings):
    model, sharp = make_gpt("c2i", vocab=4, block=4, seed=7), SamplingConfig(temperature=0.3)
    expected = exact_distribution(model, 1, sharp)
    n = 4 * N_SAMPLES  # the walk's error is small where q is close to p: the control needs the larger sample
    for acceptance, passes in ((ExactAcceptance(), True), (broken(), False)):
        tokens, _ = decode_sjd(model, torch.full((n,), 1), sharp, seeds=range(n), pac=True, window=3, init="random",
                               pac_width=2, pac_depth=2, pac_siblings=siblings, acceptance=acceptance)
        p_value = chi_square_p(tokens, expected, 4)
        assert (p_value > 1e-3) if passes else (p_value < 1e-6), (acceptance, p_value)


def test_naive_continuation_that_keeps_drafts_untested_is_not_lossless(one_thread, small, monkeypatch):
    """The naive reading of continuation: keep every later draft as it is, judged next pass against this pass's p."""
    monkeypatch.setattr(speculative, "couple", lambda new_q, old_q, old_draft, coins, u, where:
                        torch.where(where, old_draft, draw_categorical(new_q, u)))
    tokens, _ = sample(small, SHARP, window=3, init="left")
    assert chi_square_p(tokens, exact_distribution(small, 1, SHARP), 4) < 1e-6


def test_the_tree_is_the_window_plus_k_ary_branches():
    parents, depth, cand, children = pac_layout(5, 3, 2)
    assert parents[:5].tolist() == [0, 1, 2, 3, 4] and depth[:5].tolist() == [1, 2, 3, 4, 5]  # the window first
    assert len(parents) == 5 + 2 + 8  # level 1: 3 nodes (1 in the window), level 2: 9 (1 in the window)
    assert children[0].tolist() == [1, 6, 7] and children[1, 0] == 2  # root's candidates; main child = window
    assert all(depth[children[v, k] - 1] == 2 for v in children[0].tolist() for k in range(3))


def test_chains_continue_every_off_main_leaf_with_the_window_drafts():
    parents, depth, cand, children = pac_layout(6, 3, 1, 2)
    assert len(parents) == 6 + 2 * (1 + 2)  # two siblings at level 1, each with a chain of two drafts
    for sibling in children[0, 1:].tolist():
        a = children[sibling, 0].item()
        b = children[a, 0].item()
        assert depth[a - 1] == 2 and depth[b - 1] == 3 and cand[a - 1] == cand[b - 1] == 0  # the window's d_2, d_3
        assert children[b, 0] == -1  # the chain stops after C drafts
    assert children[1, 0] == 2  # the main leaf goes on as the window


def test_an_unknown_sibling_rule_is_refused(small):
    with pytest.raises(ValueError, match="unknown pac_siblings 'above'"):
        sample(small, SHARP, window=3, pac_siblings="above")


def test_a_chain_with_no_leaf_to_hang_from_is_refused(small):
    for width, depth, window in ((1, 2, 4), (3, 0, 4), (3, 1, 2)):
        with pytest.raises(ValueError, match="pac_chain=2 has nothing to continue"):
            sample(small, SHARP, window=window, pac_width=width, pac_depth=depth, pac_chain=2)


def test_left_candidates_repeat_the_parent_token_and_the_siblings_avoid_them():
    L, K, T, V = 4, 4, 2, 9
    layout = pac_layout(L, K, T)
    parents, depth, cand, children = layout
    drafts = torch.tensor([[1, 2, 3, 4]])
    q = torch.full((1, L, V), 1.0 / V)
    noise = torch.empty(1, T, V).exponential_(generator=torch.Generator().manual_seed(0))
    tok, fresh, q_sib = tree_tokens(torch.tensor([1]), drafts, q, layout, K, T, True, noise)
    kids = children[0].tolist()  # level 1: the draft, the left token (= last, here equal to the draft), a sibling
    assert tok[0, kids[0]] == 1 and tok[0, kids[1]] == 1 and not fresh[0, kids[1]]  # a repeat of the draft: skipped
    for parent in kids:  # level 2: each parent's left candidate is its own token, the siblings none of level 1's
        assert tok[0, children[parent, 0]] == 2 and tok[0, children[parent, 1]] == tok[0, parent]
        assert fresh[0, children[parent, 1]] == (tok[0, parent] != 2)
        level1 = set(tok[0, kids].tolist())
        for k in (2, 3):
            assert tok[0, children[parent, k]].item() not in level1 | {2}
    assert q_sib[0, 1, list(level1 | {2})].sum() == 0 and torch.isclose(q_sib[0, 1].sum(), torch.tensor(1.0))
    plain, _, _ = tree_tokens(torch.tensor([1]), drafts, q, layout, K, T, False, noise)
    assert plain[0, kids[1]] != 1  # the paper's rule: every sibling from q, none the draft


def test_siblings_are_draws_from_q_without_replacement():
    q = torch.tensor([0.15, 0.5, 0.3, 0.05, 0.0]).expand(1, 20000, 5)
    drafts = torch.ones(1, 20000, dtype=torch.long)
    q_l = drop_tokens(q[0], drafts[0, :, None])[None]  # the siblings' q: without the draft
    sib = sibling_drafts(q_l, 2, torch.empty(1, 20000, 5).exponential_(generator=torch.Generator().manual_seed(0)))
    assert sib.shape == (1, 20000, 2)
    assert (sib != 1).all() and (sib != 4).all() and (sib[..., 0] != sib[..., 1]).all()  # not the draft, q > 0, distinct
    first = torch.bincount(sib[0, :, 0], minlength=5).double() / 20000
    expected = torch.tensor([0.3, 0.0, 0.6, 0.1, 0.0], dtype=torch.double)  # q without the draft, renormalised
    assert (first - expected).abs().max() < 0.015


def test_pac_passes_fewer_and_names_compose(one_thread):
    model = make_gpt("c2i", vocab=16, block=16, seed=2)
    n = 256  # the tree saves a few percent of the passes here: enough samples to see it (1821 vs 1887)
    cond, sampling = torch.arange(n) % 5, SamplingConfig(top_k=8, temperature=0.5)
    _, plain = decode_sjd(model, cond, sampling, seeds=range(n), window=6, coupling="maximal")
    _, pac = get_method("sjd+coupling+pac", window=6)(model, cond, sampling, seeds=range(n))
    assert pac.method == "sjd+coupling+pac"
    assert sum(pac.per_sample_forward_passes) < sum(plain.per_sample_forward_passes)
    assert compose_method("sjd", "maximal", pac=True) == "sjd+coupling+pac"
    assert compose_method("sjd", "none", "lantern", pac=True) == "sjd+pac+lantern"
    with pytest.raises(ValueError):
        compose_method("sjd", "gumbel", "lantern", pac=True)
