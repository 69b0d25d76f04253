"""2D rotary position embedding exactly as LlamaGen computes it.

Half of each head's rotary pairs encode the row, half the column; pairs are interleaved
(GPT-J style). The table has one extra leading row for condition tokens: LlamaGen fills it
with zeros (condition tokens get zero q and k and act only through their values), which
must be kept to run its weights; ``"identity"`` is offered for new training.
"""
from __future__ import annotations

import torch


def rope_2d_table(grid: int, head_dim: int, base: float = 10000.0, cond_row: str = "zeros") -> torch.Tensor:
    """Return ``[1 + grid*grid, head_dim // 2, 2]`` (cos, sin); row 0 is the condition row.

    Image cell ``k = r * grid + c`` is row ``k + 1``.
    """
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs head_dim divisible by 4, got {head_dim}")
    half = head_dim // 2
    freqs = 1.0 / (base ** (torch.arange(0, half, 2)[: half // 2].float() / half))
    t = torch.arange(grid, dtype=torch.float32)
    freqs = torch.outer(t, freqs)  # [grid, half/2]
    grid_freqs = torch.cat([
        freqs[:, None, :].expand(-1, grid, -1),   # row angle
        freqs[None, :, :].expand(grid, -1, -1),   # column angle
    ], dim=-1)  # [grid, grid, half]
    table = torch.stack([torch.cos(grid_freqs), torch.sin(grid_freqs)], dim=-1).flatten(0, 1)
    if cond_row == "zeros":
        cond = torch.zeros(1, half, 2)
    elif cond_row == "identity":
        cond = torch.stack([torch.ones(1, half), torch.zeros(1, half)], dim=-1)
    else:
        raise ValueError(f"cond_row must be 'zeros' or 'identity', got {cond_row!r}")
    return torch.cat([cond, table])


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (``[B, T, H, D]``) by ``rope`` (``[B, T, D/2, 2]``) in fp32, interleaved pairs."""
    xs = x.float().reshape(*x.shape[:-1], -1, 2)
    r = rope[:, :, None]  # broadcast over heads
    out = torch.stack([
        xs[..., 0] * r[..., 0] - xs[..., 1] * r[..., 1],
        xs[..., 1] * r[..., 0] + xs[..., 0] * r[..., 1],
    ], dim=-1)
    return out.flatten(3).type_as(x)
