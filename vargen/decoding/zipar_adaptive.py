"""ZipAR with an adaptive window: start rows early, check each row's first token with more context.

The ZipAR paper proposes it and its code lacks it. A row ``r + 1`` starts as soon as row
``r`` has ``min_window`` tokens: its first token ``x`` is drawn from the early distribution
``q``. Once row ``r`` has ``window`` tokens, the same cell is predicted again from the
fuller context (``p``) and ``x`` is checked rejection-sampling style: kept with
probability ``min(1, p(x) / q(x))``, else replaced by a draw from ``norm(max(p - q, 0))``
and the row restarts from it (its later tokens are discarded and their cache slots
hidden). Either way the row's first token is distributed as fixed-window ZipAR's with
``window``; where the early guess stands, the row gained ``window - min_window`` steps of
lead. A rejection means the short window was too small for that row.

A row starts only below a checked row, so a rejection never invalidates more than one
row, and no row is ever behind where fixed-window ZipAR (``window``) would have it:
passes lie between those of fixed ZipAR with ``min_window`` and with ``window``.

Unlike fixed ZipAR the schedule depends on each sample's checks, so the state lives in
tensors (per sample, per row) and every pass feeds two inputs per row at fixed shapes:
the row's next-token input, and a "tail" input at the row's last cell, which starts,
checks or fixes up the row below (the proxy token, as in ZipAR, until the true last
token is known).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm

from .acceptance import ExactAcceptance
from .sampling import SamplingConfig, exponential_noise, sample_categorical, uniform_noise
from .session import DecodeSession, hide_slots, target_pass

EXACT = ExactAcceptance()  # a row's first token is re-judged by speculative sampling, as SJD's drafts


def zipar_adaptive_step(model, sampling: SamplingConfig, cache, prefix_len: int, shape: tuple, tokens: torch.Tensor,
                        count: torch.Tensor, checked: torch.Tensor, fixed: torch.Tensor, q_first: torch.Tensor,
                        draws: tuple) -> tuple:
    """One adaptive-ZipAR pass as a function of its per-row state and its draws (``--compile`` captures it
    whole): ``shape = (H, W, window, min_window)``; ``draws = (advance noise [B, H, V], check coins [B, H],
    start / resample noise [B, H, V])``, drawn outside in eager's order. Returns ``(tokens, count, checked,
    fixed, q_first, checks [B], rejections [B], positions with non-finite logits)``; ``tokens`` is written in place."""
    H, W, window, min_window = shape
    B, N = tokens.shape[0], tokens.shape[1] - 1
    dev = tokens.device
    adv_noise, coins, draw_noise = draws
    row_start = torch.arange(H, device=dev) * W
    # what each row does in this pass (rows 0..H-2 have a row below)
    advance = (count > 0) & (count < W)
    below = torch.cat([count[:, 1:], torch.full_like(count[:, :1], W)], 1)  # count of the row below
    below_checked = torch.cat([checked[:, 1:], torch.ones_like(checked[:, :1])], 1)
    start = (below == 0) & (count >= min_window) & checked
    check = (below > 0) & ~below_checked & (count >= window)
    fixup = (count == W) & ~fixed
    fixup[:, -1] = False  # nothing is generated after the last row
    tail = start | check | fixup
    latest = row_start + (count - 1).clamp(min=0)  # the row's newest cell (its true last cell when complete)
    last_slot = row_start + W - 1
    pad = torch.full_like(count, N)
    src = torch.cat([torch.where(advance, latest, pad), torch.where(tail, latest, pad)], 1)
    slot = torch.cat([torch.where(advance, latest, pad), torch.where(tail, last_slot, pad)], 1)
    probs, bad = target_pass(model, sampling, cache, prefix_len, tokens.gather(1, src), slot.clamp(max=N - 1),
                             slot)
    p_next, p_below = probs[:, :H], probs[:, H:]  # row's next cell; first cell of the row below
    # advance: one new token per active row
    x = sample_categorical(p_next, noise=adv_noise)
    target = torch.where(advance, latest + 1, pad)
    tokens.scatter_(1, target, torch.where(advance, x, tokens.gather(1, target)))
    new_count = count + advance.long()
    # the row below: start it, or check its first token against the fuller context
    q_below = torch.cat([q_first[:, 1:], q_first[:, :1]], 1)  # aligned with p_below (last row unused)
    first_cell = (row_start + W).clamp(max=N).expand(B, H)
    old_first = tokens.gather(1, first_cell)
    keep = EXACT.accept(p_below, q_below, old_first, coins)  # u q(x) < p(x): speculative sampling's test
    reject = check & ~keep
    draw = sample_categorical(torch.where(reject[..., None], EXACT.resample(p_below, q_below), p_below),
                              noise=draw_noise)
    put = start | reject
    tokens.scatter_(1, first_cell, torch.where(put, draw, old_first))
    put_below = torch.cat([torch.zeros_like(put[:, :1]), put[:, :-1]], 1)  # indexed by the row below
    new_count = torch.where(put_below, 1, new_count)
    q_first = torch.where(torch.cat([torch.zeros_like(start[:, :1]), start[:, :-1]], 1)[..., None],
                          torch.cat([p_below[:, -1:], p_below[:, :-1]], 1), q_first)
    started_full = start & (count >= window)  # started with the full window: nothing to check
    now_checked = torch.cat([torch.zeros_like(check[:, :1]), (check | started_full)[:, :-1]], 1)
    checked = checked | now_checked
    # a rejected row restarts: hide its discarded cells (the first one is rewritten next pass)
    rejected_below = torch.cat([torch.zeros_like(reject[:, :1]), reject[:, :-1]], 1)
    hidden = rejected_below[..., None].expand(B, H, W).reshape(B, N)  # every cell of those rows
    hide_slots(cache, sampling, prefix_len, hidden)
    fixed = (fixed | fixup) & ~rejected_below  # a restarted row needs its true last token written again
    return tokens, new_count, checked, fixed, q_first, check.sum(1), reject.sum(1), bad


@torch.no_grad()
def decode_zipar_adaptive(model, cond, sampling: SamplingConfig = SamplingConfig(),
                          seeds: Optional[Sequence[int]] = None, cond_mask: Optional[torch.Tensor] = None,
                          window: int = 8, min_window: Optional[int] = None, progress: bool = False, callback=None):
    """Generate all image tokens with adaptive-window ZipAR.

    Args:
        model, cond, sampling, seeds, cond_mask: as :func:`vargen.decoding.decode_ar`.
        window: the row lead whose context checks each row's first token (ZipAR's ``s``).
        min_window: the lead at which a row starts (default ``window // 2``, at least 1);
            ``min_window == window`` is fixed-window ZipAR.
        progress: tqdm bar over the least advanced sample's tokens.
        callback: optional ``callback(step, tokens, committed)`` after each pass.

    Returns:
        ``(tokens [B, N], DecodeStats)``; ``stats.extra`` has the first-token checks and
        rejections, ``stats.per_sample_forward_passes`` each sample's passes.
    """
    H, W = model.grid
    N, V = model.num_tokens, model.vocab_size
    min_window = max(1, window // 2) if min_window is None else min_window
    if not 1 <= min_window <= window:
        raise ValueError(f"need 1 <= min_window <= window, got min_window={min_window}, window={window}")
    # a lead past the row width is the whole row above (a row can never lead by more, and a check waiting
    # for a longer lead would never come: the next row would never start)
    window, min_window = min(window, W), min(min_window, W)
    session = DecodeSession(model, cond, sampling, seeds, cond_mask, method="zipar-adaptive",
                            max_len=model.prefix_len + N + 1)
    B, dev, gens = session.batch, session.device, session.generators
    tokens = torch.zeros(B, N + 1, dtype=torch.long, device=dev)  # cell N: scratch for padding inputs
    tokens[:, 0] = sample_categorical(session.prefill(), gens)
    count = torch.zeros(B, H, dtype=torch.long, device=dev)  # tokens generated per row
    count[:, 0] = 1
    checked = torch.zeros(B, H, dtype=torch.bool, device=dev)  # the row's first token has its full-window context
    checked[:, 0] = True
    fixed = torch.zeros(B, H, dtype=torch.bool, device=dev)  # the row's last slot holds its true token
    q_first = torch.zeros(B, H, V, device=dev)  # the distribution each row's first token was drawn from
    session.advance(torch.ones(B, dtype=torch.long, device=dev))
    checks = torch.zeros(B, dtype=torch.long, device=dev)
    rejections = torch.zeros(B, dtype=torch.long, device=dev)
    # --compile: the whole pass (row roles, forward, advance, start / check / restart) as one fixed-shape graph
    whole = hasattr(model, "whole_step")
    step_fn, target_model = ((model.whole_step(zipar_adaptive_step), model.model) if whole
                             else (zipar_adaptive_step, model))
    bar = tqdm(total=N, disable=not progress, desc="zipar-adaptive", leave=False)
    step = 0
    while True:
        active = (count < W).any(1)
        if not bool(active.any()):  # one host sync per pass
            break
        draws = (exponential_noise((H, V), gens, dev), uniform_noise((H,), gens, dev),
                 exponential_noise((H, V), gens, dev))
        tokens, count, checked, fixed, q_first, n_check, n_reject, bad = step_fn(
            target_model, session.sampling, session.cache, session.prefix_len, (H, W, window, min_window), tokens,
            count, checked, fixed, q_first, draws)
        session.count_pass(bad)
        checks += n_check
        rejections += n_reject
        # final: the cells of checked rows (a row restarts only before its check; rows below wait for it)
        session.advance((count * checked).sum(1))
        if callback is not None:
            callback(step, tokens[:, :N], count.sum(1))
        step += 1
        if progress:
            bar.n = int(count.sum(1).min())
            bar.refresh()
    bar.close()
    stats = session.finish()
    stats.extra.update(window=window, min_window=min_window, first_token_checks=checks.tolist(),
                       first_token_rejections=rejections.tolist(), whole_step_graph=whole)
    return tokens[:, :N], stats
