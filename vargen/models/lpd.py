"""LPD: a LlamaGen GPT with learnable position queries (Zhang et al., ICLR 2026, arXiv 2507.01957).

LPD decouples context from prediction: image tokens already generated are the context,
and a *position query* (a learnable ``mask_token`` placed at a target cell) asks for the
token of that cell. Any number of queries at any cells can be answered in one forward,
so tokens are generated in groups, in any order. The official model adds a learned
absolute position embedding to the mask token; in this GPT positions enter through the
2D rotary embedding, so a query is the mask token at its target cell's rotary position.

The transformer, its RoPE, caption path and static KV cache are LlamaGen's (wrapped, not
copied). In the token protocol a query is the extra id ``mask_id == vocab_size``.

Training sequence (one group partition per batch, one random permutation per sample):
``[condition, context tokens in generation order (all but the last group), queries]``
under :func:`lpd_attention_mask`: query rows of group ``g`` see the condition, the
context of groups ``< g`` and the queries of group ``g``; context rows of group ``g``
see the condition and the context of groups ``<= g`` (causal by group, as the official
block mask); nothing else attends to a query.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from .cache import StaticKVCache
from .checkpoint import check_saved_class
from .llamagen import LlamaGen

TRAIN_HINT = "train one with `vargen train lpd --config configs/lpd_scenes.json` (it writes OUT/lpd)"
# the AR model's settings an LPD model must share to stand in for it (plus its condition's, by model type)
MATCHING_CONFIG = ("model_type", "vocab_size", "block_size")


def lpd_attention_mask(group_sizes: Sequence[int], prefix_len: int, cond_mask: Optional[torch.Tensor] = None,
                       device=None) -> torch.Tensor:
    """Boolean training mask (``True`` = attend) over ``[condition, context, queries]``.

    ``group_sizes`` partition the ``N`` image tokens in generation order; the context is
    the first ``N - group_sizes[-1]`` tokens (the last group is never context). Returns
    ``[1, T, T]`` or, with ``cond_mask`` (``[B, P]``, True = real caption token), ``[B, T, T]``
    where pads are hidden from every other row. Condition rows are causal among themselves
    (as in AR training); every row sees at least itself.
    """
    sizes = torch.as_tensor(list(group_sizes), device=device)
    if sizes.numel() == 0 or bool((sizes < 1).any()):
        raise ValueError(f"group sizes must be a non-empty list of positive sizes, got {list(group_sizes)}")
    n = int(sizes.sum())
    context = n - int(sizes[-1])
    total = prefix_len + context + n
    gid = torch.repeat_interleave(torch.arange(len(sizes), device=device), sizes)
    kind = torch.cat([torch.zeros(prefix_len, device=device, dtype=torch.long),
                      torch.ones(context, device=device, dtype=torch.long),
                      torch.full((n,), 2, device=device, dtype=torch.long)])  # 0 condition, 1 context, 2 query
    group = torch.cat([torch.full((prefix_len,), -1, device=device), gid[:context], gid])
    q_kind, k_kind, q_g, k_g = kind[:, None], kind[None, :], group[:, None], group[None, :]
    idx = torch.arange(total, device=device)
    cond_key = k_kind == 0
    mask = ((q_kind == 0) & cond_key & (idx[None, :] <= idx[:, None])) \
        | ((q_kind == 1) & (cond_key | ((k_kind == 1) & (k_g <= q_g)))) \
        | ((q_kind == 2) & (cond_key | ((k_kind == 1) & (k_g < q_g)) | ((k_kind == 2) & (k_g == q_g))))
    mask = mask[None]
    if cond_mask is not None:
        cond_mask = cond_mask.to(device=mask.device, dtype=torch.bool)
        key_ok = torch.cat([cond_mask, cond_mask.new_ones(cond_mask.shape[0], total - prefix_len)], 1)
        mask = mask & key_ok[:, None, :]
    return mask | torch.eye(total, dtype=torch.bool, device=mask.device)[None]


def _gpt_property(name: str) -> property:
    """A protocol attribute read from the wrapped GPT."""
    return property(lambda self: getattr(self.gpt, name), doc=f"The wrapped GPT's ``{name}``.")


def check_trained_from(gpt: LlamaGen, ar: LlamaGen, where: str, use: str) -> None:
    """Raise ``ValueError`` unless ``gpt`` (inside a model trained from an AR GPT: LPD, NAR) has ``ar``'s
    tokens, grid and condition; the message names each difference and says to ``use`` the matching model."""
    mine, theirs = gpt.config, ar.config
    keys = MATCHING_CONFIG + (("caption_dim", "cls_token_num") if mine.model_type == "t2i" else ("num_classes",))
    diff = [f"{k} {getattr(mine, k)} vs {getattr(theirs, k)}" for k in keys if getattr(mine, k) != getattr(theirs, k)]
    if diff:
        raise ValueError(f"{where} does not match the AR model ({', '.join(diff)}); use {use} and its tokenizer")


class LPD(ModelMixin, ConfigMixin):
    """LlamaGen GPT + a learnable mask token: position queries for any order and group size.

    Protocol: as :class:`LlamaGen` (``forward(tokens, positions, slots, mask, cache)``),
    where the token id :attr:`mask_id` (``vocab_size``) is a position query at its
    ``position``. ``gpt_config`` is the wrapped GPT's config (a dict of :class:`LlamaGen` arguments).

    Example:
        >>> ar = LlamaGen.from_size("GPT-tiny", block_size=16, vocab_size=32, num_classes=4)
        >>> lpd = LPD.from_ar(ar)
        >>> lpd.mask_id, lpd.grid
        (32, (4, 4))
    """

    config_name = "config.json"

    @register_to_config
    def __init__(self, gpt_config: Optional[dict] = None, mask_init_std: float = 0.02):
        super().__init__()
        self.gpt = LlamaGen(**(gpt_config or {}))
        self.mask_token = nn.Parameter(torch.randn(self.gpt.config.dim) * mask_init_std)

    @classmethod
    def from_ar(cls, gpt: LlamaGen, mask_init: str = "mean") -> "LPD":
        """Initialise from a trained AR LlamaGen: every GPT weight copied; the mask token is the mean
        token embedding (``mask_init="mean"``) or N(0, ``mask_init_std``) (``"normal"``)."""
        if not isinstance(gpt, LlamaGen):
            raise TypeError(f"LPD.from_ar needs a LlamaGen GPT, got {type(gpt).__name__}")
        if mask_init not in ("mean", "normal"):
            raise ValueError(f"mask_init must be 'mean' or 'normal', got {mask_init!r}")
        model = cls(gpt_config={k: v for k, v in gpt.config.items() if not k.startswith("_")})
        weight = gpt.output.weight
        model = nn.Module.to(model, device=weight.device, dtype=weight.dtype)  # plain cast: no fp32-module warning
        model.gpt.load_state_dict(gpt.state_dict())
        if mask_init == "mean":
            with torch.no_grad():
                model.mask_token.copy_(gpt.tok_embeddings.weight.mean(0))
        return model.train(gpt.training)

    # ----------------------------------------------------------------------------- protocol metadata
    @property
    def mask_id(self) -> int:
        """The token id of a position query (one past the vocabulary)."""
        return self.gpt.vocab_size

    grid = _gpt_property("grid")
    num_tokens = _gpt_property("num_tokens")
    vocab_size = _gpt_property("vocab_size")
    prefix_len = _gpt_property("prefix_len")
    has_null_condition = _gpt_property("has_null_condition")

    def new_cache(self, batch: int, max_len: Optional[int] = None, dtype=None, device=None) -> StaticKVCache:
        return self.gpt.new_cache(batch, max_len, dtype, device)

    def condition_embeddings(self, cond, null: bool = False, train: bool = False) -> torch.Tensor:
        return self.gpt.condition_embeddings(cond, null=null, train=train)

    def check_matches(self, ar: LlamaGen, where: str = "this LPD model") -> None:
        """Raise ``ValueError`` unless this model can stand in for ``ar`` (same tokens, grid, condition)."""
        check_trained_from(self.gpt, ar, where, "the LPD model fine-tuned from this AR model")

    # ----------------------------------------------------------------------------- forward
    def embed_inputs(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids ``[B, T]`` -> embeddings; id :attr:`mask_id` becomes the mask token (a query)."""
        query = tokens == self.mask_id
        emb = self.gpt.tok_embeddings(tokens.masked_fill(query, 0))
        return torch.where(query[..., None], self.mask_token.to(emb.dtype), emb)

    def forward(self, tokens: Optional[torch.Tensor] = None, positions: Optional[torch.Tensor] = None,
                slots: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None,
                cache: Optional[StaticKVCache] = None, embeds: Optional[torch.Tensor] = None,
                return_hidden: bool = False):
        """Logits ``[B, T, V]`` (fp32) as :meth:`LlamaGen.forward`; query tokens predict their position's token."""
        if embeds is None:
            embeds = self.embed_inputs(tokens)
        return self.gpt(embeds=embeds, positions=positions, slots=slots, mask=mask, cache=cache,
                        return_hidden=return_hidden)

    def forward_train(self, tokens: torch.Tensor, cond, group_sizes: Sequence[int], orders: torch.Tensor,
                      cond_mask: Optional[torch.Tensor] = None, train: Optional[bool] = None,
                      null: bool = False) -> torch.Tensor:
        """Query logits ``[B, N, V]`` in generation order: row ``k`` predicts ``tokens.gather(1, orders)[:, k]``.

        ``tokens`` are raster image tokens ``[B, N]``, ``orders`` one permutation of the cells
        per sample ``[B, N]``, ``group_sizes`` the groups (shared by the batch). The condition
        is dropped with ``class_dropout_prob`` when training (for CFG); ``null`` uses the null
        condition; ``cond_mask`` hides caption pads. One forward over the whole sequence.
        """
        train = self.training if train is None else train
        B, N = tokens.shape
        if sum(group_sizes) != N or orders.shape != tokens.shape:
            raise ValueError(f"group sizes sum to {sum(group_sizes)} and orders are {tuple(orders.shape)}, "
                             f"but there are {N} tokens per sample")
        prefix = self.condition_embeddings(cond, null=null, train=train)
        P = prefix.shape[1]
        context_cells = orders[:, :N - group_sizes[-1]]
        context = self.gpt.tok_embeddings(tokens.gather(1, context_cells))
        queries = self.mask_token.to(context.dtype).expand(B, N, -1)
        h = torch.cat([prefix.to(context.dtype), context, queries], 1)
        positions = torch.cat([orders.new_full((B, P), -1), context_cells, orders], 1)
        mask = lpd_attention_mask(group_sizes, P, cond_mask, device=h.device)
        return self.forward(embeds=h, positions=positions, mask=mask)[:, -N:]


def load_lpd(path: str) -> LPD:
    """Load an LPD folder (``LPD.save_pretrained``), failing clearly on a missing or wrong checkpoint."""
    check_saved_class(path, LPD.__name__, "an LPD model", TRAIN_HINT)
    return LPD.from_pretrained(path).eval()
