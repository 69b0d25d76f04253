"""The 1D AR generator: the same GPT over 1D token sequences (a 1 x N grid) of the flexible-length tokenizer."""
import json

import pytest
import torch
from conftest import make_gpt
from test_speculative import N_SAMPLES, SHARP, chi_square_p, exact_distribution

from vargen.cli import main
from vargen.decoding import decode_ar, get_method
from vargen.decoding.speculative import decode_sjd
from vargen.models import LlamaGen, PrefixModel
from vargen.models.rope import apply_rope, rope_factors
from vargen.pipeline import VarGenPipeline
from vargen.tokenizers import Flex1DTokenizer, VQTokenizer, load_tokenizer

TINY_FLEX = dict(image_size=16, patch_size=8, num_latents=6, width=32, num_heads=2, encoder_depth=1,
                 decoder_depth=1, codebook_size=64)
SCENES16 = [{"name": "scenes", "resolution": 16, "seed": 0, "length": 16}]


@pytest.fixture(scope="module")
def small1d():
    """4 tokens in a row over a 4-token vocabulary: 256 sequences whose probabilities can be enumerated."""
    return make_gpt("c2i", vocab=4, block=4, seed=3, grid_rows=1)


def tiny_1d_pipeline(seed: int = 0) -> VarGenPipeline:
    torch.manual_seed(seed)
    tok = Flex1DTokenizer(**TINY_FLEX).eval()
    gpt = make_gpt("c2i", vocab=64, block=6, seed=seed, grid_rows=1)
    return VarGenPipeline(gpt=gpt, vq=tok)


def test_a_1d_model_is_a_one_row_grid_of_any_length():
    gpt = make_gpt("c2i", vocab=32, block=12, grid_rows=1)  # 12 is not a square: fine in 1D
    assert gpt.grid == (1, 12) and gpt.num_tokens == 12
    tokens = torch.randint(0, 32, (3, 12))
    assert gpt.forward_train(tokens, torch.tensor([0, 1, 2])).shape == (3, 12, 32)
    out, stats = decode_ar(gpt, torch.tensor([0, 1]), seeds=[0, 1])
    assert out.shape == (2, 12) and stats.forward_passes == 12
    # old configs (no grid_rows) are square grids as before; bad shapes fail clearly
    assert make_gpt("c2i", block=16).grid == (4, 4)
    with pytest.raises(ValueError, match="square number"):
        make_gpt("c2i", block=12)
    with pytest.raises(ValueError, match="divisor of block_size"):
        make_gpt("c2i", block=12, grid_rows=5)


def test_the_rope_of_a_1d_model_is_a_1d_rope():
    gpt = make_gpt("c2i", vocab=8, block=10, grid_rows=1)
    head_dim = gpt.config.dim // gpt.config.n_head
    pairs = head_dim // 2
    # independent formula: the first half of the pairs (the row half) is not rotated; pair j of the second
    # half rotates by pos * base^(-2j / (head_dim / 2)), a standard 1D RoPE of size head_dim / 2
    j = torch.arange(pairs // 2, dtype=torch.float64)
    theta = gpt.config.rope_base ** (-2 * j / (head_dim // 2))
    pos = torch.arange(10, dtype=torch.float64)
    angle = torch.cat([torch.zeros(10, pairs // 2, dtype=torch.float64), pos[:, None] * theta[None]], 1)
    table = gpt.rope[1:].double()
    assert torch.allclose(table[..., 0], angle.cos(), atol=1e-6)
    assert torch.allclose(table[..., 1], angle.sin(), atol=1e-6)
    # as complex multiplication, and attention scores depend only on the offset between positions
    torch.manual_seed(0)
    q, k = torch.randn(2, 1, 1, 1, head_dim).unbind(0)

    def rotate(x, p):
        return apply_rope(x, rope_factors(gpt.rope[p + 1][None, None]))

    xc = torch.view_as_complex(q.double().reshape(1, 1, 1, pairs, 2))
    expect = torch.view_as_real(xc * torch.polar(torch.ones_like(angle[7]), angle[7])).flatten(-2)
    assert torch.allclose(rotate(q, 7).double(), expect, atol=1e-5)
    scores = [float((rotate(q, m) * rotate(k, m - 3)).sum()) for m in (3, 5, 9)]
    assert max(scores) - min(scores) < 1e-4


@pytest.mark.parametrize("window,init", [(2, "left"), (3, "random")])
def test_sjd_on_1d_tokens_is_exact(small1d, window, init):
    expected = exact_distribution(small1d, 1, SHARP)
    tokens, stats = decode_sjd(small1d, torch.full((N_SAMPLES,), 1), SHARP, seeds=range(N_SAMPLES), window=window,
                               init=init)
    assert chi_square_p(tokens, expected, 4) > 1e-3
    assert stats.extra["step_compression"] > 1.0


@pytest.mark.parametrize("method", ["ar", "sjd"])
def test_stopping_after_k_tokens_samples_the_exact_prefix_marginal(small1d, method):
    expected = exact_distribution(small1d, 1, SHARP).view(64, 4).sum(1)  # marginal of the first 3 tokens
    decode = get_method(method, **({"window": 2} if method == "sjd" else {}))
    tokens, stats = decode(PrefixModel(small1d, 3), torch.full((N_SAMPLES,), 1), SHARP, seeds=range(N_SAMPLES))
    assert tokens.shape == (N_SAMPLES, 3) and stats.tokens == 3
    assert chi_square_p(tokens, expected, 4) > 1e-3


def test_lantern_runs_on_1d_tokens_with_the_tokenizer_codebook():
    pipe = tiny_1d_pipeline()
    cond = torch.tensor([0, 1, 2, 0])
    sjd = get_method("sjd", window=4)(pipe.gpt, cond, seeds=range(4))[1]
    lantern = get_method("sjd+lantern", codebook=pipe.vq.codebook_embeddings, window=4, lantern_delta=0.5,
                         lantern_k=8)(pipe.gpt, cond, seeds=range(4))[1]
    assert lantern.tokens == 6 and lantern.extra["step_compression"] >= 1.0 and sjd.extra["step_compression"] >= 1.0


def test_pipeline_stops_at_k_tokens_and_decodes_the_prefix():
    pipe = tiny_1d_pipeline()
    out = pipe([0, 1], output_type="pt", progress=False, num_tokens=3, method="sjd", method_options={"window": 2})
    assert out.tokens.shape == (2, 3) and out.images.shape == (2, 3, 16, 16) and out.stats.tokens == 3
    full = pipe([0, 1], output_type="pt", progress=False)
    assert full.tokens.shape == (2, 6)
    with pytest.raises(ValueError, match="integer in 1..6"):
        pipe([0], num_tokens=7, progress=False)
    with pytest.raises(ValueError, match="Flex1DTokenizer"):
        VarGenPipeline(gpt=pipe.gpt, vq=VQTokenizer(codebook_size=64, ch=32, ch_mult=(1, 2), z_channels=32))


def test_cli_tokens_flag(tmp_path, capsys):
    tiny_1d_pipeline().save_pretrained(str(tmp_path / "model"))
    stats_path, image = tmp_path / "stats.json", tmp_path / "out.png"
    assert main(["generate", "1", "--model", str(tmp_path / "model"), "--tokens", "2", "--cfg", "1", "--quiet",
                 "--method", "sjd", "-o", str(image), "--stats", str(stats_path)]) == 0
    assert image.exists() and json.loads(stats_path.read_text())["tokens"] == 2
    assert "for 2 tokens" in capsys.readouterr().out
    assert main(["generate", "1", "--model", "tiny-random", "--tokens", "2", "--quiet", "-o", str(image)]) == 2
    assert "--tokens needs a 1D-token model" in capsys.readouterr().err


def test_ar_recipe_trains_a_1d_model_on_flex1d_tokens(tmp_path):
    from vargen.train.ar import train_ar
    from vargen.train.flex1d import train_flex1d

    train_flex1d({"model": TINY_FLEX, "data": SCENES16, "steps": 1, "batch_size": 4, "lr": 1e-3},
                 str(tmp_path / "tok"))
    assert isinstance(load_tokenizer(str(tmp_path / "tok" / "flex1d")), Flex1DTokenizer)
    result = train_ar({"tokenizer": str(tmp_path / "tok" / "flex1d"), "data": SCENES16, "num_images": 8,
                       "model": {"size": "GPT-tiny", "model_type": "t2i"},
                       "text_encoder": {"caption_dim": 32, "width": 32, "layers": 1, "heads": 2, "max_length": 12},
                       "save_pipeline": True, "steps": 3, "batch_size": 4, "lr": 1e-3, "log_every": 1},
                      str(tmp_path / "ar"))
    assert result["steps"] == 3
    gpt = LlamaGen.from_pretrained(str(tmp_path / "ar" / "gpt"))
    assert gpt.grid == (1, 6) and gpt.config.grid_rows == 1 and gpt.vocab_size == 64
    pipe = VarGenPipeline.load(str(tmp_path / "ar" / "pipeline"))
    assert isinstance(pipe.vq, Flex1DTokenizer)
    out = pipe("a red circle", output_type="pt", progress=False, num_tokens=4, cfg_scale=2.0)
    assert out.tokens.shape == (1, 4) and out.images.shape == (1, 3, 16, 16)
