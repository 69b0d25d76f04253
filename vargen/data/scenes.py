"""Procedural compositional scenes with GenEval-style captions and exact metadata.

A scene is a resolution-free description (shapes, colours, centres and sizes in [0, 1]
image coordinates); :func:`render_scene` rasterises it at any resolution with
supersampled anti-aliasing, so the same scene gives exact ground truth at 32 px or 1024 px.
Captions follow GenEval's six tasks: single object, two objects, counting, colours,
position and colour attribution.
"""
from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field
from typing import List, Optional

import numpy as np
import torch

# GenEval's ten colour names, as sRGB.
COLORS = {
    "red": (220, 30, 30), "orange": (245, 140, 20), "yellow": (245, 225, 30), "green": (40, 170, 60),
    "blue": (35, 80, 220), "purple": (130, 50, 170), "pink": (245, 140, 190), "brown": (120, 70, 30),
    "black": (15, 15, 15), "white": (250, 250, 250),
}
# Mid-tone backgrounds so that black and white objects both stand out.
BACKGROUNDS = {"gray": (150, 150, 150), "slate": (118, 128, 145), "sand": (172, 162, 132)}
SHAPES = ("circle", "square", "triangle", "star", "diamond", "hexagon")
RELATIONS = ("left of", "right of", "above", "below")
TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}


@dataclass
class SceneObject:
    """One shape: centre ``(x, y)`` and half-size ``r`` in [0, 1] image units (y grows downwards)."""

    shape: str
    color: str
    x: float
    y: float
    r: float


@dataclass
class Scene:
    """A scene description: background, objects, caption and the GenEval-style task metadata."""

    background: str
    objects: List[SceneObject]
    caption: str
    tag: str
    include: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Scene":
        return cls(d["background"], [SceneObject(**o) for o in d["objects"]], d["caption"], d["tag"],
                   d.get("include", []))


def _plural(shape: str, count: int) -> str:
    return shape if count == 1 else shape + "s"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _place(rng: random.Random, n: int, r_range=(0.09, 0.16), boxes=None, tries: int = 200):
    """Sample ``n`` non-overlapping (x, y, r); ``boxes`` optionally constrains each centre's region."""
    placed = []
    for i in range(n):
        for _ in range(tries):
            r = rng.uniform(*r_range)
            x0, x1, y0, y1 = boxes[i] if boxes else (0.0, 1.0, 0.0, 1.0)
            x = rng.uniform(max(x0, r + 0.02), min(x1, 0.98 - r))
            y = rng.uniform(max(y0, r + 0.02), min(y1, 0.98 - r))
            if all(math.hypot(x - px, y - py) > (r + pr) * 1.15 for px, py, pr in placed):
                placed.append((x, y, r))
                break
        else:
            return None
    return placed


def sample_scene(rng: random.Random, task: Optional[str] = None) -> Scene:
    """Draw one scene (and its caption) for ``task`` (random GenEval task by default)."""
    task = task or rng.choice(TASKS)
    background = rng.choice(list(BACKGROUNDS))
    colors = list(COLORS)
    while True:
        if task in ("single_object", "colors"):
            shape, color = rng.choice(SHAPES), rng.choice(colors)
            specs = [(shape, color)]
            caption = (f"a photo of {_article(shape)} {shape}" if task == "single_object"
                       else f"a photo of {_article(color)} {color} {shape}")
            include = [{"class": shape, "count": 1, **({"color": color} if task == "colors" else {})}]
            boxes = None
            r_range = (0.15, 0.3)
        elif task == "counting":
            shape, color, count = rng.choice(SHAPES), rng.choice(colors), rng.randint(2, 4)
            specs = [(shape, color)] * count
            caption = f"a photo of {NUMBER_WORDS[count]} {_plural(shape, count)}"
            include = [{"class": shape, "count": count}]
            boxes, r_range = None, (0.08, 0.14)
        else:
            a, b = rng.sample(SHAPES, 2)
            ca, cb = rng.sample(colors, 2)
            specs = [(a, ca), (b, cb)]
            boxes, r_range = None, (0.1, 0.17)
            if task == "two_object":
                caption = f"a photo of {_article(a)} {a} and {_article(b)} {b}"
                include = [{"class": a, "count": 1}, {"class": b, "count": 1}]
            elif task == "color_attr":
                caption = f"a photo of {_article(ca)} {ca} {a} and {_article(cb)} {cb} {b}"
                include = [{"class": a, "count": 1, "color": ca}, {"class": b, "count": 1, "color": cb}]
            else:  # position: GenEval says "a photo of A <relation> B"; A's position relative to B
                rel = rng.choice(RELATIONS)
                first, second = {
                    "left of": ((0.0, 0.45, 0, 1), (0.55, 1, 0, 1)), "right of": ((0.55, 1, 0, 1), (0.0, 0.45, 0, 1)),
                    "above": ((0, 1, 0.0, 0.45), (0, 1, 0.55, 1)), "below": ((0, 1, 0.55, 1), (0, 1, 0.0, 0.45)),
                }[rel]
                boxes = [first, second]
                caption = f"a photo of {_article(ca)} {ca} {a} {rel} {_article(cb)} {cb} {b}"
                # GenEval's form: the caption's first object carries the relation to include 0
                include = [{"class": b, "count": 1, "color": cb},
                           {"class": a, "count": 1, "color": ca, "position": [rel, 0]}]
        placed = _place(rng, len(specs), r_range, boxes)
        if placed is not None:
            objects = [SceneObject(s, c, x, y, r) for (s, c), (x, y, r) in zip(specs, placed)]
            return Scene(background, objects, caption, task, include)


def _polygon(shape: str, x: float, y: float, r: float):
    if shape == "square":
        k = r * 0.85
        return [(x - k, y - k), (x + k, y - k), (x + k, y + k), (x - k, y + k)]
    n, start, radii = {"triangle": (3, -90, [r]), "diamond": (4, -90, [r]), "hexagon": (6, 0, [r * 0.95]),
                       "star": (10, -90, [r, r * 0.45])}[shape]
    pts = []
    for i in range(n):
        a = math.radians(start + 360 * i / n)
        rad = radii[i % len(radii)]
        pts.append((x + rad * math.cos(a), y + rad * math.sin(a)))
    return pts


def _inside_polygon(px: np.ndarray, py: np.ndarray, pts) -> np.ndarray:
    """Even-odd rule point-in-polygon, vectorised over pixel centres."""
    inside = np.zeros(px.shape, dtype=bool)
    n = len(pts)
    for i in range(n):
        x1, y1 = pts[i]
        x2, y2 = pts[(i + 1) % n]
        crosses = (y1 > py) != (y2 > py)
        with np.errstate(divide="ignore", invalid="ignore"):
            xint = x1 + (py - y1) * (x2 - x1) / (y2 - y1)
        inside ^= crosses & (px < xint)
    return inside


def object_coverage(obj: SceneObject, height: int, width: int, supersample: int = 4) -> np.ndarray:
    """Fraction of each pixel covered by ``obj`` (``[H, W]`` floats in [0, 1]).

    Only the pixels of the object's bounding box are supersampled (the rest is 0), so an
    object costs in proportion to its area, not the image's.
    """
    s = supersample
    cov = np.zeros((height, width), dtype=np.float64)
    y0, y1 = max(0, int((obj.y - obj.r) * height) - 1), min(height, int(math.ceil((obj.y + obj.r) * height)) + 1)
    x0, x1 = max(0, int((obj.x - obj.r) * width) - 1), min(width, int(math.ceil((obj.x + obj.r) * width)) + 1)
    if y1 <= y0 or x1 <= x0:
        return cov
    ys = (np.arange(y0 * s, y1 * s) + 0.5) / (height * s)
    xs = (np.arange(x0 * s, x1 * s) + 0.5) / (width * s)
    px, py = np.meshgrid(xs, ys)
    if obj.shape == "circle":
        inside = (px - obj.x) ** 2 + (py - obj.y) ** 2 <= obj.r ** 2
    else:
        inside = _inside_polygon(px, py, _polygon(obj.shape, obj.x, obj.y, obj.r))
    cov[y0:y1, x0:x1] = inside.reshape(y1 - y0, s, x1 - x0, s).mean(axis=(1, 3))
    return cov


def render_scene(scene: Scene, height: int, width: Optional[int] = None, supersample: int = 4) -> np.ndarray:
    """Rasterise ``scene`` to ``[H, W, 3]`` uint8 with anti-aliased edges (coverage blending)."""
    width = width or height
    if height < 1 or width < 1:
        raise ValueError(f"resolution must be positive, got {height} x {width}")
    img = np.empty((height, width, 3), dtype=np.float32)
    img[:] = BACKGROUNDS[scene.background]
    for obj in scene.objects:
        cov = object_coverage(obj, height, width, supersample)[..., None]
        img = img * (1 - cov) + np.asarray(COLORS[obj.color], dtype=np.float32) * cov
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


class SceneDataset(torch.utils.data.Dataset):
    """Seeded scenes: item ``i`` is always the same scene, rendered at ``resolution``.

    Returns ``{"image": [3, H, W] float in [-1, 1], "caption": str, "scene": dict}``. The
    length is nominal (scenes are unlimited); raise it for longer epochs.

    Example:
        >>> ds = SceneDataset(resolution=32, seed=0)
        >>> ds[0]["image"].shape
        torch.Size([3, 32, 32])
    """

    def __init__(self, resolution: int = 128, seed: int = 0, length: int = 1_000_000,
                 tasks=TASKS, supersample: int = 4):
        self.resolution, self.seed, self.length, self.supersample = resolution, seed, length, supersample
        unknown = set(tasks) - set(TASKS)
        if unknown:
            raise ValueError(f"unknown scene tasks {sorted(unknown)}; choose from {TASKS}")
        self.tasks = tuple(tasks)

    def __len__(self) -> int:
        return self.length

    def scene(self, index: int) -> Scene:
        rng = random.Random(self.seed * 1_000_003 + index)
        return sample_scene(rng, rng.choice(self.tasks))

    def __getitem__(self, index: int) -> dict:
        scene = self.scene(index)
        img = render_scene(scene, self.resolution, supersample=self.supersample)
        image = torch.from_numpy(img).permute(2, 0, 1).float() / 127.5 - 1
        return {"image": image, "caption": scene.caption, "scene": scene.to_dict()}
