import json
import os
import random

import numpy as np
import pytest
import torch
from PIL import Image

from vargen.data import Cifar10Dataset, EmojiDataset, ImageFolderDataset, SceneDataset, render_scene, sample_scene
from vargen.data.scenes import COLORS, TASKS, Scene, SceneObject, object_coverage

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
needs_shared = pytest.mark.skipif(not os.path.isdir(SHARED), reason="../shared/data not present")


def test_scenes_are_seeded_and_captioned_per_task():
    ds = SceneDataset(resolution=32, seed=3)
    a, b = ds[7], ds[7]
    assert torch.equal(a["image"], b["image"]) and a["caption"] == b["caption"]
    assert a["image"].shape == (3, 32, 32) and -1 <= a["image"].min() and a["image"].max() <= 1
    rng = random.Random(0)
    for task in TASKS:
        scene = sample_scene(rng, task)
        assert scene.tag == task and scene.caption.startswith("a photo of")
        for inc in scene.include:
            matching = [o for o in scene.objects if o.shape == inc["class"] and o.color == inc.get("color", o.color)]
            assert len(matching) == inc["count"]


def test_position_captions_match_geometry():
    rng = random.Random(1)
    for _ in range(50):
        s = sample_scene(rng, "position")
        a, b = s.objects
        rel = s.include[1]["position"][0]
        ok = {"left of": a.x < b.x, "right of": a.x > b.x, "above": a.y < b.y, "below": a.y > b.y}[rel]
        assert ok, s.caption


def test_rendering_is_resolution_free_and_antialiased():
    scene = Scene("gray", [SceneObject("circle", "red", 0.5, 0.5, 0.3)], "a photo of a red circle", "colors")
    small, large = render_scene(scene, 32), render_scene(scene, 256)
    # the 256 px render box-downsampled to 32 px matches the 32 px render (same scene, any resolution)
    down = large.reshape(32, 8, 32, 8, 3).astype(np.float32).mean(axis=(1, 3))
    assert np.abs(down - small).mean() < 2.0
    # edge pixels are blends (anti-aliasing), the centre is the exact colour
    assert tuple(small[16, 16]) == COLORS["red"]
    cov = object_coverage(scene.objects[0], 32, 32)
    assert ((cov > 0.05) & (cov < 0.95)).any()
    # coverage area approximates pi r^2
    assert abs(cov.sum() / 32 ** 2 - np.pi * 0.09) < 0.01


def test_bad_scene_arguments():
    with pytest.raises(ValueError, match="unknown scene tasks"):
        SceneDataset(tasks=["juggling"])
    with pytest.raises(ValueError, match="resolution must be positive"):
        render_scene(sample_scene(random.Random(0)), 0)


def test_missing_paths_say_where_data_is_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match="emoji captions not found.*captions.jsonl"):
        EmojiDataset(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="CIFAR-10 train archive not found.*train.tar.gz"):
        Cifar10Dataset(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        ImageFolderDataset(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="no images"):
        ImageFolderDataset(str(tmp_path))


def test_image_folder_with_captions_and_alpha(tmp_path):
    Image.new("RGBA", (10, 10), (255, 0, 0, 0)).save(tmp_path / "a.png")  # fully transparent -> white
    Image.new("RGB", (20, 20), (0, 0, 255)).save(tmp_path / "b.jpg")
    (tmp_path / "caps.jsonl").write_text(json.dumps({"file": "b.jpg", "caption": "blue"}) + "\n")
    ds = ImageFolderDataset(str(tmp_path), resolution=8, captions=str(tmp_path / "caps.jsonl"))
    assert len(ds) == 2
    assert torch.allclose(ds[0]["image"], torch.ones(3, 8, 8)) and ds[0]["caption"] == ""
    assert ds[1]["caption"] == "blue" and ds[1]["image"][2].mean() > 0.9


@needs_shared
def test_emoji_slice():
    ds = EmojiDataset(os.path.join(SHARED, "emoji"), resolution=32)
    assert len(ds) == 3554
    item = ds[0]
    assert item["image"].shape == (3, 32, 32) and item["caption"] == "number sign"


@needs_shared
def test_cifar10_slice_is_class_balanced():
    ds = Cifar10Dataset(os.path.join(SHARED, "cifar10"), split="test", resolution=64, limit=20)
    assert len(ds) == 20 and sorted(ds[i]["label"] for i in range(20)) == sorted(list(range(10)) * 2)
    assert ds[0]["image"].shape == (3, 64, 64) and ds[3]["caption"] == "cat"
