"""PJD-style 2D Jacobi decoding (after boyaliao/PJD, CVPR 2026): SJD windows on several image rows at once.

Up to ``rows`` consecutive unfinished rows are active; row ``r + 1`` may draft cell ``c`` once row ``r`` has
``c + lead`` committed tokens (ZipAR's lead, applied per cell). Every pass feeds, for each active row, its last
committed token and a Jacobi window of ``window`` drafts at their true raster positions and slots, under a
row-causal mask: a cell sees the committed cells before it in raster order (the rows above up to their
frontier, its own row's left cells) and the window cells to its left in its own row; never another row's
drafts. Each row's window is verified with the acceptance rule (SJD's speculative test against this
row-causal ``p``), so per row it is SJD; across rows it is approximate, like ZipAR: a row's cells miss the
cells of the rows above that are not committed yet. Not lossless; its cost is measured next to ZipAR and SJD.

A row's start (no committed token in it yet) feeds the row above's latest token as a proxy at a scratch slot
(ZipAR's proxy, kept out of the real slot another window may be writing in the same pass), or the row above's
true last token at its own slot once that is committed. A finished row stays active for one more pass that
feeds its last token, so every committed cell's keys and values are written before it leaves. With
``rows=1`` this is SJD with a ``left``-style init (greedy PJD is greedy AR, tested).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm

from .acceptance import ExactAcceptance
from .drafts import one_hot_q
from .sampling import SamplingConfig, exponential_noise, sample_categorical, uniform_noise
from .session import DecodeSession, target_pass


def row_windows(f: torch.Tensor, base: torch.Tensor, R: int, L: int, H: int, W: int, lead: int) -> tuple:
    """Cells of each active row's pass: ``(row [B, R], in0 [B, R] input-0 cell or -1 at a row start,
    cells [B, R, L], inside [B, R, L] the cell lies in its row, valid [B, R, L] it may be drafted now)`` for row
    frontiers ``f [B, H]`` and first unfinished rows ``base [B]``."""
    dev = f.device
    row = base[:, None] + torch.arange(R, device=dev)  # [B, R]
    live = row < H
    rc = row.clamp(max=H - 1)
    fr = f.gather(1, rc)  # [B, R] committed tokens in the row
    above = torch.where(rc > 0, f.gather(1, (rc - 1).clamp(min=0)), torch.full_like(fr, W + lead))
    col = fr[..., None] + torch.arange(L, device=dev)  # [B, R, L]
    inside = live[..., None] & (col < W)
    valid = inside & ((col + lead <= above[..., None]) | (above[..., None] >= W))
    # input 0 is the row's last committed cell; at a row start the row above's last cell once it is committed
    in0 = torch.where(fr > 0, rc * W + fr - 1, torch.where(above >= W, rc * W - 1, torch.full_like(fr, -1)))
    return rc, in0, rc[..., None] * W + col.clamp(max=W - 1), inside, valid


def row_causal_mask(cache, prefix_len: int, committed: torch.Tensor, positions: torch.Tensor,
                    slots: torch.Tensor) -> torch.Tensor:
    """``[B, R*(L+1), max_len]``: the condition prefix as the ``cache`` shows it, the committed cells before each
    query's cell, and the query's own row inputs up to itself (``positions``, ``slots`` ``[B, R, L+1]``)."""
    B, R, T = slots.shape
    P, N, max_len = prefix_len, committed.shape[1], cache.max_len
    mask = torch.zeros(B, R, T, max_len, dtype=torch.bool, device=slots.device)
    mask[..., :P] = cache.visible[:B, None, None, :P]
    before = torch.arange(N, device=slots.device) < positions[..., None]  # [B, R, T, N]
    mask[..., P:P + N] = committed[:, None, None, :] & before
    own = torch.ones(T, T, dtype=torch.bool, device=slots.device).tril()
    index = (P + slots)[:, :, None, :].expand(-1, -1, T, -1)
    mask.scatter_(3, index, own.expand(B, R, -1, -1))
    return mask.view(B, R * T, max_len)


def pjd_step(model, sampling: SamplingConfig, cache, prefix_len: int, acceptance, shape: tuple, canvas: torch.Tensor,
             committed: torch.Tensor, drafts: torch.Tensor, q: torch.Tensor, drafted: torch.Tensor, f: torch.Tensor,
             fed: torch.Tensor, draws: tuple) -> tuple:
    """One PJD pass as a function of its state and its draws (``--compile`` captures it whole): pick each active
    row's window, verify all rows in one row-causal forward, commit, and refill the Jacobi drafts. ``shape`` is
    ``(H, W, R, L, lead)``; ``canvas``, ``committed``, ``drafts``, ``q``, ``drafted`` have a scratch cell ``N``
    that absorbs the writes of cells that are not committed or refreshed, so every write is a fixed-shape
    scatter (in place; the arrays are also returned). ``draws = (coins [B, R, L], resample noise [B, R, V],
    refill noise [B, R, L, V])``, drawn outside in eager's order. Returns the updated state and the count of positions
    with non-finite logits."""
    H, W, R, L, lead = shape
    B, N, V = canvas.shape[0], canvas.shape[1] - 1, q.shape[-1]
    dev = canvas.device
    coins, noise, refill = draws
    b_idx = torch.arange(B, device=dev)[:, None, None]
    base = fed.long().cumprod(1).sum(1)  # rows finished (last cell fed) in order
    row, in0, cells, inside, valid = row_windows(f, base, R, L, H, W, lead)
    # fresh cells start as the token above (or to the left in row 0), a one-hot draft
    fresh = ~drafted.gather(1, cells.view(B, -1)).view(B, R, L)
    seed_cell = torch.where(cells >= W, cells - W, (cells - 1).clamp(min=0))
    init = canvas.gather(1, seed_cell.view(B, -1)).view(B, R, L)
    d = torch.where(fresh, init, drafts.gather(1, cells.view(B, -1)).view(B, R, L))
    q_win = torch.where(fresh[..., None], one_hot_q(init, V), q[b_idx, cells])
    # input 0: the row's last committed token at its slot; at a row start the row above's latest, at a scratch
    above_last = (row - 1).clamp(min=0) * W + (f.gather(1, (row - 1).clamp(min=0)) - 1).clamp(min=0)
    tok0 = canvas.gather(1, torch.where(in0 >= 0, in0, above_last))
    live = (base[:, None] + torch.arange(R, device=dev)) < H
    slot0 = torch.where((in0 >= 0) & live, in0, N + torch.arange(R, device=dev))
    pos0 = torch.where(in0 >= 0, in0, row * W - 1).clamp(min=0)
    tokens = torch.cat([tok0[..., None], d], -1).view(B, -1)  # [B, R*(L+1)]
    # inputs past the row's end (or of no row) write scratch slots, never a committed cell's
    scratch = N + R + torch.arange(R * L, device=dev).view(R, L)
    slots = torch.cat([slot0[..., None], torch.where(inside, cells, scratch)], -1)
    positions = torch.cat([pos0[..., None], cells], -1)
    probs, bad = target_pass(model, sampling, cache, prefix_len, tokens, positions.view(B, -1), slots.view(B, -1),
                             row_causal_mask(cache, prefix_len, committed[:, :N], positions, slots))
    probs = probs.view(B, R, L + 1, V)
    r, x = acceptance.verify_window(probs.view(B * R, L + 1, V), q_win.view(B * R, L, V), d.view(B * R, L),
                                    coins.view(B * R, L), valid.view(B * R, L), noise.view(B * R, V))
    r, x = r.view(B, R), x.view(B, R)
    # commit each row's accepted drafts and, where its cell may be drafted, the resample (or bonus); cells past a
    # row's end repeat its last cell but are never valid, so every write that counts goes to a distinct cell
    steps = torch.arange(L, device=dev)
    take = (steps < r[..., None]) & valid
    new = take | ((steps == r[..., None]) & valid)
    value = torch.where(take, d, x[..., None].expand(-1, -1, L))
    target = torch.where(new, cells, N).view(B, -1)
    canvas.scatter_(1, target, value.view(B, -1))
    committed.scatter_(1, target, new.view(B, -1))  # the scratch cell only ever receives False
    fed.scatter_(1, row, fed.gather(1, row) | ((f.gather(1, row) >= W) & live))  # its last cell was input 0
    f.scatter_add_(1, row, new.sum(-1) * live)
    # Jacobi: the window cells after each row's new frontier take this pass's distributions (row j: cell f+j)
    jac = valid & (steps > r[..., None])
    new_q = probs[:, :, :L]
    new_d = sample_categorical(new_q, noise=refill)
    target = torch.where(jac, cells, N).view(B, -1)
    drafts.scatter_(1, target, new_d.view(B, -1))
    q.scatter_(1, target[..., None].expand(-1, -1, V), new_q.reshape(B, R * L, V))
    drafted.scatter_(1, target, jac.view(B, -1))
    return canvas, committed, drafts, q, drafted, f, fed, bad


@torch.no_grad()
def decode_pjd(model, cond, sampling: SamplingConfig = SamplingConfig(), seeds: Optional[Sequence[int]] = None,
               cond_mask: Optional[torch.Tensor] = None, window: int = 8, rows: int = 4, lead: int = 2,
               acceptance=None, progress: bool = False, callback=None):
    """Generate with 2D Jacobi windows over ``rows`` active rows (module docstring; approximate).

    Args:
        window: drafts per row and pass; rows: rows decoded at once; lead: cells a row stays behind the one above.

    Returns:
        ``(tokens [B, N], DecodeStats)``.
    """
    if window < 1 or rows < 1 or lead < 1:
        raise ValueError(f"PJD needs window, rows, lead >= 1, got {window}, {rows}, {lead}")
    acceptance = acceptance or ExactAcceptance()
    (H, W), N, V, L, R = model.grid, model.num_tokens, model.vocab_size, window, rows
    session = DecodeSession(model, cond, sampling, seeds, cond_mask, method="pjd", max_len=model.prefix_len + N + R + R * window)
    B, dev, gens = session.batch, session.device, session.generators
    # every per-cell array has a scratch cell N (see pjd_step)
    canvas = torch.zeros(B, N + 1, dtype=torch.long, device=dev)
    committed = torch.zeros(B, N + 1, dtype=torch.bool, device=dev)
    drafts = torch.zeros(B, N + 1, dtype=torch.long, device=dev)  # the current draft of every cell, and its q
    q = torch.zeros(B, N + 1, V, device=dev)
    drafted = torch.zeros(B, N + 1, dtype=torch.bool, device=dev)
    canvas[:, 0] = sample_categorical(session.prefill(), gens)
    committed[:, 0] = True
    f = torch.zeros(B, H, dtype=torch.long, device=dev)
    f[:, 0] = 1
    fed = torch.zeros(B, H, dtype=torch.bool, device=dev)  # row finished and its last token's KV written
    session.advance(committed.sum(1))
    # --compile: the whole pass (windows, forward, verification, commit, Jacobi refill) as one graph
    whole = hasattr(model, "whole_step") and acceptance.fused
    step, target_model = (model.whole_step(pjd_step), model.model) if whole else (pjd_step, model)
    bar = tqdm(total=N, disable=not progress, desc="pjd", leave=False)
    step_i = 0
    while not bool(committed[:, :N].all()):  # one host sync per pass
        draws = (uniform_noise((R, L), gens, dev), exponential_noise((R, V), gens, dev),
                 exponential_noise((R, L, V), gens, dev))
        canvas, committed, drafts, q, drafted, f, fed, bad = step(
            target_model, session.sampling, session.cache, session.prefix_len, acceptance, (H, W, R, L, lead), canvas,
            committed, drafts, q, drafted, f, fed, draws)
        session.count_pass(bad)
        session.advance(committed.sum(1))
        if callback is not None:
            callback(step_i, canvas[:, :N], committed.sum(1))
        step_i += 1
        if progress:
            bar.n = int(committed.sum(1).min())
            bar.refresh()
    bar.close()
    stats = session.finish()
    stats.extra.update(window=L, rows=R, lead=lead, acceptance=acceptance.name, whole_step_graph=whole)
    return canvas[:, :N], stats
