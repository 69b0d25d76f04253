"""Recipe: train the flexible-length 1D tokenizer with nested dropout (One-D-Piece's tail token drop).

Each sample keeps a random prefix of ``k`` latents (``config["prefix"]``: ``uniform`` over 1..K,
``pow2`` or ``full``); the decoder sees only those, so every prefix length learns to decode.
Loss: L2 on pixels in [-1, 1] (plus ``l1_weight`` x L1), plus the codebook and commitment terms for
VQ (FSQ has none). L2 alone because L1's median-seeking gradient keeps a young model painting only the
background (a diagnostic run on 64-px scenes, 300 CPU steps: ~20.5 dB with L1 + L2, ~24 dB with L2).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ..data.registry import build_dataset, collate
from ..errors import load_local
from ..tokenizers.flex1d import Flex1DTokenizer, sample_prefix_lengths
from .common import infinite, run_training, save_trained, write_metrics


class CachedImages(torch.utils.data.Dataset):
    """A dataset's images rendered once and kept as uint8 (procedural scenes cost ~3 ms each to render)."""

    def __init__(self, dataset):
        images = [dataset[i]["image"] for i in range(len(dataset))]
        self.images = torch.stack([((im + 1) * 127.5).round().clamp(0, 255).to(torch.uint8) for im in images])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        return {"image": self.images[index].float() / 127.5 - 1}


def flex1d_step(modules, batch, prefix: str = "uniform", l1_weight: float = 0.0):
    """One nested-dropout loss: each sample reconstructs from its own random prefix of the latents."""
    tok = modules["flex1d"]
    inner = getattr(tok, "module", tok)  # DDP wraps the model; config lives on the inner one
    images = batch["image"].to(next(tok.parameters()).device)
    K = inner.config.num_latents
    lengths = sample_prefix_lengths(images.shape[0], K, prefix, device=images.device)
    rec, idx, losses = tok(images, lengths=lengths)
    l1, l2 = F.l1_loss(rec, images), F.mse_loss(rec, images)
    loss = l2 + l1_weight * l1 + sum(losses.values())
    psnr = 10 * torch.log10(4.0 / l2.detach().clamp_min(1e-10))  # peak-to-peak range 2 in [-1, 1]
    metrics = {"l1": l1.detach(), "psnr": psnr, "mean_k": lengths.float().mean(),
               "batch_code_usage": idx.unique().numel() / inner.vocab_size}
    metrics.update({k: v.detach() for k, v in losses.items()})
    return loss, metrics


def train_flex1d(config: dict, out_dir: str) -> dict:
    """Train ``Flex1DTokenizer(**config["model"])`` on ``config["data"]``; saves ``out_dir/flex1d`` (safetensors).

    Config keys besides the common ones (``steps``, ``batch_size``, ``lr``, ...): ``prefix``
    (nested-dropout sampling, default ``uniform``), ``l1_weight`` (default 0), ``cache`` (render
    the data once; for procedural scenes with a finite ``length``), ``init`` (a saved tokenizer
    folder to start from) and ``eval`` (``{"n_images", "seed", "lengths"}``: PSNR per prefix length on
    held-out scenes, written to ``out_dir/flex1d/metrics.json``).
    """
    torch.manual_seed(config.get("seed", 0))
    if config.get("init"):
        tok = load_local(Flex1DTokenizer, config["init"], "the 1D tokenizer to start from (init)")
    else:
        tok = Flex1DTokenizer(**config["model"])
    data = build_dataset(config["data"])
    if config.get("cache"):
        data = CachedImages(data)
    loader = torch.utils.data.DataLoader(data, batch_size=config["batch_size"], shuffle=True, drop_last=True,
                                         num_workers=config.get("num_workers", 0), collate_fn=collate)
    step = functools.partial(flex1d_step, prefix=config.get("prefix", "uniform"),
                             l1_weight=config.get("l1_weight", 0.0))
    result = run_training(config, {"flex1d": tok}, list(tok.parameters()), infinite(loader), step, out_dir,
                          log_every=config.get("log_every", 10), save_every=config.get("save_every", 200))
    trained, folder = save_trained(result, "flex1d", out_dir)
    if config.get("eval"):
        from ..eval.flex1d import held_out_scenes, psnr_vs_length

        ev = config["eval"]
        images = held_out_scenes(ev.get("n_images", 64), trained.config.image_size, ev.get("seed", 10_000))
        lengths = ev.get("lengths") or _pow2_lengths(trained.config.num_latents)
        table = psnr_vs_length(trained, images.to(next(trained.parameters()).device), lengths)
        result["psnr_vs_length"] = table
        print("held-out PSNR by prefix length: " + ", ".join(f"k={k}: {v:.2f} dB" for k, v in table.items()))
        write_metrics(folder, {"psnr_vs_length": {str(k): v for k, v in table.items()}, "eval": ev})
    return result


def _pow2_lengths(K: int) -> list:
    return sorted({2 ** i for i in range(K.bit_length()) if 2 ** i <= K} | {K})

