"""Recipe: train a LIIF token decoder (any output size from a VQ tokenizer's tokens) on procedural scenes.

As LIIF trains: one random scale ``s ~ U(1, 4)`` per batch, targets at ``round(base * s)``
px, and an L1 loss on ``sample_q`` randomly sampled (coordinate, cell, RGB) pixels. The
targets are exact renders of the same scenes at the target size (not resized images).
The VQ tokenizer stays frozen (its tokens are computed under ``no_grad`` in eval mode), so
the token ids an AR model emits keep their meaning.
"""
from __future__ import annotations

import functools
import random
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from ..data.scenes import SceneDataset, render_scene
from ..decoders.liif import LIIFTokenDecoder, make_coord
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


def liif_step(modules, batch, vq):
    """L1 on the sampled pixels; ``vq`` (frozen, outside the trained modules) turns the inputs into tokens."""
    model = modules["liif"]
    device = next(model.parameters()).device
    vq.to(device)
    with torch.no_grad():
        tokens = vq.encode(batch["inp"].to(device))
    pred = model(tokens, batch["coord"].to(device), batch["cell"].to(device))
    gt = batch["gt"].to(device)
    loss = F.l1_loss(pred, gt)
    psnr = 10 * torch.log10(4.0 / F.mse_loss(pred.detach(), gt).clamp_min(1e-10))  # range 2 in [-1, 1]
    return loss, {"psnr": psnr, "scale": batch["scale"]}


def train_liif(config: dict, out_dir: str) -> dict:
    """Train ``LIIFTokenDecoder(VQ from config["vq"], **config["model"])``; saves ``out_dir/liif``.

    With ``config["eval"]`` (``{"n_scenes", "seed", "scales"}``), LIIF is compared with
    bicubic upsampling on held-out scenes (Y-PSNR, :mod:`vargen.eval.sr`), written to
    ``out_dir/liif/metrics.json``.
    """
    from ..tokenizers import VQTokenizer

    torch.manual_seed(config.get("seed", 0))
    vq = VQTokenizer.from_pretrained(config["vq"]).eval().requires_grad_(False)
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
