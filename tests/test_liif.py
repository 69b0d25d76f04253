import pytest
import torch

from vargen.decoders import LIIF, EDSRBaseline, LIIFTokenDecoder, make_coord
from vargen.models.checkpoint import CheckpointError
from vargen.tokenizers import VQTokenizer


def small_liif(seed=0, **kw):
    torch.manual_seed(seed)
    return LIIF(EDSRBaseline(n_resblocks=2, n_feats=16), hidden_list=[32, 32], **kw).eval()


def official_spec(model):
    return {"name": "liif", "args": {
        "encoder_spec": {"name": "edsr-baseline", "args": {"n_resblocks": 2, "n_feats": 16, "no_upsampling": True}},
        "imnet_spec": {"name": "mlp", "args": {"out_dim": 3, "hidden_list": [32, 32]}}}, "sd": model.state_dict()}


def tiny_vq():
    torch.manual_seed(0)
    return VQTokenizer(codebook_size=64, ch=32, ch_mult=(1, 2), z_channels=32, num_res_blocks=1, norm_groups=8).eval()


def test_make_coord_is_pixel_centres():
    c = make_coord((2, 4), flatten=False)
    assert c.shape == (2, 4, 2)
    torch.testing.assert_close(c[:, 0, 0], torch.tensor([-0.5, 0.5]))
    torch.testing.assert_close(c[0, :, 1], torch.tensor([-0.75, -0.25, 0.25, 0.75]))
    assert make_coord((3, 5)).shape == (15, 2)


@pytest.mark.parametrize("kw,expected", [({"size": (17, 23)}, (17, 23)), ({"size": 5}, (5, 5)),
                                         ({"scale": 2.5}, (18, 22)),  # round(17.5)=18, round(22.5)=22 (to even)
                                         ({"scale": 1.3}, (9, 12)), ({"scale": (1.0, 8.0)}, (7, 72))])
def test_render_gives_the_exact_requested_size(kw, expected):
    out = small_liif().render(torch.rand(2, 3, 7, 9) * 2 - 1, **kw)
    assert out.shape == (2, 3, *expected) and torch.isfinite(out).all()


def test_bad_sizes_fail_clearly():
    m, x = small_liif(), torch.rand(1, 3, 4, 4)
    with pytest.raises(ValueError, match="exactly one"):
        m.render(x)
    with pytest.raises(ValueError, match="exactly one"):
        m.render(x, size=8, scale=2)
    with pytest.raises(ValueError, match="positive"):
        m.render(x, scale=-1)


def test_chunked_and_unchunked_queries_agree():
    m, x = small_liif(), torch.rand(2, 3, 6, 5) * 2 - 1
    full = m.render(x, size=(13, 11), chunk=10 ** 6)
    torch.testing.assert_close(m.render(x, size=(13, 11), chunk=7), full)
    # the forward on explicit coordinates is the same function
    coord = make_coord((13, 11)).expand(2, -1, -1)
    cell = torch.tensor([2 / 13, 2 / 11]).expand_as(coord)
    with torch.no_grad():
        torch.testing.assert_close(m(x, coord, cell).view(2, 13, 11, 3).permute(0, 3, 1, 2), full)


def test_constant_features_give_a_constant_image():
    """With coordinate/cell inputs zeroed, the 4 corner predictions coincide, so the image is constant iff
    the local-ensemble weights sum to 1 everywhere (borders and clamped queries included)."""
    torch.manual_seed(0)
    m = LIIF(None, hidden_list=[16], feat_dim=8, feat_unfold=False).eval()
    with torch.no_grad():
        m.imnet.layers[0].weight[:, 8:] = 0
    feat = torch.randn(1, 8, 1, 1).expand(1, 8, 5, 4)
    out = m.render(feat, scale=3.7, is_feat=True)
    expected = m.imnet(torch.cat([feat[0, :, 0, 0], torch.zeros(4)]))  # coordinate/cell inputs are ignored
    torch.testing.assert_close(out, expected.view(1, 3, 1, 1).expand_as(out))


def test_official_checkpoint_round_trip(tmp_path):
    m = small_liif()
    path = tmp_path / "epoch-last.pth"
    torch.save({"model": official_spec(m), "optimizer": {"name": "adam", "args": {"lr": 1e-4}}, "epoch": 1}, path)
    loaded = LIIF.from_liif(str(path))
    x = torch.rand(1, 3, 5, 6) * 2 - 1
    torch.testing.assert_close(loaded.render(x, scale=2.3), m.render(x, scale=2.3), rtol=0, atol=0)
    # a raw state dict (sizes read off the tensors) and our own spec() load the same
    torch.testing.assert_close(LIIF.from_liif(m.state_dict()).render(x, size=9), m.render(x, size=9))
    torch.testing.assert_close(LIIF.from_liif({"model": m.spec()}).render(x, size=9), m.render(x, size=9))
    assert "encoder.sub_mean.weight" in m.state_dict()  # EDSR's unused mean shift is in official files


def test_bad_checkpoints_name_the_problem():
    spec = official_spec(small_liif())
    del spec["sd"]["imnet.layers.0.bias"]
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): imnet\.layers\.0\.bias"):
        LIIF.from_liif({"model": spec})
    spec = official_spec(small_liif())
    spec["sd"]["imnet.extra"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): imnet\.extra"):
        LIIF.from_liif({"model": spec})
    spec["args"]["encoder_spec"]["name"] = "rdn"
    with pytest.raises(CheckpointError, match="unknown LIIF encoder 'rdn'.*edsr-baseline"):
        LIIF.from_liif({"model": spec})


def test_token_decoder_sizes_and_save_load(tmp_path):
    vq = tiny_vq()
    dec = LIIFTokenDecoder(vq, hidden=[32, 32]).eval()
    assert dec.trunk.stride == 2 and dec.config["feat_unfold"]  # f2 VQ: latent grid; 32 channels -> unfold
    tokens = torch.randint(0, 64, (2, 4, 5))
    assert dec.decode(tokens, scale=1).shape == (2, 3, 8, 10)
    assert dec.decode(tokens, scale=2.5).shape == (2, 3, 20, 25)
    assert dec.decode(tokens, size=(17, 23)).shape == (2, 3, 17, 23)
    torch.testing.assert_close(dec.decode(tokens, size=(9, 7), chunk=5), dec.decode(tokens, size=(9, 7)))
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 64\)"):
        dec.decode(tokens + 64, scale=1)
    # with every upsampler kept, the trunk is the VQ decoder up to (not including) its norm_out/conv_out head
    seen = []
    vq.decoder.norm_out.register_forward_hook(lambda mod, inp, out: seen.append(inp[0]))
    with torch.no_grad():
        vq.decode(tokens)
        torch.testing.assert_close(LIIFTokenDecoder(vq, keep_upsample=1, hidden=[8]).trunk(tokens), seen[0])
    dec.save_pretrained(str(tmp_path / "liif"))
    again = LIIFTokenDecoder.from_pretrained(str(tmp_path / "liif"))
    torch.testing.assert_close(again.decode(tokens, scale=1.5), dec.decode(tokens, scale=1.5))


def test_token_decoder_keeps_upsamplers_and_wide_features_skip_unfold():
    torch.manual_seed(0)
    vq = VQTokenizer(codebook_size=16, ch=16, ch_mult=(1, 1, 2, 4), z_channels=16, num_res_blocks=1, norm_groups=4)
    dec = LIIFTokenDecoder(vq, hidden=[16])
    assert dec.config["keep_upsample"] == 1 and dec.trunk.stride == 4  # f8 VQ -> f4 features by default
    assert dec.trunk(torch.zeros(1, 3, 3, dtype=torch.long)).shape == (1, 16, 6, 6)
    assert LIIFTokenDecoder(vq, keep_upsample=0, hidden=[16]).trunk.stride == 8
    assert not LIIFTokenDecoder(VQTokenizer(codebook_size=16, ch=128, ch_mult=(1, 1), z_channels=16,
                                            num_res_blocks=0), hidden=[16]).config["feat_unfold"]


def test_recipe_steps_reduce_loss_and_leave_the_vq_untouched():
    from vargen.train.liif import liif_step, scene_batches

    vq = tiny_vq().requires_grad_(False)
    before = {k: v.clone() for k, v in vq.state_dict().items()}
    torch.manual_seed(0)
    dec = LIIFTokenDecoder(vq, hidden=[64, 64]).train()
    batch = next(scene_batches(4, base=16, sample_q=256, seed=0))
    assert batch["gt"].shape == (4, min(256, round(16 * batch["scale"]) ** 2), 3)
    assert batch["coord"].shape == batch["cell"].shape == (4, batch["gt"].shape[1], 2)
    opt = torch.optim.Adam([p for p in dec.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(6):
        loss, metrics = liif_step({"liif": dec}, batch, vq)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < losses[0] and "psnr" in metrics
    assert all(torch.equal(v, before[k]) for k, v in vq.state_dict().items())


def test_psnr_y_and_scale_comparison():
    from vargen.eval.sr import compare_scales, psnr_y, upsamplers

    gt = torch.rand(2, 3, 10, 10)
    pred = gt + 0.1
    expected = -20 * torch.log10(torch.tensor(0.1 * (65.738 + 129.057 + 25.064) / 256))
    torch.testing.assert_close(psnr_y(pred, gt, shave=2), expected.expand(2))
    vq = tiny_vq()
    table = compare_scales(upsamplers(LIIFTokenDecoder(vq, hidden=[16]).eval(), vq), base=8, scales=(2, 2.5),
                           n_scenes=2)
    assert set(table) == {"bicubic", "vq+bicubic", "liif"} and set(table["liif"]) == {"x2", "x2.5"}
    assert table["bicubic"]["x2"] > 15  # bicubic from the exact low-res render is a sane baseline


def test_scale_consistency_separates_consistent_from_inconsistent_upsamplers():
    from vargen.eval.sr import scale_consistency

    def nearest(x, size):  # replicates pixels: its area-downsampled x4 is exactly its x1
        return torch.nn.functional.interpolate(x, size=size, mode="nearest")

    def drifting(x, size):  # brighter the larger it renders: a different image at every scale
        return (nearest(x, size) + 0.05 * size[0] / x.shape[-1]).clamp(-1, 1)

    result = scale_consistency({"nearest": nearest, "drifting": drifting}, base=8, scale=4, n_scenes=2)
    assert result["nearest"] == 99.0  # identical (capped)
    assert result["drifting"] < 35


def test_recipe_trains_saves_and_evaluates(tmp_path):
    from vargen.train.liif import train_liif

    tiny_vq().save_pretrained(str(tmp_path / "vq"))
    config = {"vq": str(tmp_path / "vq"), "model": {"hidden": [32, 32]}, "data": {"resolution": 16, "sample_q": 256},
              "eval": {"n_scenes": 2, "scales": [2, 2.5]}, "steps": 2, "batch_size": 2, "lr": 1e-3, "log_every": 1,
              "save_every": 2}
    result = train_liif(config, str(tmp_path / "out"))
    assert result["steps"] == 2 and set(result["psnr_y"]["liif"]) == {"x2", "x2.5"}
    assert (tmp_path / "out" / "liif" / "metrics.json").exists()
    dec = LIIFTokenDecoder.from_pretrained(str(tmp_path / "out" / "liif"))
    assert dec.decode(torch.zeros(1, 3, 3, dtype=torch.long), scale=3.3).shape == (1, 3, 20, 20)


def test_cli_generate_renders_any_size_through_liif(tmp_path, capsys):
    from PIL import Image

    from vargen.cli import main
    from vargen.pipeline import VarGenPipeline

    pipe = VarGenPipeline.load("tiny-random")
    folder = str(tmp_path / "liif")
    LIIFTokenDecoder(pipe.vq, hidden=[16, 16]).save_pretrained(folder)
    base = ["generate", "--model", "tiny-random", "3", "--quiet", "--liif", folder]
    assert main(base + ["--size", "50x30", "-o", str(tmp_path / "a.png")]) == 0
    assert Image.open(tmp_path / "a.png").size == (50, 30)
    assert main(base + ["--scale", "1.5", "-o", str(tmp_path / "b.png")]) == 0
    assert Image.open(tmp_path / "b.png").size == (96, 96)  # tiny-random decodes 8 x 8 tokens to 64 px
    assert main(["generate", "--model", "tiny-random", "3", "--quiet", "--scale", "2"]) == 2
    assert "--liif" in capsys.readouterr().err
    other = str(tmp_path / "other")
    LIIFTokenDecoder(VQTokenizer(codebook_size=64, ch=32, ch_mult=(1, 2), z_channels=32),
                     hidden=[16]).save_pretrained(other)
    assert main(["generate", "--model", "tiny-random", "3", "--quiet", "--scale", "2", "--liif", other]) == 2
    assert "64 codes" in capsys.readouterr().err
