"""EAGLE drafter + tree decoding: shapes, masks, trees, losslessness, LANTERN, errors, stats, recipe, CLI."""
import json
import os
import random

import pytest
import torch
from conftest import make_gpt
from test_speculative import chi_square_p, exact_distribution

from vargen.decoding.acceptance import ExactAcceptance
from vargen.cli import main
from vargen.decoding import SamplingConfig, decode_ar, get_method
from vargen.decoding.eagle import (STATIC_TREES, check_paths, decode_eagle, static_tree, tree_ancestors,
                                   tree_children)
from vargen.models import LlamaGen
from vargen.models.eagle import EagleDrafter, load_eagle
from vargen.pipeline import tiny_random_pipeline
from vargen.train.eagle import distill_dataset, eagle_loss

N_SAMPLES = 4000
SHARP = SamplingConfig(temperature=0.6)
TREES = [("dynamic", dict(depth=3, topk=2, total_tokens=6)), ("chain", dict(depth=2)), ("mc_sim_25", {})]


def make_drafter(gpt, seed=1, std=0.3):
    """A drafter for ``gpt`` with non-trivial random weights (its drafts are poor but not degenerate)."""
    drafter = EagleDrafter.from_target(gpt).eval()
    torch.manual_seed(seed)
    for p in drafter.parameters():
        torch.nn.init.normal_(p, 0.0, std)
    return drafter


@pytest.fixture(scope="module")
def small():
    """2 x 2 tokens over a 4-token vocabulary (256 images, enumerable), as in test_speculative."""
    gpt = make_gpt("c2i", vocab=4, block=4, seed=3)
    return gpt, make_drafter(gpt)


def conditions(model_type, B=3):
    if model_type == "t2i":
        torch.manual_seed(5)
        cond_mask = torch.ones(B, 6, dtype=torch.bool)
        cond_mask[0, :2] = False
        return torch.randn(B, 6, 24), cond_mask
    return torch.arange(B) % 5, None


# ----------------------------------------------------------------------------- the drafter
def test_drafter_shapes_and_save_load_round_trip(one_thread, tmp_path):
    gpt = make_gpt("t2i", vocab=48, block=16)
    drafter = make_drafter(gpt)
    B, T, dim = 2, 5, gpt.config.dim
    hidden, tokens = torch.randn(B, T, dim), torch.randint(0, 48, (B, T))
    positions = torch.arange(T).expand(B, T)
    with torch.no_grad():
        logits, feats = drafter(gpt, hidden, tokens=tokens, positions=positions)
        cache = drafter.new_cache(B, 8)
        cached, _ = drafter(gpt, hidden, tokens=tokens, positions=positions, slots=positions, cache=cache)
    assert logits.shape == (B, T, 48) and logits.dtype == torch.float32 and feats.shape == (B, T, dim)
    assert len(cache.k) == 1 and bool(cache.visible[:, :T].all()) and not bool(cache.visible[:, T:].any())
    torch.testing.assert_close(cached, logits)  # the cached causal forward is the plain causal forward
    # only the drafter's own weights are saved: fc and one block, nothing of the target
    keys = set(drafter.state_dict())
    assert keys and all(k.startswith(("fc.", "layer.")) for k in keys)
    drafter.save_pretrained(tmp_path / "eagle")
    files = sorted(os.listdir(tmp_path / "eagle"))
    assert len(files) == 2 and files[0] == "config.json" and files[1].endswith(".safetensors")
    again = load_eagle(str(tmp_path / "eagle"))
    assert not again.training and again.config.dim == dim and again.config.vocab_size == 48
    with torch.no_grad():
        assert torch.equal(again(gpt, hidden, tokens=tokens, positions=positions)[0], logits)
    n_params = sum(p.numel() for p in drafter.parameters())
    assert n_params < sum(p.numel() for p in gpt.parameters())


def test_mismatched_or_missing_drafter_fails_clearly(tmp_path):
    gpt = make_gpt("c2i", vocab=48, block=16)
    other = make_drafter(make_gpt("c2i", vocab=64, block=16))
    with pytest.raises(ValueError, match="does not match the target model .*vocab_size 64 \\(drafter\\) vs 48 "
                                         "\\(target\\).*vargen train eagle"):
        decode_eagle(gpt, torch.tensor([0]), weights=other)
    wide = make_drafter(LlamaGen.from_size("GPT-tiny", vocab_size=48, block_size=36, dim=128, num_classes=5))
    with pytest.raises(ValueError, match="dim 128 \\(drafter\\) vs 64 \\(target\\).*block_size 36"):
        decode_eagle(gpt, torch.tensor([0]), weights=wide)
    with pytest.raises(FileNotFoundError, match="no EAGLE drafter at .*vargen train eagle --config"):
        decode_eagle(gpt, torch.tensor([0]), weights=str(tmp_path / "none"))
    with pytest.raises(FileNotFoundError, match="not loaded from a folder.*--eagle PATH"):
        decode_eagle(gpt, torch.tensor([0]))
    gpt.save_pretrained(tmp_path / "gpt")
    with pytest.raises(ValueError, match="holds a LlamaGen checkpoint, not an EAGLE drafter"):
        decode_eagle(gpt, torch.tensor([0]), weights=str(tmp_path / "gpt"))
    with pytest.raises(FileNotFoundError, match="the model has none"):
        decode_eagle(LlamaGen.from_pretrained(str(tmp_path / "gpt")), torch.tensor([0]))


# ----------------------------------------------------------------------------- trees and masks
def brute_ancestors(parents):
    """Node j is node i or an ancestor of node i, by walking parent pointers (index 0 = root)."""
    M = len(parents)
    out = torch.zeros(M + 1, M + 1, dtype=torch.bool)
    for i in range(M + 1):
        out[i, 0] = True
        j = i
        while j > 0:
            out[i, j] = True
            j = parents[j - 1] + 1
    return out


def random_tree(rng, M):
    parents = []
    for i in range(M):
        parents.append(rng.randrange(-1, i))  # any earlier node or the root
    return parents


def test_tree_mask_equals_a_brute_force_ancestor_construction():
    rng = random.Random(0)
    trees = [random_tree(rng, M) for M in (1, 3, 7, 12, 20) for _ in range(4)]
    for parents in trees:
        got = tree_ancestors(torch.tensor([parents]), len(parents))[0]  # any bound >= the depth
        assert torch.equal(got, brute_ancestors(parents)), parents
    for name in STATIC_TREES:  # the static trees, with their own depth as the bound
        par, _, depths = static_tree(name)
        assert torch.equal(tree_ancestors(torch.tensor([par]), max(depths))[0], brute_ancestors(par))


def test_verify_pass_attends_to_the_committed_context_and_the_ancestors(one_thread):
    """The mask the target gets in a verify pass is, for every node, the committed slots + its tree ancestors."""
    gpt = make_gpt("t2i", vocab=10, block=16)
    drafter = make_drafter(gpt)
    cond, cond_mask = conditions("t2i", B=2)
    seen = []

    def hook(module, args, kwargs):
        if kwargs.get("tokens") is not None:
            seen.append((kwargs["slots"].clone(), kwargs["mask"].clone()))

    handle = gpt.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        decode_eagle(gpt, cond, SamplingConfig(cfg_scale=2.0), [0, 1], cond_mask=cond_mask, weights=drafter,
                     tree="dynamic", depth=3, topk=3, total_tokens=7)
    finally:
        handle.remove()
    P = gpt.prefix_len
    for slots, mask in seen:
        for b in range(2):  # the cond row of each sample (the uncond rows are the same)
            n1 = int(slots[b, 0]) - P  # slot of the last committed token c
            tree = mask[b, :, P + n1:P + n1 + slots.shape[1]]
            # every node sees c, itself, and the tree part of the mask is ancestor-closed and a forest under c
            assert bool(tree[:, 0].all()) and bool(tree.diagonal().all())
            parents = [int(tree[i, 1:i].nonzero()[-1]) if tree[i, 1:i].any() else -1 for i in range(1, len(tree))]
            assert torch.equal(tree, brute_ancestors(parents))
            # committed context: the real caption tokens and every image slot before c, nothing after the tree
            ctx = mask[b, :, :P + n1]
            assert torch.equal(ctx[:, :P], cond_mask[b].expand(len(tree), -1))
            assert bool(ctx[:, P:].all())
            assert not bool(mask[b, :, P + n1 + slots.shape[1]:].any())


def test_static_topologies_are_valid_trees():
    for name in [*STATIC_TREES, "chain"]:
        par, ranks, depths = static_tree(name, depth=4)
        assert len(par) == len(ranks) == len(depths) > 0
        for i, p in enumerate(par):
            assert p < i  # parents come first
            assert depths[i] == (1 if p < 0 else depths[p] + 1)
            siblings = [ranks[j] for j in range(len(par)) if par[j] == p]
            assert sorted(siblings) == list(range(len(siblings)))  # ranks 0..k-1, no gaps
        if name in STATIC_TREES:
            check_paths(STATIC_TREES[name])
    assert static_tree("chain", depth=4)[0] == [-1, 0, 1, 2]
    assert len(static_tree("mc_sim_25")[0]) == 25 and max(static_tree("mc_sim_25")[2]) == 3
    assert max(static_tree("mc_sim_25", vocab_size=4)[1]) == 3  # ranks beyond the vocabulary are pruned
    for bad, why in [([(0,), (0,)], "twice"), ([(0, 0)], "no parent"), ([(0,), (2,)], "sibling rank 1"),
                     ([()], "non-empty")]:
        with pytest.raises(ValueError, match=why):
            check_paths(bad)
    with pytest.raises(ValueError, match="unknown draft tree"):
        static_tree("nope")


def test_tree_children_lists_siblings_in_rank_order():
    parents = torch.tensor([[-1, -1, 0, 0, 1, 2]])
    kids = tree_children(parents, 3)
    assert kids[0].tolist() == [[1, 2, -1], [3, 4, -1], [5, -1, -1], [6, -1, -1], [-1, -1, -1], [-1, -1, -1],
                                [-1, -1, -1]]



def test_closed_form_sibling_tries_equal_the_sequential_rule():
    """Exact acceptance tries a node's siblings in one pass (accept sibling r with p(t_r) / (1 - S), S the elder
    siblings' mass); it must pick the same sibling and leave the same final distribution as K calls of
    verify_token with their renormalisations (the rule LANTERN and test rules still run)."""

    class Sequential(ExactAcceptance):  # same rule, forced through the generic loop
        def verify_token(self, p, x, coins):
            return super().verify_token(p, x, coins)

    g = torch.Generator().manual_seed(0)
    B, K, V = 4000, 4, 12
    p = torch.rand(B, V, generator=g).pow(3)
    p[:, :3] *= 20  # a few heavy tokens, so siblings are often accepted after a rejection
    p /= p.sum(-1, keepdim=True)
    tokens = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(B)])
    tried = torch.rand(B, K, generator=g) < 0.8
    coins = torch.rand(B, K, generator=g)
    fast, fast_left = ExactAcceptance().try_siblings(p, tokens, tried, coins)
    slow, slow_left = Sequential().try_siblings(p, tokens, tried, coins)
    assert torch.equal(fast, slow) and 0.2 < fast.any(1).float().mean() < 0.95
    assert (fast.sum(1) <= 1).all() and not (fast & ~tried).any()
    none = ~fast.any(1)  # where no sibling is accepted, the final draw's distributions agree
    norm = lambda x: x / x.sum(-1, keepdim=True)
    torch.testing.assert_close(norm(fast_left[none]), norm(slow_left[none]))
    assert (fast_left[none].gather(1, tokens[none]) * tried[none] == 0).all()

# ----------------------------------------------------------------------------- decoding
@pytest.mark.parametrize("model_type", ["c2i", "t2i"])
def test_greedy_eagle_is_greedy_ar_for_every_tree(one_thread, model_type):
    """Temperature 0: exact acceptance accepts a draft iff it is the argmax, so the output is greedy AR; any
    error in the tree mask, positions or the KV copy of accepted nodes would change later tokens."""
    gpt = make_gpt(model_type, vocab=10, block=16)
    drafter = make_drafter(gpt, std=0.2)
    cond, cond_mask = conditions(model_type)
    for sampling in (SamplingConfig(temperature=0), SamplingConfig(cfg_scale=3.0, temperature=0)):
        ar, _ = decode_ar(gpt, cond, sampling, cond_mask=cond_mask)
        for tree, kw in [("dynamic", dict(depth=4, topk=3, total_tokens=10)), ("chain", dict(depth=3)),
                         ("mc_sim_25", {})]:
            tokens, stats = decode_eagle(gpt, cond, sampling, cond_mask=cond_mask, weights=drafter, tree=tree, **kw)
            assert torch.equal(tokens, ar), (tree, sampling)
            assert stats.extra["mean_accepted_drafts"] > 0  # drafts were accepted, so the KV copy was exercised


@pytest.mark.parametrize("tree,options", TREES)
def test_eagle_samples_follow_the_exact_ar_distribution(one_thread, small, tree, options):
    gpt, drafter = small
    expected = exact_distribution(gpt, 1, SHARP)
    tokens, stats = decode_eagle(gpt, torch.full((N_SAMPLES,), 1), SHARP, seeds=range(N_SAMPLES), weights=drafter,
                                 tree=tree, **options)
    assert chi_square_p(tokens, expected, 4) > 0.01
    assert stats.extra["mean_accepted_drafts"] > 0.2 and stats.extra["step_compression"] > 1.0


def test_eagle_is_exact_with_cfg_and_top_k(one_thread, small):
    gpt, drafter = small
    sampling = SamplingConfig(cfg_scale=2.0, temperature=0.8, top_k=3)
    expected = exact_distribution(gpt, 1, sampling)
    tokens, _ = decode_eagle(gpt, torch.full((N_SAMPLES,), 1), sampling, seeds=range(N_SAMPLES), weights=drafter,
                             tree="dynamic", depth=2, topk=3, total_tokens=5)
    assert chi_square_p(tokens, expected, 4) > 0.01


def test_the_test_fails_without_the_renormalisation(one_thread, small):
    """Power check: a residual that zeroes a rejected sibling but does not renormalise accepts the next sibling
    with ``p(x)`` instead of ``p(x) / (1 - p(rejected))``; the chi-square test must catch it."""
    gpt, drafter = small

    class NoRenormalisation(ExactAcceptance):
        def verify_token(self, p, x, coins):
            passed, _ = super().verify_token(p, x, coins)
            keep = torch.ones_like(p, dtype=torch.bool)
            keep.scatter_(1, x[:, None], False)
            return passed, p * keep

    expected = exact_distribution(gpt, 1, SHARP)
    tokens, _ = decode_eagle(gpt, torch.full((N_SAMPLES,), 1), SHARP, seeds=range(N_SAMPLES), weights=drafter,
                             tree="dynamic", depth=3, topk=2, total_tokens=6, acceptance=NoRenormalisation())
    assert chi_square_p(tokens, expected, 4) < 1e-4


def test_lantern_with_delta_zero_is_exact_and_positive_delta_accepts_more(one_thread):
    gpt = make_gpt("c2i", vocab=16, block=16, seed=2)
    drafter = make_drafter(gpt)
    torch.manual_seed(0)
    codebook = torch.randn(16, 4)
    cond, seeds, sampling = torch.arange(64) % 5, range(64), SamplingConfig(cfg_scale=2.0)
    exact, s_exact = decode_eagle(gpt, cond, sampling, seeds, weights=drafter, depth=4, topk=3, total_tokens=12)
    zero, s_zero = get_method("eagle+lantern", codebook=codebook, lantern_delta=0.0, weights=drafter, depth=4,
                              topk=3, total_tokens=12)(gpt, cond, sampling, seeds)
    assert torch.equal(zero, exact) and s_zero.method == "eagle+lantern"
    assert s_zero.extra["acceptance"] == "lantern"
    _, s_lantern = get_method("eagle+lantern", codebook=codebook, lantern_delta=0.3, weights=drafter, depth=4,
                              topk=3, total_tokens=12)(gpt, cond, sampling, seeds)
    assert s_lantern.extra["mean_accepted"] > s_exact.extra["mean_accepted"]
    assert s_lantern.forward_passes <= s_exact.forward_passes
    _, s_lam = get_method("eagle+lantern", codebook=codebook, lantern_lambda=5.0, weights=drafter,
                          tree="chain")(gpt, cond, sampling, seeds)
    assert s_lam.extra["mean_accepted"] >= 1
    with pytest.raises(ValueError, match="takes no option"):
        get_method("eagle", lantern_delta=0.1)


def test_decode_stats_are_consistent_and_samples_are_batch_invariant(one_thread):
    gpt = make_gpt("t2i", vocab=10, block=16)
    drafter = make_drafter(gpt)
    cond, cond_mask = conditions("t2i")
    sampling = SamplingConfig(cfg_scale=2.0, temperature=0.9)
    tokens, stats = decode_eagle(gpt, cond, sampling, [4, 5, 6], cond_mask=cond_mask, weights=drafter, depth=3,
                                 topk=3, total_tokens=8)
    N, B = gpt.num_tokens, 3
    passes = stats.per_sample_forward_passes
    assert sum(k * v for k, v in stats.accepted_hist.items()) == B * N  # every token committed once
    assert sum(stats.accepted_hist.values()) == sum(passes)  # one entry per sample per target pass
    assert stats.forward_passes == max(passes)
    assert stats.extra["step_compression"] == pytest.approx(N / (sum(passes) / B))
    assert stats.extra["drafter_passes"] == 1 + 3 * (stats.forward_passes - 1)  # prefill + depth per pass
    verify = sum(passes) - B
    assert stats.extra["mean_accepted"] == pytest.approx((B * N - B) / verify)
    # a pass that accepts drafts up to the last cell has no token after them, else accepted drafts + 1
    assert stats.extra["mean_accepted"] - 1 <= stats.extra["mean_accepted_drafts"] <= stats.extra["mean_accepted"]
    assert max(stats.accepted_hist) <= 3 + 1 and stats.method == "eagle"
    assert stats.extra["tree"] == "dynamic" and stats.extra["tree_tokens"] == 8 and len(
        stats.extra["accepted_cells"]) == N
    alone, s = decode_eagle(gpt, cond[1:2], sampling, [5], cond_mask=cond_mask[1:2], weights=drafter, depth=3,
                            topk=3, total_tokens=8)
    assert torch.equal(alone[0], tokens[1]) and s.per_sample_forward_passes == [passes[1]]
    with pytest.raises(ValueError, match="topk and total_tokens are for tree='dynamic'"):
        decode_eagle(gpt, cond, sampling, cond_mask=cond_mask, weights=drafter, tree="chain", topk=2)
    with pytest.raises(ValueError, match="unknown draft tree"):
        decode_eagle(gpt, cond, sampling, cond_mask=cond_mask, weights=drafter, tree="bush")


# ----------------------------------------------------------------------------- training
def test_distillation_features_reproduce_the_target_and_training_reduces_the_loss(one_thread):
    gpt = make_gpt("c2i", vocab=16, block=16, seed=4).requires_grad_(False)
    config = {"num_samples": 6, "sample_batch_size": 6, "sampling": {"cfg_scale": 2.0}}  # rows: 6 cond, 6 null
    data = distill_dataset(config, gpt)
    assert data["tokens"].shape == (12, 16) and data["features"].shape == (12, 1 + 15, gpt.config.dim)
    with torch.no_grad():  # the stored features give the target's own teacher-forced logits
        logits = gpt.forward_train(data["tokens"][:6], torch.arange(6) % 5)
        null = gpt.forward_train(data["tokens"][6:], torch.arange(6) % 5, null=True)
    torch.testing.assert_close(gpt.output(data["features"][:6]), logits)
    torch.testing.assert_close(gpt.output(data["features"][6:]), null)
    drafter = EagleDrafter.from_target(gpt).train()
    opt = torch.optim.Adam(drafter.parameters(), lr=3e-3)
    torch.manual_seed(0)
    losses = []
    for _ in range(15):
        loss, metrics = eagle_loss(drafter, gpt, data, torch.arange(12))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-3:]) < sum(losses[:3]) and losses[-1] < losses[0] and 0 <= float(metrics["top1"]) <= 1
    assert all(p.grad is None for p in gpt.parameters())  # the target stays frozen


def test_eagle_recipe_cli_train_generate_and_bench(one_thread, tmp_path, capsys):
    pipe = tiny_random_pipeline()
    pipe.save_pretrained(tmp_path / "model")
    config = {"init": str(tmp_path / "model" / "gpt"), "num_samples": 4, "sample_batch_size": 4,
              "sampling": {"cfg_scale": 2.0}, "steps": 3, "batch_size": 4, "lr": 1e-3, "warmup": 1,
              "grad_clip": 0.5, "log_every": 1}
    cfg_path = tmp_path / "eagle.json"
    cfg_path.write_text(json.dumps(config))
    assert main(["train", "eagle", "--config", str(cfg_path), "--out", str(tmp_path / "run")]) == 0
    drafter = load_eagle(str(tmp_path / "run" / "eagle"))
    assert drafter.config.vocab_size == pipe.gpt.vocab_size
    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all("reg" in r and "ce" in r for r in rows)
    drafter.save_pretrained(tmp_path / "model" / "eagle")  # the model's own drafter: the default
    out, st = tmp_path / "img.png", tmp_path / "stats.json"
    assert main(["generate", "class1", "--model", str(tmp_path / "model"), "-o", str(out), "--quiet",
                 "--method", "eagle", "--eagle-tree", "chain", "--eagle-depth", "3", "--stats", str(st)]) == 0
    stats = json.loads(st.read_text())
    assert stats["method"] == "eagle" and stats["extra"]["tree"] == "chain" and stats["tokens"] == 64
    assert main(["bench", "speed", "--model", str(tmp_path / "model"), "--methods", "ar,eagle,eagle+lantern", "-n",
                 "2", "--batch-size", "2", "--eagle", str(tmp_path / "run" / "eagle"), "--eagle-topk", "4",
                 "--eagle-tokens", "16"]) == 0
    text = capsys.readouterr().out
    assert "| eagle |" in text and "| eagle+lantern |" in text
    assert main(["generate", "class1", "--model", "tiny-random", "-o", str(out), "--quiet",
                 "--eagle", str(tmp_path / "run" / "eagle")]) == 2
    assert "--eagle is not taken by ar; it is for eagle, eagle+lantern" in capsys.readouterr().err
    assert main(["generate", "class1", "--model", "tiny-random", "-o", str(out), "--quiet", "--method",
                 "eagle"]) == 2
    assert "vargen train eagle --config" in capsys.readouterr().err


def test_dynamic_tree_defaults_are_smaller_on_a_cpu_and_options_override_them():
    from vargen.decoding.eagle import CPU_DYNAMIC, DEFAULTS, TreeShape

    gpu, cpu = TreeShape.make("dynamic", None, None, None, 4096), TreeShape.make("dynamic", None, None, None, 4096,
                                                                                  cpu=True)
    assert (gpu.D, gpu.K, gpu.M) == tuple(DEFAULTS["dynamic"][k] for k in ("depth", "topk", "total_tokens"))
    assert (cpu.D, cpu.K, cpu.M) == tuple(CPU_DYNAMIC[k] for k in ("depth", "topk", "total_tokens"))
    assert cpu.M < gpu.M
    given = TreeShape.make("dynamic", 6, 8, 40, 4096, cpu=True)
    assert (given.D, given.K, given.M) == (6, 8, 40)
