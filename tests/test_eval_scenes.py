import numpy as np

from vargen.data import SceneDataset, render_scene
from vargen.data.scenes import Scene, SceneObject
from vargen.eval.scenes import check_scene, find_blobs, score_scenes


def test_ground_truth_renders_score_one():
    ds = SceneDataset(resolution=96, seed=5)
    scenes = [ds.scene(i) for i in range(60)]
    result = score_scenes([render_scene(s, 96) for s in scenes], scenes)
    assert result["all"] == 1.0 and result["n"] == 60


def test_wrong_renders_score_lower():
    ds = SceneDataset(resolution=96, seed=5)
    scenes = [ds.scene(i) for i in range(60)]
    shuffled = [render_scene(s, 96) for s in scenes[7:] + scenes[:7]]
    assert score_scenes(shuffled, scenes)["all"] < 0.5


def test_position_and_count_checks():
    scene = Scene("gray", [SceneObject("circle", "red", 0.25, 0.5, 0.12), SceneObject("square", "blue", 0.75, 0.5, 0.12)],
                  "a photo of a red circle left of a blue square", "position",
                  [{"class": "circle", "count": 1, "color": "red"},
                   {"class": "square", "count": 1, "color": "blue", "position": ["left of", 0]}])
    image = render_scene(scene, 64)
    assert check_scene(image, scene) == {"color": True, "count": True, "position": True}
    mirrored = image[:, ::-1]
    assert check_scene(np.ascontiguousarray(mirrored), scene)["position"] is False
    blobs = find_blobs(image)
    assert sorted(b.color for b in blobs) == ["blue", "red"]
    assert abs(next(b for b in blobs if b.color == "red").x - 0.25) < 0.02


class _RenderingPipe:
    """Stands in for a t2i pipeline: renders the scene a caption came from (or a fixed wrong one)."""

    def __init__(self, scenes, wrong=None):
        self.by_caption = {s.caption: s for s in scenes}
        self.wrong = wrong
        self.calls = []

    def __call__(self, prompts, seed, output_type, progress, **sampling):
        from types import SimpleNamespace

        self.calls.append((len(prompts), seed, sampling))
        scenes = [self.wrong or self.by_caption[p] for p in prompts]
        return SimpleNamespace(images=np.stack([render_scene(s, 64) for s in scenes]).astype(np.float32) / 255)


def test_scene_following_scores_generated_images_per_task():
    from vargen.eval.scenes import scene_following

    scenes = [SceneDataset(seed=11).scene(i) for i in range(30)]
    perfect = _RenderingPipe(scenes)
    result = scene_following(perfect, n=30, seed=11, batch_size=8, progress=False, cfg_scale=2.0)
    assert result["all"] == 1.0 and result["n"] == 30 and result["images"].shape == (30, 64, 64, 3)
    assert [c[:2] for c in perfect.calls] == [(8, 0), (8, 8), (8, 16), (6, 24)]  # image i drawn with seed i
    assert perfect.calls[0][2] == {"cfg_scale": 2.0}
    assert sum(r["n"] for r in result["by_task"].values()) == 30
    wrong = scene_following(_RenderingPipe(scenes, wrong=scenes[0]), n=30, seed=11, progress=False)
    assert wrong["all"] < 0.5


def test_tokenizer_ceiling_scores_reconstructions():
    import torch

    from vargen.eval.scenes import tokenizer_ceiling

    class Lossless:
        device = torch.device("cpu")

        def encode(self, x):
            return x

        def decode(self, z):
            return z

    class Greyscale(Lossless):
        def decode(self, z):
            return z.mean(1, keepdim=True).expand_as(z)

    assert tokenizer_ceiling(Lossless(), n=20, seed=3, resolution=64)["all"] == 1.0
    grey = tokenizer_ceiling(Greyscale(), n=20, seed=3, resolution=64)
    assert grey["color"] < 0.5 and grey["by_task"]
