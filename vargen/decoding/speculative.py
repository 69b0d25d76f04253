"""Speculative Jacobi Decoding (Teng et al., ICLR 2025) and its lossless draft coupling.

One loop: a window of ``L`` drafts after the last committed token is verified in one
forward pass (the last committed token plus ``L`` drafts, so a fully accepted window
also yields a bonus token); the acceptance rule commits the longest accepted prefix and
resamples at the first rejection; the cache rolls back by moving its length pointer;
the drafts after the rejection become this pass's samples (Jacobi iteration, ``q := p``)
and fresh drafts fill the window. Each sample advances by its own accepted length.

With ``coupling="maximal"`` a redrawn draft keeps its old token with probability
``min(1, q_new / q_old)`` (else it comes from the residual); with ``"gumbel"`` every
cell keeps one Exp(1) noise vector and drafts are ``argmax(q / E)``. Either way each draft
is still an exact sample of its ``q``, so verification stays lossless, and drafts stop
flickering between iterations, which is what raises acceptance (the MC-SJD idea).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm

from .acceptance import ExactAcceptance, couple
from .drafts import check_init, fill_fresh
from .sampling import SamplingConfig, exponential_noise, sample_categorical, uniform_noise
from .session import DecodeSession

COUPLINGS = ("none", "maximal", "gumbel")
COUPLING_SUFFIX = {"none": "", "maximal": "+coupling", "gumbel": "+gumbel"}


def sjd_method_name(coupling: str = "none", acceptance: str = "exact") -> str:
    """The registry name of an SJD variant, e.g. ``"sjd+coupling+lantern"``; GSD (grouped acceptance on plain
    SJD drafts) is ``"gsd"``. The one definition the decode loop, the CLI flags and ``METHODS`` share."""
    if acceptance == "gsd" and coupling == "none":
        return "gsd"
    return "sjd" + COUPLING_SUFFIX[coupling] + ("" if acceptance == "exact" else f"+{acceptance}")


def commit_accepted(canvas: torch.Tensor, from_draft: torch.Tensor, n: torch.Tensor, drafts: torch.Tensor,
                    accepted: torch.Tensor, token: torch.Tensor, active: torch.Tensor, N: int) -> tuple:
    """Commit ``accepted[b]`` of ``drafts`` ``[B, L]`` at cells ``n .. n+a-1`` and ``token`` (the resample or
    bonus) at ``n+a`` (inside the grid), for ``active`` samples; marks the drafts in ``from_draft``.
    Returns ``(keep [B, L], n_new [B])``."""
    steps = torch.arange(drafts.shape[1], device=n.device)
    cells = n[:, None] + steps
    keep = (steps[None] < accepted[:, None]) & active[:, None]
    canvas.scatter_(1, cells, torch.where(keep, drafts, canvas.gather(1, cells)))
    from_draft.scatter_(1, cells, from_draft.gather(1, cells) | keep)
    at = (n + accepted)[:, None]
    put = (active & (n + accepted < N))[:, None]
    canvas.scatter_(1, at, torch.where(put, token[:, None], canvas.gather(1, at)))
    return keep, torch.where(active, (n + accepted + 1).clamp(max=N), n)


def _rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[b, index[b, j]]`` for ``x`` ``[B, T, V]`` and ``index`` ``[B, L]`` -> ``[B, L, V]``."""
    return x.gather(1, index[..., None].expand(*index.shape, x.shape[-1]))


@torch.no_grad()
def decode_sjd(model, cond, sampling: SamplingConfig = SamplingConfig(), seeds: Optional[Sequence[int]] = None,
               cond_mask: Optional[torch.Tensor] = None, window: int = 16, init: str = "left",
               coupling: str = "none", acceptance=None, progress: bool = False, callback=None):
    """Generate all image tokens with Speculative Jacobi Decoding.

    Args:
        model, cond, sampling, seeds, cond_mask: as :func:`vargen.decoding.decode_ar`.
        window: drafts verified per forward pass (``L``; SJD's default is 16).
        init: draft initialisation for new window positions, see :mod:`vargen.decoding.drafts`.
        coupling: ``"none"`` (SJD), ``"maximal"`` or ``"gumbel"`` (lossless coupled redraws).
        acceptance: the acceptance rule (default :class:`ExactAcceptance`, lossless).
        progress: tqdm bar over the least advanced sample's committed tokens.
        callback: optional ``callback(step, tokens, committed)`` after each verify pass
            (``tokens [B, N]``; cells past ``committed[b]`` hold drafts).

    Returns:
        ``(tokens [B, N], DecodeStats)``; ``stats.per_sample_forward_passes`` counts each
        sample's passes (prefill included) until it finished.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    init = check_init(init)
    if coupling not in COUPLINGS:
        raise ValueError(f"unknown coupling {coupling!r}; choose from {COUPLINGS}")
    acceptance = acceptance or ExactAcceptance()
    N, V, L, width = model.num_tokens, model.vocab_size, window, model.grid[1]
    name = sjd_method_name(coupling, acceptance.name)
    session = DecodeSession(model, cond, sampling, seeds, cond_mask, method=name,
                            max_len=model.prefix_len + N + L)
    B, dev, gens = session.batch, session.device, session.generators
    canvas = torch.zeros(B, N + L + 1, dtype=torch.long, device=dev)  # committed tokens, then drafts
    from_draft = torch.zeros(B, N + L + 1, dtype=torch.bool, device=dev)  # cells committed as accepted drafts
    first = session.prefill()
    canvas[:, 0] = sample_categorical(first, gens)
    n = torch.ones(B, dtype=torch.long, device=dev)  # committed tokens per sample
    session.advance(n)
    steps = torch.arange(L + 1, device=dev)
    gumbel = exponential_noise((N + L + 1, V), gens, dev) if coupling == "gumbel" else None
    drafts, q = fill_fresh(canvas, n, torch.zeros(B, L, dtype=torch.long, device=dev),
                           torch.zeros(B, L, V, device=dev), torch.ones(B, L, dtype=torch.bool, device=dev),
                           first, init, gens, width)
    step_i = 0
    bar = tqdm(total=N, disable=not progress, desc=name, leave=False)
    while True:
        active = n < N
        if not bool(active.any()):  # one host sync per verify step, none per token
            break
        # verify: the last committed token and L drafts, at their true raster positions
        pos = (n - 1)[:, None] + steps
        inputs = torch.cat([canvas.gather(1, (n - 1)[:, None]), drafts], dim=1)
        probs = session.forward(inputs, positions=pos.clamp(max=N - 1), slots=pos)  # [B, L+1, V]
        valid = (pos[:, 1:] < N) & active[:, None]
        coins = uniform_noise((L,), gens, dev)
        noise = exponential_noise((V,), gens, dev)  # the resample's Exp(1) draw, made explicit for the fused op
        # r: drafts accepted before the first rejection; x: the residual (or bonus) token at n + r
        r, x = acceptance.verify_window(probs, q, drafts, coins, valid, noise)
        p_r = _rows(probs, r[:, None])[:, 0]
        # commit the accepted drafts at n .. n+r-1 and the resampled (or bonus) token at n+r
        _, n_new = commit_accepted(canvas, from_draft, n, drafts, r, x, active, N)
        session.advance(n_new)
        session.rollback(n_new - 1)  # the newest token has no KV yet
        # next window: this pass's distributions where they reach (Jacobi), fresh drafts after
        src = r[:, None] + 1 + steps[:L]
        new_q = _rows(probs, src.clamp(max=L))
        if gumbel is not None:
            noise = _rows(gumbel, (n_new[:, None] + steps[:L]).clamp(max=N + L))
        else:
            noise = exponential_noise((L, V), gens, dev)
        new_d = sample_categorical(new_q, noise=noise)
        if coupling == "maximal":
            old = src.clamp(max=L - 1)
            coupled = couple(new_q, _rows(q, old), drafts.gather(1, old), uniform_noise((L,), gens, dev),
                             exponential_noise((L, V), gens, dev))
            new_d = torch.where(src <= L - 1, coupled, new_d)
        n = n_new
        drafts, q = fill_fresh(canvas, n, new_d, new_q, src > L, p_r, init, gens, width)
        if callback is not None:
            callback(step_i, canvas[:, :N], n)
        step_i += 1
        if progress:
            bar.n = int(n.min())
            bar.refresh()
    bar.close()
    stats = session.finish()
    stats.extra.update(window=L, init=init, coupling=coupling, acceptance=acceptance.name,
                       accepted_cells=from_draft[:, :N].float().mean(0).tolist())
    return canvas[:, :N], stats


def decode_jacobi(model, cond, sampling: SamplingConfig = SamplingConfig(), seeds: Optional[Sequence[int]] = None,
                  cond_mask: Optional[torch.Tensor] = None, window: int = 16, init: str = "left",
                  progress: bool = False, callback=None):
    """Plain Jacobi decoding, the greedy fixed-point iteration SJD generalises (the reference point).

    Every pass replaces each draft in the window by the argmax given the drafts before it
    and commits the prefix that stopped changing. This is SJD at temperature 0: a one-hot
    ``p`` accepts a draft iff it is the argmax, and the "residual" is the argmax itself, so
    the output is exactly greedy AR. ``sampling``'s CFG is kept; its temperature, top-k and
    top-p are replaced by greedy selection.
    """
    greedy = replace(sampling, temperature=0.0, top_k=0, top_p=1.0)
    tokens, stats = decode_sjd(model, cond, greedy, seeds, cond_mask, window=window, init=init, progress=progress,
                               callback=callback)
    stats.method = "jacobi"
    return tokens, stats
