"""LPD decoding (Zhang et al., ICLR 2026): groups of position queries, one forward per group.

Needs an :class:`vargen.models.lpd.LPD` model (fine-tuned from the AR model with
``vargen train lpd``). Step ``i`` feeds the tokens sampled at step ``i - 1`` (at their cells'
positions) and the queries of group ``i``. Cache slots follow generation order: group ``i``
owns image slots ``[bounds[i], bounds[i + 1])``; its queries are written there at step
``i`` and overwritten by its sampled tokens at step ``i + 1`` (the cache is written before
attention in every layer), so no later step ever sees a query. The mask is block-causal
over slots, exactly the training mask: the tokens of group ``i - 1`` see the condition and
slots ``< bounds[i]``, the queries of group ``i`` also their own group's slots.

Orders are per sample (sample ``b``'s order depends only on ``seeds[b]``), computed on the
host one group ahead, so on a GPU the next group's cells are chosen while the current
forward runs. Guidance ramps linearly as in LPD: the token generated ``k``-th of ``N`` uses
``1 + (s - 1) * k / N``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm

from .. import ops
from ..models.lpd import LPD, TRAIN_HINT, load_lpd
from .lpd_order import ORDERS, group_bounds, group_schedule, iter_groups, order_generator
from .sampling import SamplingConfig, uniform_noise
from .session import DecodeSession, target_pass
from .trained import resolve_trained


def resolve_lpd(model, weights=None) -> LPD:
    """The LPD model to decode with (see :func:`~vargen.decoding.trained.resolve_trained`)."""
    return resolve_trained(model, weights, LPD, "LPD", "lpd", "an LPD model", load_lpd, TRAIN_HINT)


def lpd_pass(model, sampling: SamplingConfig, cache, prefix_len: int, tokens: torch.Tensor, positions: torch.Tensor,
             slots: torch.Tensor, mask: torch.Tensor, ramp: torch.Tensor, noise: torch.Tensor) -> tuple:
    """One LPD pass as a function of its inputs and its draws (``--compile`` captures it whole): the previous
    group's tokens and this group's queries in, this group's tokens out, each query row guided with its ``ramp``
    scale and drawn with its ``noise`` uniform (``[B, queries]``, drawn outside the graph in eager's order;
    :func:`vargen.ops.draw_categorical`).
    Returns ``(tokens [B, queries], count of positions with non-finite logits)``."""
    probs, bad = target_pass(model, sampling, cache, prefix_len, tokens, positions, slots, mask, cfg_scale=ramp)
    return ops.draw_categorical(probs[:, tokens.shape[1] - noise.shape[1]:], noise), bad


@torch.no_grad()
def decode_lpd(model, cond, sampling: SamplingConfig = SamplingConfig(), seeds: Optional[Sequence[int]] = None,
               cond_mask: Optional[torch.Tensor] = None, weights=None, steps: int = 20, repulsion: float = 2.0,
               order: str = "locality", progress: bool = False, callback=None):
    """Generate all image tokens in ``steps`` groups with LPD.

    Args:
        model: an :class:`LPD` model, or the AR LlamaGen it was fine-tuned from (then ``weights``).
        cond, sampling, seeds, cond_mask: as :func:`vargen.decoding.decode_ar`; ``sampling.cfg_scale``
            is the ramp's final scale.
        weights: an :class:`LPD` model or its folder; default ``<AR model folder>/lpd``.
        steps: forward passes after the condition prefill (group sizes: :func:`group_schedule`,
            the paper's list for 256 tokens in 20 steps).
        repulsion: Chebyshev distance within which a group's proximity picks repel each other.
        order: ``"locality"`` (LPD's), ``"random"`` or ``"raster"``.
        progress: tqdm bar over steps.
        callback: optional ``callback(step, tokens, committed)`` after each step (``tokens [B, N]``
            raster, zero where not generated yet; ``committed`` tokens generated so far).

    Returns:
        ``(tokens [B, N] long in raster order, DecodeStats)``; ``forward_passes == 1 + steps``.
    """
    if order not in ORDERS:
        raise ValueError(f"unknown LPD order {order!r}; choose from {ORDERS}")
    lpd = resolve_lpd(model, weights)
    N = lpd.num_tokens
    sizes = group_schedule(N, steps)
    bounds = group_bounds(sizes)
    # --compile (the pipeline's GPT wrapped): LPD's own model, compiled alike, runs each pass as one graph
    runner = model.companion(lpd) if hasattr(model, "companion") else None
    step = runner.whole_step(lpd_pass, dynamic=None) if runner is not None else lpd_pass
    session = DecodeSession(runner or lpd, cond, sampling, seeds, cond_mask, method="lpd")
    B, dev, P = session.batch, session.device, session.prefix_len
    seeds = list(range(B)) if seeds is None else list(seeds)
    groups = iter_groups(order, lpd.grid, sizes, [order_generator(s) for s in seeds], repulsion)
    session.prefill()  # the condition; the first token comes from group 0's query
    session.advance(torch.zeros(B, dtype=torch.long, device=dev))  # so the prefill commits nothing
    cond_visible = session.cache.visible[:B, :P].clone()  # real caption tokens (pads stay hidden)
    slot_ids = torch.arange(N, device=dev)
    orders = torch.zeros(B, N, dtype=torch.long, device=dev)  # cell of each generation index
    generated = torch.zeros(B, N, dtype=torch.long, device=dev)  # tokens in generation order
    for i in tqdm(range(len(sizes)), disable=not progress, desc="lpd", leave=False):
        a, b = bounds[i], bounds[i + 1]
        prev = bounds[i - 1] if i else a  # the previous group's tokens enter the cache now
        orders[:, a:b] = torch.from_numpy(next(groups)).to(dev, non_blocking=True)
        tokens = torch.cat([generated[:, prev:a], torch.full((B, b - a), lpd.mask_id, device=dev)], 1)
        limit = torch.cat([torch.full((a - prev,), a, device=dev), torch.full((b - a,), b, device=dev)])
        mask = torch.cat([cond_visible[:, None, :].expand(B, b - prev, P),
                          (slot_ids[None, :] < limit[:, None]).expand(B, -1, -1)], 2)
        rank = torch.cat([torch.zeros(a - prev, device=dev), torch.arange(a, b, device=dev) / N])
        ramp = 1 + (sampling.cfg_scale - 1) * rank  # only the query rows' scales matter
        noise = uniform_noise((b - a,), session.generators, dev)
        generated[:, a:b], bad = step(lpd, session.sampling, session.cache, P, tokens, orders[:, prev:b],
                                      slot_ids[prev:b].expand(B, -1), mask, ramp[None, :, None], noise)
        session.count_pass(bad)
        session.advance(torch.full((B,), b, device=dev))
        if callback is not None:
            partial = torch.zeros_like(generated).scatter_(1, orders[:, :b], generated[:, :b])
            callback(i, partial, torch.full((B,), b, device=dev))
    stats = session.finish()
    stats.extra.update(steps=len(sizes), group_sizes=sizes, order=order, repulsion=repulsion,
                       whole_step_graph=runner is not None)
    return torch.zeros_like(generated).scatter_(1, orders, generated), stats
