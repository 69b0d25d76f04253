"""Arbitrary-scale upsampling quality: LIIF's Y-channel PSNR, and LIIF against bicubic on held-out scenes.

Scenes give exact ground truth at every resolution (:func:`vargen.data.scenes.render_scene`
rasterises the same description at any size), so a x2.5 target is a true 2.5x render,
not a resized image.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..data.scenes import SceneDataset, render_scene

# ITU-R BT.601 luma for [0, 1] RGB (the +16/255 offset cancels in a difference), as LIIF's calc_psnr.
Y_COEFFS = (65.738 / 256, 129.057 / 256, 25.064 / 256)
SCALES = (2, 3, 4, 2.5)

Upsampler = Callable[[torch.Tensor, tuple], torch.Tensor]


def psnr_y(pred: torch.Tensor, gt: torch.Tensor, shave: int = 0) -> torch.Tensor:
    """Per-image PSNR on the Y channel, ``[B]``; images ``[B, 3, H, W]`` in [0, 1] (data range 1).

    ``shave`` pixels are dropped at every border first (LIIF's benchmark protocol: shave = scale).
    """
    if pred.shape != gt.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and gt {tuple(gt.shape)} differ in shape")
    diff = ((pred.float() - gt.float()) * pred.new_tensor(Y_COEFFS).view(1, 3, 1, 1)).sum(1)
    if shave:
        diff = diff[..., shave:-shave, shave:-shave]
    return -10 * torch.log10(diff.pow(2).flatten(1).mean(1))


def bicubic(images: torch.Tensor, size: tuple) -> torch.Tensor:
    """Bicubic resize (PyTorch's, a = -0.75, no antialias: these are upscales)."""
    return F.interpolate(images, size=size, mode="bicubic", align_corners=False)


def upsamplers(liif=None, vq=None, chunk: int = 30000) -> Dict[str, Upsampler]:
    """The methods to compare, each ``fn(low-res images in [-1, 1], (H, W)) -> images in [-1, 1]``.

    - ``bicubic``: bicubic from the exact low-resolution render.
    - with ``vq``: ``vq+bicubic`` (the tokenizer's own decode, then bicubic) and, when
      ``liif`` is a :class:`~vargen.decoders.LIIFTokenDecoder`, ``liif`` = its decode of the
      same tokens; without ``vq``, ``liif`` is an image-input :class:`~vargen.decoders.LIIF`.
    """
    methods = {"bicubic": bicubic}
    if vq is not None:
        methods["vq+bicubic"] = lambda x, size: bicubic(vq.decode(vq.encode(x)), size)
        if liif is not None:
            methods["liif"] = lambda x, size: liif.decode(vq.encode(x), size=size, chunk=chunk)
    elif liif is not None:
        methods["liif"] = lambda x, size: liif.render(x, size=size, chunk=chunk)
    return methods


def _to_tensor(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(img).permute(2, 0, 1).float() / 255


@torch.no_grad()
def compare_scales(methods: Dict[str, Upsampler], base: int = 32, scales: Sequence[float] = SCALES,
                   n_scenes: int = 16, seed: int = 10_000, batch_size: int = 8, device="cpu") -> Dict[str, dict]:
    """Mean Y-PSNR ``{method: {"x2": dB, ...}}`` on ``n_scenes`` held-out scenes.

    Inputs are scenes rendered at ``base`` px; targets are the same scenes rendered at
    ``round(base * s)`` px. Outputs are clamped to [0, 1]; the shave is ``ceil(s)`` (LIIF
    shaves the integer scale). ``seed`` should differ from the training scenes' seed.
    """
    data = SceneDataset(resolution=base, seed=seed)
    scenes = [data.scene(i) for i in range(n_scenes)]
    sums = {name: {s: 0.0 for s in scales} for name in methods}
    for start in range(0, n_scenes, batch_size):
        part = scenes[start:start + batch_size]
        lr = torch.stack([_to_tensor(render_scene(sc, base)) for sc in part]).to(device) * 2 - 1
        for s in scales:
            H = round(base * s)
            gt = torch.stack([_to_tensor(render_scene(sc, H)) for sc in part]).to(device)
            for name, fn in methods.items():
                pred = ((fn(lr, (H, H)) + 1) / 2).clamp(0, 1)
                sums[name][s] += psnr_y(pred, gt, shave=math.ceil(s)).sum().item()
    return {name: {f"x{s:g}": v / n_scenes for s, v in row.items()} for name, row in sums.items()}


@torch.no_grad()
def scale_consistency(methods: Dict[str, Upsampler], base: int = 32, scale: int = 4, n_scenes: int = 16,
                      seed: int = 10_000, batch_size: int = 8, device="cpu") -> Dict[str, float]:
    """Mean Y-PSNR (dB) between each method's x``scale`` output, area-downsampled to ``base``, and its x1
    output: an arbitrary-scale decoder should render one image at every scale, not different ones."""
    data = SceneDataset(resolution=base, seed=seed)
    scenes = [data.scene(i) for i in range(n_scenes)]
    sums = {name: 0.0 for name in methods}
    for start in range(0, n_scenes, batch_size):
        lr = torch.stack([_to_tensor(render_scene(sc, base)) for sc in scenes[start:start + batch_size]])
        lr = lr.to(device) * 2 - 1
        for name, fn in methods.items():
            x1 = ((fn(lr, (base, base)) + 1) / 2).clamp(0, 1)
            big = ((fn(lr, (base * scale, base * scale)) + 1) / 2).clamp(0, 1)
            down = F.avg_pool2d(big, scale)  # area downsampling: each x1 pixel is the mean of its scale^2 pixels
            sums[name] += psnr_y(down, x1).clamp(max=99.0).sum().item()  # identical images: capped, not inf
    return {name: v / n_scenes for name, v in sums.items()}


def format_table(results: Dict[str, dict]) -> str:
    """A plain-text table of :func:`compare_scales` results (dB)."""
    cols = list(next(iter(results.values())))
    lines = ["method".ljust(12) + "".join(c.rjust(9) for c in cols)]
    lines += [name.ljust(12) + "".join(f"{row[c]:9.2f}" for c in cols) for name, row in results.items()]
    return "\n".join(lines)
