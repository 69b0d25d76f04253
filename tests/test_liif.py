import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from vargen.decoders import LIIF, EDSRBaseline, LIIFTokenDecoder, make_coord
from vargen.errors import ModelLoadError
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


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_residual_liif_starts_as_the_interpolated_input_and_round_trips(mode, tmp_path):
    import torch.nn.functional as F

    x = torch.rand(2, 3, 7, 9) * 2 - 1
    m = small_liif(residual=mode)
    for size in [(14, 18), (17, 23)]:  # exact x2 and a non-integer ratio
        ref = F.interpolate(x, size=size, mode=mode, align_corners=False)
        torch.testing.assert_close(m.render(x, size=size, chunk=50), ref, atol=1e-5, rtol=0)
    with torch.no_grad():  # once trained, the MLP's correction is added on top of the skip
        m.imnet.layers[-1].bias.fill_(0.25)
    out = m.render(x, size=(14, 18))
    torch.testing.assert_close(out, F.interpolate(x, size=(14, 18), mode=mode, align_corners=False) + 0.25,
                               atol=1e-5, rtol=0)
    m.save_pretrained(str(tmp_path))
    loaded = LIIF.from_liif(str(tmp_path))
    assert loaded.residual == mode
    torch.testing.assert_close(loaded.render(x, size=(14, 18)), out)
    with pytest.raises(ValueError, match="interpolated input image"):
        m.render(m.gen_feat(x), size=(14, 18), is_feat=True)
    with pytest.raises(ValueError, match="residual must be one of"):
        small_liif(residual="nearest")


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


def test_head_only_save_reads_the_trunk_from_the_vq_folder_and_refuses_a_fine_tuned_trunk(tmp_path):
    from safetensors import safe_open

    vq = tiny_vq()
    vq.save_pretrained(str(tmp_path / "model" / "vq"))
    dec = LIIFTokenDecoder(vq, hidden=[32, 32], train_trunk=False).eval()
    torch.nn.init.normal_(dec.liif.imnet.layers[0].weight)  # a trained head, not the initial one
    dec.save_pretrained(str(tmp_path / "model" / "liif"), trunk="../vq")
    with safe_open(str(tmp_path / "model" / "liif" / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and not any(k.startswith("liif.encoder.") for k in keys)  # head only
    again = LIIFTokenDecoder.from_pretrained(str(tmp_path / "model" / "liif"))
    tokens = torch.randint(0, 64, (2, 4, 5))
    torch.testing.assert_close(again.decode(tokens, scale=1.5), dec.decode(tokens, scale=1.5), rtol=0, atol=0)

    from safetensors.torch import load_file, save_file

    head = load_file(str(tmp_path / "model" / "liif" / "model.safetensors"))
    save_file({**head, "liif.imnet.extra": torch.zeros(1)}, str(tmp_path / "model" / "liif" / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="unexpected keys.*liif.imnet.extra"):
        LIIFTokenDecoder.from_pretrained(str(tmp_path / "model" / "liif"))
    save_file(head, str(tmp_path / "model" / "liif" / "model.safetensors"))

    with torch.no_grad():
        dec.trunk.post_quant_conv.weight.add_(0.01)
    with pytest.raises(ValueError, match="trunk differs.*post_quant_conv"):
        dec.save_pretrained(str(tmp_path / "model" / "liif2"), trunk="../vq")
    os.remove(tmp_path / "model" / "vq" / "config.json")
    with pytest.raises(FileNotFoundError, match="needs its trunk"):
        LIIFTokenDecoder.from_pretrained(str(tmp_path / "model" / "liif"))


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


# ------------------------------------------------------------------ super-resolution variant (image encoder)
SR_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "sr")


def write_png(path, array):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def fake_benchmark(root, seed=0):
    """A Set5 with one 13 x 17 image (and a given x2 LR of the wrong size, which must be ignored) and a Set14."""
    rng = np.random.default_rng(seed)
    write_png(root / "Set5" / "HR" / "a.png", rng.integers(0, 256, (13, 17, 3), dtype=np.uint8))
    write_png(root / "Set5" / "LR_bicubic" / "X3" / "ax3.png", rng.integers(0, 256, (4, 5, 3), dtype=np.uint8))
    write_png(root / "Set14" / "HR" / "b.png", rng.integers(0, 256, (20, 24), dtype=np.uint8))  # greyscale
    return root


def test_benchmark_pairs_modcrop_and_use_the_sets_own_lr(tmp_path):
    from vargen.eval.sr import benchmark_pairs, lr_size

    root = fake_benchmark(tmp_path)
    assert [lr_size(13, s) for s in (2, 3, 2.5)] == [6, 4, 4]  # 5 x 2.5 = 12.5 px is not a whole HR crop
    (_, lr, hr), = benchmark_pairs(str(root), "Set5", 2.5)
    assert lr.shape == (1, 3, 4, 6) and hr.shape == (1, 3, 10, 15)
    (_, lr3, hr3), = benchmark_pairs(str(root), "Set5", 3)
    given = torch.from_numpy(np.array(Image.open(root / "Set5" / "LR_bicubic" / "X3" / "ax3.png"))).permute(2, 0, 1)
    torch.testing.assert_close(lr3[0], given.float() / 255)  # the set's own LR file, not a re-made one
    assert hr3.shape == (1, 3, 12, 15)
    (_, lr14, _), = benchmark_pairs(str(root), "Set14", 2)
    assert lr14.shape == (1, 3, 10, 12) and torch.equal(lr14[:, 0], lr14[:, 1])  # greyscale replicated
    with pytest.raises(FileNotFoundError, match="Set5/Set14"):
        benchmark_pairs(str(tmp_path / "nowhere"), "Set5", 2)


@pytest.mark.skipif(not os.path.isdir(SR_DATA), reason="../shared/data/sr not present")
def test_bicubic_reproduces_the_matlab_lr_images_of_set5():
    from vargen.eval.sr import lr_fidelity

    assert lr_fidelity(SR_DATA, 4) > 45  # dB; a wrong kernel (a = -0.75, no antialias) gives ~35


def test_sr_recipe_learns_saves_official_format_and_evaluates(tmp_path):
    from vargen.cli import main
    from vargen.train.liif import sr_batches, sr_step, train_liif

    folder = tmp_path / "imgs"
    rng = np.random.default_rng(0)
    for i in range(3):
        write_png(folder / f"{i}.png", rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    sources = [{"name": "scenes", "patch": 4, "batch_size": 2}, {"name": "folder", "path": str(folder), "resolution": None,
                                                                 "patch": 4, "batch_size": 2}]
    with pytest.raises(ValueError, match="lower its patch"):
        next(sr_batches([{**sources[1], "patch": 5}]))
    batches = sr_batches(sources, sample_q=16)
    first, second = next(batches), next(batches)
    assert (first["source"], second["source"]) == ("scenes", "folder")
    assert second["inp"].shape == (2, 3, 4, 4) and second["gt"].shape == (2, 16, 3) and second["cell"].min() >= 2 / 16

    torch.manual_seed(0)
    model = LIIF(EDSRBaseline(n_resblocks=1, n_feats=8), hidden_list=[16])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):  # one fixed batch: the loss must fall
        loss, _ = sr_step({"liif": model}, second)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < losses[0]

    root = fake_benchmark(tmp_path / "sr")
    config = {"encoder": {"n_resblocks": 1, "n_feats": 8}, "model": {"hidden": [16]},
              "data": {"sources": sources, "sample_q": 16}, "steps": 2, "batch_size": 2, "lr": 1e-3,
              "log_every": 1, "save_every": 2,
              "eval": {"base": 8, "n_scenes": 2, "scales": [2, 2.5], "benchmark": str(root)}}
    result = train_liif(config, str(tmp_path / "out"))
    assert set(result["psnr_y"]) == {"scenes", "Set5", "Set14"}
    assert set(result["psnr_y"]["Set5"]["liif"]) == {"x2", "x2.5"}
    loaded = LIIF.from_liif(str(tmp_path / "out" / "liif"))  # the folder's liif.pth, official layout
    raw = torch.load(tmp_path / "out" / "liif" / "liif.pth", weights_only=True)
    assert raw["model"]["name"] == "liif" and raw["model"]["args"]["encoder_spec"]["name"] == "edsr-baseline"
    x = torch.rand(1, 3, 5, 7) * 2 - 1
    trained = LIIF(EDSRBaseline(n_resblocks=1, n_feats=8), hidden_list=[16])
    trained.load_state_dict(raw["model"]["sd"])
    torch.testing.assert_close(loaded.render(x, scale=2.5), trained.eval().render(x, scale=2.5))

    out = tmp_path / "sr.json"
    assert main(["eval", "sr", "--liif", str(tmp_path / "out" / "liif"), "--benchmark", str(root), "--scales", "2",
                 "--n-scenes", "2", "--base", "8", "--json", str(out)]) == 0
    table = json.loads(out.read_text())
    assert table["Set5"]["bicubic"]["x2"] > 0 and "liif" in table["Set14"]
    assert main(["eval", "sr", "--liif", str(tmp_path / "out" / "liif"), "--vq", "x", "--benchmark", str(root)]) == 2


def test_decode_in_memory_chunks_matches_one_pass():
    """Chunking images and pixels to a budget changes where the work is cut, not the pixels."""
    from vargen.decoders import LIIFTokenDecoder
    from vargen.tokenizers import VQTokenizer

    torch.manual_seed(0)
    vq = VQTokenizer(codebook_size=16, ch=16, ch_mult=(1, 2), z_channels=16, norm_groups=8)
    dec = LIIFTokenDecoder(vq, hidden=(16,)).eval()
    tokens = torch.randint(0, 16, (5, 3, 3))
    whole = dec.decode(tokens, scale=1.5, chunk=10 ** 9)
    tiny_budget = dec.decode(tokens, scale=1.5, max_memory=20_000)  # a few queries, one image at a time
    torch.testing.assert_close(tiny_budget, whole)
    assert whole.shape == (5, 3, 9, 9)
