"""PJD-style 2D Jacobi windows: one row is SJD (greedy = greedy AR); several rows cut passes (approximately)."""
import pytest
import torch
from conftest import make_gpt

from vargen.decoding import SamplingConfig, decode_ar, get_method
from vargen.decoding.pjd import decode_pjd


def test_one_active_row_is_sjd_so_greedy_pjd_is_greedy_ar(one_thread):
    model, greedy = make_gpt("c2i", vocab=16, block=16, seed=2), SamplingConfig(temperature=0.0)
    ar, _ = decode_ar(model, torch.arange(4), greedy, seeds=range(4))
    tokens, stats = decode_pjd(model, torch.arange(4), greedy, seeds=range(4), window=3, rows=1, lead=1)
    assert torch.equal(tokens, ar) and stats.method == "pjd"


def test_more_rows_take_fewer_passes_and_fill_every_cell(one_thread):
    model = make_gpt("t2i", vocab=16, block=16, seed=2)
    cond, mask = torch.randn(4, 6, 24), torch.ones(4, 6, dtype=torch.bool)
    mask[0, :2] = False
    sampling = SamplingConfig(cfg_scale=2.0, temperature=0.8, top_k=8)
    one, s1 = decode_pjd(model, cond, sampling, seeds=range(4), cond_mask=mask, window=3, rows=1)
    four, s4 = get_method("pjd", window=3, rows=4, lead=1)(model, cond, sampling, seeds=range(4), cond_mask=mask)
    assert sum(s4.per_sample_forward_passes) < sum(s1.per_sample_forward_passes)
    assert four.shape == (4, 16) and int(four.max()) < 16
    with pytest.raises(ValueError, match="PJD needs"):
        decode_pjd(model, cond, sampling, rows=0)
