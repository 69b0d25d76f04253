import numpy as np
import pytest
import torch
from scipy import stats

from vargen.decoding import (DecodeSession, SamplingConfig, decode_ar, filter_logits, guided_logits,
                             logits_to_probs, make_generators, sample_categorical)

from conftest import make_gpt


def test_exact_categorical_sampler_passes_chi_square():
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1, 0.0])
    gens = make_generators([123])
    draws = torch.stack([sample_categorical(probs[None], gens) for _ in range(20000)]).flatten()
    counts = np.bincount(draws.numpy(), minlength=5)
    assert counts[4] == 0, "a zero-probability token was drawn"
    _, pvalue = stats.chisquare(counts[:4], 20000 * probs[:4].numpy())
    assert pvalue > 1e-3


def test_exponential_noise_is_exp1_and_never_zero():
    """The Exp(1) noise behind every draw (``-log(1 - U)``): a Kolmogorov-Smirnov test against Exp(1) passes,
    and fails for Exp(1.1) noise (the control); no value is 0, so ``p / E`` is never 0 / 0."""
    from vargen.decoding.sampling import exponential_noise

    noise = exponential_noise((50000,), make_generators([7]))[0].double().numpy()
    assert stats.kstest(noise, "expon").pvalue > 1e-3
    assert stats.kstest(noise / 1.1, "expon").pvalue < 1e-6
    assert noise.min() > 0


def test_chi_square_detects_a_wrong_sampler():
    """Power check: the same test rejects draws from a slightly different distribution."""
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1])
    wrong = torch.tensor([0.45, 0.3, 0.15, 0.1])
    draws = sample_categorical(wrong.expand(20000, 4).contiguous(), make_generators(range(20000)))
    _, pvalue = stats.chisquare(np.bincount(draws.numpy(), minlength=4), 20000 * probs.numpy())
    assert pvalue < 1e-6


def test_sampling_is_reproducible_and_per_sample():
    probs = torch.softmax(torch.randn(3, 100), -1)
    a = sample_categorical(probs, make_generators([1, 2, 3]))
    b = sample_categorical(probs, make_generators([1, 2, 3]))
    assert torch.equal(a, b)
    # sample 1 depends only on its own seed, not on the rest of the batch
    c = sample_categorical(probs[1:2], make_generators([2]))
    assert c.item() == a[1].item()


def test_top_k_keeps_exactly_k_support():
    logits = torch.tensor([[3.0, 1.0, 2.0, 0.5, -1.0, 2.5]])
    kept = torch.isfinite(filter_logits(logits, top_k=3))
    assert kept.tolist() == [[True, False, True, False, False, True]]


def test_top_p_keeps_smallest_set_reaching_p():
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    logits = probs.log()
    assert torch.isfinite(filter_logits(logits, top_p=0.65)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.7 + 1e-4)).tolist() == [[True, True, True, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.3)).tolist() == [[True, False, False, False]]
    p = logits_to_probs(logits, SamplingConfig(top_p=0.65))
    torch.testing.assert_close(p, torch.tensor([[4 / 7, 3 / 7, 0.0, 0.0]]))


def test_cfg_combines_halves_in_fp32():
    cond, uncond = torch.randn(2, 10), torch.randn(2, 10)
    out = guided_logits(torch.cat([cond, uncond]).half(), 3.0)
    assert out.dtype == torch.float32 and out.shape == (2, 10)
    torch.testing.assert_close(out, uncond.half().float() + 3 * (cond.half().float() - uncond.half().float()))


def test_temperature_zero_is_greedy():
    logits = torch.tensor([[0.1, 2.0, 1.0]])
    assert logits_to_probs(logits, SamplingConfig(temperature=0)).tolist() == [[0.0, 1.0, 0.0]]


@pytest.mark.parametrize("config, message", [
    (SamplingConfig(temperature=-0.5), "temperature must be >= 0"),
    (SamplingConfig(top_k=49), r"top_k must be in \[0, 48\]"),
    (SamplingConfig(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (SamplingConfig(cfg_scale=-1.0), "cfg_scale must be >= 0"),
])
def test_bad_sampling_arguments_fail_clearly(config, message):
    with pytest.raises(ValueError, match=message):
        config.validate(vocab_size=48)


def test_cfg_without_null_condition_fails_clearly():
    model = make_gpt("c2i", class_dropout_prob=0.0)
    assert not model.has_null_condition
    with pytest.raises(ValueError, match="needs a null condition.*cfg_scale=1"):
        decode_ar(model, torch.tensor([0]), SamplingConfig(cfg_scale=2.0))


def test_nan_logits_raise():
    with pytest.raises(FloatingPointError, match="1 non-finite logits"):
        logits_to_probs(torch.tensor([[0.0, float("nan")]]), SamplingConfig())


def test_non_finite_rows_counts_every_kind_of_bad_position():
    from vargen.decoding.sampling import non_finite_rows

    logits = torch.zeros(2, 5, 8)
    logits[0, 0, 1] = float("nan")
    logits[0, 2, 3] = float("inf")
    logits[1, 1, 0] = -float("inf")
    logits[1, 3, 2], logits[1, 3, 5] = float("inf"), -float("inf")  # +inf and -inf in one row sum to NaN
    logits[1, 4] = 3e37  # large but finite: a vocabulary's sum stays finite
    assert int(non_finite_rows(logits)) == 4
    assert int(non_finite_rows(torch.randn(3, 7, 64))) == 0


def test_nan_weights_fail_decoding_clearly():
    model = make_gpt("c2i")
    with torch.no_grad():
        model.output.weight[3, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite logits.*dtype"):
        decode_ar(model, torch.tensor([0]), SamplingConfig())


def test_greedy_ar_matches_full_recomputation(c2i):
    """Plain AR through the cache gives the tokens a cache-free greedy loop gives."""
    cond = torch.tensor([1, 4])
    tokens, stats = decode_ar(c2i, cond, SamplingConfig(temperature=0))
    ref = torch.zeros(2, 16, dtype=torch.long)
    for k in range(16):
        logits = c2i.forward_train(torch.cat([ref[:, :k], torch.zeros(2, 1, dtype=torch.long)], 1), cond,
                                   train=False)
        ref[:, k] = logits[:, k].argmax(-1)
    assert torch.equal(tokens, ref)
    assert stats.forward_passes == 16 and stats.tokens == 16 and stats.accepted_hist == {1: 32}


def test_ar_with_cfg_matches_guided_recomputation(c2i):
    cond = torch.tensor([2])
    cfg = SamplingConfig(cfg_scale=3.0, temperature=0)
    tokens, _ = decode_ar(c2i, cond, cfg)
    for k in [0, 5, 15]:
        seq = torch.cat([tokens[:, :k], torch.zeros(1, 1, dtype=torch.long)], 1)
        lc = c2i.forward_train(seq, cond, train=False)[:, k]
        # the null prefix through the same forward: use the protocol directly
        session = DecodeSession(c2i, cond, SamplingConfig(cfg_scale=3.0))
        assert session.prefix.shape[0] == 2
        lu = c2i.forward(embeds=torch.cat([session.prefix[1:], c2i.tok_embeddings(seq[:, :-1])], 1),
                         positions=torch.cat([torch.tensor([-1]), torch.arange(k)])[None])[:, -1]
        assert tokens[0, k].item() == (lu + 3.0 * (lc - lu)).argmax().item()


def test_ar_samples_are_reproducible_across_batch_composition(c2i):
    cfg = SamplingConfig(cfg_scale=2.0, top_k=20)
    batch, _ = decode_ar(c2i, torch.tensor([0, 3, 1]), cfg, seeds=[10, 11, 12])
    alone, _ = decode_ar(c2i, torch.tensor([3]), cfg, seeds=[11])
    assert torch.equal(batch[1], alone[0])
    again, _ = decode_ar(c2i, torch.tensor([0, 3, 1]), cfg, seeds=[10, 11, 12])
    assert torch.equal(batch, again)


def test_ar_first_token_distribution_is_exact(c2i):
    """Thousands of seeded first tokens follow the model's first-position distribution (chi-square)."""
    cfg = SamplingConfig(temperature=1.5, top_k=8)
    n = 3000
    session = DecodeSession(c2i, torch.tensor([2]), cfg)
    p = session.prefill()[0]
    first = sample_categorical(p.expand(n, -1).contiguous(), make_generators(range(n)))
    counts = np.bincount(first.numpy(), minlength=c2i.vocab_size)
    support = p > 0
    assert counts[~support.numpy()].sum() == 0 and int(support.sum()) == 8
    expected = p[support].double().numpy()
    _, pvalue = stats.chisquare(counts[support.numpy()], n * expected / expected.sum())
    assert pvalue > 1e-3
    # and decode_ar draws its first token the same way
    tokens, _ = decode_ar(c2i, torch.tensor([2] * 4), cfg, seeds=[0, 1, 2, 3])
    assert torch.equal(tokens[:, 0], first[:4])
