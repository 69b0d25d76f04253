"""The models shipped in vargen/weights: size budget, loading, and that their conditions steer the samples."""
import os

import pytest
import torch

from vargen.pipeline import WEIGHTS_DIR, VarGenPipeline, default_model, embedded_models

shipped = embedded_models()


def test_shipped_weights_fit_the_120_mb_budget():
    total = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(WEIGHTS_DIR) for f in fs
                if f.endswith(".safetensors")) if os.path.isdir(WEIGHTS_DIR) else 0
    assert total <= 120e6


@pytest.mark.skipif("scenes-t2i" not in shipped, reason="scenes-t2i not shipped")
def test_scenes_t2i_is_the_default_and_the_caption_picks_the_domain():
    """Emoji captions give emoji on white, scene captions give shapes on grey backgrounds.

    (Colour, count and position following are measured by ``vargen eval scenes``; the
    shipped CPU-trained model is weak at them, see its model card.)
    """
    assert default_model() == "scenes-t2i"
    pipe = VarGenPipeline.load("scenes-t2i")
    assert pipe.gpt.grid == (16, 16) and pipe.vq.downsample == 8
    emoji = ["grinning face", "snowman", "red apple", "rocket"]
    scenes = ["a photo of a red circle", "a photo of two stars", "a photo of a blue square left of a yellow star",
              "a photo of a black hexagon"]
    out = pipe(emoji + scenes, cfg_scale=4.0, seed=0, output_type="np", progress=False)
    assert out.images.shape == (8, 128, 128, 3)
    white = (out.images.min(-1) > 0.9).reshape(8, -1).mean(1)  # share of near-white pixels
    assert (white[:4] > white[4:].max() + 0.05).sum() >= 3 and white[:4].mean() > 10 * white[4:].mean()


@pytest.mark.skipif("cifar10-c2i" not in shipped, reason="cifar10-c2i not shipped")
def test_cifar10_c2i_takes_class_names_and_classes_change_the_images():
    pipe = VarGenPipeline.load("cifar10-c2i")
    assert pipe.class_names[0] == "airplane" and pipe.gpt.grid == (16, 16)
    ship = pipe(["ship"] * 4, cfg_scale=4.0, seed=0, output_type="pt", progress=False).images
    frog = pipe(["frog"] * 4, cfg_scale=4.0, seed=0, output_type="pt", progress=False).images
    assert ship.shape == (4, 3, 64, 64)
    # ships sit on blue water and sky, frogs on green-brown: the blue-minus-green balance separates them
    balance = lambda x: float((x[:, 2] - x[:, 1]).mean())  # noqa: E731
    assert balance(ship) > balance(frog)


@pytest.mark.skipif("scenes-t2i" not in shipped, reason="scenes-t2i not shipped")
def test_scenes_liif_renders_any_size_and_beats_the_tokenizer_plus_bicubic(tmp_path):
    from PIL import Image

    from vargen.cli import main
    from vargen.decoders import LIIFTokenDecoder
    from vargen.eval.sr import compare_scales, upsamplers

    out = tmp_path / "big.png"
    assert main(["generate", "a photo of a red circle", "--scale", "1.25", "--quiet", "-o", str(out)]) == 0
    assert Image.open(out).size == (160, 160)  # the model's own LIIF decoder, no --liif needed
    pipe = VarGenPipeline.load("scenes-t2i")
    liif = LIIFTokenDecoder.from_pretrained(os.path.join(pipe.name_or_path, "liif"))
    table = compare_scales(upsamplers(liif, pipe.vq), base=128, scales=(2,), n_scenes=16, seed=10000)
    # same tokens, same target, the model card's 16 scenes: it measured +0.13 dB at x2 (+0.11..0.15 at x2..x4)
    assert table["liif"]["x2"] > table["vq+bicubic"]["x2"] + 0.05


@pytest.mark.skipif("scenes-t2i" not in shipped, reason="scenes-t2i not shipped")
def test_scenes_eagle_drafter_is_found_beside_the_model_and_compresses_steps():
    from vargen.decoding import SamplingConfig, get_method

    pipe = VarGenPipeline.load("scenes-t2i")
    cond, mask = pipe.parse_conditions(["a photo of a red circle", "grinning face"])
    tokens, stats = get_method("eagle")(pipe.gpt, cond, SamplingConfig(cfg_scale=4.0), seeds=[0, 1], cond_mask=mask)
    assert tokens.shape == (2, 256) and int(tokens.max()) < pipe.gpt.vocab_size
    # the README measured ~2.1x at n = 8; these two seeds gave 1.78x with Gumbel-max draws and 1.39x with the
    # inverse-CDF ones (two images vary that much); a drafter that never agrees gives exactly 1x
    assert stats.extra["step_compression"] > 1.25


@pytest.mark.skipif("scenes-t2i" not in shipped, reason="scenes-t2i not shipped")
def test_scenes_mulo_upsampler_predicts_the_high_resolution_tokens_of_held_out_scenes():
    from vargen.decoding.mulo import resolve_mulo
    from vargen.train.mulo import tokenize_pairs

    pipe = VarGenPipeline.load("scenes-t2i")
    mulo = resolve_mulo(pipe.gpt)  # the shipped scenes-t2i/mulo, checked against the target
    pairs = tokenize_pairs(pipe.vq, {"seed": 4321, "length": 16}, 64, 128, limit=16)
    with torch.no_grad():
        logits = mulo.upsampler(pairs["low"].view(-1, 8, 8))
    accuracy = float((logits.argmax(-1) == pairs["high"]).float().mean())
    # chance is 1/4096; the shipped (short, still-improving) run gets 0.19 on these 16 scenes
    assert accuracy > 0.1


@pytest.mark.skipif("scenes-t2i" not in shipped, reason="scenes-t2i not shipped")
@pytest.mark.parametrize("method,passes", [("lpd", 21), ("nar", 31)])
def test_scenes_parallel_decoders_are_found_beside_the_model(method, passes):
    from vargen.decoding import SamplingConfig, get_method
    from vargen.eval.speed import sample_log_likelihood

    pipe = VarGenPipeline.load("scenes-t2i")
    cond, mask = pipe.parse_conditions(["a photo of a red circle", "a photo of two stars"])
    sampling = SamplingConfig(cfg_scale=4.0)
    tokens, stats = get_method(method)(pipe.gpt, cond, sampling, seeds=[0, 1], cond_mask=mask)
    assert stats.forward_passes == passes and tokens.shape == (2, 256)
    # trained, not random: the AR model finds its samples far likelier than uniform random tokens
    noise = torch.randint(0, pipe.gpt.vocab_size, tokens.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ll = sample_log_likelihood(pipe.gpt, tokens, cond, sampling, mask)
        floor = sample_log_likelihood(pipe.gpt, noise, cond, sampling, mask)
    assert ll.min() > floor.max() + 500, (ll, floor)


@pytest.mark.skipif("scenes-t2i" not in shipped, reason="scenes-t2i not shipped")
def test_scenes_tokenizer_keeps_the_colours_apart():
    """Single objects through the shipped VQ come back in their own colour (the scorer's segmentation).

    An earlier CPU-trained decoder drew 3 of the 10 colours (green, blue, purple, pink and brown
    went grey); the shipped one (configs/scenes_vq_bf16_decoder.json) keeps all ten.
    """
    from vargen.eval.scenes import colour_fidelity

    kept = colour_fidelity(VarGenPipeline.load("scenes-t2i").vq, shapes=("circle", "square"))
    assert kept["colours_kept"] == 10, kept["found"]
