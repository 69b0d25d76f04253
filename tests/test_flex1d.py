"""The flexible-length 1D tokenizer: prefixes, quantisers, nested dropout, save/load, errors, a tiny training run."""
import json

import pytest
import torch

from vargen.eval.flex1d import held_out_scenes, psnr, psnr_vs_length, vq_psnr
from vargen.tokenizers import Flex1DTokenizer, VQTokenizer
from vargen.tokenizers.flex1d import FSQuantizer, sample_prefix_lengths
from vargen.train import flex1d as recipe

K = 6


def tiny(quantizer="vq", seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(image_size=16, patch_size=4, num_latents=K, width=32, num_heads=2, encoder_depth=1, decoder_depth=1,
               quantizer=quantizer, codebook_size=64, codebook_embed_dim=8, fsq_levels=(4, 3, 3))
    return Flex1DTokenizer(**{**cfg, **kw})


def images(n=3, seed=0, size=16):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


@pytest.mark.parametrize("quantizer", ["vq", "fsq"])
def test_every_prefix_encodes_and_decodes(quantizer):
    tok = tiny(quantizer).eval()
    x = images()
    full = tok.encode(x)
    assert full.shape == (3, K) and full.dtype == torch.long
    for k in range(1, K + 1):
        ids = tok.encode(x, length=k)
        assert ids.shape == (3, k)
        assert torch.equal(ids, full[:, :k])  # prefix-consistent
        assert tok.decode(ids).shape == (3, 3, 16, 16)


@pytest.mark.parametrize("quantizer", ["vq", "fsq"])
def test_valid_ids_and_straight_through_gradients(quantizer):
    tok = tiny(quantizer).train()
    rec, idx, losses = tok(images(4), lengths=torch.tensor([1, 2, 4, K]))
    assert idx.shape == (4, K) and int(idx.min()) >= 0 and int(idx.max()) < tok.vocab_size
    (rec.pow(2).mean() + sum(losses.values())).backward()
    for p in (tok.patch_embed.weight, tok.latent_tokens, tok.quant_proj.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0  # the quantiser passes gradients through
    if quantizer == "vq":
        assert set(losses) == {"vq", "commit"}
    # eval-mode ids decode the same codes the encoder quantised to
    tok.eval()
    codes, ids, _ = tok.quantize_images(images(2))
    assert torch.allclose(tok.embed_tokens(ids), codes, atol=1e-6)


def test_fsq_ids_are_a_bijection():
    fsq = FSQuantizer((8, 5, 3))
    ids = torch.arange(fsq.vocab_size)
    codes = fsq.indices_to_codes(ids)
    assert fsq.vocab_size == 120 and codes.abs().max() <= 1
    assert torch.equal(fsq.codes_to_indices(codes), ids)
    q, qid, _ = fsq(torch.randn(50, 3) * 3)
    assert torch.equal(fsq.codes_to_indices(q), qid) and len(torch.unique(q, dim=0)) <= 120


@pytest.mark.parametrize("k", [1, 3, K])
def test_decoder_sees_only_the_prefix(k):
    tok = tiny().eval()
    ids = tok.encode(images())
    codes = tok.embed_tokens(ids).detach().requires_grad_(True)
    out = tok.decode_latents(codes, lengths=k)
    assert torch.allclose(out, tok.decode(ids[:, :k]), atol=1e-5)  # training path == prefix decode
    other = ids.clone()
    other[:, k:] = (other[:, k:] + 7) % tok.vocab_size  # change every latent after k
    assert torch.allclose(tok.decode_latents(tok.embed_tokens(other), lengths=k), out, atol=1e-6)
    out.sum().backward()
    assert codes.grad[:, k:].abs().sum() == 0 and codes.grad[:, :k].abs().sum() > 0


def test_training_step_drops_tails_per_sample(monkeypatch):
    tok = tiny().train()
    seen, captured = [], {}
    sampler = recipe.sample_prefix_lengths

    def recording(*a, **kw):
        seen.append(sampler(*a, **kw))
        return seen[-1]

    monkeypatch.setattr(recipe, "sample_prefix_lengths", recording)
    tok.decoder[0].register_forward_pre_hook(lambda m, args: captured.setdefault("x", args[0].detach()))
    torch.manual_seed(3)
    loss, metrics = recipe.flex1d_step({"flex1d": tok}, {"image": images(8)})
    lengths = seen[0]
    assert loss.requires_grad and lengths.min() >= 1 and lengths.max() <= K and len(set(lengths.tolist())) > 1
    assert float(metrics["mean_k"]) == pytest.approx(lengths.float().mean().item())
    lat = captured["x"][:, tok.num_patches:]  # the decoder's K latent slots
    dropped = (tok.dropped_token + tok.latent_pos).detach()
    for b, k in enumerate(lengths.tolist()):
        assert torch.allclose(lat[b, k:], dropped[k:])  # after the prefix: only the learned dropped token
        assert not torch.allclose(lat[b, :k], dropped[:k])


def test_sample_prefix_lengths():
    g = torch.Generator().manual_seed(0)
    u = sample_prefix_lengths(2000, 32, "uniform", generator=g)
    assert u.min() == 1 and u.max() == 32 and len(u.unique()) == 32
    assert set(sample_prefix_lengths(500, 24, "pow2", generator=g).tolist()) == {1, 2, 4, 8, 16, 24}
    assert sample_prefix_lengths(4, 24, "full").tolist() == [24] * 4
    with pytest.raises(ValueError, match="prefix sampling"):
        sample_prefix_lengths(4, 8, "random")


@pytest.mark.parametrize("quantizer", ["vq", "fsq"])
def test_save_load_round_trip(tmp_path, quantizer):
    tok = tiny(quantizer).eval()
    ids = tok.encode(images())
    tok.save_pretrained(tmp_path / "tok")
    loaded = Flex1DTokenizer.from_pretrained(tmp_path / "tok").eval()
    def public(config):
        return {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in config.items() if not k.startswith("_")}

    assert public(loaded.config) == public(tok.config)
    assert torch.equal(loaded.encode(images()), ids)
    for k in (1, K):
        assert torch.equal(loaded.decode(ids[:, :k]), tok.decode(ids[:, :k]))


def test_clear_errors():
    tok = tiny().eval()
    x = images()
    for bad in (0, K + 1, -1, 1.5, True):
        with pytest.raises(ValueError, match="prefix length"):
            tok.encode(x, length=bad)
    with pytest.raises(ValueError, match="16 x 16"):
        tok.encode(images(size=32))
    with pytest.raises(ValueError, match=r"\[B, 3"):
        tok.encode(torch.zeros(2, 1, 16, 16))
    with pytest.raises(ValueError, match="token ids must lie in"):
        tok.decode(torch.tensor([[0, tok.vocab_size]]))
    with pytest.raises(ValueError, match="token ids must lie in"):
        tok.decode(torch.tensor([[-1]]))
    with pytest.raises(ValueError, match="prefix length must be in"):
        tok.decode(torch.zeros(1, K + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="integer tensor"):
        tok.decode(torch.zeros(1, 2))
    with pytest.raises(ValueError, match="quantizer"):
        tiny("lfq")
    with pytest.raises(ValueError, match="multiple of patch_size"):
        tiny(image_size=18)
    with pytest.raises(ValueError, match="prefix lengths"):
        psnr_vs_length(tok, x, [1, K + 1])


def test_psnr_and_vq_baseline():
    gt = torch.full((2, 3, 4, 4), 0.5)
    assert psnr(gt + 0.1, gt) == pytest.approx(torch.full((2,), 20.0), abs=1e-3)
    torch.manual_seed(0)
    vq = VQTokenizer(codebook_size=32, ch=32, ch_mult=(1, 2), z_channels=32).eval()
    row = vq_psnr(vq, held_out_scenes(2, 16, seed=5))
    assert row["tokens"] == 64 and row["psnr"] > 0


def test_tiny_training_improves_with_prefix_length(tmp_path, one_thread):
    """A few hundred tiny nested-dropout steps on 16 fixed scenes: more tokens reconstruct better on average."""
    config = {
        # 3 x 3 FSQ levels: 9 codes a token, so one token cannot just say which of the 16 scenes it is
        "model": dict(image_size=16, patch_size=4, num_latents=8, width=64, num_heads=2, encoder_depth=1,
                      decoder_depth=1, quantizer="fsq", fsq_levels=[3, 3]),
        "data": [{"name": "scenes", "resolution": 16, "seed": 0, "length": 16, "supersample": 2}],
        "cache": True, "steps": 300, "batch_size": 16, "lr": 2e-3, "warmup": 5, "grad_clip": 1.0,
        "log_every": 100, "save_every": 1000, "seed": 0,
    }
    result = recipe.train_flex1d(config, str(tmp_path))
    tok = Flex1DTokenizer.from_pretrained(tmp_path / "flex1d").eval()
    scenes = torch.stack([recipe.build_dataset(config["data"])[i]["image"] for i in range(16)])
    table = psnr_vs_length(tok, scenes, [1, 2, 4, 8])
    assert table[8] >= table[1] + 0.5, table
    assert table[8] >= table[2] and table[4] >= table[1], table
    assert result["steps"] == 300
    assert [json.loads(line)["step"] for line in open(tmp_path / "log.jsonl")] == [100, 200, 300]
