"""A flexible-length 1D tokenizer (TiTok / One-D-Piece / FlexTok family): any prefix decodes.

A ViT encoder reads the image patches together with ``K`` learned latent tokens and keeps
the ``K`` latent outputs; each is quantised (cosine VQ with L2-normalised codes, or FSQ)
to one token id. A ViT decoder reconstructs the patches from one mask token per patch
plus the latents. Training drops a random tail of the latents (nested dropout / One-D-Piece's
tail token drop: a sample keeps the first ``k`` in 1..K and the rest are replaced by a
learned "dropped" token, as FlexTok), so the sequence is ordered coarse to fine and every
prefix ``tokens[:, :k]`` decodes to a whole image. Pixels are in ``[-1, 1]``, as
:class:`~vargen.tokenizers.VQTokenizer`.

One addition for small, short runs: a learned latent <-> patch attention bias (``route``), started
from a quadtree (latent 0 reads the whole image, the next four the quadrants, ...), shared by the
encoder (latents reading patches) and the decoder (mask tokens reading latents). It is a soft,
trainable prior; ``route_init="random"`` starts it without spatial structure.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from timm.models.vision_transformer import Block

from .vq import VectorQuantizer

QUANTIZERS = ("vq", "fsq")


class FSQuantizer(nn.Module):
    """Finite scalar quantisation (Mentzer et al. 2023): each channel rounded to one of ``levels[c]`` values.

    No codebook and no auxiliary losses; the id of a code is its mixed-radix number, so the
    vocabulary is ``prod(levels)`` (64,000 for FlexTok's ``[8, 8, 8, 5, 5, 5]``).
    """

    def __init__(self, levels: Sequence[int], eps: float = 1e-3):
        super().__init__()
        if not levels or min(levels) < 2:
            raise ValueError(f"FSQ levels must be integers >= 2, got {list(levels)}")
        lv = torch.tensor(list(levels), dtype=torch.long)
        # derived from the config, so not saved in checkpoints
        self.register_buffer("levels", lv, persistent=False)
        self.register_buffer("basis", torch.cumprod(torch.cat([lv.new_ones(1), lv[:-1]]), 0), persistent=False)
        self.eps = eps
        self.dim = len(levels)
        self.vocab_size = int(torch.prod(lv))

    def _half_width(self) -> torch.Tensor:
        return (self.levels // 2).float()

    def bound(self, z: torch.Tensor) -> torch.Tensor:
        """Squash ``z`` so that rounding gives exactly ``levels[c]`` values (even levels are offset by 1/2)."""
        half_l = (self.levels.float() - 1) * (1 + self.eps) / 2
        offset = (self.levels % 2 == 0).float() * 0.5
        shift = torch.atanh(offset / half_l)
        return torch.tanh(z + shift) * half_l - offset

    def forward(self, z: torch.Tensor):
        """``z`` ``[..., dim]`` -> (codes in [-1, 1] with straight-through grads, ids ``[...]``, no losses)."""
        bounded = self.bound(z)
        rounded = bounded + (bounded.round() - bounded).detach()  # straight-through rounding
        codes = rounded / self._half_width()
        return codes, self.codes_to_indices(codes.detach()), {}

    def codes_to_indices(self, codes: torch.Tensor) -> torch.Tensor:
        digits = (codes * self._half_width() + self._half_width()).round().long()
        return (digits * self.basis).sum(-1)

    def indices_to_codes(self, idx: torch.Tensor) -> torch.Tensor:
        digits = (idx[..., None] // self.basis) % self.levels
        return (digits.float() - self._half_width()) / self._half_width()


def sincos_2d(grid: int, width: int) -> torch.Tensor:
    """Fixed 2D sine-cosine position embeddings ``[grid * grid, width]`` (MAE's), row-major.

    Smooth in space from the first step, so what the decoder learns at one patch carries over to
    its neighbours; learned random embeddings made small CPU runs stall at the mean image.
    """
    if width % 4:
        raise ValueError(f"width must be a multiple of 4 for 2D sin-cos position embeddings, got {width}")
    omega = 1.0 / 10000 ** (torch.arange(width // 4, dtype=torch.float64) / (width // 4))
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                            indexing="ij")
    out = [f(c.flatten()[:, None] * omega[None]) for c in (ys, xs) for f in (torch.sin, torch.cos)]
    return torch.cat(out, 1).float()


def quadtree_routes(num_latents: int, grid: int, scale: float) -> torch.Tensor:
    """A coarse-to-fine routing prior ``[K, grid * grid]``: 0 inside each latent's region, ``-scale`` outside.

    Latent 0 covers the whole image, the next 4 the quadrants, the next 16 the 4 x 4 blocks of
    cells, and so on down to single patches (a partly used level takes its cells in a fixed
    shuffled order, so they spread over the image); latents beyond that get random rows.
    """
    rows, level = [], 0
    while len(rows) < num_latents and 2 ** level <= grid:
        n = 2 ** level
        order = torch.randperm(n * n, generator=torch.Generator().manual_seed(level)).tolist()
        for cell in order[:num_latents - len(rows)]:
            a, b = divmod(cell, n)
            region = torch.full((grid, grid), -float(scale))
            region[a * grid // n:(a + 1) * grid // n, b * grid // n:(b + 1) * grid // n] = 0
            rows.append(region.flatten())
        level += 1
    g = torch.Generator().manual_seed(num_latents)
    rows += [torch.randn(grid * grid, generator=g) * scale / 2 for _ in range(num_latents - len(rows))]
    return torch.stack(rows)


def _latent_causal_mask(n_patches: int, n_latents: int) -> torch.Tensor:
    """Boolean attention mask (True = may attend) for ``[patches | latents]``.

    Patches see patches only; latent i sees every patch and latents 0..i (FlexTok's causal
    registers), so a latent never depends on later ones and the order is built into the encoder.
    """
    n = n_patches + n_latents
    mask = torch.zeros(n, n, dtype=torch.bool)
    mask[:, :n_patches] = True
    mask[n_patches:, n_patches:] = torch.ones(n_latents, n_latents, dtype=torch.bool).tril()
    return mask


class Flex1DTokenizer(ModelMixin, ConfigMixin):
    """1D tokenizer: ``encode(images, length=k) -> [B, k]``, ``decode(tokens [B, k]) -> images`` for any ``k <= K``.

    ``quantizer="vq"`` uses an L2-normalised codebook (``codebook_size`` x ``codebook_embed_dim``,
    TiTok's choice) with dead-code restarts; ``quantizer="fsq"`` uses FSQ with ``fsq_levels``.

    Example:
        >>> tok = Flex1DTokenizer(image_size=32, patch_size=8, num_latents=8, width=32, num_heads=2,
        ...                       encoder_depth=1, decoder_depth=1, codebook_size=64)
        >>> tok.encode(torch.zeros(2, 3, 32, 32), length=3).shape
        torch.Size([2, 3])
        >>> tok.decode(torch.zeros(2, 3, dtype=torch.long)).shape
        torch.Size([2, 3, 32, 32])
    """

    config_name = "config.json"

    @register_to_config
    def __init__(self, image_size: int = 64, patch_size: int = 8, num_latents: int = 32, width: int = 128,
                 encoder_depth: int = 3, decoder_depth: int = 3, num_heads: int = 4, mlp_ratio: float = 4.0,
                 quantizer: str = "vq", codebook_size: int = 1024, codebook_embed_dim: int = 12,
                 commit_loss_beta: float = 0.25, dead_code_restart_every: int = 0,
                 fsq_levels: Sequence[int] = (8, 8, 8, 5, 5, 5), causal_latents: bool = True,
                 route_init: str = "quadtree", route_scale: float = 4.0):
        super().__init__()
        if quantizer not in QUANTIZERS:
            raise ValueError(f"quantizer must be one of {QUANTIZERS}, got {quantizer!r}")
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        if num_latents < 1:
            raise ValueError(f"num_latents must be >= 1, got {num_latents}")
        if route_init not in ("quadtree", "random"):
            raise ValueError(f"route_init must be 'quadtree' or 'random', got {route_init!r}")
        if width % num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {num_heads}")
        grid = image_size // patch_size
        self.num_patches = grid * grid
        std = 1.0  # learned tokens as large as the normalised features, so the K latents start distinct

        # encoder: patches (+ position) and K learned latents -> K latent outputs
        self.patch_embed = nn.Conv2d(3, width, patch_size, patch_size)
        # normalised so image content is as large as the position code (a flat-colour patch otherwise
        # embeds to ~0.1 per channel against sin-cos values ~1)
        self.patch_norm = nn.LayerNorm(width)
        self.register_buffer("patch_pos", sincos_2d(grid, width), persistent=False)
        self.latent_tokens = nn.Parameter(torch.randn(num_latents, width) * std)
        self.encoder = nn.ModuleList(Block(width, num_heads, mlp_ratio, qkv_bias=True) for _ in range(encoder_depth))
        self.enc_norm = nn.LayerNorm(width)

        if quantizer == "vq":
            # cosine VQ, as the 2D tokenizer (and TiTok): codes and latents are unit vectors
            self.quantize = VectorQuantizer(codebook_size, codebook_embed_dim, commit_loss_beta, True, True,
                                            dead_code_restart_every)
            code_dim = codebook_embed_dim
        else:
            self.quantize = FSQuantizer(fsq_levels)
            code_dim = len(fsq_levels)
        self.quant_proj = nn.Linear(width, code_dim)

        # decoder: one mask token per patch + K latent slots (dropped slots hold a learned token)
        self.post_quant_proj = nn.Linear(code_dim, width)
        self.dropped_token = nn.Parameter(torch.randn(width) * std)
        self.latent_pos = nn.Parameter(torch.randn(num_latents, width) * std)
        self.mask_token = nn.Parameter(torch.randn(width) * std)
        self.decoder = nn.ModuleList(Block(width, num_heads, mlp_ratio, qkv_bias=True) for _ in range(decoder_depth))
        self.dec_norm = nn.LayerNorm(width)
        self.to_pixels = nn.Linear(width, patch_size * patch_size * 3)
        self.conv_out = nn.Conv2d(3, 3, 3, padding=1)  # smooths patch seams, as TiTok's pixel decoder
        # A learned latent <-> patch attention bias, the same matrix read both ways (latent i reads the
        # patches it routes from; patch p reads the latents that route from it). With plain attention every
        # latent starts as the same average of the patches, and short runs sit at the per-image mean colour
        # for a long time; a quadtree prior (whole image, quadrants, blocks, ...) starts the latents coarse
        # to fine, the order nested dropout asks for (measured on 64-px scenes, 600 CPU steps: 22.6 dB at
        # k = 32 against 21.7 dB from a random start). Learned from there; TiTok/FlexTok have no such bias.
        init = quadtree_routes(num_latents, grid, route_scale) if route_init == "quadtree" else \
            torch.randn(num_latents, self.num_patches) * route_scale / 2
        self.route = nn.Parameter(init)
        # Latents (encoder) and mask tokens (decoder) hold no image content at first: start them reading
        # the other side rather than each other (learned scalar biases; left at 0 they dilute the routes).
        self.latent_latent_bias = nn.Parameter(torch.tensor(-float(route_scale)))
        self.mask_mask_bias = nn.Parameter(torch.tensor(-float(route_scale)))
        allowed = _latent_causal_mask(self.num_patches, num_latents) if causal_latents else \
            torch.ones(self.num_patches + num_latents, self.num_patches + num_latents, dtype=torch.bool)
        self.register_buffer("enc_blocked", ~allowed, persistent=False)

    # ----------------------------------------------------------------------------- properties
    @property
    def num_latents(self) -> int:
        return self.config.num_latents

    @property
    def vocab_size(self) -> int:
        if self.config.quantizer == "vq":
            return self.config.codebook_size
        return self.quantize.vocab_size

    @property
    def codebook_embeddings(self) -> torch.Tensor:
        """``[vocab_size, code_dim]`` code vectors: the L2-normalised VQ codes, or every FSQ code (64,000 x 6)."""
        if self.config.quantizer == "vq":
            return self.quantize.codebook()
        return self.quantize.indices_to_codes(torch.arange(self.vocab_size, device=self.latent_tokens.device))

    # ----------------------------------------------------------------------------- checks
    def _check_length(self, length: int) -> int:
        K = self.config.num_latents
        if isinstance(length, bool) or not isinstance(length, int) or not 1 <= length <= K:
            raise ValueError(f"prefix length must be an integer in 1..{K}, got {length!r}")
        return length

    def _check_images(self, images: torch.Tensor) -> None:
        s = self.config.image_size
        if not torch.is_tensor(images) or images.dim() != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
            raise ValueError(f"images must be a [B, 3, {s}, {s}] tensor in [-1, 1], got {shape}")
        if tuple(images.shape[-2:]) != (s, s):
            raise ValueError(f"this tokenizer takes {s} x {s} images, got {images.shape[-2]} x {images.shape[-1]}; "
                             "resize first")

    def _check_tokens(self, tokens: torch.Tensor) -> None:
        K = self.config.num_latents
        if not torch.is_tensor(tokens) or tokens.dim() != 2 or tokens.is_floating_point():
            shape = tuple(tokens.shape) if torch.is_tensor(tokens) else type(tokens).__name__
            raise ValueError(f"tokens must be an integer tensor [B, k] with 1 <= k <= {K}, got {shape}")
        if not 1 <= tokens.shape[1] <= K:
            raise ValueError(f"token prefix length must be in 1..{K}, got {tokens.shape[1]}")
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.vocab_size}); got range [{int(tokens.min())}, "
                             f"{int(tokens.max())}] - do the model and tokenizer vocabularies match?")

    # ----------------------------------------------------------------------------- attention biases
    def _encoder_bias(self, dtype) -> torch.Tensor:
        """``[P + K, P + K]`` additive bias over ``[patches | latents]``: latent rows read patches by ``route``."""
        P, K = self.num_patches, self.config.num_latents
        zeros = self.route.new_zeros(P, P + K)
        latent_rows = torch.cat([self.route, self.latent_latent_bias.expand(K, K)], 1)
        return torch.cat([zeros, latent_rows], 0).to(dtype).masked_fill(self.enc_blocked, float("-inf"))

    def _decoder_bias(self, dtype) -> torch.Tensor:
        """``[P + K, P + K]`` additive bias over ``[mask tokens | latents]``: mask rows read latents by ``route``."""
        P, K = self.num_patches, self.config.num_latents
        mask_rows = torch.cat([self.mask_mask_bias.expand(P, P), self.route.t()], 1)
        return torch.cat([mask_rows, self.route.new_zeros(K, P + K)], 0).to(dtype)

    # ----------------------------------------------------------------------------- encoder
    def quantize_images(self, images: torch.Tensor):
        """Encode and quantise all K latents: ``(codes [B, K, d], ids [B, K], losses)``, straight-through grads."""
        self._check_images(images)
        B = images.shape[0]
        x = self.patch_norm(self.patch_embed(images).flatten(2).transpose(1, 2)) + self.patch_pos
        x = torch.cat([x, self.latent_tokens.expand(B, -1, -1)], 1)
        bias = self._encoder_bias(x.dtype)
        for block in self.encoder:
            x = block(x, attn_mask=bias)
        z = self.quant_proj(self.enc_norm(x[:, self.num_patches:]))
        if self.config.quantizer == "vq":
            z_q, idx, losses = self.quantize(z.transpose(1, 2).unsqueeze(2))  # as a [B, d, 1, K] grid
            return z_q.squeeze(2).transpose(1, 2), idx.flatten(1), losses
        return self.quantize(z)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, length: Optional[int] = None) -> torch.Tensor:
        """Images ``[B, 3, S, S]`` in ``[-1, 1]`` -> the first ``length`` (default K) token ids ``[B, length]``.

        The encoder always computes all K latents, so ``encode(x, k)`` is ``encode(x)[:, :k]``.
        """
        k = self._check_length(self.config.num_latents if length is None else length)
        return self.quantize_images(images)[1][:, :k]

    # ----------------------------------------------------------------------------- decoder
    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids ``[B, k]`` -> code vectors ``[B, k, d]``."""
        self._check_tokens(tokens)
        if self.config.quantizer == "vq":
            return self.quantize.codebook()[tokens]
        return self.quantize.indices_to_codes(tokens)

    def decode_latents(self, codes: torch.Tensor, lengths: Union[None, int, torch.Tensor] = None) -> torch.Tensor:
        """Code vectors ``[B, k, d]`` -> images ``[B, 3, S, S]`` in ``[-1, 1]`` (unclamped).

        ``lengths`` (an int or a ``[B]`` tensor, default ``k``) keeps each sample's first
        ``lengths[b]`` latents; the slots after it (and after ``k``) hold the learned dropped
        token, so the output does not depend on them.
        """
        B, k, _ = codes.shape
        K, device = self.config.num_latents, codes.device
        if not 1 <= k <= K:
            raise ValueError(f"latent prefix length must be in 1..{K}, got {k}")
        if k < K:
            codes = torch.cat([codes, codes.new_zeros(B, K - k, codes.shape[2])], 1)
        if lengths is None:
            lengths = k
        lengths = torch.as_tensor(lengths, device=device).clamp(max=k).expand(B)
        if lengths.min() < 1:
            raise ValueError("every sample must keep at least one latent")
        keep = torch.arange(K, device=device)[None, :] < lengths[:, None]  # [B, K]
        # torch.where (not slicing) keeps one fixed shape and the dropped token in the graph for every batch
        lat = torch.where(keep[..., None], self.post_quant_proj(codes), self.dropped_token) + self.latent_pos
        x = torch.cat([(self.mask_token + self.patch_pos).expand(B, -1, -1), lat], 1)
        bias = self._decoder_bias(x.dtype)
        for block in self.decoder:
            x = block(x, attn_mask=bias)
        x = self.to_pixels(self.dec_norm(x[:, :self.num_patches]))  # [B, P, p*p*3]
        p, g = self.config.patch_size, self.config.image_size // self.config.patch_size
        img = x.view(B, g, g, p, p, 3).permute(0, 5, 1, 3, 2, 4).reshape(B, 3, g * p, g * p)
        return self.conv_out(img)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids ``[B, k]`` (any ``1 <= k <= K``) -> images ``[B, 3, S, S]`` in ``[-1, 1]`` (unclamped)."""
        return self.decode_latents(self.embed_tokens(tokens))

    def forward(self, images: torch.Tensor, lengths: Union[None, int, torch.Tensor] = None):
        """Reconstruct from each sample's first ``lengths[b]`` latents (default K): ``(images, ids [B, K], losses)``."""
        codes, idx, losses = self.quantize_images(images)
        return self.decode_latents(codes, lengths), idx, losses


def sample_prefix_lengths(batch: int, num_latents: int, mode: str = "uniform", device=None,
                          generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Nested-dropout prefix lengths ``[B]`` in 1..K, one per sample.

    ``uniform``: ``k ~ U{1..K}`` (One-D-Piece's tail token drop). ``pow2``: ``k`` uniform over
    the powers of two up to K, plus K itself (FlexTok's option; favours short prefixes).
    ``full``: always K (no dropout; a plain TiTok).
    """
    if mode == "uniform":
        return torch.randint(1, num_latents + 1, (batch,), generator=generator).to(device)
    if mode == "pow2":
        choices = sorted({2 ** i for i in range(int(math.log2(num_latents)) + 1)} | {num_latents})
        pick = torch.randint(0, len(choices), (batch,), generator=generator)
        return torch.tensor(choices)[pick].to(device)
    if mode == "full":
        return torch.full((batch,), num_latents, device=device)
    raise ValueError(f"prefix sampling must be 'uniform', 'pow2' or 'full', got {mode!r}")
