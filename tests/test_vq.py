import argparse

import pytest
import torch
import torch.nn.functional as F

from vargen.models import CheckpointError
from vargen.tokenizers import VQTokenizer


def tiny_vq(**kw):
    torch.manual_seed(0)
    return VQTokenizer(codebook_size=64, ch=32, ch_mult=(1, 2, 2), z_channels=32, **kw).eval()


def test_encode_decode_shapes():
    vq = tiny_vq()
    assert vq.downsample == 4
    x = torch.rand(2, 3, 32, 24) * 2 - 1
    tokens = vq.encode(x)
    assert tokens.shape == (2, 8, 6) and tokens.dtype == torch.long
    assert int(tokens.min()) >= 0 and int(tokens.max()) < 64
    assert vq.decode(tokens).shape == (2, 3, 32, 24)


def test_codebook_lookup_is_cosine_nearest_code():
    vq = tiny_vq()
    codes = vq.codebook_embeddings
    torch.testing.assert_close(codes.norm(dim=-1), torch.ones(64))
    want = torch.tensor([[3, 17], [42, 63]])
    # latents pointing along chosen codes (any length: the lookup is cosine) quantise to those codes
    z = (codes[want] * 2.5).permute(2, 0, 1)[None]
    _, idx, _ = vq.quantize(z)
    assert torch.equal(idx[0], want)
    torch.testing.assert_close(vq.embed_tokens(want[None])[0], codes[want].permute(2, 0, 1))


def test_flat_tokens_and_out_of_range_tokens():
    vq = tiny_vq()
    assert vq.embed_tokens(torch.zeros(1, 16, dtype=torch.long)).shape == (1, 8, 4, 4)
    with pytest.raises(ValueError, match="vocabularies match"):
        vq.decode(torch.full((1, 2, 2), 64))


def test_bad_image_sizes_fail_clearly():
    vq = tiny_vq()
    with pytest.raises(ValueError, match="not divisible by the downsample factor 4"):
        vq.encode(torch.zeros(1, 3, 30, 32))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        vq.encode(torch.zeros(3, 32, 32))


def test_training_losses_and_usage_buffer():
    vq = tiny_vq().train()
    rec, idx, losses = vq(torch.rand(2, 3, 16, 16) * 2 - 1)
    assert set(losses) == {"vq", "commit"} and rec.shape == (2, 3, 16, 16)
    (F.mse_loss(rec, torch.zeros_like(rec)) + sum(losses.values())).backward()
    assert vq.encoder.conv_in.weight.grad is not None  # straight-through estimator reaches the encoder
    assert torch.equal(vq.quantize.codebook_used[-idx.numel():], idx.flatten().float())


def test_from_llamagen_checkpoint_with_usage_buffer(tmp_path):
    ref = VQTokenizer(codebook_size=32, ch=32, ch_mult=(1, 1, 2, 2, 4), z_channels=32)
    ref.quantize.codebook_used.fill_(3)
    path = tmp_path / "vq_ds16_c2i.pt"
    torch.save({"model": ref.state_dict(), "optimizer": None, "discriminator": {}, "steps": 1,
                "args": argparse.Namespace(vq_model="VQ-16")}, path)
    loaded = VQTokenizer.from_llamagen(path, downsample=16, ch=32, z_channels=32)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    assert torch.equal(loaded.encode(x), ref.eval().encode(x))
    # a file without the usage buffer (older exports) loads too
    state = {k: v for k, v in ref.state_dict().items() if k != "quantize.codebook_used"}
    assert VQTokenizer.from_llamagen(state).downsample == 16  # read off the encoder's depth
    with pytest.raises(CheckpointError, match="downsample: you gave 8 but the checkpoint is a VQ-16"):
        VQTokenizer.from_llamagen(state, downsample=8)
    with pytest.raises(ValueError, match="downsample must be 16 or 8"):
        VQTokenizer.from_llamagen(state, downsample=4)


def test_llamagen_sizes():
    with torch.device("meta"):
        assert round(sum(p.numel() for p in VQTokenizer().parameters()) / 1e5) == 719
        assert round(sum(p.numel() for p in VQTokenizer(ch_mult=(1, 2, 2, 4)).parameters()) / 1e5) == 701


def test_dead_code_restart_moves_unused_codes_onto_latents():
    vq = tiny_vq()
    vq.quantize.codebook_used.zero_()  # only code 0 used recently
    vq.quantize.codebook_used[:5] = torch.tensor([0.0, 3.0, 3.0, 7.0, 0.0])
    before = vq.quantize.embedding.weight.detach().clone()
    latents = F.normalize(torch.randn(10, 8), dim=-1)
    moved = vq.quantize.restart_unused_codes(latents)
    assert moved == 64 - 3
    after = vq.quantize.embedding.weight.detach()
    assert torch.equal(after[[0, 3, 7]], before[[0, 3, 7]])
    # every moved code now sits next to one of the latents
    sims = F.normalize(after, dim=-1) @ latents.t()
    keep = torch.ones(64, dtype=torch.bool)
    keep[[0, 3, 7]] = False
    assert (sims[keep].max(1).values > 0.99).all()
