"""Recipes: train LIIF, either as a token decoder (any output size from a VQ tokenizer's tokens,
on procedural scenes) or, with ``config["encoder"]``, as the super-resolution model of the
paper (EDSR-baseline encoder on the image itself, official checkpoint format).

As LIIF trains: random scales ``s ~ U(1, 4)``, targets at ``round(p * s)`` px for an input of
``p`` px, and an L1 loss on ``sample_q`` randomly sampled (coordinate, cell, RGB) pixels.
Scene targets are exact renders of the same scene at the target size (not resized images);
image targets (CIFAR-10, emoji, a folder) are random crops at native resolution, with the
input their bicubic downsampling, the degradation of the SR benchmarks. In the token
decoder the VQ tokenizer stays frozen (its tokens are computed under ``no_grad`` in eval
mode), so the token ids an AR model emits keep their meaning.
"""
from __future__ import annotations

import functools
import random
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from ..data.scenes import SceneDataset, render_scene
from ..decoders.liif import LIIF, EDSRBaseline, LIIFTokenDecoder, make_coord
from ..errors import load_local
from .common import run_training, save_trained, write_metrics


def _image(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(img).permute(2, 0, 1).float() / 127.5 - 1


def scene_batches(batch_size: int, base: int, scale_range=(1.0, 4.0), sample_q: int = 2304, seed: int = 0,
                  tasks=None) -> Iterator[dict]:
    """Endless batches ``{"inp": [B, 3, base, base], "coord", "cell": [B, Q, 2], "gt": [B, Q, 3], "scale"}``.

    ``inp`` is each scene rendered at ``base`` px and ``gt`` the colours of ``Q`` random pixels
    of its render at ``round(base * s)`` px (all in [-1, 1]); ``Q = min(sample_q, H * W)``.
    """
    data = SceneDataset(resolution=base, seed=seed, **({"tasks": tasks} if tasks else {}))
    rng = random.Random(seed)
    while True:
        s = rng.uniform(*scale_range)
        H = round(base * s)
        scenes = [data.scene(rng.randrange(1 << 30)) for _ in range(batch_size)]
        inp = torch.stack([_image(render_scene(sc, base)) for sc in scenes])
        hr = torch.stack([_image(render_scene(sc, H)) for sc in scenes]).flatten(2).transpose(1, 2)  # [B, H*H, 3]
        coord = make_coord((H, H))
        q = min(sample_q, H * H)
        idx = torch.stack([torch.randperm(H * H)[:q] for _ in scenes])
        cell = coord.new_tensor([2.0 / H, 2.0 / H]).expand(batch_size, q, 2)
        gt = torch.gather(hr, 1, idx[..., None].expand(-1, -1, 3))
        yield {"inp": inp, "coord": coord[idx], "cell": cell, "gt": gt, "scale": s}


def _quantise(x: torch.Tensor) -> torch.Tensor:
    """Round [-1, 1] images to 8 bits, as benchmark LR files are stored."""
    return ((x + 1) * 127.5).round().clamp(0, 255) / 127.5 - 1


def _augment(img: torch.Tensor, rng: random.Random) -> torch.Tensor:
    """LIIF's augmentation: random horizontal / vertical flips and transpose."""
    if rng.random() < 0.5:
        img = img.flip(-1)
    if rng.random() < 0.5:
        img = img.flip(-2)
    return img.transpose(-1, -2) if rng.random() < 0.5 else img


def _sample_pixels(hr: torch.Tensor, q: int):
    """``q`` random pixels of ``hr`` ``[3, H, W]``: coordinates, cells and colours, each ``[q, *]``."""
    H, W = hr.shape[-2:]
    idx = torch.randperm(H * W)[:q]
    coord = make_coord((H, W))[idx]
    cell = coord.new_tensor([2.0 / H, 2.0 / W]).expand(q, 2)
    return coord, cell, hr.flatten(1).t()[idx]


def sr_batches(sources, scale_range=(1.0, 4.0), sample_q: int = 2304, seed: int = 0) -> Iterator[dict]:
    """Endless super-resolution batches ``{"inp": [B, 3, p, p], "coord", "cell": [B, Q, 2], "gt": [B, Q, 3]}``.

    ``sources``: ``[{"name": "scenes" | "cifar10" | "emoji" | "folder", "path", "patch": p, "batch_size"}]``,
    used one per step in turn. Each sample draws its own scale (as LIIF's
    ``sr-implicit-downsampled``): the target is ``round(p * s)`` px (an exact scene render, or a
    random crop of the image at its native size) and the input is ``p`` px (the scene rendered
    at ``p``, or the crop's 8-bit bicubic downsampling); ``Q = min(sample_q, p * p)``.
    """
    from ..data.registry import build_dataset
    from ..eval.sr import bicubic

    rng = random.Random(seed)
    prepared = []
    for spec in sources:
        spec = dict(spec)
        p, bs = spec.pop("patch"), spec.pop("batch_size")
        if spec["name"] == "scenes":
            data = SceneDataset(resolution=p, seed=spec.get("seed", seed))
        else:
            data = build_dataset([spec])
            side = min(data[0]["image"].shape[-2:])
            if round(p * scale_range[1]) > side:
                raise ValueError(f"{spec['name']} images are {side} px: a {p}-px input at scale {scale_range[1]:g} "
                                 f"needs {round(p * scale_range[1])} px; lower its patch")
        prepared.append((spec["name"], data, p, bs))
    step = 0
    while True:
        name, data, p, bs = prepared[step % len(prepared)]
        step += 1
        q = min(sample_q, p * p)
        inps, samples = [], []
        for _ in range(bs):
            H = round(p * rng.uniform(*scale_range))
            if name == "scenes":
                scene = data.scene(rng.randrange(1 << 30))
                hr, lr = _image(render_scene(scene, H)), _image(render_scene(scene, p))
            else:
                img = data[rng.randrange(len(data))]["image"]
                y, x = rng.randrange(img.shape[-2] - H + 1), rng.randrange(img.shape[-1] - H + 1)
                hr = _augment(img[:, y:y + H, x:x + H], rng)
                lr = _quantise(bicubic(hr[None], (p, p))[0])
            inps.append(lr)
            samples.append(_sample_pixels(hr, q))
        coord, cell, gt = (torch.stack(t) for t in zip(*samples))
        yield {"inp": torch.stack(inps), "coord": coord, "cell": cell, "gt": gt, "source": name}


def sr_step(modules, batch):
    """L1 on the sampled pixels of an image-input LIIF."""
    model = modules["liif"]
    device = next(model.parameters()).device
    pred = model(batch["inp"].to(device), batch["coord"].to(device), batch["cell"].to(device))
    gt = batch["gt"].to(device)
    psnr = 10 * torch.log10(4.0 / F.mse_loss(pred.detach(), gt).clamp_min(1e-10))  # range 2 in [-1, 1]
    return F.l1_loss(pred, gt), {"psnr": psnr}


def train_liif_sr(config: dict, out_dir: str) -> dict:
    """Train ``LIIF(EDSRBaseline(**config["encoder"]), hidden_list=config["model"]["hidden"],
    residual=config["model"].get("residual"))`` on
    ``config["data"]["sources"]``; saves ``out_dir/liif/liif.pth`` (official format).

    With ``config["eval"]``: Y-PSNR against bicubic on held-out scenes rendered at ``base`` px
    (``{"base", "n_scenes", "seed", "scales"}``) and, with ``"benchmark": root``, on Set5 /
    Set14 (:mod:`vargen.eval.sr`), written to ``out_dir/liif/metrics.json``.
    """
    torch.manual_seed(config.get("seed", 0))
    spec = config.get("model", {})
    model = LIIF(EDSRBaseline(**config["encoder"]), hidden_list=spec.get("hidden", [256] * 4),
                 residual=spec.get("residual"))
    data = config["data"]
    batches = sr_batches(data["sources"], tuple(data.get("scale_range", (1.0, 4.0))), data.get("sample_q", 2304),
                         data.get("seed", 0))
    result = run_training(config, {"liif": model}, list(model.parameters()), batches, sr_step, out_dir,
                          log_every=config.get("log_every", 10), save_every=config.get("save_every", 200))
    trained, folder = save_trained(result, "liif", out_dir)
    if config.get("eval"):
        from ..eval.sr import compare_benchmark, compare_scales, format_table, upsamplers

        ev, device = config["eval"], next(trained.parameters()).device
        scales = ev.get("scales", (2, 3, 4, 2.5))
        metrics = {"scenes": compare_scales(upsamplers(trained), base=ev.get("base", 32), scales=scales,
                                            n_scenes=ev.get("n_scenes", 16), seed=ev.get("seed", 10_000),
                                            device=device)}
        if ev.get("benchmark"):
            metrics.update(compare_benchmark(upsamplers(trained), ev["benchmark"], scales=scales, device=device))
        for name, table in metrics.items():
            print(f"{name}:\n{format_table(table)}")
        result["psnr_y"] = metrics
        write_metrics(folder, metrics)
    return result


def liif_step(modules, batch, vq):
    """L1 on the sampled pixels; ``vq`` (frozen, outside the trained modules) turns the inputs into tokens."""
    model = modules["liif"]
    device = next(model.parameters()).device
    vq.to(device)
    with torch.no_grad(), torch.autocast(device.type, enabled=False):  # the ids inference will give
        tokens = vq.encode(batch["inp"].to(device))
    pred = model(tokens, batch["coord"].to(device), batch["cell"].to(device))
    gt = batch["gt"].to(device)
    loss = F.l1_loss(pred, gt)
    psnr = 10 * torch.log10(4.0 / F.mse_loss(pred.detach(), gt).clamp_min(1e-10))  # range 2 in [-1, 1]
    return loss, {"psnr": psnr, "scale": batch["scale"], "tokens": tokens.numel()}


def train_liif(config: dict, out_dir: str) -> dict:
    """Train ``LIIFTokenDecoder(VQ from config["vq"], **config["model"])``; saves ``out_dir/liif``
    (a config with ``"encoder"`` trains the image-input SR model instead: :func:`train_liif_sr`).

    With ``config["eval"]`` (``{"n_scenes", "seed", "scales"}``), LIIF is compared with
    bicubic upsampling on held-out scenes (Y-PSNR, :mod:`vargen.eval.sr`), written to
    ``out_dir/liif/metrics.json``.
    """
    from ..tokenizers import VQTokenizer

    if "encoder" in config:
        return train_liif_sr(config, out_dir)
    torch.manual_seed(config.get("seed", 0))
    vq = load_local(VQTokenizer, config["vq"], "the tokenizer (vq)").eval().requires_grad_(False)
    model = LIIFTokenDecoder(vq, **config.get("model", {}))
    data = config.get("data", {})
    base = data.get("resolution", 128)
    if base % vq.downsample:
        raise ValueError(f"data resolution {base} is not a multiple of the tokenizer's downsample {vq.downsample}")
    batches = scene_batches(config["batch_size"], base, tuple(data.get("scale_range", (1.0, 4.0))),
                            data.get("sample_q", 2304), data.get("seed", 0), data.get("tasks"))
    params = [p for p in model.parameters() if p.requires_grad]
    result = run_training(config, {"liif": model}, params, batches, functools.partial(liif_step, vq=vq), out_dir,
                          log_every=config.get("log_every", 10), save_every=config.get("save_every", 200))
    trained, folder = save_trained(result, "liif", out_dir)
    if config.get("eval"):
        from ..eval.sr import compare_scales, format_table, upsamplers

        ev = config["eval"]
        device = next(trained.parameters()).device
        table = compare_scales(upsamplers(trained, vq.to(device)), base=base, scales=ev.get("scales", (2, 3, 4, 2.5)),
                               n_scenes=ev.get("n_scenes", 16), seed=ev.get("seed", 10_000), device=device)
        print(format_table(table))
        result["psnr_y"] = table
        write_metrics(folder, table)
    return result
