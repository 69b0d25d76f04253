"""Draft sources for verification-based decoding: how a window position gets its first guess.

A draft is a token plus the exact distribution ``q`` it was drawn from (one-hot for a
deterministic guess), so that any acceptance rule can verify it. Spatial initialisations
exploit that neighbouring image tokens are often equal (SJD, ZipAR).
"""
from __future__ import annotations

from typing import Sequence

import torch

from .sampling import sample_categorical

DRAFT_INITS = ("random", "left", "above", "left-dist")
INIT_ALIASES = {"up": "above", "sample": "left-dist"}  # the names SJD's paper and code use


def one_hot_q(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    """``[..., vocab]`` fp32 one-hot draft distributions of deterministic drafts. ``F.one_hot`` would check the
    tokens' range on the host (two syncs per call) inside the decode loop."""
    return torch.zeros(*tokens.shape, vocab, device=tokens.device).scatter_(-1, tokens[..., None], 1.0)


def check_init(init: str) -> str:
    """The canonical name of a draft initialisation (aliases ``up``, ``sample`` accepted)."""
    init = INIT_ALIASES.get(init, init)
    if init not in DRAFT_INITS:
        raise ValueError(f"unknown draft initialisation {init!r}; choose from {DRAFT_INITS} "
                         f"(aliases {sorted(INIT_ALIASES)})")
    return init


def fill_fresh(canvas: torch.Tensor, start: torch.Tensor, drafts: torch.Tensor, q: torch.Tensor,
               fresh: torch.Tensor, prev_dist: torch.Tensor, init: str, generators: Sequence[torch.Generator],
               width: int) -> tuple:
    """Give every ``fresh`` window position a new draft; the others keep theirs.

    Args:
        canvas: ``[B, C]`` committed tokens followed by drafts (updated in place with the window).
        start: ``[B]`` raster cell of window position 0 (the first uncommitted cell).
        drafts, q: ``[B, L]`` tokens and ``[B, L, V]`` their draft distributions.
        fresh: ``[B, L]`` bool, positions to initialise.
        prev_dist: ``[B, V]`` distribution of the token just before the window (for ``left-dist``).
        init: ``random`` (uniform token), ``left`` (copy the left neighbour; the one above at a
            row start), ``above`` (copy the token above; the left one in the first row) or
            ``left-dist`` (sample from the left neighbour's distribution).
        width: grid width, for the neighbour above.

    Returns:
        ``(drafts, q)``, new tensors.
    """
    B, L = drafts.shape
    V = q.shape[-1]
    if init in ("left", "above"):
        return _copy_neighbours(canvas, start, drafts, q, fresh, init, width)
    rows = torch.arange(B, device=canvas.device)
    last = canvas.shape[1] - 1
    drafts, q = drafts.clone(), q.clone()
    prev = prev_dist
    for j in range(L):  # the sampling inits, sequential: left-dist samples from the cell before's q
        cell = start + j
        if init == "left-dist":
            qj = prev
            d = sample_categorical(qj, generators)
        else:  # random
            d = sample_categorical(torch.full((B, V), 1.0 / V, device=canvas.device), generators)
            qj = one_hot_q(d, V).to(q.dtype)
        f = fresh[:, j]
        drafts[:, j] = torch.where(f, d, drafts[:, j])
        q[:, j] = torch.where(f[:, None], qj, q[:, j])
        canvas[rows, cell.clamp(max=last)] = drafts[:, j]
        prev = q[:, j]
    return drafts, q


def _copy_neighbours(canvas: torch.Tensor, start: torch.Tensor, drafts: torch.Tensor, q: torch.Tensor,
                     fresh: torch.Tensor, init: str, width: int) -> tuple:
    """:func:`fill_fresh` for the copying inits in a handful of tensor ops instead of a loop over the window.

    A fresh cell copies its left neighbour (which may itself be a fresh copy, so runs of fresh cells carry
    one value forward) or, where the init says so, the cell above. So each window value is the value of the
    nearest *anchor* at or before it: a kept draft, a cell that copies from above, or the committed cell before
    the window: a forward fill (running maximum of anchor positions). The cell above lies ``width`` cells back:
    before the window for the first ``width`` window cells, which the first round makes final; round ``r``
    then makes the first ``r * width`` final, so ``ceil(L / width)`` rounds serve any window (one for
    ``L <= width``).
    """
    B, L = drafts.shape
    steps = torch.arange(L, device=canvas.device)
    cells = start[:, None] + steps
    from_above = cells % width == 0 if init == "left" else cells >= width
    anchor = ~fresh | from_above
    source = torch.where(anchor, steps + 1, 0).cummax(1).values  # 0: the committed cell before the window
    for _ in range(-(-L // width)):
        above = canvas.gather(1, (cells - width).clamp(min=0))
        values = torch.cat([canvas.gather(1, (start - 1)[:, None]), torch.where(fresh, above, drafts)], 1)  # [B, 1+L]
        window = values.gather(1, source)
        canvas.scatter_(1, cells, window)
    return window, torch.where(fresh[..., None], one_hot_q(window, q.shape[-1]).to(q.dtype), q)
