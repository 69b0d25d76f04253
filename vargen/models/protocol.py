"""The one interface every AR image generator implements for vargen's decoding methods."""
from __future__ import annotations

from typing import Optional, Protocol, runtime_checkable

import torch

from .cache import StaticKVCache


@runtime_checkable
class ARImageModel(Protocol):
    """Protocol of an AR image generator.

    ``forward(tokens|embeds, positions, slots, mask, cache) -> logits [B, T, V]`` (fp32):
    ``positions`` are image places (raster cell ``r * W + c``; ``-1`` for condition
    tokens), ``slots`` are the cache slots written, ``mask`` (``[B, T, max_len]``, True =
    attend) defaults to generation-order causal. Rolling back is moving
    ``cache.length``; methods never copy or slice the cache.
    """

    grid: tuple
    num_tokens: int
    vocab_size: int
    prefix_len: int
    has_null_condition: bool

    def new_cache(self, batch: int, max_len: Optional[int] = None) -> StaticKVCache: ...

    def condition_embeddings(self, cond, null: bool = False) -> torch.Tensor: ...

    def forward(self, tokens: Optional[torch.Tensor] = None, positions: Optional[torch.Tensor] = None,
                slots: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None,
                cache: Optional[StaticKVCache] = None, embeds: Optional[torch.Tensor] = None) -> torch.Tensor: ...
