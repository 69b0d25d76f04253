"""vargen's static KV cache seen from inside a Hugging Face decoder.

HF attention layers call ``past_key_values.update(k, v, layer_idx)`` and attend over what
it returns, under the 4D ``attention_mask`` they were given (``masking_utils`` passes a
4D mask through unchanged). :class:`SlotBridge` is a ``transformers`` ``Cache`` whose
``update`` writes into a vargen :class:`SlotKVCache` at explicit slots and returns the
whole buffers, so an unmodified HF decoder runs on vargen's slots, masks and rollbacks.

Internal layout of a :class:`SlotKVCache` with ``M = max_len`` vargen slots: internal slot
``s`` holds the token of vargen slot ``s``; with row separators, internal slot ``M + s``
holds the separator forced right after the token of slot ``s`` (valid when ``has_sep[s]``)
and ``2 M`` is a scratch slot nobody attends to (padding writes go there).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .cache import StaticKVCache


@dataclass
class SlotKVCache(StaticKVCache):
    """A :class:`StaticKVCache` (``visible``/``length`` over vargen slots) for HF adapters.

    Extra attributes:
        sep_base: internal index of the separator region (``0``: the model has none).
        has_sep: ``[B, max_len]`` bool, the slot's token was a row's last cell, so the
            separator at ``sep_base + slot`` is valid (it is visible whenever its token is).
        hidden: ``[B, max_len]`` bool, prompt padding written at the slot: never attended.
        prompt_len: ``[B]`` long, real prompt tokens; image cells sit after them in HF positions.
    """

    sep_base: int = 0
    has_sep: Optional[torch.Tensor] = None
    hidden: Optional[torch.Tensor] = None
    prompt_len: Optional[torch.Tensor] = None

    @classmethod
    def allocate_slots(cls, n_layers: int, batch: int, heads: int, max_len: int, head_dim: int,
                       separators: bool, dtype=torch.float32, device=None) -> "SlotKVCache":
        """Buffers for ``max_len`` vargen slots (``2 * max_len + 1`` internal ones with separators)."""
        internal = 2 * max_len + 1 if separators else max_len
        shape = (batch, heads, internal, head_dim)
        flags = dict(dtype=torch.bool, device=device)
        return cls(
            k=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)],
            v=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)],
            visible=torch.zeros(batch, max_len, **flags),
            length=torch.zeros(batch, dtype=torch.long, device=device),
            sep_base=max_len if separators else 0,
            has_sep=torch.zeros(batch, max_len, **flags),
            hidden=torch.zeros(batch, max_len, **flags),
            prompt_len=torch.zeros(batch, dtype=torch.long, device=device),
        )

    @property
    def scratch(self) -> int:
        """Internal slot for writes nobody reads (separators fed as padding)."""
        return 2 * self.max_len


class _SlotLayer(CacheLayerMixin):
    """One decoder layer's view of the bridge: write at the bridge's slots, return the full buffers."""

    def __init__(self, bridge: "SlotBridge", index: int):
        super().__init__()
        self.bridge, self.index = bridge, index

    def lazy_initialization(self, key_states, value_states) -> None:  # buffers exist already
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        cache = self.bridge.cache
        # HF hands [B, H, T, D]; vargen writes [B, T, H, D] rows at [B, T] slots
        cache.write(self.index, self.bridge.slots, key_states.transpose(1, 2), value_states.transpose(1, 2))
        return cache.k[self.index], cache.v[self.index]

    def get_mask_sizes(self, query_length: int) -> tuple:
        return self.bridge.cache.k[self.index].shape[2], 0

    def get_seq_length(self) -> int:
        return int(self.bridge.cache.length.max())

    def get_max_length(self) -> int:
        return self.bridge.cache.k[self.index].shape[2]


class SlotBridge(Cache):
    """A ``transformers`` ``Cache`` writing one forward's keys/values into a :class:`SlotKVCache`.

    Args:
        cache: the vargen cache (one buffer pair per decoder layer).
        slots: ``[B, T]`` internal slots of this forward's inputs.
    """

    def __init__(self, cache: StaticKVCache, slots: torch.Tensor):
        self.cache, self.slots = cache, slots
        super().__init__(layers=[_SlotLayer(self, i) for i in range(len(cache.k))])


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bool ``[B, T, L]`` (True = attend) -> additive ``[B, 1, T, L]`` that eager and SDPA both take."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]
