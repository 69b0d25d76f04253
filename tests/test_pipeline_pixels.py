"""Tokens to pixels in the pipeline: diffusers' height / width / output_type, LIIF at any other size, progress
bars as configured, and decoding methods built once per pipeline."""
import numpy as np
import pytest
import torch

from vargen.errors import UsageError
from vargen.pipeline import VarGenPipeline


@pytest.fixture(scope="module")
def scenes():
    return VarGenPipeline.load("scenes-t2i")


def test_height_and_width_render_through_the_models_liif(scenes, one_thread):
    out = scenes("a photo of a red circle", seed=0, height=96, width=160, output_type="pil", progress=False)
    assert out.images[0].size == (160, 96)
    pt = scenes("a photo of a red circle", seed=0, height=96, width=160, output_type="pt", progress=False)
    assert pt.images.shape == (1, 3, 96, 160) and torch.equal(pt.tokens, out.tokens)
    assert np.abs(np.asarray(out.images[0]) / 255 - pt.images[0].permute(1, 2, 0).numpy()).max() <= 0.5 / 255 + 1e-6
    own = scenes("a photo of a red circle", seed=0, output_type="np", progress=False)
    assert own.images.shape == (1, 128, 128, 3) and torch.equal(own.tokens, out.tokens)
    assert scenes.output_size(width=256) == (256, 256)  # one side keeps the tokenizer's aspect ratio


def test_latent_output_and_bad_sizes(scenes, one_thread):
    out = scenes("a photo of a blue square", seed=1, output_type="latent", progress=False)
    assert out.images.shape == (1, 256) and out.images.dtype == torch.long
    with pytest.raises(UsageError, match="height must be a positive whole number"):
        scenes("a photo of a blue square", height=0, progress=False)
    with pytest.raises(ValueError, match="output_type must be"):
        scenes("a photo of a blue square", output_type="jpeg", progress=False)


def test_a_model_without_liif_says_how_to_get_one(one_thread):
    pipe = VarGenPipeline.load("tiny-random")
    with pytest.raises(UsageError, match="has none: pass one"):
        pipe([1], height=32, width=48, progress=False)


def test_progress_bar_config_is_honoured(scenes, capsys, one_thread):
    scenes.set_progress_bar_config(disable=True)
    scenes("a photo of a red circle", seed=0, output_type="latent")
    assert "tokens" not in capsys.readouterr().err
    scenes.set_progress_bar_config(disable=False)
    scenes("a photo of a red circle", seed=0, output_type="latent")
    assert "tokens" in capsys.readouterr().err


def test_methods_are_built_once_per_pipeline(scenes, monkeypatch, one_thread):
    import vargen.decoding.methods as methods

    calls = []
    real = methods.codebook_neighbours
    monkeypatch.setattr(methods, "codebook_neighbours", lambda *a, **k: calls.append(1) or real(*a, **k))
    for seed in (0, 1):
        scenes("a photo of a red circle", seed=seed, method="sjd+lantern", output_type="latent", progress=False)
    assert len(calls) == 1  # LANTERN's neighbour table: once, not per call


def test_a_memory_budget_set_once_chunks_every_later_call(one_thread, monkeypatch):
    """``vargen sample`` / ``eval`` set the budget once; a small one makes the pipeline decode in more chunks."""
    import vargen.memory as memory

    pipe = VarGenPipeline.load("tiny-random")
    calls = []
    real = memory.per_chunk
    monkeypatch.setattr(memory, "per_chunk", lambda total, cost, budget: calls.append(budget) or real(total, cost,
                                                                                                       budget))
    pipe.set_memory_budget(12345678)
    pipe([1, 2, 3], seed=0, output_type="latent", progress=False)
    assert calls and set(calls) == {12345678}
