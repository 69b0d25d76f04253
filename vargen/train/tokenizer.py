"""Recipe: train a VQ tokenizer (L1 + L2 reconstruction, codebook and commitment losses)."""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from ..data.registry import build_dataset, collate
from ..tokenizers import VQTokenizer
from .common import infinite, run_training


def vq_step(modules, batch):
    """One VQ loss: pixels in [-1, 1]; no perceptual or GAN terms (they need pretrained nets or scale)."""
    vq = modules["vq"]
    images = batch["image"].to(next(vq.parameters()).device)
    rec, idx, losses = vq(images)
    l1, l2 = F.l1_loss(rec, images), F.mse_loss(rec, images)
    loss = l1 + l2 + losses["vq"] + losses["commit"]
    psnr = 10 * torch.log10(4.0 / l2.detach().clamp_min(1e-10))  # peak-to-peak range 2 in [-1, 1]
    usage = idx.unique().numel() / vq.config.codebook_size
    return loss, {"l1": l1.detach(), "psnr": psnr, "batch_code_usage": usage}


def train_tokenizer(config: dict, out_dir: str) -> dict:
    """Train ``VQTokenizer(**config["model"])`` on ``config["data"]``; saves ``out_dir/vq`` (safetensors)."""
    torch.manual_seed(config.get("seed", 0))
    vq = VQTokenizer(**config["model"])
    data = build_dataset(config["data"])
    loader = torch.utils.data.DataLoader(data, batch_size=config["batch_size"], shuffle=True, drop_last=True,
                                         num_workers=config.get("num_workers", 0), collate_fn=collate)
    result = run_training(config, {"vq": vq}, list(vq.parameters()), infinite(loader), vq_step, out_dir,
                          log_every=config.get("log_every", 10), save_every=config.get("save_every", 200))
    trained = result.pop("modules")["vq"]
    trained.save_pretrained(os.path.join(out_dir, "vq"))
    return result
