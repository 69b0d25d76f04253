"""Reconstruction quality of the flexible-length 1D tokenizer against its token count.

PSNR (RGB, images mapped to [0, 1] and clamped, data range 1) for each prefix length ``k``
on held-out procedural scenes (a scene seed the training data does not use), next to the
2D VQ tokenizer's PSNR on the same scenes (at its own resolution, stated in the table).

    vargen eval flex1d --tokenizer runs/flex1d_scenes_cpu/flex1d \
        --vq vargen/weights/scenes-t2i/vq --vq-resolution 128 64 --n 64 --seed 10000 --out outputs/flex1d
"""
from __future__ import annotations

import json
import os
from typing import Dict, Optional, Sequence

import torch

from ..atomic import write_atomic
from ..data.scenes import SceneDataset, render_scene
from ..errors import load_local


def psnr(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Per-image RGB PSNR ``[B]`` in dB; both ``[B, 3, H, W]`` in [0, 1] (``pred`` is clamped first)."""
    if pred.shape != gt.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and gt {tuple(gt.shape)} differ in shape")
    mse = (pred.float().clamp(0, 1) - gt.float()).pow(2).flatten(1).mean(1)
    return -10 * torch.log10(mse.clamp_min(1e-10))


def held_out_scenes(n: int, resolution: int, seed: int = 10_000) -> torch.Tensor:
    """``n`` scenes ``[n, 3, R, R]`` in [-1, 1]; scene ``i`` of ``seed`` is the same at every resolution.

    Training configs use seeds 0-2 with at most a million scenes each, so seed 10,000 is disjoint.
    """
    data = SceneDataset(resolution=resolution, seed=seed)
    return torch.stack([torch.from_numpy(render_scene(data.scene(i), resolution)).permute(2, 0, 1)
                        for i in range(n)]).float() / 127.5 - 1


def _to_unit(images: torch.Tensor) -> torch.Tensor:
    return ((images + 1) / 2).clamp(0, 1)


@torch.no_grad()
def psnr_vs_length(tokenizer, images: torch.Tensor, lengths: Sequence[int] = (1, 2, 4, 8, 16, 32),
                   batch_size: int = 32) -> Dict[int, float]:
    """Mean PSNR (dB) of ``decode(encode(images, length=k))`` for each ``k``: ``{k: dB}``.

    ``images`` are ``[N, 3, S, S]`` in [-1, 1] (as vargen's datasets give them); PSNR is
    measured on [0, 1] RGB. Encoding is prefix-consistent, so each batch is encoded once
    at full length and every prefix decoded from it.
    """
    K = tokenizer.config.num_latents
    bad = [k for k in lengths if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= K]
    if bad:
        raise ValueError(f"prefix lengths must be integers in 1..{K}, got {bad}")
    device = next(tokenizer.parameters()).device
    sums = {k: 0.0 for k in lengths}
    for start in range(0, images.shape[0], batch_size):
        x = images[start:start + batch_size].to(device)
        tokens = tokenizer.encode(x)
        gt = _to_unit(x)
        for k in lengths:
            sums[k] += psnr(_to_unit(tokenizer.decode(tokens[:, :k])), gt).sum().item()
    return {k: v / images.shape[0] for k, v in sums.items()}


@torch.no_grad()
def vq_psnr(vq, images: torch.Tensor, batch_size: int = 16) -> Dict[str, float]:
    """Mean PSNR (dB) of a 2D :class:`~vargen.tokenizers.VQTokenizer` round trip and its token count."""
    device = next(vq.parameters()).device
    total, tokens = 0.0, 0
    for start in range(0, images.shape[0], batch_size):
        x = images[start:start + batch_size].to(device)
        ids = vq.encode(x)
        tokens = ids[0].numel()
        total += psnr(_to_unit(vq.decode(ids)), _to_unit(x)).sum().item()
    return {"psnr": total / images.shape[0], "tokens": tokens}


def plot_psnr_vs_tokens(table: dict, out_png: str) -> None:
    """PSNR against token count (log x): the 1D prefixes as a line, each 2D VQ as a labelled point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    rows = table["flex1d"]["rows"]
    ax.plot([r["tokens"] for r in rows], [r["psnr"] for r in rows], "o-",
            label=f"1D flex ({table['flex1d']['resolution']} px, prefix k)")
    for row in table.get("vq2d", []):
        ax.plot([row["tokens"]], [row["psnr"]], "s", label=f"2D VQ ({row['resolution']} px, {row['tokens']} tokens)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens")
    ax.set_ylabel("PSNR (dB, RGB)")
    ax.set_title("held-out scenes: reconstruction vs token count")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


@torch.no_grad()
def save_recon_grid(tokenizer, images: torch.Tensor, lengths: Sequence[int], out_png: str) -> None:
    """Rows: the input, then its decode from each prefix length (coarse to fine); columns: images."""
    from torchvision.utils import save_image

    device = next(tokenizer.parameters()).device
    x = images.to(device)
    tokens = tokenizer.encode(x)
    rows = [x] + [tokenizer.decode(tokens[:, :k]) for k in lengths]
    save_image(_to_unit(torch.cat(rows)), out_png, nrow=x.shape[0], padding=1)


def evaluate(tokenizer_path: str, vq_path: Optional[str] = None, n: int = 64, seed: int = 10_000,
             lengths: Optional[Sequence[int]] = None, vq_resolutions: Sequence[int] = (128,),
             out_dir: str = "outputs/flex1d", device: str = "cpu") -> dict:
    """The PSNR-vs-token-count table: writes ``psnr_vs_tokens.json``, ``psnr_vs_tokens.png`` and ``recon.png``."""
    from ..tokenizers import VQTokenizer
    from ..tokenizers.flex1d import Flex1DTokenizer

    tok = load_local(Flex1DTokenizer, tokenizer_path, "the 1D tokenizer (--tokenizer)").float().eval().to(device)
    K, res = tok.config.num_latents, tok.config.image_size
    lengths = list(lengths or sorted({2 ** i for i in range(K.bit_length()) if 2 ** i <= K} | {K}))
    images = held_out_scenes(n, res, seed)
    by_k = psnr_vs_length(tok, images, lengths)
    table = {"data": {"name": "scenes", "seed": seed, "n_images": n, "metric": "mean RGB PSNR (dB), [0, 1] range",
                      "note": "every tokenizer sees the same scene descriptions rendered at its own resolution; "
                              "PSNRs at different resolutions are not directly comparable"},
             "flex1d": {"path": tokenizer_path, "resolution": res, "quantizer": tok.config.quantizer,
                        "vocab_size": tok.vocab_size,
                        "rows": [{"tokens": k, "psnr": round(v, 3)} for k, v in by_k.items()]}}
    if vq_path:
        vq = load_local(VQTokenizer, vq_path, "the tokenizer (--vq)").float().eval().to(device)
        table["vq2d"] = []
        for r in vq_resolutions:  # the same scenes, rendered at the VQ's resolution
            row = vq_psnr(vq, held_out_scenes(n, r, seed))
            table["vq2d"].append({"path": vq_path, "resolution": r, "tokens": row["tokens"],
                                  "vocab_size": vq.vocab_size, "psnr": round(row["psnr"], 3)})
    os.makedirs(out_dir, exist_ok=True)
    write_atomic(os.path.join(out_dir, "psnr_vs_tokens.json"), json.dumps(table, indent=2))
    plot_psnr_vs_tokens(table, os.path.join(out_dir, "psnr_vs_tokens.png"))
    save_recon_grid(tok, images[:8], lengths, os.path.join(out_dir, "recon.png"))
    return table


def format_table(table: dict) -> str:
    """A markdown table of :func:`evaluate`'s result."""
    flex = table["flex1d"]
    lines = ["| tokenizer | resolution | tokens | PSNR (dB) |", "|---|---|---|---|"]
    lines += [f"| 1D flex ({flex['quantizer']}, {flex['vocab_size']} codes), prefix | {flex['resolution']} px | "
              f"{r['tokens']} | {r['psnr']:.2f} |" for r in flex["rows"]]
    lines += [f"| 2D VQ ({r['vocab_size']} codes) | {r['resolution']} px | {r['tokens']} | {r['psnr']:.2f} |"
              for r in table.get("vq2d", [])]
    return "\n".join(lines)

