"""Colour-segmentation checks of generated scene images against their exact scene metadata.

Objects are found as connected regions of one of GenEval's ten palette colours (pixels
within a colour distance of the palette value, small specks dropped). This checks what
a caption asks of colours, counts and relative positions; shape identity is not judged
here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np
import torch
from scipy import ndimage

from ..data.scenes import BACKGROUNDS, COLORS, Scene


@dataclass
class Blob:
    color: str
    area: float  # fraction of the image
    x: float  # centroid, [0, 1]
    y: float


def find_blobs(image: np.ndarray, max_dist: float = 60.0, min_area: float = 0.004) -> List[Blob]:
    """Connected single-colour regions of an ``[H, W, 3]`` uint8 image, nearest palette colour per pixel.

    Background colours are excluded; regions smaller than ``min_area`` of the image are ignored.
    """
    img = image.astype(np.float32)
    palette = np.array([COLORS[n] for n in COLORS] + [BACKGROUNDS[n] for n in BACKGROUNDS], dtype=np.float32)
    dist = np.linalg.norm(img[:, :, None, :] - palette[None, None], axis=-1)
    nearest, best = dist.argmin(-1), dist.min(-1)
    H, W = nearest.shape
    blobs = []
    for ci, name in enumerate(COLORS):
        mask = (nearest == ci) & (best < max_dist)
        labels, n = ndimage.label(mask)
        for lab in range(1, n + 1):
            ys, xs = np.nonzero(labels == lab)
            area = len(ys) / (H * W)
            if area >= min_area:
                blobs.append(Blob(name, area, (xs.mean() + 0.5) / W, (ys.mean() + 0.5) / H))
    return blobs


def check_scene(image: np.ndarray, scene: Scene) -> Dict[str, bool]:
    """Which of the caption's colour / count / position requirements the image meets.

    Returns ``{"color": ..., "count": ..., "position": ...}`` for the requirements this
    scene's task makes (a key is absent when the caption does not ask for it).
    """
    blobs = find_blobs(image)
    out = {}
    colors = [inc["color"] for inc in scene.include if "color" in inc]
    if colors:
        out["color"] = all(any(b.color == c for b in blobs) for c in colors)
    if scene.tag == "counting":
        out["count"] = len(blobs) == scene.include[0]["count"]
    elif scene.tag in ("single_object", "colors"):
        out["count"] = len(blobs) == 1
    else:
        out["count"] = len(blobs) == 2
    pos = [inc for inc in scene.include if "position" in inc]
    if pos:
        rel = pos[0]["position"][0]
        first = [b for b in blobs if b.color == scene.include[0]["color"]]
        second = [b for b in blobs if b.color == scene.include[1]["color"]]
        ok = False
        if first and second:
            a = max(first, key=lambda b: b.area)
            b = max(second, key=lambda b: b.area)
            ok = {"left of": a.x < b.x, "right of": a.x > b.x, "above": a.y < b.y, "below": a.y > b.y}[rel]
        out["position"] = bool(ok)
    return out


def score_scenes(images: List[np.ndarray], scenes: List[Scene]) -> Dict[str, float]:
    """Accuracy of each requirement over a set, plus ``all`` (every requirement of an image met)."""
    checks = [check_scene(img, s) for img, s in zip(images, scenes)]
    result = {}
    for key in ("color", "count", "position"):
        vals = [c[key] for c in checks if key in c]
        if vals:
            result[key] = float(np.mean(vals))
            result[f"{key}_n"] = len(vals)
    result["all"] = float(np.mean([all(c.values()) for c in checks]))
    result["n"] = len(checks)
    return result


def scene_following(pipe, n: int = 100, seed: int = 999, resolution: Optional[int] = None, batch_size: int = 16,
                    progress: bool = True, **sampling) -> Dict[str, object]:
    """Generate from ``n`` held-out scene captions (``SceneDataset(seed=seed)``) and score each image
    against its exact scene metadata with :func:`check_scene`.

    Image ``i`` is drawn with seed ``i`` (batches change nothing). ``sampling`` goes to the
    pipeline call (``cfg_scale``, ``top_k``, ...). Returns the :func:`score_scenes` figures,
    the same figures per task (``by_task``), and the images (``[n, H, W, 3]`` uint8).
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
    return {**_score_by_task(images, scenes), "images": np.stack(images), "captions": [s.caption for s in scenes]}


@torch.no_grad()
def tokenizer_ceiling(vq, n: int = 100, seed: int = 999, resolution: int = 128, batch_size: int = 16) -> dict:
    """The same scores for the ground-truth renders of the same ``n`` scenes after encode -> decode
    through ``vq``: what a perfect generator could reach with this tokenizer."""
    from ..data.scenes import SceneDataset

    data = SceneDataset(resolution=resolution, seed=seed)
    scenes = [data.scene(i) for i in range(n)]
    images = []
    for start in range(0, n, batch_size):
        x = torch.stack([data[i]["image"] for i in range(start, min(n, start + batch_size))]).to(vq.device)
        rec = ((vq.decode(vq.encode(x)).float().clamp(-1, 1) + 1) * 127.5).round().byte()
        images += list(rec.permute(0, 2, 3, 1).cpu().numpy())
    return _score_by_task(images, scenes)


def _score_by_task(images, scenes) -> dict:
    result = score_scenes(images, scenes)
    by_task = {}
    for task in sorted({s.tag for s in scenes}):
        idx = [i for i, s in enumerate(scenes) if s.tag == task]
        by_task[task] = score_scenes([images[i] for i in idx], [scenes[i] for i in idx])
    return {**result, "by_task": by_task}
