import pytest
import torch

from vargen.decoding import SamplingConfig, decode_ar, decode_sjd, decode_zipar, zipar_schedule


@pytest.mark.parametrize("H,W,s", [(4, 4, 1), (4, 4, 2), (16, 16, 8), (8, 6, 3), (5, 7, 7)])
def test_schedule_predicts_every_cell_once_from_its_raster_predecessor_or_a_proxy(H, W, s):
    steps = zipar_schedule(H, W, s)
    targets = [t for step in steps for _, _, t in step if t >= 0]
    assert sorted(targets) == list(range(1, H * W))
    seen = {0}
    for step in steps:
        for src, slot, target in step:
            assert src in seen  # only generated tokens are fed
            if target >= 0:
                assert slot == target - 1  # the input sits at the predicted cell's raster predecessor
                assert src == slot or (target % W == 0 and src // W == target // W - 1)  # else a row-above proxy
        seen |= {t for _, _, t in step if t >= 0}
    if s < W:
        assert len(steps) + 1 < H * W and any(src != slot for step in steps for src, slot, _ in step)


def test_step_count_matches_the_row_lead():
    assert len(zipar_schedule(16, 16, 8)) + 1 == 136  # 15 rows x 8 of lead + 16 for the last row
    assert len(zipar_schedule(4, 4, 1)) + 1 == 4 + 4 - 1  # lead 1: anti-diagonal wavefront
    with pytest.raises(ValueError, match="window must be >= 1"):
        zipar_schedule(4, 4, 0)


def test_full_row_window_is_exactly_ar(c2i):
    sampling = SamplingConfig(cfg_scale=2.0, top_k=10)
    ar, _ = decode_ar(c2i, torch.arange(3), sampling, seeds=[5, 6, 7])
    zipar, stats = decode_zipar(c2i, torch.arange(3), sampling, seeds=[5, 6, 7], window=4)
    assert torch.equal(ar, zipar) and stats.forward_passes == 16


def _garbage_cache(model, monkeypatch):
    """Fill fresh caches with large values: attending an unwritten slot would change the output."""
    original = model.new_cache

    def new_cache(*args, **kwargs):
        cache = original(*args, **kwargs)
        for buf in cache.k + cache.v:
            buf.fill_(1e3)
        return cache

    monkeypatch.setattr(model, "new_cache", new_cache)


@pytest.mark.parametrize("decode", [lambda m, c, s: decode_zipar(m, c, s, window=1),
                                    lambda m, c, s: decode_sjd(m, c, s, window=5, init="random")])
def test_no_query_attends_an_empty_or_rolled_back_slot(c2i, monkeypatch, decode):
    sampling = SamplingConfig(top_k=10)
    cond = torch.arange(3)
    clean, _ = decode(c2i, cond, sampling)
    _garbage_cache(c2i, monkeypatch)
    dirty, _ = decode(c2i, cond, sampling)
    assert torch.equal(clean, dirty)


# ------------------------------------------------------------------------------- adaptive window
from conftest import make_gpt  # noqa: E402
from test_speculative import N_SAMPLES, SHARP, chi_square_p, exact_distribution  # noqa: E402

from vargen.decoding.zipar_adaptive import decode_zipar_adaptive  # noqa: E402


@pytest.fixture(scope="module")
def grid8():
    return make_gpt("c2i", block=64)  # 8 x 8 tokens


@pytest.mark.parametrize("s", [1, 3, 8])
def test_adaptive_with_no_early_start_is_fixed_zipar(grid8, s):
    greedy = SamplingConfig(temperature=0, cfg_scale=2.0)
    fixed, fs = decode_zipar(grid8, torch.arange(3), greedy, window=s)
    adaptive, stats = decode_zipar_adaptive(grid8, torch.arange(3), greedy, window=s, min_window=s)
    assert torch.equal(fixed, adaptive) and stats.per_sample_forward_passes == [fs.forward_passes] * 3
    assert sum(stats.extra["first_token_checks"]) == 0


@pytest.mark.parametrize("window,min_window", [(4, 1), (4, 2), (6, 3)])
def test_adaptive_passes_lie_between_the_two_fixed_windows(grid8, window, min_window):
    sampling = SamplingConfig(cfg_scale=2.0)
    cond, seeds = torch.arange(6) % 5, range(6)
    _, short = decode_zipar(grid8, cond, sampling, seeds=seeds, window=min_window)
    _, long = decode_zipar(grid8, cond, sampling, seeds=seeds, window=window)
    tokens, stats = decode_zipar_adaptive(grid8, cond, sampling, seeds=seeds, window=window, min_window=min_window)
    assert all(short.forward_passes <= p <= long.forward_passes for p in stats.per_sample_forward_passes)
    assert sum(stats.extra["first_token_checks"]) > 0 and 0 <= tokens.min() and tokens.max() < grid8.vocab_size


def test_adaptive_restarts_never_attend_discarded_slots(grid8, monkeypatch):
    sampling = SamplingConfig(top_k=10)
    cond = torch.arange(5)
    clean, stats = decode_zipar_adaptive(grid8, cond, sampling, window=4, min_window=1)
    assert sum(stats.extra["first_token_rejections"]) > 0  # restarts happened
    _garbage_cache(grid8, monkeypatch)
    dirty, _ = decode_zipar_adaptive(grid8, cond, sampling, window=4, min_window=1)
    assert torch.equal(clean, dirty)


def test_adaptive_samples_do_not_depend_on_the_batch(grid8):
    sampling = SamplingConfig(cfg_scale=2.0)
    batch, _ = decode_zipar_adaptive(grid8, torch.tensor([0, 3, 4]), sampling, seeds=[7, 8, 9], window=4)
    alone, _ = decode_zipar_adaptive(grid8, torch.tensor([3]), sampling, seeds=[8], window=4)
    assert torch.equal(batch[1], alone[0])


def test_checking_with_the_full_row_makes_a_two_row_grid_exact():
    """On 2 x 2 tokens with window 2, each first token is checked against the AR context, so adaptive
    ZipAR samples the exact AR distribution, which fixed ZipAR with its proxy does not."""
    small = make_gpt("c2i", vocab=4, block=4, seed=3)
    expected = exact_distribution(small, 1, SHARP)
    cond = torch.full((N_SAMPLES,), 1)
    tokens, stats = decode_zipar_adaptive(small, cond, SHARP, seeds=range(N_SAMPLES), window=2, min_window=1)
    assert chi_square_p(tokens, expected, 4) > 1e-3
    assert 0 < sum(stats.extra["first_token_rejections"]) < N_SAMPLES  # the check acts, and not always
    approximate, _ = decode_zipar(small, cond, SHARP, seeds=range(N_SAMPLES), window=1)
    assert chi_square_p(approximate, expected, 4) < 1e-6


def test_adaptive_window_arguments():
    with pytest.raises(ValueError, match="1 <= min_window <= window"):
        decode_zipar_adaptive(make_gpt("c2i"), torch.arange(2), window=2, min_window=3)


def test_adaptive_window_wider_than_the_row_finishes_as_the_full_row(one_thread):
    """A lead beyond the row width used to wait forever for a check that never came (4-wide rows, window 8)."""
    from conftest import make_gpt

    gpt = make_gpt("c2i", vocab=48, block=16, grid_rows=4)
    wide, ws = decode_zipar_adaptive(gpt, torch.arange(2), SamplingConfig(), seeds=[0, 1], window=8)
    full, fs = decode_zipar_adaptive(gpt, torch.arange(2), SamplingConfig(), seeds=[0, 1], window=4, min_window=4)
    assert torch.equal(wide, full) and ws.per_sample_forward_passes == fs.per_sample_forward_passes
