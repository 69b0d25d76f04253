"""2D rotary position embedding exactly as LlamaGen computes it.

Half of each head's rotary pairs encode the row, half the column; pairs are interleaved
(GPT-J style). The table has one extra leading row for condition tokens: LlamaGen fills it
with zeros (condition tokens get zero q and k and act only through their values), which
must be kept to run its weights; ``"identity"`` is offered for new training.
"""
from __future__ import annotations

from typing import Optional

import torch


def rope_2d_table(grid: int, head_dim: int, base: float = 10000.0, cond_row: str = "zeros",
                  cols: Optional[int] = None) -> torch.Tensor:
    """Return ``[1 + rows*cols, head_dim // 2, 2]`` (cos, sin); row 0 is the condition row.

    The grid has ``grid`` rows and ``cols`` columns (default ``grid``: square, as LlamaGen).
    Image cell ``k = r * cols + c`` is row ``k + 1``. With one row (``grid=1``) the row
    angle is 0 everywhere, so the row half of the pairs is not rotated and the column half
    is a 1D RoPE over the cell index: the positional encoding of 1D token sequences.
    """
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs head_dim divisible by 4, got {head_dim}")
    rows, cols = grid, grid if cols is None else cols
    half = head_dim // 2
    freqs = 1.0 / (base ** (torch.arange(0, half, 2)[: half // 2].float() / half))
    row_freqs = torch.outer(torch.arange(rows, dtype=torch.float32), freqs)  # [rows, half/2]
    col_freqs = torch.outer(torch.arange(cols, dtype=torch.float32), freqs)  # [cols, half/2]
    grid_freqs = torch.cat([
        row_freqs[:, None, :].expand(-1, cols, -1),   # row angle
        col_freqs[None, :, :].expand(rows, -1, -1),   # column angle
    ], dim=-1)  # [rows, cols, half]
    table = torch.stack([torch.cos(grid_freqs), torch.sin(grid_freqs)], dim=-1).flatten(0, 1)
    if cond_row == "zeros":
        cond = torch.zeros(1, half, 2)
    elif cond_row == "identity":
        cond = torch.stack([torch.ones(1, half), torch.zeros(1, half)], dim=-1)
    else:
        raise ValueError(f"cond_row must be 'zeros' or 'identity', got {cond_row!r}")
    return torch.cat([cond, table])


def rope_factors(rope: torch.Tensor) -> tuple:
    """``(cos, sin)`` factors of table rows ``rope`` (``[B, T, D/2, 2]``) for :func:`apply_rope`, once per forward
    (every layer shares them): ``cos = [c, c]`` and ``sin = [-s, s]`` per pair, ``[B, T, 1, D/2, 2]`` fp32."""
    cos, sin = rope[:, :, None].float().unbind(-1)
    return torch.stack([cos, cos], -1), torch.stack([-sin, sin], -1)


def apply_rope(x: torch.Tensor, factors: tuple) -> torch.Tensor:
    """Rotate ``x`` (``[B, T, H, D]``) by :func:`rope_factors` in fp32, interleaved pairs ``(x0, x1)``:
    ``(x0 c - x1 s, x1 c + x0 s)`` as ``x * [c, c] + swap(x) * [-s, s]``, the same products and sums (so the same
    bits) in 4 ops where one per term took 10; rotating q and k was about a tenth of a decode step's ops."""
    cos, sin = factors
    xs = x.float().unflatten(-1, (-1, 2))
    return (xs * cos + xs.flip(-1) * sin).flatten(3).type_as(x)
