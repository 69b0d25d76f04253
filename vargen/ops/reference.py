"""PyTorch reference implementations of the fused ops: the one implementation the library runs
everywhere except where a CUDA kernel replaces it.

The decoding and LIIF modules call these (through :mod:`vargen.ops`), so CPU behaviour is
defined here; the kernels in ``csrc/`` are tested against these functions.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F


# --------------------------------------------------------------------------------------------- sampling
def guided_logits(logits: torch.Tensor, cfg_scale) -> torch.Tensor:
    """Combine a CFG-doubled batch ``[cond; uncond]`` into guided fp32 logits (half the batch).

    ``cfg_scale`` is a float, or a tensor broadcasting over the half batch (per-position schedules)."""
    logits = logits.float()
    if not torch.is_tensor(cfg_scale) and cfg_scale == 1.0:
        return logits
    cond, uncond = logits.chunk(2, dim=0)
    return uncond + cfg_scale * (cond - uncond)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set logits outside the top-k / top-p support to ``-inf`` (fp32, last dim = vocabulary)."""
    logits = logits.float()
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the mass before it already reaches top_p (so the crossing token stays)
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sampling_probs(logits: torch.Tensor, cfg_scale: float = 1.0, temperature: float = 1.0, top_k: int = 0,
                   top_p: float = 1.0) -> torch.Tensor:
    """Raw logits (CFG-doubled when ``cfg_scale != 1``) -> fp32 probabilities: CFG, temperature
    (0 = one-hot argmax), top-k, top-p, softmax."""
    logits = guided_logits(logits, cfg_scale)
    if temperature == 0:
        return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    return filter_logits(logits / temperature, top_k, top_p).softmax(-1)


# --------------------------------------------------------------------------------------------- verification
def gather_prob(dist: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``dist[..., tokens]``: the probability of each token under its own row."""
    return dist.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``norm(max(p - q, 0))``, the distribution to resample from after rejecting a draft from ``q``.

    Where ``p <= q`` everywhere (a rejection that had probability 0, reachable only through
    rounding) the result is ``p`` itself, so a draw is always well defined.
    """
    r = (p - q).clamp_min(0)
    mass = r.sum(-1, keepdim=True)
    return torch.where(mass > 0, r / mass.clamp_min(1e-30), p)


def draw_categorical(p: torch.Tensor, u: torch.Tensor, q: Optional[torch.Tensor] = None,
                     residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One exact draw per row of ``p`` ``[..., V]`` (unnormalised weights) by inverse CDF with ``u`` ``[...]`` U(0, 1):
    the first token whose cumulative weight reaches ``(1 - u)`` of the total, so a token of weight 0 is never
    drawn. Where ``residual`` ``[...]`` is True the weights are ``max(p - q, 0)`` (the speculative residual; ``p``
    where that has no mass). One uniform per draw where ``argmax(p / E)`` takes ``V`` Exp(1) numbers."""
    w = p
    if q is not None:
        res = (p - q).clamp_min(0)
        w = torch.where((residual & (res.sum(-1, dtype=torch.float64) > 0))[..., None], res, p)
    cum = w.cumsum(-1)  # on a CPU, summed in double and rounded to fp32 (the CPU kernel does the same)
    return (cum < ((1 - u) * cum[..., -1])[..., None]).sum(-1)


def accept_drafts(p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor, coins: torch.Tensor,
                  extra: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Bool ``[...]``: ``coins * q(d) < p(d) + extra`` (``extra`` = mass a relaxed rule adds to ``p(d)``)."""
    target = gather_prob(p, drafts)
    if extra is not None:
        target = target + extra
    return coins * gather_prob(q, drafts) < target


def settle_window(ok: torch.Tensor, probs: torch.Tensor, q: torch.Tensor, noise: torch.Tensor,
                  resample=residual, target=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """First rejection and the token drawn there, given which drafts passed (``ok [B, L]``).

    ``r`` counts the drafts accepted before the first rejection; the token comes from
    ``resample(p_r, q_r)`` if ``r < L``, else from ``target(p_L)`` (the bonus token, ``p_L``
    by default), drawn as ``argmax(dist / noise)`` with the given Exp(1) ``noise [B, V]``.
    """
    L, V = q.shape[1], q.shape[-1]
    r = ok.long().cumprod(1).sum(1)
    p_r = probs.gather(1, r[:, None, None].expand(-1, 1, V))[:, 0]
    q_r = q.gather(1, r.clamp(max=L - 1)[:, None, None].expand(-1, 1, V))[:, 0]
    bonus = p_r if target is None else target(p_r)
    dist = torch.where((r < L)[:, None], resample(p_r, q_r), bonus)
    return r, (dist / noise).argmax(-1)  # = sample_categorical(dist, noise=noise)


def verify_window(probs: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor, coins: torch.Tensor,
                  valid: torch.Tensor, noise: torch.Tensor,
                  extra: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """One speculative verification step: accept, first rejection, residual (or bonus) draw.

    See :func:`vargen.ops.verify_window` for the shapes.
    """
    L = q.shape[1]
    ok = accept_drafts(probs[:, :L], q, drafts, coins, extra) & valid
    return settle_window(ok, probs, q, noise)


def lantern_pooled_mass(p: torch.Tensor, drafts: torch.Tensor, neighbours: torch.Tensor,
                        delta: Optional[float] = None, lam: Optional[float] = None) -> torch.Tensor:
    """LANTERN's ``S_m`` per draft: the largest prefix sum of neighbour masses within the budget."""
    _, cum, pooled = lantern_pooled_set(p, drafts, neighbours, delta, lam)
    return (cum * pooled).amax(-1)


def lantern_pooled_set(p: torch.Tensor, drafts: torch.Tensor, neighbours: torch.Tensor,
                       delta: Optional[float] = None, lam: Optional[float] = None) -> tuple:
    """``(neighbour ids [..., k], their cumulative mass [..., k], pooled [..., k] bool)`` per draft: the
    pooled neighbours are the prefix whose cumulative mass stays within LANTERN's budget.

    A draft outside the sampling support (``p(d) == 0`` after top-k / top-p) pools nothing: the user's
    filter is a hard limit, so such a draft must never be accepted through its neighbours' mass."""
    nb = neighbours.to(drafts.device)[drafts]  # [..., k]
    cum = p.gather(-1, nb).cumsum(-1)
    p_d = gather_prob(p, drafts)
    budget = (lam - 1) * p_d if lam is not None else torch.full_like(cum[..., 0], delta)
    return nb, cum, (cum <= budget[..., None]) & (p_d > 0)[..., None]


# --------------------------------------------------------------------------------------------- LIIF
def make_coord(shape: Sequence[int], ranges=None, flatten: bool = True, device=None) -> torch.Tensor:
    """Pixel-centre coordinates of a grid: ``[*shape, ndim]`` (or ``[prod(shape), ndim]`` flattened).

    Each axis of ``n`` pixels spans ``[-1, 1]`` (or ``ranges[i]``); pixel ``i`` sits at
    ``-1 + (2i + 1) / n``, i.e. ``align_corners=False`` centres. Axis order is (row, col).
    """
    seqs = []
    for i, n in enumerate(shape):
        v0, v1 = (-1.0, 1.0) if ranges is None else ranges[i]
        r = (v1 - v0) / (2 * n)
        seqs.append(v0 + r + 2 * r * torch.arange(n, device=device).float())
    ret = torch.stack(torch.meshgrid(*seqs, indexing="ij"), dim=-1)
    return ret.view(-1, ret.shape[-1]) if flatten else ret


def liif_offsets(h: int, w: int, local_ensemble: bool = True) -> List[Tuple[float, float]]:
    """(row, col) shifts of the query for each corner: half a feature cell towards it, plus an eps
    that breaks ties when a query sits exactly on a cell border (so the 4 corners are 4 cells)."""
    if not local_ensemble:
        return [(0.0, 0.0)]
    rx, ry, eps = 1.0 / h, 1.0 / w, 1e-6
    return [(vx * rx + eps, vy * ry + eps) for vx, vy in [(-1, -1), (-1, 1), (1, -1), (1, 1)]]


def liif_corners(feat: torch.Tensor, coord: torch.Tensor, cell: Optional[torch.Tensor] = None,
                 local_ensemble: bool = True, cell_decode: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """LIIF's corner gather: MLP inputs ``[S, B, Q, C + 2 (+2)]`` and areas ``[S, B, Q]`` (S = 4 or 1).

    See :func:`vargen.ops.liif_corners`.
    """
    B, _, h, w = feat.shape
    feat_coord = make_coord((h, w), flatten=False, device=feat.device).to(feat.dtype)
    feat_coord = feat_coord.permute(2, 0, 1).unsqueeze(0).expand(B, 2, h, w)
    hw = coord.new_tensor([h, w])
    inps, areas = [], []
    for dr, dc in liif_offsets(h, w, local_ensemble):
        coord_ = coord.clone()
        coord_[..., 0] += dr
        coord_[..., 1] += dc
        coord_.clamp_(-1 + 1e-6, 1 - 1e-6)
        grid = coord_.flip(-1).unsqueeze(1)  # grid_sample wants (x, y) = (col, row)
        q_feat = F.grid_sample(feat, grid, mode="nearest", align_corners=False)[:, :, 0, :].permute(0, 2, 1)
        q_coord = F.grid_sample(feat_coord, grid, mode="nearest", align_corners=False)[:, :, 0, :].permute(0, 2, 1)
        rel_coord = (coord - q_coord) * hw  # offset from the chosen feature's centre, in feature cells
        inp = [q_feat, rel_coord]
        if cell_decode:
            inp.append(cell * hw)  # the query pixel's size in feature cells
        inps.append(torch.cat(inp, dim=-1))
        areas.append(torch.abs(rel_coord[..., 0] * rel_coord[..., 1]) + 1e-9)
    return torch.stack(inps), torch.stack(areas)
