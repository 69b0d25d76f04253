"""The model protocol on top of a Hugging Face AR image generator (shared by every family).

:class:`HFImageModel` owns the mapping from vargen's ``(image cell, slot)`` to the HF
model's sequence. The HF position of image cell ``(r, c)`` is
``prompt_len + r * (W + sep) + c``, where ``sep`` is 1 when the model puts a row-separator
token after every row (Emu3's end-of-line, Lumina-mGPT's new-line). A separator is
forced, never sampled: when a row's last cell is fed, the adapter feeds its separator
right after it in the same forward (into the cell's twin internal slot, see
:mod:`vargen.models.hf_cache`) and returns, for that cell, the logits at the separator,
i.e. the distribution of the next row's first token. A separator is visible exactly when
its cell is, so out-of-order decoding (ZipAR) and rollbacks (SJD) need nothing extra.

Prompts are token ids. :meth:`HFImageModel.condition_embeddings` left-pads the rows of a
batch (and the null prompts of classifier-free guidance, which may be shorter or longer)
to one length and marks the padding as NaN embeddings: the adapter's own forward turns
those into hidden keys and counts HF positions over the real tokens only, so a padded
row computes exactly what its unpadded prompt does. The marker survives the session's
``[cond; uncond]`` concatenation without any state in the adapter.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import List, Optional, Sequence

import torch
import torch.nn as nn

from .cache import causal_slot_mask
from .hf_cache import SlotBridge, SlotKVCache, additive_mask


def prompt_rows(cond) -> List[List[int]]:
    """Prompt ids as one list per sample: ``[B, P]`` ids, a list of id lists, or a mapping
    with ``input_ids`` (and optionally ``attention_mask``, whose zeros are dropped)."""
    mask = None
    if isinstance(cond, Mapping):
        if "input_ids" not in cond:
            raise ValueError("a prompt mapping needs 'input_ids' (e.g. the output of adapter.prompt_ids)")
        ids, mask = cond["input_ids"], cond.get("attention_mask")
    else:
        ids = cond
    if isinstance(ids, (list, tuple)) and ids and all(isinstance(r, (list, tuple)) for r in ids):
        rows = [[int(t) for t in r] for r in ids]
    else:
        ids = torch.as_tensor(ids)
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2 or ids.dtype.is_floating_point:
            raise ValueError(f"prompt ids must be integer [B, P], got {tuple(ids.shape)} {ids.dtype}")
        rows = ids.tolist()
    if mask is not None:
        mask = torch.as_tensor(mask).reshape(len(rows), -1).tolist()
        rows = [[t for t, keep in zip(r, m) if keep] for r, m in zip(rows, mask)]
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("every prompt needs at least one token")
    return rows


def _id_slice(ids: torch.Tensor) -> Optional[slice]:
    """``slice(lo, hi)`` when ``ids`` is ``lo, lo+1, ..., hi-1`` (weights then need no gather copy)."""
    lo = int(ids[0])
    if torch.equal(ids.cpu(), torch.arange(lo, lo + ids.numel())):
        return slice(lo, lo + ids.numel())
    return None


class HFImageModel(nn.Module):
    """Base adapter: a ``transformers`` AR image generator speaking vargen's model protocol.

    Families fill in the embeddings, the head, the decoder module and the null prompt;
    this class does the slot/position mapping, separators, masks, cache and prompt padding.

    Args:
        hf_model: the ``transformers`` model (kept as ``self.hf``; put in eval mode).
        grid: ``(H, W)`` image tokens.
        image_ids: ``[V]`` LM vocabulary id of each image code (``None`` when the model has
            a separate image vocabulary, as Janus).
        separator_id: vocabulary id of the row separator, ``None`` for none.
        bos_token_id, boi_token_id, pad_token_id: special ids used to build null prompts.
        max_prompt_len: the protocol's ``prefix_len``: an upper bound on prompt tokens
            (caches of SJD/ZipAR are sized with it); longer prompts raise an error.
        negative_prompt_ids: text ids put in the null prompt (families that support it).
    """

    family = "hf"
    has_image_decoder = False  # whether the transformers model ships a VQ decoder (decode_tokens works)
    null_keeps_bos = True  # whether a null prompt starts with BOS before the image header

    def __init__(self, hf_model, grid: Sequence[int], image_ids: Optional[torch.Tensor] = None,
                 separator_id: Optional[int] = None, bos_token_id: Optional[int] = None,
                 boi_token_id: Optional[int] = None, pad_token_id: Optional[int] = None,
                 max_prompt_len: int = 256, negative_prompt_ids: Optional[Sequence[int]] = None):
        super().__init__()
        self.hf = hf_model.eval()
        H, W = (int(g) for g in grid)
        if H < 1 or W < 1:
            raise ValueError(f"grid must be two positive sizes, got {tuple(grid)}")
        self.grid = (H, W)
        self.prefix_len = int(max_prompt_len)
        self.separator_id = None if separator_id is None else int(separator_id)
        self.bos_token_id = None if bos_token_id is None else int(bos_token_id)
        self.boi_token_id = None if boi_token_id is None else int(boi_token_id)
        self.pad_token_id = None if pad_token_id is None else int(pad_token_id)
        self.negative_prompt_ids = [int(t) for t in (negative_prompt_ids or [])]
        self._id_range = None
        if image_ids is not None:
            image_ids = torch.as_tensor(image_ids, dtype=torch.long)
            self.register_buffer("image_ids", image_ids, persistent=False)
            self._id_range = _id_slice(image_ids)
        self.eval()

    # ----------------------------------------------------------------------------- family hooks
    @property
    def text_config(self):
        """The decoder's config (layers, heads, head size) for cache allocation."""
        raise NotImplementedError

    @property
    def decoder(self) -> nn.Module:
        """The HF decoder stack (takes ``inputs_embeds``, ``position_ids``, mask and cache)."""
        raise NotImplementedError

    def embed_text(self, ids: torch.Tensor) -> torch.Tensor:
        return self.hf.get_input_embeddings()(ids)

    def embed_image(self, codes: torch.Tensor) -> torch.Tensor:
        """Input embeddings of image codes (default: the LM embedding of their vocabulary ids)."""
        return self.embed_text(self.image_ids[codes])

    def image_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits over the image codes, in code order (default: the LM head's image rows)."""
        weight = self.hf.get_output_embeddings().weight
        rows = weight[self._id_range] if self._id_range is not None else weight.index_select(0, self.image_ids)
        return torch.nn.functional.linear(hidden, rows)

    def decode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Image codes ``[B, N]`` (raster order) -> images ``[B, 3, H, W]`` in ``[0, 1]``."""
        raise NotImplementedError(f"{type(self).__name__} has no image decoder")

    # ----------------------------------------------------------------------------- metadata
    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def vocab_size(self) -> int:
        return int(self.image_ids.numel())

    @property
    def codebook_embeddings(self) -> torch.Tensor:
        """``[V, D]`` code vectors of the model's VQ (LANTERN's latent neighbours), in code order."""
        return self.hf.model.vqmodel.quantize.embedding.weight

    @property
    def has_null_condition(self) -> bool:
        """Whether an unconditional prompt exists (built from the image header; needs BOI)."""
        return self.boi_token_id is not None

    @property
    def separators(self) -> bool:
        return self.separator_id is not None

    @property
    def device(self) -> torch.device:
        return next(self.hf.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf.parameters()).dtype

    def new_cache(self, batch: int, max_len: Optional[int] = None, dtype=None, device=None) -> SlotKVCache:
        """A cache for ``batch`` sequences of ``max_len`` vargen slots (default: prompt bound + image)."""
        cfg = self.text_config
        heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        max_len = max_len or self.prefix_len + self.num_tokens
        return SlotKVCache.allocate_slots(cfg.num_hidden_layers, batch, heads, max_len, head_dim, self.separators,
                                          dtype or self.dtype, device or self.device)

    # ----------------------------------------------------------------------------- prompts
    def header_start(self, row: List[int]) -> int:
        """Index of the image header (the last BOI) in a prompt row."""
        if self.boi_token_id is None or self.boi_token_id not in row:
            raise ValueError(f"{self.family} prompt ids must end with the image header starting with the "
                             f"begin-of-image token (id {self.boi_token_id}); build them with "
                             f"{type(self).__name__}.prompt_ids(texts, processor)")
        return len(row) - 1 - row[::-1].index(self.boi_token_id)

    def check_prompt(self, row: List[int]) -> None:
        """Raise if a prompt row cannot be followed by image tokens."""
        if self.boi_token_id is not None:
            self.header_start(row)

    def null_row(self, row: List[int], negative: Sequence[int]) -> List[int]:
        """The unconditional prompt for ``row``: [BOS] + negative text + the row's image header."""
        head = [row[0]] if self.null_keeps_bos and self.bos_token_id is not None and row[0] == self.bos_token_id else []
        return head + list(negative) + row[self.header_start(row):]

    def condition_embeddings(self, cond, null: bool = False) -> torch.Tensor:
        """Prompt ids -> input embeddings ``[B, P, D]`` (``null=True``: the unconditional prompts).

        ``cond`` is ``[B, P]`` ids, a list of id lists, or a mapping with ``input_ids``
        (+ ``attention_mask``, + ``negative_ids``) such as :meth:`prompt_ids` returns. Rows
        are left-padded to one length (shared by the cond and null prompts, so the session
        can stack them); padding rows are NaN, which :meth:`forward` hides.
        """
        if null and not self.has_null_condition:
            raise ValueError(f"{type(self).__name__} has no unconditional prompt (its begin-of-image/pad ids "
                             "are unknown); pass them to the adapter or use cfg_scale=1")
        rows = prompt_rows(cond)
        for r in rows:
            self.check_prompt(r)
        negative = self.negative_prompt_ids
        if isinstance(cond, Mapping) and cond.get("negative_ids") is not None:
            negative = [int(t) for t in torch.as_tensor(cond["negative_ids"]).reshape(-1).tolist()]
        nulls = [self.null_row(r, negative) for r in rows] if self.has_null_condition else []
        length = max(len(r) for r in rows + nulls)
        if length > self.prefix_len:
            raise ValueError(f"prompt of {length} tokens is longer than max_prompt_len={self.prefix_len}; "
                             "shorten it or build the adapter with a larger max_prompt_len")
        chosen = nulls if null else rows
        ids = torch.zeros(len(chosen), length, dtype=torch.long)
        pad = torch.ones(len(chosen), length, dtype=torch.bool)
        for i, r in enumerate(chosen):
            ids[i, length - len(r):] = torch.tensor(r)
            pad[i, length - len(r):] = False
        dev = self.device
        emb = self.embed_text(ids.to(dev))
        return emb.masked_fill(pad.to(dev)[..., None], float("nan"))

    # ----------------------------------------------------------------------------- forward
    def forward(self, tokens: Optional[torch.Tensor] = None, positions: Optional[torch.Tensor] = None,
                slots: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None,
                cache: Optional[SlotKVCache] = None, embeds: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits ``[B, T, V]`` (fp32, image codes) for inputs at ``positions``, written at ``slots``.

        ``embeds`` are prompt embeddings (positions ``-1`` or ``None``); ``tokens`` are
        image codes at raster cells ``positions``. ``mask`` (``[B, T, max_len]``, True =
        attend) defaults to generation-order causal. Without a cache, ``embeds`` run as a
        plain causal forward.
        """
        if (tokens is None) == (embeds is None):
            raise ValueError("give exactly one of tokens (image codes) or embeds (prompt embeddings)")
        if cache is None:
            if tokens is not None:
                raise ValueError("image tokens need the prompt in a cache: prefill it first (see DecodeSession)")
            B, T = embeds.shape[:2]
            cache = self.new_cache(B, T)
            slots = torch.arange(T, device=embeds.device).expand(B, T)
        if not isinstance(cache, SlotKVCache):
            raise TypeError(f"{type(self).__name__} needs its own cache type; allocate it with model.new_cache()")
        if slots is None:
            raise ValueError("slots are required when writing to a cache")
        if embeds is not None:
            if positions is not None and bool((positions >= 0).any()):
                raise ValueError("embeds are for the prompt (positions -1); feed image cells as tokens")
            return self._prefill(embeds, slots, mask, cache)
        if positions is None:
            raise ValueError("image tokens need their raster cells as positions")
        return self._image_step(tokens, positions, slots, mask, cache)

    def _visible_mask(self, mask, slots, cache):
        """The vargen mask without prompt padding (a query always sees itself); also returns ``own``."""
        if mask is None:
            mask = causal_slot_mask(slots, cache)
        own = torch.zeros_like(mask, dtype=torch.bool).scatter_(2, slots[..., None], True)
        return (mask.bool() & ~cache.hidden[:, None, :]) | own, own

    def _run(self, x, positions, slots, allowed, cache) -> torch.Tensor:
        dtype = self.dtype
        out = self.decoder(inputs_embeds=x.to(dtype), position_ids=positions,
                           attention_mask=additive_mask(allowed, dtype),
                           past_key_values=SlotBridge(cache, slots), use_cache=True)
        return out.last_hidden_state

    def _prefill(self, embeds, slots, mask, cache) -> torch.Tensor:
        pad = torch.isnan(embeds).any(-1)
        embeds = embeds.masked_fill(pad[..., None], 0.0)
        base = cache.visible.sum(1)  # real prompt tokens already in the cache (chunked prefill); 0 when fresh
        cache.hidden.scatter_(1, slots, pad)
        cache.has_sep.scatter_(1, slots, False)
        allowed, _ = self._visible_mask(mask, slots, cache)
        real = ~pad & allowed[:, -1].gather(1, slots)  # what the last prompt token reads (cond_mask pads too)
        positions = (base[:, None] + real.long().cumsum(1) - 1).clamp(min=0)
        cache.prompt_len.copy_(base + real.sum(1))
        if self.separators:  # prompt tokens never see separator or scratch slots
            allowed = torch.cat([allowed, allowed.new_zeros(*allowed.shape[:2], cache.max_len + 1)], -1)
        hidden = self._run(embeds, positions, slots, allowed, cache)
        cache.visible.scatter_(1, slots, ~pad)
        return self.image_logits(hidden).float()

    def _image_step(self, tokens, positions, slots, mask, cache) -> torch.Tensor:
        B, T = tokens.shape
        W = self.grid[1]
        row_len = W + int(self.separators)
        hf_pos = cache.prompt_len[:, None] + (positions // W) * row_len + positions % W
        x = self.embed_image(tokens)
        cache.hidden.scatter_(1, slots, False)
        is_last = positions % W == W - 1
        if self.separators:
            cache.has_sep.scatter_(1, slots, is_last)
        allowed, own = self._visible_mask(mask, slots, cache)
        out_index = None
        if self.separators:
            x, hf_pos, slots, allowed, out_index = self._add_separators(x, hf_pos, slots, allowed, own, is_last, cache)
        hidden = self._run(x, hf_pos, slots, allowed, cache)
        cache.visible.scatter_(1, slots[:, :T], True)
        if out_index is not None:  # a row's last cell answers with its separator's output
            hidden = hidden.gather(1, out_index[..., None].expand(-1, -1, hidden.shape[-1]))
        return self.image_logits(hidden).float()

    def _add_separators(self, x, hf_pos, slots, allowed, own, is_last, cache):
        """Append one separator input per last cell; returns the extended inputs and, per cell,
        the input whose output it answers with."""
        B, T = slots.shape
        M = cache.max_len
        key_sep = cache.has_sep[:, None, :]
        scratch = allowed.new_zeros(B, T, 1)
        # a token sees the separators of the cells it sees, never its own (that one comes after it)
        rows = torch.cat([allowed, allowed & key_sep & ~own, scratch], -1)
        # static shapes where it matters (plain AR, torch.compile): every input carries a separator
        # input, padding ones go to the scratch slot; otherwise one host sync sizes the extra inputs
        n_sep = T if T == 1 or torch.compiler.is_compiling() else int(is_last.sum(1).max())
        out_index = torch.arange(T, device=slots.device).expand(B, T).clone()
        if n_sep == 0:
            return x, hf_pos, slots, rows, None
        src = torch.sort((~is_last).to(torch.uint8), dim=1, stable=True).indices[:, :n_sep]  # last cells first
        ok = is_last.gather(1, src)
        sep_slots = torch.where(ok, cache.sep_base + slots.gather(1, src), torch.full_like(src, cache.scratch))
        sep_x = self.embed_text(torch.full((1, 1), self.separator_id, device=x.device)).to(x.dtype)
        seen = allowed.gather(1, src[..., None].expand(-1, -1, M))
        sep_rows = torch.cat([seen, seen & key_sep, seen.new_zeros(B, n_sep, 1)], -1)
        only_scratch = torch.zeros_like(sep_rows[:1, :1])
        only_scratch[..., -1] = True  # padding separators see only themselves in the scratch slot
        sep_rows = torch.where(ok[..., None], sep_rows, only_scratch)
        out_index.scatter_(1, src, torch.where(ok, T + torch.arange(n_sep, device=src.device), src))
        return (torch.cat([x, sep_x.expand(B, n_sep, -1)], 1), torch.cat([hf_pos, hf_pos.gather(1, src) + 1], 1),
                torch.cat([slots, sep_slots], 1), torch.cat([rows, sep_rows], 1), out_index)
