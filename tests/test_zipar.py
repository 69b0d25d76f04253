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
