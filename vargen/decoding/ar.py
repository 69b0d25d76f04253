"""Plain autoregressive decoding in raster order: the baseline every method is measured against."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm

from .sampling import SamplingConfig, sample_categorical
from .session import DecodeSession


@torch.no_grad()
def decode_ar(model, cond, sampling: SamplingConfig = SamplingConfig(), seeds: Optional[Sequence[int]] = None,
              cond_mask: Optional[torch.Tensor] = None, progress: bool = False, callback=None):
    """Generate all image tokens one per forward pass.

    Args:
        model: a vargen protocol model (e.g. :class:`vargen.models.LlamaGen`).
        cond: class ids ``[B]`` or caption features ``[B, P, C]``.
        sampling: CFG / temperature / top-k / top-p.
        seeds: one seed per sample; the same seed gives the same tokens at any batch size.
        cond_mask: caption padding mask ``[B, P]`` for t2i.
        progress: show a tqdm bar over tokens.
        callback: optional ``callback(step, tokens, committed)`` after each token (``tokens [B, N]``;
            the first ``committed[b]`` of row ``b`` are final).

    Returns:
        ``(tokens [B, N] long in raster order, DecodeStats)``.
    """
    session = DecodeSession(model, cond, sampling, seeds, cond_mask, method="ar")
    B, N = session.batch, model.num_tokens
    tokens = torch.empty(B, N, dtype=torch.long, device=session.device)
    probs = session.prefill()
    for k in tqdm(range(N), disable=not progress, desc="tokens", leave=False):
        tokens[:, k] = sample_categorical(probs, session.generators)
        session.advance(torch.full((B,), k + 1, device=session.device))  # the pass that gave probs
        if callback is not None:
            callback(k, tokens, torch.full((B,), k + 1, device=session.device))
        if k + 1 < N:
            step = torch.full((B, 1), k, device=session.device)
            probs = session.forward(tokens[:, k: k + 1], positions=step, slots=step)[:, 0]
    return tokens, session.finish()
