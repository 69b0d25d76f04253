import copy
import io

import numpy as np
import pytest

from vargen.data import SceneDataset, render_scene
from vargen.data.scenes import BACKGROUNDS, COLORS, SHAPES, TASKS, Scene, SceneObject
from vargen.eval.scenes import (Blob, check_scene, evaluate_blobs, find_blobs, geneval_metadata, relation_holds,
                                score_scenes, summarize_checks)


def _scenes(seed, n):
    ds = SceneDataset(seed=seed)
    return [ds.scene(i) for i in range(n)]


def _blur_jpeg(image, sigma=None, quality=None):
    from PIL import Image, ImageFilter

    im = Image.fromarray(image)
    if sigma:
        im = im.filter(ImageFilter.GaussianBlur(sigma))
    if quality:
        buf = io.BytesIO()
        im.save(buf, format="jpeg", quality=quality)
        im = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    return np.asarray(im)


@pytest.mark.parametrize("res", [64, 128, 256])
def test_shape_classification_is_exact_on_ground_truth(res):
    colors, backgrounds = list(COLORS), list(BACKGROUNDS)
    k = 0
    for shape in SHAPES:
        for r in (0.08, 0.15, 0.3):
            color, bg = colors[k % len(colors)], backgrounds[k % len(backgrounds)]
            x, y = 0.5 + 0.07 * ((k % 3) - 1), 0.5 + 0.05 * ((k % 5) - 2)
            k += 1
            scene = Scene(bg, [SceneObject(shape, color, x, y, r)], f"a photo of a {shape}", "single_object",
                          [{"class": shape, "count": 1}])
            blobs = find_blobs(render_scene(scene, res))
            assert [(b.shape, b.color) for b in blobs] == [(shape, color)], (res, shape, r, color, bg)
            b = blobs[0]
            assert abs(b.x - x) * res < 0.25 and abs(b.y - y) * res < 0.25
            area = {"circle": np.pi, "square": 2.89, "triangle": 1.299, "star": 1.3225, "diamond": 2.0,
                    "hexagon": 2.3448}[shape] * r * r
            assert abs(b.area / area - 1) < 0.03
            assert b.score > 0.97 and b.score == max(b.shape_scores.values())
            x0, y0, x1, y1 = b.bbox
            assert x0 < x < x1 and y0 < y < y1


def test_ground_truth_renders_score_one_on_every_task():
    scenes = _scenes(5, 120)
    assert {s.tag for s in scenes} == set(TASKS)
    for res, part in ((64, scenes), (96, scenes[:72]), (256, scenes[:16])):
        result = score_scenes([render_scene(s, res) for s in part], part, return_checks=True)
        assert [c["reason"] for c in result["checks"] if not c["correct"]] == []
        assert result["overall"] == 1.0 and result["all"] == 1.0 and result["n"] == len(part)
        assert result["overall_exact"] == result["exact"] == 1.0 and result["extra"] == 0.0
        assert result["count"] == result["color"] == result["position"] == 1.0
        for tag, row in result["by_task"].items():
            assert row["accuracy"] == row["all"] == 1.0, tag
        assert sum(r["n"] for r in result["by_task"].values()) == len(part)
    assert list(result["by_task"]) == [t for t in TASKS if t in result["by_task"]]  # GenEval's order
    checks = result.pop("checks")
    assert summarize_checks(checks) == result


def test_blurred_and_jpeg_renders_still_score_high():
    scenes = _scenes(7, 36)
    renders = [render_scene(s, 128) for s in scenes]
    assert score_scenes([_blur_jpeg(im, sigma=1.0) for im in renders], scenes)["overall"] >= 0.95
    assert score_scenes([_blur_jpeg(im, quality=75) for im in renders], scenes)["overall"] >= 0.95
    small = [_blur_jpeg(render_scene(s, 64), sigma=0.7, quality=90) for s in scenes]
    assert score_scenes(small, scenes)["overall"] >= 0.9


def _wrong(scenes, tags, edit):
    """Render every scene, the ones with a tag in ``tags`` after ``edit`` (a deep copy of the scene)."""
    images = []
    for s in scenes:
        if s.tag in tags:
            s = copy.deepcopy(s)
            edit(s)
        images.append(render_scene(s, 64))
    return score_scenes(images, scenes, return_checks=True)


def _assert_drops(result, dropped):
    for tag, row in result["by_task"].items():
        assert row["accuracy"] == (0.0 if tag in dropped else 1.0), (tag, row)
    assert result["overall"] == pytest.approx(1 - len(dropped) / len(result["by_task"]))


def test_wrong_renders_drop_the_expected_task():
    scenes = _scenes(5, 72)
    assert {s.tag for s in scenes} == set(TASKS)

    def recolour(s):
        used = {o.color for o in s.objects}
        s.objects[0].color = next(c for c in COLORS if c not in used)

    result = _wrong(scenes, ("colors", "color_attr"), recolour)
    _assert_drops(result, ("colors", "color_attr"))
    assert result["count"] == 1.0 and result["color"] < 1.0

    def delete(s):
        s.objects.pop()

    result = _wrong(scenes, ("counting", "two_object"), delete)
    _assert_drops(result, ("counting", "two_object"))
    assert result["by_task"]["counting"]["count"] == 0.0 and result["by_task"]["two_object"]["count"] == 0.0

    def swap(s):
        a, b = s.objects
        (a.x, a.y), (b.x, b.y) = (b.x, b.y), (a.x, a.y)

    result = _wrong(scenes, ("position",), swap)
    _assert_drops(result, ("position",))
    row = result["by_task"]["position"]
    assert row["position"] == 0.0 and row["count"] == 1.0 and row["color"] == 1.0
    assert all("left of" in c["reason"] or "right of" in c["reason"] or "above" in c["reason"]
               or "below" in c["reason"] for c in result["checks"] if c["tag"] == "position")

    def reshape(s):
        s.objects[0].shape = SHAPES[(SHAPES.index(s.objects[0].shape) + 1) % len(SHAPES)]

    result = _wrong(scenes, ("single_object",), reshape)
    _assert_drops(result, ("single_object",))

    shuffled = [render_scene(s, 64) for s in scenes[7:] + scenes[:7]]
    assert score_scenes(shuffled, scenes)["overall"] < 0.3


def test_counting_is_exact_and_extra_objects_only_matter_where_geneval_says():
    two = Scene("gray", [SceneObject("star", "red", 0.3, 0.3, 0.12), SceneObject("star", "red", 0.7, 0.7, 0.12)],
                "a photo of two stars", "counting", [{"class": "star", "count": 2}])
    assert check_scene(render_scene(two, 96), two)["correct"]
    three = copy.deepcopy(two)
    three.objects.append(SceneObject("star", "red", 0.3, 0.75, 0.12))
    check = check_scene(render_scene(three, 96), two)
    assert not check["correct"] and not check["count"] and "expected star<3, found 3" in check["reason"]
    # two objects of one colour touching (squares' corners reach 1.2 r) are still two objects
    touching = Scene("gray", [SceneObject("square", "pink", 0.393, 0.324, 0.107),
                              SceneObject("square", "pink", 0.562, 0.503, 0.101)],
                     "a photo of two squares", "counting", [{"class": "square", "count": 2}])
    for res in (64, 128):
        assert check_scene(render_scene(touching, res), touching)["correct"], res
    # single object: GenEval asks for at least one; another object of another class changes nothing
    single = Scene("sand", [SceneObject("hexagon", "blue", 0.3, 0.3, 0.15)], "a photo of a hexagon",
                   "single_object", [{"class": "hexagon", "count": 1}])
    busy = copy.deepcopy(single)
    busy.objects.append(SceneObject("triangle", "green", 0.7, 0.7, 0.15))
    check = check_scene(render_scene(busy, 96), single)
    assert check["correct"] and check["extra"] == 1 and not check["exact"]  # the strict reading fails it
    assert "1 object(s) beyond the 1 named" in check["reason"]
    # colours: the matched object of the class must have the colour; that colour elsewhere does not count
    colors = Scene("slate", [SceneObject("diamond", "yellow", 0.5, 0.5, 0.2)], "a photo of a yellow diamond",
                   "colors", [{"class": "diamond", "count": 1, "color": "yellow"}])
    other = copy.deepcopy(colors)
    other.objects = [SceneObject("diamond", "purple", 0.3, 0.3, 0.15),
                     SceneObject("circle", "yellow", 0.7, 0.7, 0.15)]
    check = check_scene(render_scene(other, 96), colors)
    assert not check["correct"] and check["color"] and check["count"]
    assert "expected yellow diamond>=1, found 0 yellow; and 1 purple" in check["reason"]


def test_position_and_blob_report():
    scene = Scene("gray", [SceneObject("circle", "red", 0.25, 0.5, 0.12),
                           SceneObject("square", "blue", 0.75, 0.5, 0.12)],
                  "a photo of a red circle left of a blue square", "position",
                  [{"class": "square", "count": 1, "color": "blue"},
                   {"class": "circle", "count": 1, "color": "red", "position": ["left of", 0]}])
    image = render_scene(scene, 64)
    check = check_scene(image, scene)
    assert check == {"tag": "position", "correct": True, "exact": True, "extra": 0, "count": True, "color": True,
                     "position": True, "reason": ""}
    mirrored = check_scene(np.ascontiguousarray(image[:, ::-1]), scene)
    assert mirrored["correct"] is False and mirrored["position"] is False and mirrored["count"] is True
    blobs = find_blobs(image)
    assert sorted((b.shape, b.color) for b in blobs) == [("circle", "red"), ("square", "blue")]
    red = next(b for b in blobs if b.color == "red")
    assert abs(red.x - 0.25) < 0.01 and abs(red.y - 0.5) < 0.01 and isinstance(red, Blob)
    assert red.bbox == pytest.approx((0.13, 0.38, 0.37, 0.62), abs=1.5 / 64)


def test_geneval_metadata_conventions():
    # scene metadata is in GenEval's form: the caption's first object carries the relation
    scene = next(s for s in _scenes(5, 60) if s.tag == "position")
    target, subject = scene.include
    meta = geneval_metadata(scene)
    rel = subject["position"][0]
    assert scene.caption.startswith(f"a photo of a{'n' if subject['color'][0] in 'aeiou' else ''} "
                                    f"{subject['color']} {subject['class']} {rel} ")
    assert meta["include"] == scene.include and meta["prompt"] == scene.caption and meta["exclude"] == []
    # GenEval's own lines are kept as they are ("a dog right of a teddy bear": the dog carries it)
    line = {"tag": "position", "include": [{"class": "teddy bear", "count": 1},
                                           {"class": "dog", "count": 1, "position": ["right of", 0]}],
            "prompt": "a photo of a dog right of a teddy bear"}
    assert geneval_metadata(line)["include"] == line["include"]
    # counting gets GenEval's exclude (count + 1); an explicit exclude is kept
    counting = next(s for s in _scenes(5, 60) if s.tag == "counting")
    n = counting.include[0]["count"]
    assert geneval_metadata(counting)["exclude"] == [{"class": counting.include[0]["class"], "count": n + 1}]
    line = {"tag": "counting", "include": [{"class": "clock", "count": 2}],
            "exclude": [{"class": "clock", "count": 3}], "prompt": "a photo of two clocks"}
    assert geneval_metadata(line)["exclude"] == line["exclude"]
    assert geneval_metadata(dict(scene.to_dict()))["include"] == meta["include"]


def test_relation_rules():
    def blob(x, y, r=0.1):
        return Blob("circle", "red", 0.03, x, y, (x - r, y - r, x + r, y + r))

    a, b = blob(0.2, 0.2), blob(0.4, 0.8)  # a is left of b, but mostly above it
    assert relation_holds(a, b, "left of") and relation_holds(a, b, "above")
    assert not relation_holds(a, b, "right of") and not relation_holds(a, b, "below")
    assert relation_holds(a, b, "above", rule="geneval") and not relation_holds(a, b, "left of", rule="geneval")
    near = blob(0.23, 0.5)  # offset 0.03 < margin 0.1 * (0.2 + 0.2): no relation
    assert not relation_holds(blob(0.2, 0.5), near, "left of")
    assert not relation_holds(blob(0.2, 0.5), near, "left of", rule="geneval")
    with pytest.raises(ValueError, match="unknown relation"):
        relation_holds(a, b, "behind")


def test_geneval_confidence_thresholds_drop_weak_detections():
    def blob(shape, score):
        return Blob(shape, "red", 0.03, 0.5, 0.5, (0.4, 0.4, 0.6, 0.6), score)

    one = {"tag": "single_object", "include": [{"class": "circle", "count": 1}]}
    assert evaluate_blobs([blob("circle", 0.35)], one)["correct"]
    assert not evaluate_blobs([blob("circle", 0.25)], one)["correct"]  # below GenEval's 0.3
    two = {"tag": "counting", "include": [{"class": "circle", "count": 2}], "exclude": [{"class": "circle", "count": 3}]}
    assert not evaluate_blobs([blob("circle", 0.95), blob("circle", 0.8)], two)["correct"]  # counting wants 0.9
    assert evaluate_blobs([blob("circle", 0.95), blob("circle", 0.92), blob("circle", 0.8)], two)["correct"]
    crowd = [blob("square", 0.5)] * 16 + [blob("circle", 0.4)]  # GenEval keeps the 16 most confident
    assert not evaluate_blobs(crowd, one)["correct"]


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

    scenes = _scenes(11, 30)
    perfect = _RenderingPipe(scenes)
    result = scene_following(perfect, n=30, seed=11, batch_size=8, progress=False, cfg_scale=2.0)
    assert result["overall"] == 1.0 and result["all"] == 1.0 and result["n"] == 30
    assert result["images"].shape == (30, 64, 64, 3) and result["captions"] == [s.caption for s in scenes]
    assert [c[:2] for c in perfect.calls] == [(8, 0), (8, 8), (8, 16), (6, 24)]  # image i drawn with seed i
    assert perfect.calls[0][2] == {"cfg_scale": 2.0}
    assert sum(r["n"] for r in result["by_task"].values()) == 30
    wrong = scene_following(_RenderingPipe(scenes, wrong=scenes[0]), n=30, seed=11, progress=False)
    assert wrong["overall"] < 0.5 and wrong["all"] < 0.5


class Lossless:
    """A stand-in tokenizer whose tokens are the image itself."""

    device = "cpu"

    def encode(self, x):
        return x

    def decode(self, z):
        return z


class Greyscale(Lossless):
    def decode(self, z):
        return z.mean(1, keepdim=True).expand_as(z)


def test_tokenizer_ceiling_scores_reconstructions():
    from vargen.eval.scenes import tokenizer_ceiling

    lossless = tokenizer_ceiling(Lossless(), n=20, seed=3, resolution=64)
    assert lossless["overall"] == 1.0 and lossless["all"] == 1.0
    grey = tokenizer_ceiling(Greyscale(), n=20, seed=3, resolution=64)
    assert grey["color"] < 0.5 and grey["overall"] < 0.7 and grey["by_task"]


def test_score_scenes_checks_lengths():
    with pytest.raises(ValueError, match="2 images for 1 scenes"):
        score_scenes([np.zeros((8, 8, 3), np.uint8)] * 2, _scenes(0, 1))


def test_exact_score_rejects_clutter_that_geneval_accepts():
    """Noise holding the right shape passes GenEval's single-object rule, not the exact one."""
    rng = np.random.default_rng(0)
    scenes = [s for s in _scenes(7, 60) if s.tag == "single_object"][:4]
    images = []
    for s in scenes:
        clutter = copy.deepcopy(s)
        for shape in SHAPES:  # the named object plus a scatter of others, every shape and colour
            clutter.objects.append(SceneObject(shape, str(rng.choice(list(COLORS))), *rng.uniform(0.1, 0.9, 2), 0.06))
        images.append(render_scene(clutter, 128))
    result = score_scenes(images, scenes)
    assert result["by_task"]["single_object"]["accuracy"] >= 0.75
    assert result["overall_exact"] == 0.0 and result["extra"] >= 3


def test_colour_fidelity_counts_the_colours_a_tokenizer_keeps():
    from vargen.eval.scenes import colour_fidelity

    exact = colour_fidelity(Lossless(), resolution=64, shapes=("circle", "square"))
    assert exact["colours_kept"] == 10 and exact["objects_kept"] == 1.0
    grey = colour_fidelity(Greyscale(), resolution=64, shapes=("circle", "square"))
    assert grey["colours_kept"] <= 3 and grey["by_colour"]["blue"] == 0.0
    assert sum(grey["found"]["blue"].values()) == 6  # 3 backgrounds x 2 shapes


class _ColourPipe:
    """Renders one centred object of the prompt's colour and shape, or of ``colour`` (a generator that ignores
    colours), or with a second object beside it."""

    def __init__(self, colour=None, extra=False):
        self.colour, self.extra, self.seeds = colour, extra, []

    def __call__(self, prompts, seed, output_type, progress, **sampling):
        from types import SimpleNamespace

        self.seeds += list(seed)
        images = []
        for prompt in prompts:
            colour, shape = prompt.split()[-2:]
            objects = [SceneObject(shape, self.colour or colour, 0.5, 0.5, 0.2)]
            if self.extra:
                objects.append(SceneObject("circle", "black", 0.15, 0.15, 0.08))
            images.append(render_scene(Scene("gray", objects, prompt, "colors"), 64))
        return SimpleNamespace(images=np.stack(images).astype(np.float32) / 255)


def test_colour_following_checks_colour_and_object_count():
    from vargen.eval.scenes import colour_following

    pipe = _ColourPipe()
    exact = colour_following(pipe, seeds=(0, 5), shapes=("circle", "square"), batch_size=7, progress=False)
    assert exact["right_colour"] == 1.0 and exact["one_object"] == 1.0 and exact["colours_drawn"] == 10
    assert exact["n"] == 40 and exact["images"].shape == (40, 64, 64, 3)
    assert pipe.seeds == [0] * 20 + [5] * 20 and exact["prompts"][0] == "a photo of a red circle"
    red = colour_following(_ColourPipe(colour="red"), seeds=(0,), shapes=("circle",), progress=False)
    assert red["colours_drawn"] == 1 and red["by_colour"]["red"] == 1.0 and red["right_colour"] == 0.1
    two = colour_following(_ColourPipe(extra=True), seeds=(0,), shapes=("square",), progress=False)
    assert two["right_colour"] >= 0.9 and two["one_object"] == 0.0


def test_eval_tokenizer_cli_reports_the_ceiling(tmp_path, capsys):
    import json

    import torch

    from vargen.cli import main
    from vargen.tokenizers import VQTokenizer

    vq = VQTokenizer(codebook_size=32, ch=16, ch_mult=[1, 1, 1, 1], z_channels=16, num_res_blocks=1, norm_groups=8)
    with torch.no_grad():  # a flat grey decoder: no objects to segment, so the checks run in seconds
        vq.decoder.conv_out.weight.zero_()
        vq.decoder.conv_out.bias.zero_()
    vq.save_pretrained(str(tmp_path / "vq"))
    out = tmp_path / "figures.json"
    assert main(["eval", "tokenizer", "--vq", str(tmp_path / "vq"), "-n", "3", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "3 held-out scenes (seed 999), 128 px: reconstruction" in printed and "colours kept:" in printed
    figures = json.loads(out.read_text())
    assert figures["n"] == 3 and 0 < figures["psnr_db"] < 60 and figures["ceiling"]["n"] == 3
    assert len(figures["colours"]["by_colour"]) == 10 and figures["colours"]["colours_kept"] == 0
    assert main(["eval", "tokenizer", "--vq", str(tmp_path / "missing")]) == 2
    assert "VQ tokenizer not found" in capsys.readouterr().err
