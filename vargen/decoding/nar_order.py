"""NAR's next-neighbour order: anti-diagonals, parents, and the proximity attention mask.

NAR (He et al., arXiv 2503.10696) generates an ``H x W`` token grid by increasing Manhattan
distance from the top-left cell: step ``c`` emits every cell with ``row + col == c``, so a
full grid takes ``H + W - 1`` steps (31 for 16 x 16). Cell ``(i, j)`` is predicted from its
*parents*, the left neighbour ``(i, j - 1)`` and the upper neighbour ``(i - 1, j)``, both on
the previous anti-diagonal; cell ``(0, 0)`` has none (it is predicted from the condition).

Cells are raster indices ``k = i * W + j`` throughout. Everything here is pure (no model,
no device state); the mask builders return boolean tensors (``True`` = attend).
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch


def anti_diagonals(grid: Sequence[int]) -> List[List[int]]:
    """The ``H + W - 1`` groups of raster indices ``[[cells with row + col == c] for c in 0..H+W-2]``.

    Each group is in raster order (increasing row). Every cell appears exactly once.

    Example:
        >>> anti_diagonals((2, 3))
        [[0], [1, 3], [2, 4], [5]]
    """
    H, W = int(grid[0]), int(grid[1])
    if H < 1 or W < 1:
        raise ValueError(f"grid must be two positive sizes (rows, cols), got {tuple(grid)}")
    return [[i * W + (c - i) for i in range(max(0, c - W + 1), min(c, H - 1) + 1)] for c in range(H + W - 1)]


def diagonal_index(grid: Sequence[int], device=None) -> torch.Tensor:
    """``[N]`` long: the anti-diagonal ``row + col`` of every raster cell."""
    H, W = int(grid[0]), int(grid[1])
    cells = torch.arange(H * W, device=device)
    return cells // W + cells % W


def parents(grid: Sequence[int], device=None) -> tuple:
    """``(left, up)``: ``[N]`` long tensors, the raster index of each cell's left / upper neighbour, ``-1`` where
    there is none (first column / first row).

    Example:
        >>> left, up = parents((2, 2))
        >>> left.tolist(), up.tolist()
        ([-1, 0, -1, 2], [-1, -1, 0, 1])
    """
    H, W = int(grid[0]), int(grid[1])
    cells = torch.arange(H * W, device=device)
    left = torch.where(cells % W > 0, cells - 1, -1)
    up = torch.where(cells >= W, cells - W, -1)
    return left, up


def proximity_mask(grid: Sequence[int], prefix_len: int, cells: Optional[Sequence[int]] = None,
                   cond_mask: Optional[torch.Tensor] = None, device=None) -> torch.Tensor:
    """Boolean proximity mask (``True`` = attend) over ``[condition, image tokens at cells]``.

    ``cells`` are the raster cells of the image rows (default all ``0..N-1`` in raster order;
    any subset in any order works). Rows and columns are ``prefix_len`` condition tokens
    followed by the image tokens. An image token on anti-diagonal ``c`` sees every condition
    token and every image token on anti-diagonals ``<= c`` (its own diagonal included,
    nothing later). Condition tokens are causal among themselves (as in AR training) and see
    no image token. With ``cond_mask`` (``[B, P]``, True = real caption token) pads are hidden
    from every other row and the result is ``[B, T, T]``; otherwise ``[1, T, T]``. Every row sees
    itself (so no row is empty).
    """
    diag = diagonal_index(grid, device)
    cells = torch.arange(diag.numel(), device=device) if cells is None else torch.as_tensor(cells, device=device)
    n, P = cells.numel(), prefix_len
    T = P + n
    d = diag[cells.long()]
    mask = torch.zeros(T, T, dtype=torch.bool, device=device)
    mask[:P, :P] = torch.ones(P, P, dtype=torch.bool, device=device).tril()
    mask[P:, :P] = True
    mask[P:, P:] = d[None, :] <= d[:, None]
    mask = mask[None]
    if cond_mask is not None:
        cond_mask = cond_mask.to(device=mask.device, dtype=torch.bool)
        key_ok = torch.cat([cond_mask, cond_mask.new_ones(cond_mask.shape[0], n)], 1)
        mask = mask & key_ok[:, None, :]
    return mask | torch.eye(T, dtype=torch.bool, device=mask.device)[None]


def proximity_slot_mask(grid: Sequence[int], diagonal: int, rows: int, cond_visible: torch.Tensor,
                        max_len: int) -> torch.Tensor:
    """Decoding mask ``[B, rows, max_len]`` for ``rows`` tokens of anti-diagonal ``diagonal`` over a KV cache whose
    slots are ``[condition (P), image cells in raster order]``: the visible condition slots (``cond_visible``,
    ``[B, P]``) and every image slot on anti-diagonals ``<= diagonal``, as :func:`proximity_mask`."""
    B, P = cond_visible.shape
    device = cond_visible.device
    image = diagonal_index(grid, device) <= diagonal
    tail = torch.zeros(max_len - P - image.numel(), dtype=torch.bool, device=device)
    row = torch.cat([cond_visible, torch.cat([image, tail])[None].expand(B, -1)], 1)
    return row[:, None, :].expand(B, rows, max_len)
