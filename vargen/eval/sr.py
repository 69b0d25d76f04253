"""Arbitrary-scale upsampling quality: LIIF's Y-channel PSNR against bicubic, on held-out scenes
and on the Set5 / Set14 super-resolution benchmarks.

Scenes give exact ground truth at every resolution (:func:`vargen.data.scenes.render_scene`
rasterises the same description at any size), so a x2.5 target is a true 2.5x render,
not a resized image. Set5 / Set14 follow the SR protocol: HR cropped to a multiple of the
scale, LR by bicubic downsampling (Set5's own MATLAB ``LR_bicubic`` where it has the scale),
PSNR on Y with ``shave = ceil(scale)``.
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
    """Bicubic resize with MATLAB ``imresize``'s kernel (Keys, a = -0.5), widened by the factor
    when shrinking (antialias), as SR benchmarks make and upsample their LR images.

    PyTorch's antialiased bicubic is PIL's, which uses that kernel; Set5's MATLAB-made
    ``LR_bicubic`` images are reproduced to within rounding (see :func:`lr_fidelity`).
    """
    return F.interpolate(images, size=tuple(size), mode="bicubic", align_corners=False, antialias=True)


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


# ------------------------------------------------------------------------------------- Set5 / Set14
BENCHMARKS = ("Set5", "Set14")


def _read_png(path: str) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as im:
        return _to_tensor(np.array(im.convert("RGB")))  # Set14's bridge is greyscale: replicated to RGB


def lr_size(hr: int, scale: float) -> int:
    """The largest LR side ``h <= hr / scale`` with ``h * scale`` a whole number of HR pixels, so
    that LR and cropped HR are aligned exactly (``h = hr // scale`` for integer scales)."""
    h = int(hr // scale)
    while h > 0 and abs(h * scale - round(h * scale)) > 1e-6:
        h -= 1
    if h < 1:
        raise ValueError(f"an image of side {hr} is too small for scale {scale:g}")
    return h


def benchmark_pairs(root: str, name: str, scale: float):
    """``[(image name, lr [1, 3, h, w], hr [1, 3, h*s, w*s])]`` in [0, 1] for benchmark ``name`` in ``root``.

    HR is cropped at the bottom-right to ``lr * scale`` (the usual "modcrop"). LR is the set's
    own ``LR_bicubic/X{s}/{name}x{s}.png`` when it exists with matching size, else :func:`bicubic`.
    """
    import glob
    import os

    folder = os.path.join(root, name, "HR")
    paths = sorted(glob.glob(os.path.join(folder, "*.png")))
    if not paths:
        raise FileNotFoundError(f"no {name} HR images at {folder!r}: point --benchmark at the folder holding "
                                f"{'/'.join(BENCHMARKS)} (e.g. ../shared/data/sr)")
    pairs = []
    for path in paths:
        stem = os.path.splitext(os.path.basename(path))[0]
        hr = _read_png(path)[None]
        h, w = (lr_size(v, scale) for v in hr.shape[-2:])
        hr = hr[..., :round(h * scale), :round(w * scale)]
        given = os.path.join(root, name, "LR_bicubic", f"X{scale:g}", f"{stem}x{scale:g}.png")
        lr = _read_png(given)[None] if os.path.exists(given) else None
        if lr is None or lr.shape[-2:] != (h, w):
            lr = bicubic(hr, (h, w)).clamp(0, 1)
            lr = (lr * 255).round() / 255  # an 8-bit LR image, as the benchmark files are
        pairs.append((stem, lr, hr))
    return pairs


@torch.no_grad()
def lr_fidelity(root: str, scale: int = 2) -> float:
    """Mean RGB PSNR between :func:`bicubic`'s LR and Set5's MATLAB ``LR_bicubic`` at ``scale``: how
    closely vargen's degradation matches the one the published numbers were measured on."""
    import os

    values = []
    for stem, lr, hr in benchmark_pairs(root, "Set5", scale):
        if not os.path.exists(os.path.join(root, "Set5", "LR_bicubic", f"X{scale}", f"{stem}x{scale}.png")):
            continue
        ours = (bicubic(hr, lr.shape[-2:]).clamp(0, 1) * 255).round() / 255
        values.append(-10 * torch.log10((ours - lr).pow(2).mean()).item())
    if not values:
        raise FileNotFoundError(f"no Set5 LR_bicubic/X{scale} images under {root!r}")
    return sum(values) / len(values)


@torch.no_grad()
def compare_benchmark(methods: Dict[str, Upsampler], root: str, sets: Sequence[str] = BENCHMARKS,
                      scales: Sequence[float] = SCALES, device="cpu") -> Dict[str, Dict[str, dict]]:
    """Mean Y-PSNR ``{set: {method: {"x2": dB, ...}}}`` on each benchmark set, one image at a time
    (the images differ in size). Methods take and return images in [-1, 1], as in :func:`compare_scales`."""
    out = {}
    for name in sets:
        sums = {m: {} for m in methods}
        for s in scales:
            pairs = benchmark_pairs(root, name, s)
            for stem, lr, hr in pairs:
                lr, hr = lr.to(device), hr.to(device)
                for m, fn in methods.items():
                    pred = ((fn(lr * 2 - 1, tuple(hr.shape[-2:])) + 1) / 2).clamp(0, 1)
                    sums[m][f"x{s:g}"] = sums[m].get(f"x{s:g}", 0.0) + psnr_y(pred, hr, math.ceil(s)).item() / len(pairs)
        out[name] = sums
    return out
