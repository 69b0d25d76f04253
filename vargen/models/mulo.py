"""MuLo-SD's trained parts (arXiv 2601.05149): a low-resolution drafter GPT and a token-space up-sampler.

- The **drafter** is an ordinary :class:`LlamaGen` GPT on the low-resolution token grid (e.g. 8 x 8
  tokens of a 64 px image with the target's VQ tokenizer). It takes the target's condition as is
  (same caption features / class ids, so a t2i drafter shares the target's text encoder).
- The **up-sampler** :class:`TokenUpsampler` maps a low-resolution token grid ``[B, h*w]`` to logits
  ``[B, (s*h)*(s*w), V]`` over the same codebook for every high-resolution cell (raster order):
  token embedding (initialised from the VQ codebook) -> conv residual blocks -> ``x s`` pixel shuffle
  -> residual blocks -> 1x1 conv to ``V`` logits. ``softmax`` of the logits is the draft's ``q``.

:class:`MuLo` holds both; ``MuLo.save_pretrained(folder)`` writes ``folder/drafter`` and
``folder/upsampler`` (each ``config.json`` + safetensors weights), and by convention a target model
at ``<model>/gpt`` finds its MuLo parts at ``<model>/mulo``.
"""
from __future__ import annotations

import os
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from .checkpoint import check_saved_class
from .llamagen import LlamaGen

TRAIN_HINT = "train one with `vargen train mulo --config configs/mulo_scenes_cpu.json` (it writes OUT/mulo)"


class _ResBlock(nn.Module):
    def __init__(self, dim: int, groups: int):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(groups, dim), nn.Conv2d(dim, dim, 3, padding=1)
        self.norm2, self.conv2 = nn.GroupNorm(groups, dim), nn.Conv2d(dim, dim, 3, padding=1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        return x + self.conv2(F.silu(self.norm2(h)))


class TokenUpsampler(ModelMixin, ConfigMixin):
    """Low-resolution token grid -> per-cell logits over the codebook on the ``scale`` x finer grid.

    Example:
        >>> up = TokenUpsampler(vocab_size=32, low_grid=(4, 4), scale=2, dim=16, blocks=1, groups=4)
        >>> up(torch.zeros(2, 16, dtype=torch.long)).shape
        torch.Size([2, 64, 32])
    """

    config_name = "config.json"

    @register_to_config
    def __init__(self, vocab_size: int = 512, low_grid: Sequence[int] = (8, 8), scale: int = 2, embed_dim: int = 8,
                 dim: int = 128, blocks: int = 2, groups: int = 8):
        super().__init__()
        if scale < 1:
            raise ValueError(f"scale must be >= 1, got {scale}")
        if dim % groups:
            raise ValueError(f"dim {dim} is not divisible by groups {groups}")
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.inp = nn.Conv2d(embed_dim, dim, 3, padding=1)
        self.low = nn.Sequential(*[_ResBlock(dim, groups) for _ in range(blocks)])
        self.up = nn.Sequential(nn.Conv2d(dim, dim * scale * scale, 3, padding=1), nn.PixelShuffle(scale))
        self.high = nn.Sequential(*[_ResBlock(dim, groups) for _ in range(blocks)])
        self.out_norm = nn.GroupNorm(groups, dim)
        self.out = nn.Conv2d(dim, vocab_size, 1)

    @classmethod
    def from_codebook(cls, codebook: torch.Tensor, low_grid: Sequence[int], scale: int = 2, **kwargs):
        """An up-sampler whose token embedding starts as the VQ ``codebook`` (``[V, D]``)."""
        model = cls(vocab_size=codebook.shape[0], low_grid=tuple(low_grid), scale=scale, embed_dim=codebook.shape[1],
                    **kwargs)
        with torch.no_grad():
            model.embed.weight.copy_(codebook.detach().float())
        return model

    @property
    def low_grid(self) -> tuple:
        return tuple(self.config.low_grid)

    @property
    def high_grid(self) -> tuple:
        h, w = self.low_grid
        return (h * self.config.scale, w * self.config.scale)

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Low-resolution tokens ``[B, h*w]`` (raster) or ``[B, h, w]`` -> logits ``[B, H*W, V]`` (fp32, raster)."""
        h, w = self.low_grid
        if tokens.dim() == 2:
            if tokens.shape[1] != h * w:
                raise ValueError(f"this up-sampler takes a {h}x{w} low-resolution grid ({h * w} tokens), got "
                                 f"{tokens.shape[1]} tokens; use the drafter it was trained with")
            tokens = tokens.view(-1, h, w)
        if tuple(tokens.shape[1:]) != (h, w):
            raise ValueError(f"this up-sampler takes a {h}x{w} token grid, got {tuple(tokens.shape[1:])}")
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.vocab_size}), got [{int(tokens.min())}, "
                             f"{int(tokens.max())}]; the drafter and up-sampler vocabularies do not match")
        x = self.inp(self.embed(tokens).permute(0, 3, 1, 2))
        x = self.high(self.up(self.low(x)))
        logits = self.out(F.silu(self.out_norm(x)))  # [B, V, H, W]
        return logits.flatten(2).transpose(1, 2).float()


class MuLo(nn.Module):
    """The MuLo-SD drafting pair: ``drafter`` (low-resolution :class:`LlamaGen`) and ``upsampler``
    (:class:`TokenUpsampler`). ``MuLo.from_pretrained(folder)`` reads ``folder/{drafter,upsampler}``."""

    def __init__(self, drafter: LlamaGen, upsampler: TokenUpsampler):
        super().__init__()
        self.drafter, self.upsampler = drafter, upsampler
        self.check_pair()

    def check_pair(self, where: str = "this MuLo model") -> None:
        """The drafter must generate the up-sampler's input grid over the same vocabulary."""
        if self.drafter.vocab_size != self.upsampler.vocab_size:
            raise ValueError(f"{where}: the drafter has {self.drafter.vocab_size} tokens but the up-sampler "
                             f"{self.upsampler.vocab_size}; train them with the same tokenizer ({TRAIN_HINT})")
        if tuple(self.drafter.grid) != self.upsampler.low_grid:
            raise ValueError(f"{where}: the drafter makes a {self.drafter.grid} grid but the up-sampler takes "
                             f"{self.upsampler.low_grid}; train them together ({TRAIN_HINT})")

    def save_pretrained(self, folder: str) -> None:
        self.drafter.save_pretrained(os.path.join(folder, "drafter"))
        self.upsampler.save_pretrained(os.path.join(folder, "upsampler"))

    @classmethod
    def from_pretrained(cls, folder: str) -> "MuLo":
        folder = os.path.abspath(str(folder))
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"no MuLo model at {folder!r} (not a folder); {TRAIN_HINT}")
        check_saved_class(os.path.join(folder, "drafter"), "LlamaGen", "a MuLo drafter", TRAIN_HINT)
        check_saved_class(os.path.join(folder, "upsampler"), "TokenUpsampler", "a MuLo TokenUpsampler", TRAIN_HINT)
        model = cls(LlamaGen.from_pretrained(os.path.join(folder, "drafter")),
                    TokenUpsampler.from_pretrained(os.path.join(folder, "upsampler")))
        return model.eval()

    @property
    def grid(self) -> tuple:
        """The high-resolution grid the drafts cover (the target's)."""
        return self.upsampler.high_grid

    def check_matches(self, ar, where: str = "this MuLo model") -> None:
        """Raise ``ValueError`` unless the drafts fit the target ``ar``: same vocabulary, the up-sampler's output
        grid is the target's grid, and the drafter reads the target's condition (model type, caption shape or
        class count)."""
        self.check_pair(where)
        mine, theirs = self.drafter.config, ar.config
        diff = []
        if self.upsampler.vocab_size != ar.vocab_size:
            diff.append(f"vocabulary {self.upsampler.vocab_size} vs {ar.vocab_size}")
        if tuple(self.grid) != tuple(ar.grid):
            diff.append(f"up-sampled grid {self.grid} vs the target's {tuple(ar.grid)}")
        keys = ("model_type",) + (("caption_dim", "cls_token_num") if theirs.model_type == "t2i" else ("num_classes",))
        diff += [f"{k} {getattr(mine, k)} vs {getattr(theirs, k)}" for k in keys
                 if getattr(mine, k) != getattr(theirs, k)]
        if diff:
            raise ValueError(f"{where} does not match the target model ({', '.join(diff)}); use the MuLo model "
                             f"trained for this target and its tokenizer, or {TRAIN_HINT}")


def load_mulo(path: str) -> MuLo:
    """Load a MuLo folder in eval mode, failing clearly on a missing or wrong one."""
    return MuLo.from_pretrained(path)
