"""LPD's generation orders and group-size schedules (Zhang et al., ICLR 2026, arXiv 2507.01957).

An order is a permutation of the grid's raster cells; a schedule cuts it into groups, one
group per forward pass. LPD's locality-aware order puts into each group cells that touch
what is already generated (strong context) but not each other (weak dependency within
the group, since a group's tokens are sampled independently):

1. step 0: one random cell;
2. every free cell scores ``sum(1 / euclidean distance)`` over the already generated
   cells within Chebyshev distance 1 (4-neighbours count 1, diagonals 1/sqrt 2);
3. cells scoring ``>= 1`` are taken best first (ties in random order), skipping a cell
   within Chebyshev distance ``<= repulsion`` of a cell already in this group;
4. the rest of the group is filled by farthest-point sampling (max-min Euclidean distance
   to the group's cells) over all other free cells.

Every random choice comes from one ``torch.Generator``, so an order is a function of its seed.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

# Published schedules (mit-han-lab/lpd orders/group_sizes_lookup.json): 256 tokens (256 px) in 20 and 32
# steps, 1024 tokens (512 px) in 48 steps. Other (tokens, steps) pairs use the cosine ramp below.
PAPER_SCHEDULES = {
    (256, 20): [1, 2, 4, 5, 7, 8, 10, 11, 12, 14, 15, 16, 17, 18, 18, 19, 19, 20, 20, 20],
    (256, 32): [1, 1, 2, 2, 3, 3, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 10, 11, 11, 11, 11, 12, 12, 12, 12,
                12, 12, 12, 12],
    (1024, 48): [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 23, 24, 25,
                 26, 26, 27, 28, 28, 29, 29, 30, 30, 31, 31, 32, 32, 32, 33, 33, 33, 33, 33, 33, 33, 34],
}
ORDERS = ("locality", "random", "raster")


def _round_cumulative(weights: Sequence[float], total: int) -> List[int]:
    """Integers proportional to ``weights`` that sum to exactly ``total`` (rounding the running sum)."""
    whole, acc, prev, out = sum(weights), 0.0, 0, []
    for w in weights:
        acc += w
        cum = round(total * acc / whole)
        out.append(cum - prev)
        prev = cum
    return out


def group_schedule(num_tokens: int, steps: int, ramp: str = "cosine") -> List[int]:
    """Group sizes for ``num_tokens`` tokens in ``steps`` forward passes (sums to ``num_tokens``).

    The first group is one token (LPD starts from a single random cell) and sizes grow
    step by step. ``ramp="cosine"`` is the paper's shape: tokens generated after step
    ``t`` follow ``N (1 - cos(pi/2 * t / steps))``; where the paper published a schedule
    (:data:`PAPER_SCHEDULES`, e.g. 256 tokens in 20 steps) that list is returned.
    ``ramp="linear"``: group sizes grow linearly with the step.

    Example:
        >>> group_schedule(256, 20)[:5]
        [1, 2, 4, 5, 7]
    """
    if not 1 <= steps <= num_tokens:
        raise ValueError(f"LPD needs 1 <= steps <= {num_tokens} tokens, got steps={steps}")
    if ramp not in ("cosine", "linear"):
        raise ValueError(f"ramp must be 'cosine' or 'linear', got {ramp!r}")
    if steps == 1:
        return [num_tokens]
    if ramp == "cosine" and (num_tokens, steps) in PAPER_SCHEDULES:
        return list(PAPER_SCHEDULES[(num_tokens, steps)])
    if ramp == "cosine":
        done = [1 - math.cos(math.pi / 2 * t / steps) for t in range(steps + 1)]
        weights = [done[t + 1] - done[t] for t in range(1, steps)]
    else:
        weights = [float(t) for t in range(1, steps)]
    sizes = _round_cumulative(weights, num_tokens - 1)
    if min(sizes) < 1:  # many steps for few tokens: one token each, the rest by the ramp
        sizes = [1 + s for s in _round_cumulative(weights, num_tokens - steps)]
    return [1] + sorted(sizes)


def group_bounds(group_sizes: Sequence[int]) -> List[int]:
    """``[0, g0, g0 + g1, ..., N]``: group ``i`` is ``order[bounds[i]:bounds[i + 1]]``."""
    bounds = [0]
    for g in group_sizes:
        if g < 1:
            raise ValueError(f"group sizes must be >= 1, got {list(group_sizes)}")
        bounds.append(bounds[-1] + int(g))
    return bounds


def order_generator(seed: int) -> torch.Generator:
    """The order's own generator for sample ``seed``: decorrelated from the sampling generator of the
    same seed (both are CPU streams; the same seed would replay the same numbers)."""
    return torch.Generator().manual_seed((int(seed) * 0x9E3779B97F4A7C15 + 0x5EED) % (2 ** 63))


def random_order(num_tokens: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """A uniformly random permutation of the cells ``[N]`` (as LPD trains)."""
    return torch.randperm(num_tokens, generator=generator)


@lru_cache(maxsize=8)
def _grid_tables(height: int, width: int, reach: int):
    """Per-cell tables of a grid: rows, cols, the 8-neighbour ids (padded with the dummy cell ``n``)
    with their ``1 / euclid`` weights, and the cells within Chebyshev distance ``reach`` (tuples)."""
    n = height * width
    rows, cols = np.divmod(np.arange(n), width)
    nbr_ids, nbr_w, boxes = np.full((n, 8), n), np.zeros((n, 8)), []
    for cell in range(n):
        r, c = int(rows[cell]), int(cols[cell])
        boxes.append(tuple(rr * width + cc for rr in range(max(r - reach, 0), min(r + reach + 1, height))
                           for cc in range(max(c - reach, 0), min(c + reach + 1, width))))
        ring = [(r + dr, c + dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1)
                if (dr or dc) and 0 <= r + dr < height and 0 <= c + dc < width]
        for k, (rr, cc) in enumerate(ring):
            nbr_ids[cell, k], nbr_w[cell, k] = rr * width + cc, 1.0 / math.hypot(rr - r, cc - c)
    return rows, cols, nbr_ids, nbr_w, boxes


def _proximity_picks(first: Optional[int], strong: List[int], size: int, boxes) -> Tuple[List[int], List[int]]:
    """Walk the strong candidates best first until the group is full: take a cell unless it is within
    the repulsion box of a cell already taken. Returns ``(taken cells, ranks of skipped candidates)``."""
    near = [] if first is None else [first]
    blocked = set(boxes[first]) if first is not None else set()
    skipped = []
    for rank, c in enumerate(strong):
        if len(near) == size:
            break
        if c in blocked:
            skipped.append(rank)
        else:
            near.append(c)
            blocked.update(boxes[c])
    return near, skipped


def iter_locality_groups(height: int, width: int, group_sizes: Sequence[int],
                         generators: Sequence[torch.Generator], repulsion: float = 2.0, proximity: float = 1.0):
    """LPD's locality-aware groups for a batch, one step at a time (see the module docstring).

    Sample ``b`` draws every random choice from ``generators[b]``, so its order depends on
    that generator only. Yields, per group, ``(cells [B, g], fill [B, g])`` (numpy): the
    group's raster cells in the order they were picked, proximity picks first, and which
    of them came from farthest-point sampling. Generating step by step lets a decoder
    compute the next group on the host while the device runs the current forward.
    """
    n, B = height * width, len(generators)
    if sum(group_sizes) != n:
        raise ValueError(f"group sizes sum to {sum(group_sizes)}, the grid has {n} cells")
    group_bounds(group_sizes)  # validates the sizes
    rows, cols, nbr_ids, nbr_w, boxes = _grid_tables(height, width, int(math.floor(repulsion)))
    batch = np.arange(B)
    taken = np.zeros((B, n), dtype=bool)
    score = np.zeros((B, n + 1))  # column n: the padding of the neighbour table
    # tie-break keys of every step and the first cell, drawn up front from each sample's generator
    keys = np.stack([torch.rand(len(group_sizes), n, generator=g, dtype=torch.float64).numpy() for g in generators])
    firsts = [int(torch.randint(n, (1,), generator=g)) for g in generators]
    for step, size in enumerate(group_sizes):
        free = ~taken
        if step == 0:
            free[batch, firsts] = False
        # candidates best score first, random among equal scores (distinct scores differ by > 0.1; keys < 1)
        cand = np.argsort(np.where(free, -100 * score[:, :n] + keys[:, step], np.inf), axis=1, kind="stable")
        n_strong = ((score[:, :n] >= proximity) & free).sum(1)
        cells = np.zeros((B, size), dtype=np.int64)
        count = np.zeros(B, dtype=np.int64)
        # farthest-point ties go to the official candidate order: weak candidates best first, then the
        # skipped strong ones, then the strong ones never examined
        rank = np.arange(n)[None, :] + 2 * n * (np.arange(n)[None, :] < n_strong[:, None])
        for b in range(B):
            near, skipped = _proximity_picks(firsts[b] if step == 0 else None,
                                                cand[b, :n_strong[b]].tolist(), size, boxes)
            cells[b, :len(near)], count[b] = near, len(near)
            rank[b, skipped] -= n
        near_count = count.copy()
        priority = np.empty((B, n), dtype=np.int64)
        np.put_along_axis(priority, cand, rank, 1)
        candidate = free.copy()
        picked = np.arange(size)[None, :] < count[:, None]
        candidate[np.nonzero(picked)[0], cells[picked]] = False
        d2 = np.full((B, n), (height + width) ** 2, dtype=np.int64)  # beyond any squared distance

        def closer(d2, rows_at, c):  # min squared distance after adding cells c to rows rows_at
            dist = (rows[None, :] - rows[c][:, None]) ** 2 + (cols[None, :] - cols[c][:, None]) ** 2
            return np.minimum(d2[rows_at], dist)

        for k in range(int(count.max(initial=0))):
            at = np.flatnonzero(k < count)
            d2[at] = closer(d2, at, cells[at, k])
        for b in np.flatnonzero(count == 0):  # no proximity pick: the first fill is a random candidate
            options = np.flatnonzero(candidate[b])
            options = options[np.argsort(priority[b, options], kind="stable")]
            c = int(options[int(torch.randint(len(options), (1,), generator=generators[b]))])
            cells[b, 0], count[b], candidate[b, c] = c, 1, False
            d2[b] = closer(d2, [b], np.array([c]))[0]
        while (count < size).any():
            at = np.flatnonzero(count < size)
            key = np.where(candidate[at], d2[at] * (4 * n) - priority[at], np.iinfo(np.int64).min)
            c = key.argmax(1)  # the farthest; among equals the first in candidate order
            cells[at, count[at]] = c
            count[at] += 1
            candidate[at, c] = False
            d2[at] = closer(d2, at, c)
        taken[batch[:, None], cells] = True
        np.add.at(score, (np.repeat(batch, size * 8), nbr_ids[cells].reshape(-1)), nbr_w[cells].reshape(-1))
        yield cells, np.arange(size)[None, :] >= near_count[:, None]


def locality_orders(height: int, width: int, group_sizes: Sequence[int], generators: Sequence[torch.Generator],
                    repulsion: float = 2.0, proximity: float = 1.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """LPD's locality-aware orders for a batch: ``(orders [B, H*W] raster cell ids, fill [B, H*W] bool)``.

    ``fill`` marks the cells farthest-point sampling added (the others were proximity picks).
    """
    steps = list(iter_locality_groups(height, width, group_sizes, generators, repulsion, proximity))
    return (torch.from_numpy(np.concatenate([c for c, _ in steps], 1)),
            torch.from_numpy(np.concatenate([f for _, f in steps], 1)))


def locality_groups(height: int, width: int, group_sizes: Sequence[int], repulsion: float = 2.0,
                    generator: Optional[torch.Generator] = None,
                    proximity: float = 1.0) -> List[Tuple[List[int], List[int]]]:
    """One sample's locality-aware groups as ``(near, fill)`` lists: the proximity picks (pairwise
    Chebyshev distance ``> repulsion``) and the farthest-point picks, each in the order picked."""
    generator = generator if generator is not None else torch.default_generator
    out = []
    for cells, fill in iter_locality_groups(height, width, group_sizes, [generator], repulsion, proximity):
        picks = list(zip(cells[0].tolist(), fill[0].tolist()))
        out.append(([c for c, f in picks if not f], [c for c, f in picks if f]))
    return out


def locality_order(height: int, width: int, group_sizes: Sequence[int], repulsion: float = 2.0,
                   generator: Optional[torch.Generator] = None, proximity: float = 1.0) -> torch.Tensor:
    """LPD's locality-aware order ``[H * W]`` (raster cell ids) of one sample for ``group_sizes``.

    Example:
        >>> order = locality_order(4, 4, [1, 3, 5, 7], generator=torch.Generator().manual_seed(0))
        >>> sorted(order.tolist()) == list(range(16))
        True
    """
    generator = generator if generator is not None else torch.default_generator
    return locality_orders(height, width, group_sizes, [generator], repulsion, proximity)[0][0]


def iter_groups(kind: str, grid: Tuple[int, int], group_sizes: Sequence[int],
                generators: Sequence[torch.Generator], repulsion: float = 2.0):
    """Cells ``[B, g]`` (numpy, raster ids) of each group in turn for an order of ``kind``:
    ``"locality"`` (LPD's, sample ``b`` seeded by ``generators[b]``), ``"random"`` (a uniform
    permutation per sample) or ``"raster"`` (row by row; the same for every sample)."""
    height, width = grid
    n = height * width
    if kind == "locality":
        for cells, _ in iter_locality_groups(height, width, group_sizes, generators, repulsion):
            yield cells
        return
    if kind == "random":
        orders = np.stack([random_order(n, g).numpy() for g in generators])
    elif kind == "raster":
        orders = np.tile(np.arange(n), (len(generators), 1))
    else:
        raise ValueError(f"unknown LPD order {kind!r}; choose from {ORDERS}")
    bounds = group_bounds(group_sizes)
    if bounds[-1] != n:
        raise ValueError(f"group sizes sum to {bounds[-1]}, the grid has {n} cells")
    for a, b in zip(bounds[:-1], bounds[1:]):
        yield orders[:, a:b]
