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
