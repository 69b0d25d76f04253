"""LlamaGen's VQGAN (VQ-16 / VQ-8): a 2D grid tokenizer with a cosine (L2-normalised) codebook.

Module and parameter names follow FoundationVision/LlamaGen
``tokenizer/tokenizer_image/vq_model.py`` so official checkpoints load with
:meth:`VQTokenizer.from_llamagen`. Pixels are in ``[-1, 1]``; token grids are row-major.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from ..models.checkpoint import CheckpointError, checkpoint_args, load_checked, read_checkpoint, read_state_dict

VQ_CH_MULT = {16: (1, 1, 2, 2, 4), 8: (1, 2, 2, 4)}


def vq_downsample_of(state, args: dict) -> Optional[int]:
    """A LlamaGen VQ checkpoint's downsample factor: its ``args.vq_model`` (``"VQ-16"``), else the
    encoder's depth (one level per factor of 2, plus one), else ``None``."""
    name = str(args.get("vq_model", ""))
    if name.startswith("VQ-") and name[3:].isdigit():
        return int(name[3:])
    levels = {k.split(".")[2] for k in state if k.startswith("encoder.conv_blocks.")}
    return 2 ** (len(levels) - 1) if levels else None


def _norm(ch: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, ch, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, dropout: float = 0.0, groups: int = 32):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin, groups), nn.Conv2d(cin, cout, 3, 1, 1)
        self.norm2, self.conv2 = _norm(cout, groups), nn.Conv2d(cout, cout, 3, 1, 1)
        self.dropout = nn.Dropout(dropout)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    def __init__(self, ch: int, groups: int = 32):
        super().__init__()
        self.norm = _norm(ch, groups)
        self.q, self.k, self.v = (nn.Conv2d(ch, ch, 1) for _ in range(3))
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x):
        h = self.norm(x)
        b, c, hh, ww = x.shape
        q, k, v = (m(h).reshape(b, c, hh * ww).transpose(1, 2) for m in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(c)) v, as the original bmm
        return x + self.proj_out(out.transpose(1, 2).reshape(b, c, hh, ww))


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, 2, 0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric pad, as taming/LlamaGen


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, 1, 1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _run_level(block: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """One resolution level: res blocks, each followed by attention where the level has it."""
    for j, res in enumerate(block.res):
        h = res(h)
        if len(block.attn):
            h = block.attn[j](h)
    return h


class Encoder(nn.Module):
    def __init__(self, ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int, dropout: float,
                 groups: int = 32):
        super().__init__()
        self.conv_in = nn.Conv2d(3, ch, 3, 1, 1)
        in_mult = (1,) + tuple(ch_mult)
        self.conv_blocks = nn.ModuleList()
        last = len(ch_mult) - 1
        for i, mult in enumerate(ch_mult):
            block = nn.Module()
            block.res, block.attn = nn.ModuleList(), nn.ModuleList()
            cin = ch * in_mult[i]
            for _ in range(num_res_blocks):
                block.res.append(ResnetBlock(cin, ch * mult, dropout, groups))
                cin = ch * mult
                if i == last:  # attention only at the lowest resolution
                    block.attn.append(AttnBlock(cin, groups))
            if i != last:
                block.downsample = Downsample(cin)
            self.conv_blocks.append(block)
        self.mid = nn.ModuleList([ResnetBlock(cin, cin, dropout, groups), AttnBlock(cin, groups),
                                  ResnetBlock(cin, cin, dropout, groups)])
        self.norm_out = _norm(cin, groups)
        self.conv_out = nn.Conv2d(cin, z_channels, 3, 1, 1)

    def forward(self, x):
        h = self.conv_in(x)
        for block in self.conv_blocks:
            h = _run_level(block, h)
            if hasattr(block, "downsample"):
                h = block.downsample(h)
        for m in self.mid:
            h = m(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int, dropout: float,
                 groups: int = 32):
        super().__init__()
        cin = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, cin, 3, 1, 1)
        self.mid = nn.ModuleList([ResnetBlock(cin, cin, dropout, groups), AttnBlock(cin, groups),
                                  ResnetBlock(cin, cin, dropout, groups)])
        self.conv_blocks = nn.ModuleList()
        last = len(ch_mult) - 1
        for i in reversed(range(len(ch_mult))):
            block = nn.Module()
            block.res, block.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks + 1):  # the decoder has one more res block per level
                block.res.append(ResnetBlock(cin, ch * ch_mult[i], dropout, groups))
                cin = ch * ch_mult[i]
                if i == last:
                    block.attn.append(AttnBlock(cin, groups))
            if i != 0:
                block.upsample = Upsample(cin)
            self.conv_blocks.append(block)
        self.norm_out = _norm(cin, groups)
        self.conv_out = nn.Conv2d(cin, 3, 3, 1, 1)

    def trunk(self, z):
        """Features before the output norm and conv (what a LIIF head reads)."""
        h = self.conv_in(z)
        for m in self.mid:
            h = m(h)
        for block in self.conv_blocks:
            h = _run_level(block, h)
            if hasattr(block, "upsample"):
                h = block.upsample(h)
        return h

    def forward(self, z):
        return self.conv_out(F.silu(self.norm_out(self.trunk(z))))


class VectorQuantizer(nn.Module):
    """Nearest-code lookup; with ``l2_norm`` both latents and codes are unit vectors (cosine VQ)."""

    def __init__(self, n_e: int, e_dim: int, beta: float, l2_norm: bool, show_usage: bool, restart_every: int = 0):
        super().__init__()
        self.n_e, self.e_dim, self.beta, self.l2_norm = n_e, e_dim, beta, l2_norm
        self.restart_every, self._steps = restart_every, 0
        self.embedding = nn.Embedding(n_e, e_dim)
        self.embedding.weight.data.uniform_(-1.0 / n_e, 1.0 / n_e)
        if l2_norm:
            self.embedding.weight.data = F.normalize(self.embedding.weight.data, dim=-1)
        if show_usage:
            # LlamaGen keeps a FIFO of the last 65536 codes; it is in the checkpoints, so keep it.
            self.register_buffer("codebook_used", torch.zeros(65536))

    @torch.no_grad()
    def restart_unused_codes(self, z_flat: torch.Tensor) -> int:
        """Move codes absent from the recent-usage FIFO onto random current latents (dead-code restart).

        Small codebooks trained briefly otherwise keep most codes unused and lose detail such as hue.
        Returns the number of codes moved.
        """
        used = torch.zeros(self.n_e, dtype=torch.bool, device=z_flat.device)
        used[self.codebook_used.long().clamp(0, self.n_e - 1)] = True
        dead = (~used).nonzero().flatten()
        if dead.numel():
            pick = torch.randint(0, z_flat.shape[0], (dead.numel(),), device=z_flat.device)
            new = z_flat[pick] + 0.01 * torch.randn(dead.numel(), self.e_dim, device=z_flat.device)
            self.embedding.weight.data[dead] = F.normalize(new, dim=-1) if self.l2_norm else new
        return int(dead.numel())

    def codebook(self) -> torch.Tensor:
        w = self.embedding.weight
        return F.normalize(w, dim=-1) if self.l2_norm else w

    def forward(self, z):
        """Quantise ``z`` ``[B, C, H, W]``; returns (z_q with straight-through grads, indices ``[B, H, W]``, losses)."""
        z = z.permute(0, 2, 3, 1)
        if self.l2_norm:
            z = F.normalize(z, dim=-1)
        codes = self.codebook()
        flat = z.reshape(-1, self.e_dim)
        d = flat.pow(2).sum(1, keepdim=True) + codes.pow(2).sum(1) - 2 * flat @ codes.t()
        idx = d.argmin(1)
        z_q = codes[idx].view(z.shape)
        losses = {}
        if self.training:
            losses["vq"] = F.mse_loss(z_q, z.detach())
            losses["commit"] = self.beta * F.mse_loss(z, z_q.detach())
            if hasattr(self, "codebook_used"):
                n = min(idx.numel(), self.codebook_used.numel())
                self.codebook_used.copy_(torch.cat([self.codebook_used[n:], idx[-n:].float()]))
                self._steps += 1
                if self.restart_every and self._steps % self.restart_every == 0:
                    self.restart_unused_codes(flat.detach())
        z_q = z + (z_q - z).detach()
        return z_q.permute(0, 3, 1, 2), idx.view(z.shape[:3]), losses


class VQTokenizer(ModelMixin, ConfigMixin):
    """2D VQ tokenizer: ``encode(images) -> [B, h, w]`` token grid, ``decode(tokens) -> images``.

    Defaults are LlamaGen VQ-16 (71.9M parameters, codebook 16384 x 8). Small ``ch``
    values give tiny tokenizers for tests and CPU training.

    Example:
        >>> tok = VQTokenizer(ch=32, ch_mult=(1, 2), codebook_size=64, z_channels=32)
        >>> tok.encode(torch.zeros(1, 3, 16, 16)).shape
        torch.Size([1, 8, 8])
    """

    config_name = "config.json"

    @register_to_config
    def __init__(self, codebook_size: int = 16384, codebook_embed_dim: int = 8, codebook_l2_norm: bool = True,
                 codebook_show_usage: bool = True, commit_loss_beta: float = 0.25,
                 ch: int = 128, ch_mult: Sequence[int] = (1, 1, 2, 2, 4), decoder_ch_mult: Optional[Sequence[int]] = None,
                 num_res_blocks: int = 2, z_channels: int = 256, dropout_p: float = 0.0, norm_groups: int = 32,
                 dead_code_restart_every: int = 0, decode_codebook: bool = False):
        super().__init__()
        dec_mult = tuple(decoder_ch_mult or ch_mult)
        if len(dec_mult) != len(ch_mult):
            raise ValueError("encoder and decoder must have the same number of levels")
        # LlamaGen uses 32 groups at ch 128 (4 channels a group); at ch 32, 32 groups would normalise
        # each channel alone and erase flat colours, so small tokenizers use fewer groups.
        self.encoder = Encoder(ch, tuple(ch_mult), num_res_blocks, z_channels, dropout_p, norm_groups)
        self.decoder = Decoder(ch, dec_mult, num_res_blocks, z_channels, dropout_p, norm_groups)
        self.quantize = VectorQuantizer(codebook_size, codebook_embed_dim, commit_loss_beta,
                                        codebook_l2_norm, codebook_show_usage, dead_code_restart_every)
        self.quant_conv = nn.Conv2d(z_channels, codebook_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(codebook_embed_dim, z_channels, 1)
        if decode_codebook:
            self.decode_embedding = nn.Embedding(codebook_size, codebook_embed_dim)

    @classmethod
    def from_llamagen(cls, path_or_state_dict, downsample: Optional[int] = None, prefer_ema: bool = False,
                      trust_checkpoint: bool = False, **kwargs) -> "VQTokenizer":
        """Load an official ``vq_ds16_c2i.pt`` / ``vq_ds8_c2i.pt`` / ``vq_ds16_t2i.pt`` checkpoint.

        The downsample factor comes from the file (its ``args.vq_model``, else its encoder's
        depth) unless given; a given one that contradicts the file raises naming both. The
        codebook, base width and latent channels are read from the weights. Pickled files are
        read safely unless ``trust_checkpoint`` (see :func:`vargen.models.checkpoint.read_checkpoint`).
        """
        if downsample not in (None, *VQ_CH_MULT):
            raise ValueError(f"downsample must be 16 or 8, got {downsample}")
        obj = path_or_state_dict
        if isinstance(obj, (str, os.PathLike)):
            obj = read_checkpoint(obj, trust_checkpoint)
        state = read_state_dict(obj, prefer_ema=prefer_ema)
        in_file = vq_downsample_of(state, checkpoint_args(obj))
        if downsample is not None and in_file is not None and downsample != in_file:
            raise CheckpointError(f"downsample: you gave {downsample} but the checkpoint is a VQ-{in_file} tokenizer; "
                                  "drop the option or pass the file's value")
        downsample = downsample or in_file or 16
        if downsample not in VQ_CH_MULT:
            raise CheckpointError(f"the checkpoint is a VQ-{downsample} tokenizer; LlamaGen's are VQ-16 or VQ-8")
        if "quantize.embedding.weight" in state:
            kwargs.setdefault("codebook_size", state["quantize.embedding.weight"].shape[0])
            kwargs.setdefault("codebook_embed_dim", state["quantize.embedding.weight"].shape[1])
        if "encoder.conv_in.weight" in state:
            kwargs.setdefault("ch", state["encoder.conv_in.weight"].shape[0])
        if "quant_conv.weight" in state:
            kwargs.setdefault("z_channels", state["quant_conv.weight"].shape[1])
        kwargs.setdefault("codebook_show_usage", "quantize.codebook_used" in state)
        model = cls(ch_mult=VQ_CH_MULT[downsample], **kwargs)
        load_checked(model, state, what=f"LlamaGen VQ-{downsample}")
        return model.eval()

    # ----------------------------------------------------------------------------- properties
    @property
    def downsample(self) -> int:
        return 2 ** (len(self.config.ch_mult) - 1)

    @property
    def vocab_size(self) -> int:
        return self.config.codebook_size

    @property
    def codebook_embeddings(self) -> torch.Tensor:
        """``[codebook_size, embed_dim]`` code vectors as used for lookups (L2-normalised if cosine VQ)."""
        return self.quantize.codebook()

    @property
    def decode_table(self) -> torch.Tensor:
        """``[codebook_size, embed_dim]`` vectors the decoder reads per token: the codebook, or the
        separate decode codebook when there is one (:meth:`add_decode_codebook`)."""
        return self.decode_embedding.weight if hasattr(self, "decode_embedding") else self.codebook_embeddings

    def add_decode_codebook(self) -> "VQTokenizer":
        """Give the decoder its own trainable vector per token id, initialised from the codebook.

        Quantisation (and so every token id) keeps using the codebook; only decoding reads the new
        table. A briefly trained cosine codebook can keep hues apart by id while their vectors
        are nearly parallel (cos 0.97-0.99 between blue, purple and grey-background codes in the
        CPU-trained scenes tokenizer), which a smooth decoder cannot amplify; a free decode
        vector per id can move apart. Returns ``self``.
        """
        if not hasattr(self, "decode_embedding"):
            table = self.codebook_embeddings.detach().clone()
            self.decode_embedding = nn.Embedding(*table.shape).to(table.device)
            self.decode_embedding.weight.data.copy_(table)
            self.register_to_config(decode_codebook=True)
        return self

    # ----------------------------------------------------------------------------- API
    def quantize_images(self, images: torch.Tensor):
        """Encode and quantise; returns ``(z_q, indices [B, h, w], losses)`` with straight-through grads."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W] in [-1, 1], got {tuple(images.shape)}")
        if images.shape[-1] % self.downsample or images.shape[-2] % self.downsample:
            raise ValueError(f"image size {tuple(images.shape[-2:])} is not divisible by the downsample "
                             f"factor {self.downsample}")
        return self.quantize(self.quant_conv(self.encoder(images)))

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` in ``[-1, 1]`` -> token grid ``[B, H/f, W/f]`` (long)."""
        return self.quantize_images(images)[1]

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token grid ``[B, h, w]`` (or flat ``[B, h*w]`` for a square grid) -> latents ``[B, C, h, w]``."""
        if tokens.dim() == 2:
            side = int(round(tokens.shape[1] ** 0.5))
            if side * side != tokens.shape[1]:
                raise ValueError(f"flat token sequence of length {tokens.shape[1]} is not a square grid; "
                                 "pass [B, h, w]")
            tokens = tokens.view(-1, side, side)
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.vocab_size}); got range "
                             f"[{int(tokens.min())}, {int(tokens.max())}] - do the model and tokenizer vocabularies match?")
        return self.decode_table[tokens].permute(0, 3, 1, 2)

    def decode_latents(self, z_q: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z_q))

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token grid ``[B, h, w]`` -> images ``[B, 3, h*f, w*f]`` in ``[-1, 1]`` (unclamped)."""
        return self.decode_latents(self.embed_tokens(tokens))

    def forward(self, images: torch.Tensor):
        z_q, idx, losses = self.quantize_images(images)
        return self.decode_latents(z_q), idx, losses
