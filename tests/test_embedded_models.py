"""The models shipped in vargen/weights: size budget, loading, and that their conditions steer the samples."""
import os

import numpy as np
import pytest
import torch

from vargen.pipeline import WEIGHTS_DIR, VarGenPipeline, default_model, embedded_models

shipped = embedded_models()


def test_shipped_weights_fit_the_40_mb_budget():
    total = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(WEIGHTS_DIR) for f in fs
                if f.endswith(".safetensors")) if os.path.isdir(WEIGHTS_DIR) else 0
    assert total <= 40e6


@pytest.mark.skipif("scenes-t2i" not in shipped, reason="scenes-t2i not shipped")
def test_scenes_t2i_is_the_default_and_follows_black_and_white():
    from vargen.eval.scenes import find_blobs

    assert default_model() == "scenes-t2i"
    pipe = VarGenPipeline.load("scenes-t2i")
    assert pipe.gpt.grid == (16, 16) and pipe.vq.downsample == 8
    prompts = ["a photo of a white circle", "a photo of a black square"]
    out = pipe(prompts, num_images_per_prompt=4, cfg_scale=4.0, seed=0, output_type="np", progress=False)
    assert out.images.shape == (8, 128, 128, 3)
    colours = [{b.color for b in find_blobs((img * 255).round().astype(np.uint8))} for img in out.images]
    assert sum("white" in c for c in colours[:4]) >= 3 and sum("black" in c for c in colours[4:]) >= 3


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
