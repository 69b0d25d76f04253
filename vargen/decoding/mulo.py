"""MuLo-SD: multi-scale local speculative decoding (CVPR'26, arXiv 2601.05149; no official code).

Needs a :class:`vargen.models.mulo.MuLo` (low-resolution drafter GPT + token up-sampler, trained with
``vargen train mulo``). One run:

1. **Draft.** The drafter samples a low-resolution grid ``y~`` by plain AR (its own
   :class:`DecodeSession`, same condition and sampling config; its passes are counted apart, in
   ``stats.extra["drafter_forward_passes"]``). The up-sampler gives ``q = softmax(U(y~))`` per
   high-resolution cell and the draft ``x~ ~ q``.
2. **Round 1.** The target verifies every cell in one forward over the draft (raster, causal: cell
   ``k`` is judged by ``p(. | x~_<k)``), each cell with the acceptance rule (exact ``min(1, p/q)``,
   or LANTERN pooling); a rejected cell is resampled from the rule's residual.
3. **Local re-verification.** A changed cell changes the context of the cells after it. MuLo-SD
   assumes that influence is local: only the cells within Chebyshev radius ``rho_t`` of a cell
   changed in round ``t`` *and after it in raster order* (:func:`later_neighbourhood`) are judged
   again in round ``t + 1``, with ``rho_t = radius + (t - 1) * expand`` (default radius 1, 2, 3, ...:
   the neighbourhood grows while rejections keep coming; ``expand=0`` keeps it fixed, which is
   faster and lossier, see the README's measurements). The next round's forward rolls
   the cache back to the first cell changed in round ``t`` (per sample) and recomputes from there
   (so every round is one honest target pass over current tokens). A re-judged cell proposes its
   current token with ``q := p_old``, the distribution it was last judged against: the judged token
   is a sample of ``p_old`` (exact rule), so this is speculative sampling from ``p_old`` to ``p_new``
   (accept ``min(1, p_new / p_old)``, else the residual), as SJD does for its Jacobi drafts.
4. Rounds stop when no cell needs re-judging or after ``max_rounds`` verify rounds. The first changed
   cell moves strictly forward every round (a re-judged cell always follows a changed one), so
   ``max_rounds = N`` (the default) always ends with nothing pending. At a smaller limit,
   ``finish="accept"`` (default) keeps the pending cells' current tokens (lossy, no extra pass);
   ``finish="ar"`` resamples every cell from the first pending one onward by plain AR (exact from
   there on, one pass per cell).

What is lossy: cells outside the neighbourhoods keep tokens judged under a context that later
changed (the locality assumption), pending cells at the round limit with ``finish="accept"``, and
LANTERN's pooling when used. With ``radius >= max(H, W)`` and enough rounds, every later cell is
re-judged after any change and the result is exact up to the Jacobi-style fixed point. The cost is
measured by ``vargen bench speed`` next to AR and SJD (log-likelihood, token TV, scene score).
"""
from __future__ import annotations

import time
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..models.mulo import TRAIN_HINT, MuLo, load_mulo
from .acceptance import ExactAcceptance
from .ar import decode_ar
from .sampling import SamplingConfig, exponential_noise, sample_categorical, uniform_noise
from .session import DecodeSession
from .trained import resolve_trained

FINISH = ("accept", "ar")
DRAFTER_SEED_OFFSET = 0x9E3779B1  # the drafter's generators must not replay the target session's streams


def resolve_mulo(model, weights=None) -> MuLo:
    """The MuLo pair to draft with, checked against the target ``model`` (see
    :func:`~vargen.decoding.trained.resolve_trained`)."""
    return resolve_trained(model, weights, MuLo, "MuLo", "mulo", "a MuLo drafter + up-sampler", load_mulo,
                           TRAIN_HINT)


def later_kernel(radius: int) -> torch.Tensor:
    """``[1, 1, 2r+1, 2r+1]`` kernel: ``conv2d(changed, k)`` counts changed cells ``j`` with ``k - j`` in the
    raster-later half of the square (``dr > 0``, or ``dr == 0`` and ``dc > 0``), ``|dr|, |dc| <= r``."""
    size = 2 * radius + 1
    d = torch.arange(-radius, radius + 1)
    dr, dc = d[:, None].expand(size, size), d[None, :].expand(size, size)
    later = (dr > 0) | ((dr == 0) & (dc > 0))  # offsets (target - source)
    # conv2d is a correlation: out[k] = sum_u in[k + u - r] * K[u], so the source offset -(dr, dc) sits at r - (dr, dc)
    return later.flip(0).flip(1).float()[None, None]


def later_neighbourhood(changed: torch.Tensor, grid: Sequence[int], radius: int) -> torch.Tensor:
    """``[B, N]`` bool: cells ``k`` with some changed cell ``j`` (``changed [B, N]``) within Chebyshev distance
    ``radius`` of ``k`` on the ``grid`` (no wrap-around) that comes before ``k`` in raster order. Those are the
    cells whose causal context a change touched locally; ``radius 0`` gives none."""
    H, W = grid
    B = changed.shape[0]
    if radius <= 0:
        return torch.zeros_like(changed, dtype=torch.bool)
    kernel = later_kernel(radius).to(changed.device)
    x = changed.float().view(B, 1, H, W)
    return (F.conv2d(x, kernel, padding=radius) > 0.5).view(B, H * W)


def _rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return x.gather(1, index[..., None].expand(*index.shape, x.shape[-1]))


def _first(mask: torch.Tensor, default: int) -> torch.Tensor:
    """Index of the first True per row (``default`` where none)."""
    N = mask.shape[1]
    idx = torch.where(mask, torch.arange(N, device=mask.device), N)
    return idx.min(1).values.masked_fill(~mask.any(1), default)


def _forward_from(session: DecodeSession, tokens: torch.Tensor, start: torch.Tensor, length: int) -> tuple:
    """Roll back to image slot ``start[b]`` and feed ``tokens[b, start[b] : start[b] + length]`` there (padded past
    the last cell, into spare slots): ``(probs [B, length, V], cells [B, length])``, row ``i`` giving the
    distribution of cell ``start[b] + i + 1`` (>= N for padding rows)."""
    N = tokens.shape[1]
    slots = start[:, None] + torch.arange(length, device=tokens.device)
    session.rollback(start)
    probs = session.forward(tokens.gather(1, slots.clamp(max=N - 1)), positions=slots.clamp(max=N - 1), slots=slots)
    return probs, slots + 1


@torch.no_grad()
def decode_mulo(model, cond, sampling: SamplingConfig = SamplingConfig(), seeds: Optional[Sequence[int]] = None,
                cond_mask: Optional[torch.Tensor] = None, weights=None, radius: int = 1, expand: int = 1,
                max_rounds: Optional[int] = None, finish: str = "accept", acceptance=None, progress: bool = False,
                callback=None):
    """Generate all image tokens with MuLo-SD (see the module docstring).

    Args:
        model: the target AR model (a LlamaGen GPT, or a compiled wrapper of one).
        cond, sampling, seeds, cond_mask: as :func:`vargen.decoding.decode_ar`; the drafter samples with the
            same sampling config (CFG included) from seeds offset by a constant.
        weights: a :class:`MuLo` or its folder; default ``<AR model folder>/mulo``.
        radius: neighbourhood radius after round 1 (``>= 0``; 0 re-judges nothing: one verify round).
        expand: radius growth per further round (``rho_t = radius + (t - 1) * expand``; 0 keeps it fixed).
        max_rounds: verify rounds at most (``>= 1``); default ``N``, which always ends with nothing pending
            (the first changed cell moves strictly forward every round).
        finish: ``"accept"`` or ``"ar"``: what happens to cells still pending at the round limit.
        acceptance: the acceptance rule (default :class:`ExactAcceptance`; LANTERN for ``mulo+lantern``).
        progress: tqdm bar over rounds.
        callback: optional ``callback(round, tokens, committed)`` after each verify round (``tokens [B, N]``).

    Returns:
        ``(tokens [B, N], DecodeStats)``: ``forward_passes`` counts target passes only (prefill, verify rounds,
        AR finish); ``stats.extra`` has ``drafter_forward_passes``, ``step_compression`` (``N`` / mean target
        passes per sample), ``rounds`` and per-round ``checked_per_round`` / ``accepted_per_round``.
    """
    if radius < 0 or expand < 0:
        raise ValueError(f"radius and expand must be >= 0, got {radius}, {expand}")
    max_rounds = max_rounds or getattr(model, "model", model).num_tokens
    if max_rounds < 1:
        raise ValueError(f"max_rounds must be >= 1, got {max_rounds}")
    if finish not in FINISH:
        raise ValueError(f"unknown finish {finish!r}; choose from {FINISH}")
    t_start = time.perf_counter()
    mulo = resolve_mulo(model, weights)
    acceptance = acceptance or ExactAcceptance()
    base = getattr(model, "model", model)
    N, V, grid = base.num_tokens, base.vocab_size, tuple(base.grid)
    name = "mulo" if acceptance.name == "exact" else f"mulo+{acceptance.name}"

    # 1. draft: low-resolution AR, then the token up-sampler's q and a sample of it
    B0 = cond.shape[0] if torch.is_tensor(cond) else len(cond)
    seeds = list(range(B0)) if seeds is None else list(seeds)
    low, dstats = decode_ar(mulo.drafter, cond, sampling, [s + DRAFTER_SEED_OFFSET for s in seeds], cond_mask)
    q = torch.softmax(mulo.upsampler(low), -1)  # [B, N, V] fp32

    session = DecodeSession(model, cond, sampling, seeds, cond_mask, method=name, max_len=base.prefix_len + 2 * N)
    B, dev, gens = session.batch, session.device, session.generators
    q = q.to(dev)
    tokens = sample_categorical(q, gens)
    from_draft = torch.ones(B, N, dtype=torch.bool, device=dev)  # final token is the up-sampled draft
    P_ext = torch.zeros(B, N + 1, V, device=dev)  # each cell's latest target distribution (+ a spill row)
    P = P_ext[:, :N]
    P[:, 0] = session.prefill()
    session.advance(torch.zeros(B, dtype=torch.long, device=dev))  # judged in round 1, with the rest
    check = torch.ones(B, N, dtype=torch.bool, device=dev)  # cells to judge this round
    changed = torch.zeros(B, N, dtype=torch.bool, device=dev)
    checked_log, accepted_log, rounds = [], [], torch.zeros(B, dtype=torch.long, device=dev)
    bar = tqdm(total=max_rounds, disable=not progress, desc=name, leave=False)
    for t in range(1, max_rounds + 1):
        active = check.any(1)
        if not bool(active.any()):  # one host sync per round
            break
        # one target pass over the current tokens from the first cell changed in the previous round
        start = torch.zeros(B, dtype=torch.long, device=dev) if t == 1 else _first(changed, N - 1)
        start = torch.where(active, start, N - 1)
        length = N - 1 - int(start.min())
        if length > 0:
            probs, cells = _forward_from(session, tokens, start, length)
            # rows past the last cell, and inactive samples' rows, go to the spill row (no duplicate targets)
            idx = torch.where((cells < N) & active[:, None], cells, N)
            P_ext.scatter_(1, idx[..., None].expand(-1, -1, V), probs)
        # judge the cells in `check`; a rejection is resampled from the rule's residual
        coins = uniform_noise((N,), gens, dev)
        ok = acceptance.accept(P, q, tokens, coins)
        rejected = check & ~ok
        redraw = sample_categorical(acceptance.resample(P, q), noise=exponential_noise((N, V), gens, dev))
        tokens = torch.where(rejected, redraw, tokens)
        from_draft &= ~rejected
        q = torch.where(check[..., None], P, q)  # a judged token is a sample of the p it was judged by
        checked_log.append(check.sum(1))
        accepted_log.append((check & ok).sum(1))
        rounds += active.long()
        changed = rejected
        check = later_neighbourhood(changed, grid, radius + (t - 1) * expand)
        # final: the cells before the first one judged again (re-judging only ever reaches later cells)
        session.advance(_first(check, N))
        if callback is not None:
            callback(t - 1, tokens, torch.full((B,), N, device=dev))
        bar.update(1)
    bar.close()
    pending = check
    pending_cells = pending.sum(1)
    if finish == "ar" and bool(pending.any()):
        tokens = _finish_ar(session, tokens, changed, pending, gens)
        from_draft &= ~(torch.arange(N, device=dev)[None] >= _first(pending, N)[:, None])
    stats = session.finish(torch.full((B,), N, device=dev))  # "accept" keeps the pending cells as they are
    target_wall = stats.wall_s
    stats.wall_s = time.perf_counter() - t_start
    checked = torch.stack(checked_log).float()  # [rounds, B]
    accepted = torch.stack(accepted_log).float()
    stats.extra.update(
        drafter_forward_passes=dstats.forward_passes, drafter_grid=list(mulo.drafter.grid),
        target_wall_s=target_wall, drafter_wall_s=dstats.wall_s,
        rounds=rounds.tolist(), radius=radius, expand=expand, max_rounds=max_rounds, finish=finish,
        acceptance=acceptance.name, pending_at_limit=pending_cells.tolist(),
        checked_per_round=checked.mean(1).tolist(),
        accepted_per_round=(accepted.sum(1) / checked.sum(1).clamp_min(1)).tolist(),
        accepted_cells=from_draft.float().mean(0).tolist())
    return tokens, stats


def _finish_ar(session: DecodeSession, tokens: torch.Tensor, changed: torch.Tensor, pending: torch.Tensor, gens):
    """Resample every cell from the first pending one on by plain AR (one pass per cell, each recorded in
    ``session``); returns the tokens."""
    B, N = tokens.shape
    first = _first(pending, N)  # N where nothing is pending
    todo = first < N
    # the cache is valid before the first cell changed in the last round: re-feed from there to the first pending
    start = torch.minimum(_first(changed, N - 1), (first - 1).clamp(min=0))
    start = torch.where(todo, start, N - 1)
    length = max(int((first - start).clamp(min=1).max()), 1)
    probs, cells = _forward_from(session, tokens, start, length)
    session.advance(torch.where(todo, first + 1, N))  # this pass gives the first pending cell's p
    cur = first.clone()
    p = _rows(probs, (first - 1 - start).clamp(0, length - 1)[:, None])[:, 0]
    steps = N - int(torch.where(todo, first, N).min())  # one host sync: the longest tail sets the loop
    for i in range(steps):
        live = todo & (cur < N)
        x = sample_categorical(p, gens)
        at = cur.clamp(max=N - 1)[:, None]
        tokens = tokens.scatter(1, at, torch.where(live[:, None], x[:, None], tokens.gather(1, at)))
        nxt = cur + 1
        if i == steps - 1:  # no sample has a cell after this one
            break
        step = torch.where(live, cur, N - 1)
        # p for cell 0 comes from the prefill; first >= 1 always here since pending cells follow a changed cell
        probs, _ = _forward_from(session, tokens, step, 1)
        p = probs[:, 0]
        session.advance(torch.where(todo & (nxt < N), nxt + 1, session.committed))
        cur = nxt
    return tokens
