"""The one interface every AR image generator implements for vargen's decoding methods."""
from __future__ import annotations

from typing import Optional, Protocol, runtime_checkable

import torch

from .cache import StaticKVCache


@runtime_checkable
class ARImageModel(Protocol):
    """Protocol of an AR image generator: what :class:`vargen.decoding.DecodeSession` checks a model against.

    Implemented by :class:`~vargen.models.LlamaGen`, the parallel models trained from it
    (:class:`~vargen.models.lpd.LPD`, :class:`~vargen.models.nar.NARModel`), the Hugging Face adapters
    (:class:`~vargen.models.hf_base.HFImageModel`) and the wrappers around any of them
    (:class:`~vargen.models.PrefixModel`, :class:`~vargen.models.compiled.CompiledModel`).

    ``forward(tokens|embeds, positions, slots, mask, cache) -> logits [B, T, V]``:
    ``positions`` are image places (raster cell ``r * W + c``; ``-1`` for condition
    tokens), ``slots`` are the cache slots written, ``mask`` (``[B, T, max_len]``, True =
    attend) defaults to generation-order causal over the cache's ``visible`` slots.

    What a rollback does (:meth:`StaticKVCache.rollback`): it sets each sample's ``length`` and clears
    ``visible`` from that slot on, one masked write over ``[B, max_len]`` bools; no keys or values move.
    Attention masks read ``visible`` (never ``length``); ``length`` is read only by the Hugging Face
    bridge, which hands transformers a cache length. EAGLE's accepted tree path is the one place keys and
    values are copied (:meth:`StaticKVCache.copy_slots`), because tree nodes sit in slots that are not
    their final cells.
    """

    grid: tuple
    num_tokens: int
    vocab_size: int
    prefix_len: int
    has_null_condition: bool

    def parameters(self): ...

    def new_cache(self, batch: int, max_len: Optional[int] = None) -> StaticKVCache: ...

    def condition_embeddings(self, cond, null: bool = False) -> torch.Tensor: ...

    def forward(self, tokens: Optional[torch.Tensor] = None, positions: Optional[torch.Tensor] = None,
                slots: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None,
                cache: Optional[StaticKVCache] = None, embeds: Optional[torch.Tensor] = None) -> torch.Tensor: ...


FORWARD_ARGS = ("tokens", "positions", "slots", "mask", "cache", "embeds")


def check_model(model) -> None:
    """Raise ``TypeError`` naming what ``model`` lacks of :class:`ARImageModel` (attributes, or forward arguments)."""
    import inspect

    missing = [name for name in ("grid", "num_tokens", "vocab_size", "prefix_len", "has_null_condition",
                                 "parameters", "new_cache", "condition_embeddings", "forward")
               if not hasattr(model, name)]
    if not missing:
        params = inspect.signature(model.forward).parameters
        takes_all = any(p.kind == p.VAR_KEYWORD for p in params.values())
        missing = [f"forward({a}=)" for a in FORWARD_ARGS if a not in params and not takes_all]
    if missing:
        raise TypeError(f"{type(model).__name__} does not implement vargen's model protocol (ARImageModel): "
                        f"missing {', '.join(missing)}")
