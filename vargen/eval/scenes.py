"""GenEval-style scoring of scene images: colour segmentation, shape identification, GenEval's rules.

Detection (:func:`find_blobs`), per image:

1. **Colour segmentation, palette-nearest along blend lines.** The background colour ``bg`` is
   the median of the pixels whose nearest palette entry (GenEval's ten colours and the
   scene backgrounds) is a background. Every pixel ``p`` is then explained as an
   anti-aliased blend ``bg + a * (c - bg)`` of the background and each palette colour
   ``c``: ``a_c`` is the clipped projection and the residual is the distance to that line.
   The pixel belongs to the colour with the smallest residual when ``a_c >= 0.5`` and the
   residual is below ``max_dist`` (for pure pixels this is the plain nearest palette
   colour; for edge pixels it stops a red-on-grey blend from being called brown).
2. **Connected components** per colour (4-connectivity), split at narrow necks (two objects
   of one colour touching); components smaller than ``min_area`` of the image, or thinner
   than ``min_thickness`` pixels (colour fringes of blurred / JPEG'd edges), are dropped.
3. **Shape identity.** Each blob's soft coverage map is the blend coefficient ``a_c`` of its
   colour over the pixels nearer to it than to any other blob (within a small band). Its
   coverage-weighted centroid and area give, for every shape of
   :data:`vargen.data.scenes.SHAPES`, the centre and half-size ``r`` that shape would need
   (all shapes are centred on their centroid; area = ``k_shape * r**2``). Each hypothesis is
   rasterised with the repo's own :func:`~vargen.data.scenes.object_coverage` and compared
   with the observed coverage by soft IoU (``sum(min) / sum(max)``); the best IoU wins and is
   the blob's ``score`` (its detection confidence). On ground-truth renders the observed
   coverage *is* the rasteriser's coverage, so the right shape fits almost perfectly.

Scoring (:func:`check_scene`, :func:`score_scenes`) follows GenEval's ``evaluate``
(``evaluation/evaluate_images.py`` in djghosh13/geneval) on the scene's GenEval metadata
(:func:`geneval_metadata`): detected objects below GenEval's confidence threshold (0.3; 0.9 for
the counting tag) are dropped, at most 16 are kept, and they are grouped by shape class and ordered
by confidence; an image is correct iff every ``include`` holds and no ``exclude`` is violated:

* include ``{"class", "count"}``: at least ``count`` objects of the class; the first ``count``
  of them (most confident first) are the include's matched objects;
* ``"color"``: at least ``count`` of the matched objects have that colour;
* ``"position": [relation, i]``: every matched object stands in ``relation`` to every matched
  object of include ``i`` (see :func:`relation_holds`: by default the centre offset along the
  relation's axis must exceed GenEval's margin, 0.1 of the two objects' extents; GenEval's
  exact rule, which also wants that axis to dominate the offset, is ``position_rule="geneval"``);
* exclude ``{"class", "count"}``: fewer than ``count`` objects of the class. GenEval's
  counting prompts carry ``exclude = count + 1`` (exactly ``count`` objects); scene
  metadata has no excludes, so :func:`geneval_metadata` adds that one for the counting tag.

:func:`score_scenes` reports per-task accuracy and GenEval's ``overall`` (the unweighted
mean of the task accuracies), next to the share of correct images and per-requirement
accuracies (colour / count / position).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from scipy import ndimage

from ..data.scenes import BACKGROUNDS, COLORS, SHAPES, TASKS, Scene, SceneObject, _polygon, object_coverage

COLOR_NAMES = tuple(COLORS)
POSITION_MARGIN = 0.1  # GenEval's POSITION_THRESHOLD
# GenEval's detector settings: detections below THRESHOLD confidence (COUNTING_THRESHOLD for the
# counting tag) are dropped and at most MAX_OBJECTS are kept. Here the confidence is the shape fit's
# soft IoU, so irregular clutter (noise blobs that a detector would not call objects) does not count.
THRESHOLD, COUNTING_THRESHOLD, MAX_OBJECTS = 0.3, 0.9, 16


def _shape_geometry(shape: str) -> Tuple[float, float, float]:
    """``(k, cx, cy)``: the shape's area is ``k * r**2`` and its centroid ``(x + cx * r, y + cy * r)``."""
    if shape == "circle":
        return math.pi, 0.0, 0.0
    p = np.asarray(_polygon(shape, 0.0, 0.0, 1.0), dtype=np.float64)
    x, y = p[:, 0], p[:, 1]
    x1, y1 = np.roll(x, -1), np.roll(y, -1)
    cross = x * y1 - x1 * y
    area = cross.sum() / 2
    return abs(area), float(((x + x1) * cross).sum() / (6 * area)), float(((y + y1) * cross).sum() / (6 * area))


SHAPE_GEOMETRY = {s: _shape_geometry(s) for s in SHAPES}


@dataclass
class Blob:
    """One detected object. Coordinates are image fractions in [0, 1] (``y`` grows downwards)."""

    shape: str  # best-fitting shape of SHAPES
    color: str  # one of GenEval's ten colour names
    area: float  # soft (anti-aliasing aware) area, fraction of the image
    x: float  # coverage-weighted centroid
    y: float
    bbox: Tuple[float, float, float, float]  # (x0, y0, x1, y1) of the blob's pixels
    score: float = 1.0  # soft IoU of the best shape fit: the detection confidence
    shape_scores: Dict[str, float] = field(default_factory=dict)  # soft IoU of every shape hypothesis


def estimate_background(image: np.ndarray, max_dist: float = 60.0) -> np.ndarray:
    """Background colour of ``[H, W, 3]`` uint8 ``image``: the median of the pixels whose nearest
    palette entry is one of the scene backgrounds (the border's median when there are too few)."""
    img = image.reshape(-1, 3).astype(np.float32)
    palette = np.array([COLORS[n] for n in COLORS] + [BACKGROUNDS[n] for n in BACKGROUNDS], dtype=np.float32)
    dist2 = (img ** 2).sum(-1, keepdims=True) - 2 * img @ palette.T + (palette ** 2).sum(-1)
    is_bg = (dist2.argmin(-1) >= len(COLORS)) & (dist2.min(-1) < max_dist ** 2)
    if is_bg.sum() >= 0.05 * len(img):
        return np.median(img[is_bg], axis=0)
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]]).astype(np.float32)
    return np.median(border, axis=0)


def segment_colors(image: np.ndarray, max_dist: float = 60.0):
    """Per-pixel colour assignment of an ``[H, W, 3]`` uint8 image (step 1 of the module doc).

    Returns ``(labels, alpha, bg)``: ``labels`` ``[H, W]`` int, the index into
    :data:`COLOR_NAMES` of a pixel's colour or ``-1`` (background / unexplained);
    ``alpha`` ``[H, W, 10]`` the blend coefficient of every colour; ``bg`` the background colour.
    """
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an [H, W, 3] image, got shape {image.shape}")
    bg = estimate_background(image, max_dist)
    diff = image.astype(np.float32) - bg  # [H, W, 3]
    d = np.array([COLORS[n] for n in COLOR_NAMES], dtype=np.float32) - bg  # [10, 3]
    norm2 = np.maximum((d ** 2).sum(-1), 1e-6)
    dot = diff @ d.T  # [H, W, 10]
    alpha = np.clip(dot / norm2, 0.0, 1.0)
    # squared distance of each pixel to each blend line bg -> colour
    residual2 = (diff ** 2).sum(-1, keepdims=True) - 2 * alpha * dot + alpha ** 2 * norm2
    best = residual2.argmin(-1)
    a_best = np.take_along_axis(alpha, best[..., None], -1)[..., 0]
    r_best = np.take_along_axis(residual2, best[..., None], -1)[..., 0]
    # a colour hardly different from the background cannot be told apart from it
    visible = np.sqrt(norm2)[best] >= 20.0
    labels = np.where((a_best >= 0.5) & (r_best < max_dist ** 2) & visible, best, -1)
    return labels, alpha, bg


def classify_shape(coverage: np.ndarray, supersample: int = 4,
                   blurs: Sequence[float] = (0.0, 0.5, 1.0, 1.5)) -> Tuple[str, Dict[str, float]]:
    """Best shape of :data:`SHAPES` for a soft coverage map ``[H, W]`` (values in [0, 1], one object).

    For each shape the centre and size follow from the coverage's centroid and area; the shape
    is rasterised there with :func:`~vargen.data.scenes.object_coverage`, optionally blurred
    (Gaussian, ``blurs`` in pixels; the best one counts, so soft images are matched by soft
    shapes) and scored by soft IoU. Returns ``(shape, {shape: iou})``.
    """
    H, W = coverage.shape
    total = float(coverage.sum())
    if total <= 0:
        return SHAPES[0], {s: 0.0 for s in SHAPES}
    ys, xs = np.nonzero(coverage)
    w = coverage[ys, xs]
    cx, cy = float(((xs + 0.5) * w).sum() / total / W), float(((ys + 0.5) * w).sum() / total / H)
    area = total / (H * W)
    # a window holding the observation and every hypothesis, with room for the blur
    pad = int(math.ceil(3 * max(blurs, default=0.0))) + 2
    reach = math.sqrt(area / min(g[0] for g in SHAPE_GEOMETRY.values())) * 1.2
    y0 = max(0, min(ys.min(), int((cy - reach) * H)) - pad)
    y1 = min(H, max(ys.max() + 1, int(math.ceil((cy + reach) * H))) + pad)
    x0 = max(0, min(xs.min(), int((cx - reach) * W)) - pad)
    x1 = min(W, max(xs.max() + 1, int(math.ceil((cx + reach) * W))) + pad)
    obs = coverage[y0:y1, x0:x1]
    scores = {}
    for shape in SHAPES:
        k, ox, oy = SHAPE_GEOMETRY[shape]
        r = math.sqrt(area / k)
        hyp = object_coverage(SceneObject(shape, "", cx - ox * r, cy - oy * r, r), H, W, supersample)[y0:y1, x0:x1]
        best = 0.0
        for sigma in blurs:
            h = ndimage.gaussian_filter(hyp, sigma, mode="constant") if sigma > 0 else hyp
            union = np.maximum(h, obs).sum()
            best = max(best, float(np.minimum(h, obs).sum() / union) if union > 0 else 0.0)
        scores[shape] = best
    return max(scores, key=scores.get), scores


def find_blobs(image: np.ndarray, max_dist: float = 60.0, min_area: float = 0.004, min_thickness: float = 1.5,
               neck: Optional[int] = None, band: Optional[float] = None, supersample: int = 4,
               blurs: Sequence[float] = (0.0, 0.5, 1.0, 1.5)) -> List[Blob]:
    """Objects of an ``[H, W, 3]`` uint8 image: one-colour connected regions with their shape.

    ``min_area``: smallest object, as a fraction of the image. ``min_thickness``: a region must
    hold a pixel at least this many pixels from its edge (drops 1-2 px colour fringes).
    ``neck``: regions joined by a neck narrower than about ``2 * neck`` pixels (two objects of
    one colour touching) are split there (default 1.2% of the image side; 0 = never).
    ``band``: how far (pixels) around a region its soft coverage is collected (default
    ``2 + 1%`` of the image side). ``supersample`` and ``blurs`` go to :func:`classify_shape`.
    Blobs come out in colour order, then top-to-bottom.
    """
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {image.dtype}")
    labels, alpha, _ = segment_colors(image, max_dist)
    H, W = labels.shape
    neck = max(1, int(round(0.012 * min(H, W)))) if neck is None else neck
    comp = np.zeros((H, W), dtype=np.int32)
    colors = []
    for ci in range(len(COLOR_NAMES)):
        lab, n = ndimage.label(labels == ci)
        if n == 0:
            continue
        areas = ndimage.sum_labels(np.ones_like(lab), lab, index=np.arange(1, n + 1))
        for j in np.nonzero(areas >= min_area * H * W)[0]:
            for mask in _split_touching(lab == j + 1, neck):
                if mask.sum() < min_area * H * W:
                    continue
                if ndimage.distance_transform_edt(np.pad(mask, 1)).max() < min_thickness:
                    continue
                colors.append(ci)
                comp[mask] = len(colors)
    if not colors:
        return []
    band = 2.0 + 0.01 * max(H, W) if band is None else band
    dist, (iy, ix) = ndimage.distance_transform_edt(comp == 0, return_indices=True)
    territory = np.where(dist <= band, comp[iy, ix], 0)
    blobs = []
    for k, ci in enumerate(colors, start=1):
        cov = np.where(territory == k, alpha[..., ci], 0.0)
        total = float(cov.sum())
        ys, xs = np.nonzero(cov)
        w = cov[ys, xs]
        hy, hx = np.nonzero(comp == k)
        bbox = (hx.min() / W, hy.min() / H, (hx.max() + 1) / W, (hy.max() + 1) / H)
        shape, scores = classify_shape(cov, supersample, blurs)
        blobs.append(Blob(shape, COLOR_NAMES[ci], total / (H * W), float(((xs + 0.5) * w).sum() / total / W),
                          float(((ys + 0.5) * w).sum() / total / H), tuple(float(v) for v in bbox),
                          scores[shape], scores))
    return blobs


def _split_touching(mask: np.ndarray, neck: int) -> List[np.ndarray]:
    """Split a region at necks: erode by a disk of radius ``neck``; when that leaves two or more
    sizeable cores (each at least a fifth of the largest), every pixel goes to its nearest core.
    Convex shapes and the stars (whose arms widen towards the body) never split."""
    if neck < 1:
        return [mask]
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    crop = mask[y0:y1, x0:x1]
    yy, xx = np.mgrid[-neck:neck + 1, -neck:neck + 1]
    cores, n = ndimage.label(ndimage.binary_erosion(crop, structure=yy ** 2 + xx ** 2 <= neck ** 2))
    if n < 2:
        return [mask]
    sizes = ndimage.sum_labels(np.ones_like(cores), cores, index=np.arange(1, n + 1))
    keep = [j + 1 for j in range(n) if sizes[j] >= 0.2 * sizes.max()]
    if len(keep) < 2:
        return [mask]
    cores = np.where(np.isin(cores, keep), cores, 0)
    _, (iy, ix) = ndimage.distance_transform_edt(cores == 0, return_indices=True)
    owner = np.where(crop, cores[iy, ix], 0)
    parts = []
    for j in keep:
        part = np.zeros_like(mask)
        part[y0:y1, x0:x1] = owner == j
        parts.append(part)
    return parts


# ----------------------------------------------------------------------------- GenEval rules
def geneval_metadata(scene: Union[Scene, dict]) -> dict:
    """The GenEval metadata line of a scene: ``{"tag", "include", "exclude", "prompt"}``.

    Counting without an ``exclude`` gets GenEval's ``{"class", "count": count + 1}`` exclude,
    so the count must be exact. Position follows GenEval: include ``{"class": A, "position":
    [rel, i]}`` means "A is ``rel`` include ``i``" (scene metadata is written that way).
    """
    if isinstance(scene, Scene):
        meta = {"tag": scene.tag, "include": scene.include, "prompt": scene.caption,
                **({"exclude": scene.exclude} if getattr(scene, "exclude", None) else {})}
    else:
        meta = {"tag": scene["tag"], "include": scene["include"], "exclude": scene.get("exclude", []),
                "prompt": scene.get("prompt", scene.get("caption", ""))}
    include = copy.deepcopy(list(meta["include"]))
    exclude = copy.deepcopy(list(meta.get("exclude", [])))
    if meta["tag"] == "counting" and not exclude:
        exclude = [{"class": r["class"], "count": r["count"] + 1} for r in include]
    return {"tag": meta["tag"], "include": include, "exclude": exclude, "prompt": meta["prompt"]}


def relation_holds(a: Blob, b: Blob, relation: str, margin: float = POSITION_MARGIN, rule: str = "axis") -> bool:
    """Whether object ``a`` is ``relation`` (left of / right of / above / below) object ``b``.

    ``rule="axis"`` (default): along the relation's axis, ``a``'s centre is beyond ``b``'s
    centre by more than ``margin * (size_a + size_b)`` (sizes are the bounding boxes' extents
    on that axis): GenEval's margin, without its requirement that this axis dominates the
    offset (scene placements only constrain one axis). ``rule="geneval"``: GenEval's
    ``relative_position`` exactly (bounding-box centres; the margin-reduced offset, divided by
    the full offset's length, must exceed 0.5 along the relation's direction).
    """
    if relation not in ("left of", "right of", "above", "below"):
        raise ValueError(f"unknown relation {relation!r}")
    size = lambda o: np.array([o.bbox[2] - o.bbox[0], o.bbox[3] - o.bbox[1]])
    if rule == "axis":
        offset = np.array([a.x - b.x, a.y - b.y])
    elif rule == "geneval":
        offset = np.array([(a.bbox[0] + a.bbox[2] - b.bbox[0] - b.bbox[2]) / 2,
                           (a.bbox[1] + a.bbox[3] - b.bbox[1] - b.bbox[3]) / 2])
    else:
        raise ValueError(f"rule must be 'axis' or 'geneval', got {rule!r}")
    revised = np.maximum(np.abs(offset) - margin * (size(a) + size(b)), 0) * np.sign(offset)
    axis, sign = {"left of": (0, -1), "right of": (0, 1), "above": (1, -1), "below": (1, 1)}[relation]
    if rule == "axis":
        return bool(sign * revised[axis] > 0)
    if np.all(np.abs(revised) < 1e-3):
        return False
    return bool(sign * revised[axis] / np.linalg.norm(offset) > 0.5)


def evaluate_blobs(blobs: Sequence[Blob], metadata: dict, position_rule: str = "axis",
                   margin: float = POSITION_MARGIN) -> dict:
    """GenEval's ``evaluate`` on detected blobs and one GenEval metadata dict (see the module doc).

    Returns ``{"correct", "exact", "extra", "count", "color", "position", "reason"}``: ``correct`` is
    GenEval's verdict; ``extra`` the number of detections (confidence >= 0.3, at most 16) beyond the
    objects the metadata names, and ``exact`` = ``correct`` with no extra object (a scene holds
    exactly the named objects, so this is the strict reading of its metadata; it stops clutter
    that contains the right shapes from passing); ``count`` (every include's class found often enough and no exclude violated),
    ``color`` (for every coloured include, at least ``count`` objects of that colour, whatever
    their shape) and ``position`` (the include's objects and its target's objects, taken by
    class alone, stand in the relation) are diagnostics, each judged on its own, present
    only when the metadata makes such a requirement.
    """
    min_score = COUNTING_THRESHOLD if metadata.get("tag") == "counting" else THRESHOLD
    # objects beyond those the prompt names (scenes hold exactly those): GenEval ignores them outside
    # counting, so noise that happens to hold the right shapes passes; "exact" below does not
    named = sum(req["count"] for req in metadata.get("include", []))
    extra = max(0, min(MAX_OBJECTS, sum(b.score >= THRESHOLD for b in blobs)) - named)
    blobs = [b for b in sorted(blobs, key=lambda b: -b.score) if b.score >= min_score][:MAX_OBJECTS]
    objects: Dict[str, List[Blob]] = {}
    for b in blobs:
        objects.setdefault(b.shape, []).append(b)
    includes = metadata.get("include", [])
    correct, reasons, groups = True, [], []
    flags = {"count": True}
    for req in includes:
        cls, count = req["class"], req["count"]
        found = objects.get(cls, [])[:count]
        matched = True
        if "color" in req:  # diagnostic: the colour is there, whatever the shapes
            flags["color"] = flags.get("color", True) and sum(b.color == req["color"] for b in blobs) >= count
        if "position" in req:  # diagnostic: the objects of both classes (if found) stand in the relation
            rel, target = req["position"]
            other = objects.get(includes[target]["class"], [])[:includes[target]["count"]]
            flags["position"] = flags.get("position", True) and len(found) == count and len(other) > 0 and all(
                relation_holds(o, t, rel, margin, position_rule) for o in found for t in other)
        if len(found) < count:
            correct = matched = flags["count"] = False
            reasons.append(f"expected {cls}>={count}, found {len(found)}")
        else:
            if "color" in req:
                colors = [b.color for b in found]
                if colors.count(req["color"]) < count:
                    correct = matched = False
                    reasons.append(f"expected {req['color']} {cls}>={count}, found {colors.count(req['color'])} "
                                   f"{req['color']}; and " + ", ".join(f"{colors.count(c)} {c}" for c in COLOR_NAMES
                                                                       if c in colors))
            if "position" in req and matched:
                rel, target = req["position"]
                if groups[target] is None:
                    correct = matched = False
                    reasons.append(f"no target for {cls} to be {rel}")
                elif not all(relation_holds(o, t, rel, margin, position_rule) for o in found for t in groups[target]):
                    correct = matched = False
                    reasons.append(f"expected {cls} {rel} target")
        groups.append(found if matched else None)
    for req in metadata.get("exclude", []):
        n = len(objects.get(req["class"], []))
        if n >= req["count"]:
            correct = flags["count"] = False
            reasons.append(f"expected {req['class']}<{req['count']}, found {n}")
    if extra:
        reasons.append(f"{extra} object(s) beyond the {named} named")
    return {"correct": correct, "exact": correct and not extra, "extra": extra, **flags, "reason": "\n".join(reasons)}


def check_scene(image: np.ndarray, scene: Union[Scene, dict], position_rule: str = "axis", **detect) -> dict:
    """GenEval's verdict on one ``[H, W, 3]`` uint8 image for its scene (or GenEval metadata dict).

    ``detect`` goes to :func:`find_blobs`. Returns :func:`evaluate_blobs`' dict plus ``tag``.
    """
    meta = geneval_metadata(scene)
    return {"tag": meta["tag"], **evaluate_blobs(find_blobs(image, **detect), meta, position_rule)}


def score_scenes(images: Sequence[np.ndarray], scenes: Sequence[Union[Scene, dict]], position_rule: str = "axis",
                 return_checks: bool = False, **detect) -> Dict[str, object]:
    """GenEval-style accuracy of images against their scenes (:func:`check_scene` on each, then
    :func:`summarize_checks`).

    Returns::

        {"overall": mean of the per-task accuracies (GenEval's overall score),
         "overall_exact": the same for "exact" (correct and no object beyond the named ones),
         "all": share of correct images, "exact": share of exact images,
         "extra": mean number of unnamed objects per image, "n": number of images,
         "by_task": {tag: {"accuracy", "all" (= accuracy), "n", "count", "color", "position"}},
         "count", "color", "position": per-requirement accuracies (with "count_n", ... the
             number of images that make the requirement; absent when none does),
         "checks": [per-image check_scene dicts]  (only with return_checks=True)}

    ``by_task`` holds the tasks present, in GenEval's order; the per-requirement keys of a
    task are there when its images make that requirement.
    """
    if len(images) != len(scenes):
        raise ValueError(f"got {len(images)} images for {len(scenes)} scenes")
    checks = [check_scene(np.asarray(img), s, position_rule, **detect) for img, s in zip(images, scenes)]
    result = summarize_checks(checks)
    if return_checks:
        result["checks"] = checks
    return result


def summarize_checks(checks: Sequence[dict]) -> Dict[str, object]:
    """:func:`score_scenes`' figures from per-image :func:`check_scene` results (no detection:
    resample ``checks`` to bootstrap the scores cheaply)."""
    checks = list(checks)
    result = _aggregate(checks)
    order = {t: i for i, t in enumerate(TASKS)}
    by_task = {}
    for tag in sorted({c["tag"] for c in checks}, key=lambda t: (order.get(t, len(order)), t)):
        part = _aggregate([c for c in checks if c["tag"] == tag])
        by_task[tag] = {"accuracy": part["all"], **{k: v for k, v in part.items() if not k.endswith("_n")}}
    result["by_task"] = by_task
    result["overall"] = float(np.mean([t["accuracy"] for t in by_task.values()])) if by_task else float("nan")
    result["overall_exact"] = float(np.mean([t["exact"] for t in by_task.values()])) if by_task else float("nan")
    return result


def _aggregate(checks: List[dict]) -> dict:
    result = {}
    for key in ("count", "color", "position"):
        vals = [c[key] for c in checks if key in c]
        if vals:
            result[key] = float(np.mean(vals))
            result[f"{key}_n"] = len(vals)
    result["all"] = float(np.mean([c["correct"] for c in checks])) if checks else float("nan")
    result["exact"] = float(np.mean([c["exact"] for c in checks])) if checks else float("nan")
    result["extra"] = float(np.mean([c["extra"] for c in checks])) if checks else float("nan")
    result["n"] = len(checks)
    return result


def scene_following(pipe, n: int = 100, seed: int = 999, resolution: Optional[int] = None, batch_size: int = 16,
                    progress: bool = True, **sampling) -> Dict[str, object]:
    """Generate from ``n`` held-out scene captions (``SceneDataset(seed=seed)``) and score each image
    against its exact scene metadata with :func:`score_scenes`.

    Image ``i`` is drawn with seed ``i`` (batches change nothing). ``sampling`` goes to the
    pipeline call (``cfg_scale``, ``top_k``, ...). Returns the :func:`score_scenes` figures
    (``overall``, ``by_task``, ...), the images (``[n, H, W, 3]`` uint8) and the captions.
    """
    from tqdm.auto import tqdm

    from ..data.scenes import SceneDataset

    data = SceneDataset(resolution=resolution or 128, seed=seed)
    scenes = [data.scene(i) for i in range(n)]
    images = []
    for start in tqdm(range(0, n, batch_size), desc="scene prompts", disable=not progress):
        chunk = scenes[start:start + batch_size]
        out = pipe([s.caption for s in chunk], seed=start, output_type="np", progress=False, **sampling)
        images += list((out.images * 255).round().astype(np.uint8))
    return {**score_scenes(images, scenes), "images": np.stack(images), "captions": [s.caption for s in scenes]}


def colour_prompts(shapes: Sequence[str] = SHAPES) -> List[Tuple[str, str, str]]:
    """``(prompt, colour, shape)`` for "a photo of a {colour} {shape}", every GenEval colour x every shape."""
    from ..data.scenes import _article

    return [(f"a photo of {_article(c)} {c} {shape}", c, shape) for c in COLOR_NAMES for shape in shapes]


def colour_following(pipe, seeds: Sequence[int] = (0, 1), shapes: Sequence[str] = SHAPES, batch_size: int = 16,
                     progress: bool = True, **sampling) -> Dict[str, object]:
    """Does the generator draw the colour it is asked for? :func:`colour_prompts` drawn once per seed of ``seeds``
    (every prompt with that seed), each image checked with :func:`find_blobs`: **right colour** when its largest
    object has the prompt's colour, **one object** when it holds exactly one object and that one has it.

    Returns ``right_colour`` and ``one_object`` (shares of all images), ``by_colour`` (right-colour share per
    colour), ``colours_drawn`` (colours right in at least one image), the ``prompts`` and the ``images``
    (``[n, H, W, 3]`` uint8, seed-major). ``sampling`` goes to the pipeline call (``cfg_scale``, ...)."""
    from tqdm.auto import tqdm

    items = [(seed, *item) for seed in seeds for item in colour_prompts(shapes)]
    images, right, one = [], [], []
    for start in tqdm(range(0, len(items), batch_size), desc="colour prompts", disable=not progress):
        chunk = items[start:start + batch_size]
        out = pipe([prompt for _, prompt, _, _ in chunk], seed=[seed for seed, *_ in chunk], output_type="np",
                   progress=False, **sampling)
        for image, (_, _, colour, _) in zip((out.images * 255).round().astype(np.uint8), chunk):
            blobs = find_blobs(image)
            right.append(bool(blobs) and max(blobs, key=lambda b: b.area).color == colour)
            one.append(len(blobs) == 1 and blobs[0].color == colour)
            images.append(image)
    by_colour = {c: float(np.mean([r for r, (_, _, colour, _) in zip(right, items) if colour == c]))
                 for c in COLOR_NAMES}
    return {"right_colour": float(np.mean(right)), "one_object": float(np.mean(one)), "by_colour": by_colour,
            "colours_drawn": sum(v > 0 for v in by_colour.values()), "n": len(items),
            "prompts": [prompt for _, prompt, _, _ in items], "images": np.stack(images)}


def _reconstruct(vq, images: torch.Tensor) -> np.ndarray:
    """Images ``[B, 3, H, W]`` in [-1, 1] through ``vq`` (encode -> decode) as ``[B, H, W, 3]`` uint8."""
    rec = vq.decode(vq.encode(images.to(vq.device))).float().clamp(-1, 1)
    return ((rec + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def tokenizer_ceiling(vq, n: int = 100, seed: int = 999, resolution: int = 128, batch_size: int = 16) -> dict:
    """The same scores for the ground-truth renders of the same ``n`` scenes after encode -> decode
    through ``vq``: what a perfect generator could reach with this tokenizer (a 1D tokenizer takes its own
    fixed ``image_size``)."""
    from ..data.scenes import SceneDataset
    from ..tokenizers import Flex1DTokenizer

    if isinstance(vq, Flex1DTokenizer):  # the 2D VQ is fully convolutional, the 1D tokenizer is not
        resolution = vq.config.image_size
    data = SceneDataset(resolution=resolution, seed=seed)
    scenes = [data.scene(i) for i in range(n)]
    images = []
    for start in range(0, n, batch_size):
        x = torch.stack([data[i]["image"] for i in range(start, min(n, start + batch_size))])
        images += list(_reconstruct(vq, x))
    return score_scenes(images, scenes)


@torch.no_grad()
def colour_fidelity(vq, resolution: int = 128, shapes: Sequence[str] = SHAPES, radius: float = 0.2,
                    batch_size: int = 18) -> dict:
    """Whether single objects come back from encode -> decode through ``vq`` in their own colour.

    Every colour of :data:`COLOR_NAMES` on every scene background, one centred object per shape of
    ``shapes`` (half-size ``radius``); an object counts as kept when the largest blob that
    :func:`find_blobs` finds in the reconstruction has its colour. Returns ``{"by_colour": {colour:
    share kept}, "found": {colour: {colour found (or "none"): images}}, "colours_kept": colours kept in
    at least half their images, "objects_kept": share of all objects kept}``.
    """
    from ..data.scenes import render_scene

    scenes = [Scene(bg, [SceneObject(shape, color, 0.5, 0.5, radius)], "", "colors")
              for color in COLOR_NAMES for bg in BACKGROUNDS for shape in shapes]
    found: Dict[str, Dict[str, int]] = {c: {} for c in COLOR_NAMES}
    for start in range(0, len(scenes), batch_size):
        part = scenes[start:start + batch_size]
        x = torch.from_numpy(np.stack([render_scene(s, resolution) for s in part])).permute(0, 3, 1, 2)
        for image, scene in zip(_reconstruct(vq, x.float() / 127.5 - 1), part):
            blobs = find_blobs(image)
            got = max(blobs, key=lambda b: b.area).color if blobs else "none"
            tally = found[scene.objects[0].color]
            tally[got] = tally.get(got, 0) + 1
    by_colour = {c: found[c].get(c, 0) / sum(found[c].values()) for c in COLOR_NAMES}
    return {"by_colour": by_colour, "found": found, "colours_kept": sum(v >= 0.5 for v in by_colour.values()),
            "objects_kept": float(np.mean(list(by_colour.values())))}


def _score_by_task(images, scenes) -> dict:
    """Kept for callers of the old name: :func:`score_scenes` now reports ``by_task`` itself."""
    return score_scenes(images, scenes)
