"""LlamaGen's GPT (class- and text-conditional), speaking vargen's model protocol.

Parameter names, initialisation, RMSNorm, SwiGLU sizing and the 2D RoPE follow
FoundationVision/LlamaGen ``autoregressive/models/gpt.py`` so its released checkpoints
load unchanged (:meth:`LlamaGen.from_llamagen`). Inference goes through one forward over
explicit positions, cache slots and a mask (see ``vargen.models.protocol``).
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from .cache import StaticKVCache, causal_slot_mask
from .checkpoint import CheckpointError, checkpoint_args, load_checked, read_checkpoint, read_state_dict
from ..ops import cpu_kernels
from .linear import Linear
from .rope import apply_rope, rope_2d_table, rope_factors

# Named sizes as in LlamaGen (layers, heads, dim); tiny sizes are for tests and CPU recipes.
GPT_SIZES = {
    "GPT-B": dict(n_layer=12, n_head=12, dim=768),
    "GPT-L": dict(n_layer=24, n_head=16, dim=1024),
    "GPT-XL": dict(n_layer=36, n_head=20, dim=1280),
    "GPT-XXL": dict(n_layer=48, n_head=24, dim=1536),
    "GPT-XXXL": dict(n_layer=48, n_head=40, dim=2560),
    "GPT-1B": dict(n_layer=22, n_head=32, dim=2048),
    "GPT-3B": dict(n_layer=24, n_head=32, dim=3200),
    "GPT-7B": dict(n_layer=32, n_head=32, dim=4096),
    "GPT-tiny": dict(n_layer=2, n_head=4, dim=64, multiple_of=32),
    "GPT-mini": dict(n_layer=6, n_head=8, dim=256, multiple_of=64),
    "GPT-small": dict(n_layer=8, n_head=8, dim=384, multiple_of=128),
}


def _token_grid(block_size: int, grid_rows: Optional[int]) -> tuple:
    """``(rows, cols)``: a square grid by default; ``grid_rows=1`` makes a 1D sequence (a ``1 x N`` grid)."""
    if grid_rows is None:
        g = int(round(block_size ** 0.5))
        if g * g != block_size:
            raise ValueError(f"block_size must be a square number of tokens, got {block_size} "
                             "(set grid_rows for other grids, grid_rows=1 for 1D token sequences)")
        return (g, g)
    if grid_rows < 1 or block_size % grid_rows:
        raise ValueError(f"grid_rows must be a positive divisor of block_size {block_size}, got {grid_rows}")
    return (grid_rows, block_size // grid_rows)


_WEIGHTS, _ARGS = "the checkpoint's weights", "the checkpoint's args"


def _agree(what: str, given, in_file, where: str, given_by: str = "you gave"):
    """``given`` when it matches the file's value (or the file is silent), else a :class:`CheckpointError`."""
    if given is not None and in_file is not None and given != in_file:
        raise CheckpointError(f"{what}: {given_by} {given!r} but {where} gives {in_file!r}"
                              + ("; drop the option or pass the file's value" if given_by == "you gave" else ""))
    return given if given is not None else in_file


def size_of_weights(state) -> Optional[str]:
    """The named size (``GPT-B``, ``GPT-L``, ...) whose width and depth the weights have, if any."""
    if "tok_embeddings.weight" not in state:
        return None
    dim = state["tok_embeddings.weight"].shape[1]
    n_layer = len({k.split(".")[1] for k in state if k.startswith("layers.")})
    return next((name for name, s in GPT_SIZES.items() if s["dim"] == dim and s["n_layer"] == n_layer), None)


def llamagen_file_config(state, args: dict, size: Optional[str] = None, model_type: Optional[str] = None,
                         block_size: Optional[int] = None, image_size: Optional[int] = None,
                         downsample: Optional[int] = None, vocab_size: Optional[int] = None,
                         num_classes: Optional[int] = None, cls_token_num: Optional[int] = None,
                         class_dropout_prob: float = 0.1) -> dict:
    """The :class:`LlamaGen` config of a LlamaGen checkpoint: what was given, else its training
    ``args`` (``gpt_model``, ``gpt_type``, ``image_size``, ``downsample_size``, ``vocab_size``,
    ``num_classes``, ``cls_token_num``), else its weights. Disagreements raise naming both values."""
    weights_size = size_of_weights(state)
    if weights_size:  # the weights are the truth; args that disagree mean a hand-edited file
        _agree("size", args.get("gpt_model"), weights_size, _WEIGHTS, "its args say")
    size = _agree("size", size, weights_size or args.get("gpt_model"), _WEIGHTS if weights_size else _ARGS)
    if size is None:
        raise CheckpointError("the checkpoint's width and depth match no named GPT size and it carries no args; "
                              f"pass size= one of {', '.join(GPT_SIZES)}")
    weights_type = None
    if "tok_embeddings.weight" in state:
        weights_type = "t2i" if any(k.startswith("cls_embedding.cap_proj") for k in state) else "c2i"
    model_type = _agree("model type", model_type, weights_type or args.get("gpt_type"),
                        _WEIGHTS if weights_type else _ARGS)
    found = {"size": size, "model_type": model_type or "c2i"}
    image_size = _agree("image size", image_size, args.get("image_size"), _ARGS)
    downsample = _agree("downsample", downsample, args.get("downsample_size"), _ARGS)
    if image_size is not None:
        grid = image_size // (downsample or 16)
        block_size = _agree("block size (tokens)", block_size, grid * grid,
                            f"image size {image_size} / downsample {downsample or 16}")
    found["block_size"] = block_size or 256
    if "tok_embeddings.weight" in state:
        in_file = _agree("vocabulary size", args.get("vocab_size"), state["tok_embeddings.weight"].shape[0],
                         _WEIGHTS, "its args say")
        found["vocab_size"] = _agree("vocabulary size", vocab_size, in_file, _WEIGHTS)
    if found["model_type"] == "c2i" and "cls_embedding.embedding_table.weight" in state:
        rows = state["cls_embedding.embedding_table.weight"].shape[0]
        in_file = _agree("class count", args.get("num_classes"), rows - int(class_dropout_prob > 0),
                         "the checkpoint's class table", "its args say")
        found["num_classes"] = _agree("class count", num_classes, in_file, "the checkpoint's class table")
    if found["model_type"] == "t2i" and "cls_embedding.uncond_embedding" in state:
        tokens, found["caption_dim"] = state["cls_embedding.uncond_embedding"].shape
        in_file = _agree("caption length", args.get("cls_token_num"), tokens, _WEIGHTS, "its args say")
        found["cls_token_num"] = _agree("caption length", cls_token_num, in_file, _WEIGHTS)
    return found


def attention_inputs(rope_table: torch.Tensor, h: torch.Tensor, positions: Optional[torch.Tensor],
                     slots: Optional[torch.Tensor], mask: Optional[torch.Tensor],
                     cache: Optional[StaticKVCache]) -> tuple:
    """``(rope, mask)`` for inputs ``h`` ``[B, T, dim]`` at grid ``positions`` (default ``0..T-1``; -1 is the
    condition): the RoPE factors (:func:`rope_factors`) of those rows of ``rope_table`` and, with a cache, the
    generation-order causal slot mask unless ``mask`` is given, cut to the slots in use on a CPU
    (:meth:`StaticKVCache.in_use`)."""
    B, T = h.shape[:2]
    if positions is None:
        positions = torch.arange(T, device=h.device).expand(B, T)
    if cache is not None:
        if slots is None:
            raise ValueError("slots are required when writing to a cache")
        if mask is None:
            mask = causal_slot_mask(slots, cache)
        mask = cache.in_use(mask, slots)
    return rope_factors(rope_table[positions + 1]), mask


def _round_up(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - n % k


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        if (kernels := cpu_kernels.for_eager(x, self.weight)) is not None:  # one op instead of seven
            return kernels.rms_norm(x, self.weight, self.eps)
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class LabelEmbedder(nn.Module):
    """Class table with one extra row (index ``num_classes``) for the null class when CFG is trained."""

    def __init__(self, num_classes: int, dim: int, dropout_prob: float):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), dim)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def forward(self, labels, train: bool):
        if train and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, self.num_classes, labels)
        return self.embedding_table(labels).unsqueeze(1)


class CaptionMLP(nn.Module):
    def __init__(self, in_features: int, hidden: int, out_features: int):
        super().__init__()
        self.fc1 = Linear(in_features, hidden, bias=False)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = Linear(hidden, out_features, bias=False)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CaptionEmbedder(nn.Module):
    """Caption features (e.g. 120 x 2048 FLAN-T5) through a bias-free MLP; fixed uncond embedding."""

    def __init__(self, caption_dim: int, dim: int, uncond_prob: float, token_num: int = 120):
        super().__init__()
        self.cap_proj = CaptionMLP(caption_dim, dim, dim)
        self.register_buffer("uncond_embedding", torch.randn(token_num, caption_dim) / caption_dim ** 0.5)
        self.uncond_prob = uncond_prob

    def forward(self, caption, train: bool):
        if train and self.uncond_prob > 0:
            drop = torch.rand(caption.shape[0], device=caption.device) < self.uncond_prob
            caption = torch.where(drop[:, None, None], self.uncond_embedding.to(caption.dtype), caption)
        return self.cap_proj(caption)


class FeedForward(nn.Module):
    def __init__(self, dim: int, multiple_of: int, ffn_dim_multiplier: Optional[float], dropout: float):
        super().__init__()
        hidden = int(2 * 4 * dim / 3)
        if ffn_dim_multiplier is not None:
            hidden = int(ffn_dim_multiplier * hidden)
        hidden = _round_up(hidden, multiple_of)
        self.w1 = Linear(dim, hidden, bias=False)
        self.w3 = Linear(dim, hidden, bias=False)
        self.w2 = Linear(hidden, dim, bias=False)
        self.ffn_dropout = nn.Dropout(dropout)

    def forward(self, x):
        if (kernels := cpu_kernels.for_eager(x)) is not None:  # one op for the gate (eager bf16 on a CPU)
            return self.ffn_dropout(self.w2(kernels.silu_mul(self.w1(x), self.w3(x))))
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


def single_query_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention of one query per row (an AR decode step) over the cache, in fp32: ``q`` ``[B, H, 1, d]``, ``keys``
    / ``values`` ``[B, H, L, d]``, ``mask`` ``[B, 1, 1, L]`` (True = attend); returns ``q``'s dtype.

    On the CPU, SDPA's flash kernel spends ~260 us on this shape (2 x 6 heads x 272 slots, bf16: 0.8 MFLOP)
    against ~105 us for these three small fp32 ops, with the same error against an fp32 reference (the flash
    kernel also scores in fp32); at the default model's size that took an AR step from 10.1 to 9.1 ms in a
    same-run comparison. Longer queries (verify windows) stay on SDPA, which wins there. Both give way to vargen's
    CPU attention kernel in bf16 where it is built (:meth:`Attention.uses_cpu_kernel`)."""
    scores = torch.matmul(q.float(), keys.float().transpose(-1, -2)).mul_(q.shape[-1] ** -0.5)
    weights = scores.masked_fill_(~mask, float("-inf")).softmax(-1)
    return torch.matmul(weights, values.float()).to(q.dtype)


class Attention(nn.Module):
    def __init__(self, dim: int, n_head: int, n_kv_head: int, attn_dropout: float, resid_dropout: float):
        super().__init__()
        self.dim, self.n_head, self.n_kv_head = dim, n_head, n_kv_head
        self.head_dim = dim // n_head
        self.wqkv = Linear(dim, (n_head + 2 * n_kv_head) * self.head_dim, bias=False)
        self.wo = Linear(dim, dim, bias=False)
        self.attn_dropout_p = attn_dropout
        self.resid_dropout = nn.Dropout(resid_dropout)

    def uses_cpu_kernel(self, q: torch.Tensor, keys: torch.Tensor) -> bool:
        """Whether this step's attention runs vargen's CPU kernel (``csrc/cpu/attention_bf16.cpp``): bf16
        inference on a CPU with the extension in use, head dim a multiple of 16. It beat SDPA's flash kernel 2-4x
        and the fp32 single-query path ~1.7x at the default model's shapes (mask, softmax and sums in fp32, the
        probabilities rounded to bf16 as SDPA's flash kernel does). Compiled graphs decide once, when
        :class:`~vargen.models.compiled.CompiledModel` wraps the model (:meth:`freeze_cpu_kernel`)."""
        if torch.compiler.is_compiling():
            return self.__dict__.get("cpu_kernel_frozen", False) and q.dtype == keys.dtype == torch.bfloat16
        return self.head_dim % 16 == 0 and cpu_kernels.for_eager(q, keys) is not None

    def freeze_cpu_kernel(self, dtype: torch.dtype, device: torch.device) -> bool:
        """Let compiled graphs call the CPU attention kernel as the op ``vargen_cpu::attention`` (for a bf16 CPU
        model whose extension loads); returns whether they will."""
        use = (dtype == torch.bfloat16 and device.type == "cpu" and self.head_dim % 16 == 0
               and cpu_kernels.kernels() is not None)
        self.__dict__["cpu_kernel_frozen"] = use
        return use

    def forward(self, x, rope, mask, cache: Optional[StaticKVCache], layer: int, slots):
        B, T, _ = x.shape
        kv = self.n_kv_head * self.head_dim
        qk, v = self.wqkv(x).split([self.dim + kv, kv], dim=-1)
        # q and k rotated in one call: the same elementwise ops, half the op launches of a decode step's RoPE
        qk = qk.view(B, T, self.n_head + self.n_kv_head, self.head_dim)
        kernels = cpu_kernels.for_eager(qk)
        qk = apply_rope(qk, rope) if kernels is None else kernels.rope(qk, *rope)
        q, k = qk.split([self.n_head, self.n_kv_head], dim=2)
        v = v.view(B, T, self.n_kv_head, self.head_dim)
        if cache is not None:
            cache.write(layer, slots, k, v)
            S = mask.shape[-1]  # the slots in use (StaticKVCache.in_use)
            keys, values = cache.k[layer][:, :, :S], cache.v[layer][:, :, :S]
        else:
            keys, values = k.transpose(1, 2), v.transpose(1, 2)
        if mask is not None and not self.training and self.uses_cpu_kernel(q, keys):
            compiling = torch.compiler.is_compiling()
            attend = torch.ops.vargen_cpu.attention if compiling else cpu_kernels.kernels().attention
            return self.resid_dropout(self.wo(attend(q, keys, values, mask, self.head_dim ** -0.5)))
        if self.n_kv_head != self.n_head:
            rep = self.n_head // self.n_kv_head
            keys, values = keys.repeat_interleave(rep, 1), values.repeat_interleave(rep, 1)
        if T == 1 and mask is not None and q.device.type == "cpu" and not self.training:
            out = single_query_attention(q.transpose(1, 2), keys, values, mask[:, None])
        else:
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), keys.to(q.dtype), values.to(q.dtype),
                attn_mask=None if mask is None else mask[:, None],
                is_causal=mask is None,
                dropout_p=self.attn_dropout_p if self.training else 0.0,
            )
        return self.resid_dropout(self.wo(out.transpose(1, 2).reshape(B, T, self.dim)))


class TransformerBlock(nn.Module):
    def __init__(self, cfg, drop_path: float):
        super().__init__()
        self.attention = Attention(cfg.dim, cfg.n_head, cfg.n_kv_head or cfg.n_head,
                                   cfg.attn_dropout_p, cfg.resid_dropout_p)
        self.feed_forward = FeedForward(cfg.dim, cfg.multiple_of, cfg.ffn_dim_multiplier, cfg.ffn_dropout_p)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        if drop_path > 0:
            from timm.layers import DropPath

            self.drop_path = DropPath(drop_path)
        else:
            self.drop_path = nn.Identity()

    def forward(self, x, rope, mask, cache, layer, slots):
        if (kernels := self._fused(x, mask, cache, layer, slots)) is not None:
            return self._fused_forward(kernels, x, rope, mask, cache, layer, slots)
        h = x + self.drop_path(self.attention(self.attention_norm(x), rope, mask, cache, layer, slots))
        return h + self.drop_path(self.feed_forward(self.ffn_norm(h)))

    def _fused(self, x, mask, cache, layer, slots):
        """The CPU extension when this block can run as its one op ``block`` (``csrc/cpu/block_bf16.cpp``, the same
        kernels as the modules below in their order, so the same bits): eager bf16 inference with a cache and a
        mask, every matmul, the attention and the cache write on vargen's kernels; else ``None``."""
        if self.training or mask is None or cache is None or slots.dtype != torch.long:
            return None
        kernels = cpu_kernels.for_eager(x, cache.k[layer])
        return kernels if kernels is not None and self._fits_kernels() else None

    def _fits_kernels(self) -> bool:
        """Whether the weights fit the kernels (bf16 CPU matmuls of the shapes they take, no biases, head dim a
        multiple of 16): decided once per weight dtype and device, not in every step."""
        attn, ffn = self.attention, self.feed_forward
        w = attn.wqkv.weight
        key = (w.dtype, w.device)
        cached = self.__dict__.get("_fits")
        if cached is None or cached[0] != key:
            linears = (attn.wqkv, attn.wo, ffn.w1, ffn.w3, ffn.w2)
            fits = attn.head_dim % 16 == 0 and all(m.bias is None and cpu_kernels.takes(w, m.weight) for m in linears)
            cached = self.__dict__["_fits"] = (key, fits)
        return cached[1]

    def _fused_forward(self, kernels, x, rope, mask, cache, layer, slots):
        attn, ffn = self.attention, self.feed_forward
        return kernels.block(x, self.attention_norm.weight, self.ffn_norm.weight, self.attention_norm.eps,
                             attn.wqkv.stream_weight(kernels), attn.wo.stream_weight(kernels),
                             ffn.w1.stream_weight(kernels), ffn.w3.stream_weight(kernels),
                             ffn.w2.stream_weight(kernels), rope[0], rope[1], cache.k[layer], cache.v[layer], slots,
                             mask, attn.n_head, attn.n_kv_head, attn.head_dim ** -0.5)


class LlamaGen(ModelMixin, ConfigMixin):
    """LlamaGen GPT for class- (``c2i``) or text-conditional (``t2i``) image generation.

    Protocol: :meth:`forward` takes image tokens (or condition embeddings) at explicit
    ``positions`` (raster cell index ``r * grid + c``; ``-1`` for condition tokens) and
    writes them to ``slots`` of a :class:`StaticKVCache`; ``mask`` (``[B, T, max_len]``,
    ``True`` = attend) defaults to generation-order causal. ``grid_rows=1`` makes a 1D-token
    model (a ``1 x block_size`` grid, e.g. for :class:`vargen.tokenizers.Flex1DTokenizer`
    sequences): its RoPE rotates by the sequence index only, and every decoding method
    runs on it unchanged.

    Example:
        >>> model = LlamaGen.from_size("GPT-tiny", block_size=16, vocab_size=32, num_classes=4)
        >>> model.grid
        (4, 4)
    """

    config_name = "config.json"

    @register_to_config
    def __init__(self, dim: int = 768, n_layer: int = 12, n_head: int = 12, n_kv_head: Optional[int] = None,
                 multiple_of: int = 256, ffn_dim_multiplier: Optional[float] = None, rope_base: float = 10000.0,
                 norm_eps: float = 1e-5, initializer_range: float = 0.02, token_dropout_p: float = 0.1,
                 attn_dropout_p: float = 0.0, resid_dropout_p: float = 0.1, ffn_dropout_p: float = 0.1,
                 drop_path_rate: float = 0.0, num_classes: int = 1000, caption_dim: int = 2048,
                 class_dropout_prob: float = 0.1, model_type: str = "c2i", vocab_size: int = 16384,
                 cls_token_num: int = 1, block_size: int = 256, cond_rope: str = "zeros",
                 class_names: Optional[Sequence[str]] = None, grid_rows: Optional[int] = None):
        super().__init__()
        if model_type not in ("c2i", "t2i"):
            raise ValueError(f"model_type must be 'c2i' or 't2i', got {model_type!r}")
        if dim % n_head:
            raise ValueError(f"dim {dim} is not divisible by n_head {n_head}")
        rows, cols = _token_grid(block_size, grid_rows)
        cfg = self.config
        if model_type == "c2i":
            self.cls_embedding = LabelEmbedder(num_classes, dim, class_dropout_prob)
        else:
            self.cls_embedding = CaptionEmbedder(caption_dim, dim, class_dropout_prob, cls_token_num)
        self.tok_embeddings = nn.Embedding(vocab_size, dim)
        self.tok_dropout = nn.Dropout(token_dropout_p)
        rates = [drop_path_rate * i / max(n_layer - 1, 1) for i in range(n_layer)]  # linspace, stochastic depth
        self.layers = nn.ModuleList(TransformerBlock(cfg, r) for r in rates)
        self.norm = RMSNorm(dim, norm_eps)
        self.output = Linear(dim, vocab_size, bias=False)
        self.register_buffer("rope", rope_2d_table(rows, dim // n_head, rope_base, cond_rope, cols=cols),
                             persistent=False)
        self._init_weights()

    # ----------------------------------------------------------------------------- set-up
    def _init_weights(self):
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, std)
        nn.init.zeros_(self.output.weight)  # LlamaGen zero-inits the head

    @classmethod
    def from_size(cls, size: str, **kwargs) -> "LlamaGen":
        """Build a named size (``GPT-B``, ``GPT-L``, ..., ``GPT-tiny``) with extra config overrides."""
        if size not in GPT_SIZES:
            raise ValueError(f"unknown GPT size {size!r}; choose one of {', '.join(GPT_SIZES)}")
        return cls(**{**GPT_SIZES[size], **kwargs})

    @classmethod
    def from_llamagen(cls, path_or_state_dict, size: Optional[str] = None, model_type: Optional[str] = None,
                      block_size: Optional[int] = None, image_size: Optional[int] = None,
                      downsample: Optional[int] = None, prefer_ema: bool = False, trust_checkpoint: bool = False,
                      **kwargs) -> "LlamaGen":
        """Load an official LlamaGen checkpoint (``c2i_B_256.pt``, FSDP dicts, ``t2i_XL_*.pt``, ...).

        What is not given comes from the file (:func:`llamagen_file_config`): the training
        ``args`` LlamaGen saves (size, image size, downsample, vocabulary, classes, caption
        length), else the weights; a value given that contradicts the file raises naming both.
        Without either, the grid is 16 x 16 (256 px at downsample 16). Pickled files are read
        safely unless ``trust_checkpoint`` (see :func:`vargen.models.checkpoint.read_checkpoint`).
        """
        obj = path_or_state_dict
        if isinstance(obj, (str, os.PathLike)):
            obj = read_checkpoint(obj, trust_checkpoint)
        state = read_state_dict(obj, prefer_ema=prefer_ema)
        checked = {k: kwargs.pop(k, None) for k in ("vocab_size", "num_classes", "cls_token_num")}
        found = llamagen_file_config(state, checkpoint_args(obj), size=size, model_type=model_type,
                                     block_size=block_size, image_size=image_size, downsample=downsample,
                                     class_dropout_prob=kwargs.get("class_dropout_prob", 0.1), **checked)
        size, model_type = found.pop("size"), found["model_type"]
        model = cls.from_size(size, **{**found, **kwargs})
        load_checked(model, state, what=f"LlamaGen {size} ({model_type})",
                     ignore=("freqs_cis", "rope", "kv_cache.k_cache", "kv_cache.v_cache", "causal_mask"))
        return model.eval()

    # ----------------------------------------------------------------------------- metadata
    @property
    def grid(self) -> tuple:
        """``(rows, cols)`` of the token grid: square for image grids, ``(1, N)`` for 1D token sequences."""
        return _token_grid(self.config.block_size, self.config.grid_rows)

    @property
    def num_tokens(self) -> int:
        return self.config.block_size

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def prefix_len(self) -> int:
        return self.config.cls_token_num

    @property
    def has_null_condition(self) -> bool:
        """Whether an unconditional input exists (needed for classifier-free guidance)."""
        if self.config.model_type == "t2i":
            return True
        return self.cls_embedding.embedding_table.num_embeddings > self.config.num_classes

    def new_cache(self, batch: int, max_len: Optional[int] = None, dtype=None, device=None) -> StaticKVCache:
        """Preallocate a cache for ``batch`` sequences of prefix + all image tokens by default."""
        cfg = self.config
        max_len = max_len or self.prefix_len + self.num_tokens
        return StaticKVCache.allocate(cfg.n_layer, batch, cfg.n_kv_head or cfg.n_head, max_len,
                                      cfg.dim // cfg.n_head, dtype or self.output.weight.dtype,
                                      device or self.output.weight.device)

    # ----------------------------------------------------------------------------- conditions
    def condition_embeddings(self, cond, null: bool = False, train: bool = False) -> torch.Tensor:
        """Embed the condition prefix: class ids ``[B]`` (c2i) or caption features ``[B, P, C]`` (t2i).

        ``null=True`` returns the unconditional prefix for classifier-free guidance.
        """
        if self.config.model_type == "c2i":
            labels = torch.as_tensor(cond, device=self.tok_embeddings.weight.device).long().reshape(-1)
            if null:
                if not self.has_null_condition:
                    raise ValueError("this model was trained without a null class (class_dropout_prob=0), "
                                     "so classifier-free guidance is unavailable; use cfg_scale=1")
                labels = torch.full_like(labels, self.config.num_classes)
            elif labels.numel() and (labels.min() < 0 or labels.max() >= self.config.num_classes):
                raise ValueError(f"class ids must lie in [0, {self.config.num_classes}), got {labels.tolist()}")
            return self.cls_embedding(labels, train=train)
        caption = cond
        if caption.dim() != 3 or caption.shape[-1] != self.config.caption_dim:
            raise ValueError(f"t2i condition must be caption features [B, {self.config.cls_token_num}, "
                             f"{self.config.caption_dim}], got {tuple(caption.shape)}")
        if caption.shape[1] > self.config.cls_token_num:
            raise ValueError(f"prompt too long: {caption.shape[1]} caption tokens, the model takes at most "
                             f"{self.config.cls_token_num}; shorten the prompt")
        caption = caption.to(self.output.weight.dtype)
        if null:
            caption = self.cls_embedding.uncond_embedding[: caption.shape[1]].expand_as(caption).to(caption.dtype)
        return self.cls_embedding(caption, train=train)[:, : self.config.cls_token_num]

    # ----------------------------------------------------------------------------- forward
    def forward(self, tokens: Optional[torch.Tensor] = None, positions: Optional[torch.Tensor] = None,
                slots: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None,
                cache: Optional[StaticKVCache] = None, embeds: Optional[torch.Tensor] = None,
                return_hidden: bool = False):
        """Next-token logits ``[B, T, V]`` (fp32) for inputs at ``positions``, written at ``slots``.

        Give either image ``tokens`` ``[B, T]`` or input ``embeds`` ``[B, T, dim]`` (the
        condition prefix). Without a cache the call is a plain causal forward.
        """
        h, _, _ = self.trunk(tokens, positions, slots, mask, cache, embeds)
        h = self.norm(h)
        logits = self.output(h).float()
        return (logits, h) if return_hidden else logits

    def trunk(self, tokens: Optional[torch.Tensor] = None, positions: Optional[torch.Tensor] = None,
              slots: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None,
              cache: Optional[StaticKVCache] = None, embeds: Optional[torch.Tensor] = None) -> tuple:
        """Embeddings and every transformer layer, arguments as :meth:`forward`: ``(h, rope, mask)``
        with ``h`` before the final norm, so models with extra heads (NAR) run further blocks on the
        same RoPE and mask (cache layers after ``len(self.layers)``)."""
        h = self.tok_embeddings(tokens) if embeds is None else embeds
        h = self.tok_dropout(h)
        rope, mask = attention_inputs(self.rope, h, positions, slots, mask, cache)
        for i, layer in enumerate(self.layers):
            h = layer(h, rope, mask, cache, i, slots)
        if cache is not None:
            cache.visible.scatter_(1, slots, True)  # masks are built already: later blocks may reuse them
        return h, rope, mask

    def forward_train(self, tokens: torch.Tensor, cond, cond_mask: Optional[torch.Tensor] = None,
                      train: Optional[bool] = None, null: bool = False) -> torch.Tensor:
        """Teacher-forced logits ``[B, N, V]`` predicting image tokens ``tokens[:, 0..N-1]``.

        The sequence is ``[cond prefix] + tokens[:, :-1]``, as in LlamaGen training; the
        condition is dropped with ``class_dropout_prob`` when training (for CFG); ``null``
        replaces it by the null condition (the unconditional half of CFG).
        ``cond_mask`` (``[B, P]`` bool) marks real caption tokens; pads are hidden.
        """
        train = self.training if train is None else train
        prefix = self.condition_embeddings(cond, null=null, train=train)
        P = prefix.shape[1]
        h = torch.cat([prefix, self.tok_embeddings(tokens[:, :-1])], dim=1)
        B, T = h.shape[:2]
        positions = torch.cat([torch.full((P,), -1, device=h.device), torch.arange(T - P, device=h.device)])
        mask = None
        if cond_mask is not None:
            causal = torch.ones(T, T, dtype=torch.bool, device=h.device).tril()
            key_ok = torch.cat([cond_mask.bool(), torch.ones(B, T - P, dtype=torch.bool, device=h.device)], 1)
            mask = (causal[None] & key_ok[:, None, :]) | torch.eye(T, dtype=torch.bool, device=h.device)[None]
        logits = self.forward(embeds=h, positions=positions.expand(B, T), mask=mask)
        return logits[:, P - 1:]
