"""Acceptance rules for verifying drafts: exact speculative sampling, and the pieces it is made of.

Every rule sees the same fp32 tensors: the verifier's ``p`` and the draft's own ``q``
(``[..., V]``), the drafted tokens and one U(0, 1) coin per draft. A rule returns which
drafts are accepted and the distribution to resample from at a rejection. Exact rules
keep the output distribution equal to ``p``; relaxed rules (LANTERN, GSD) change it by a
bounded, stated amount.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import ops
from ..ops.reference import gather_prob, residual, settle_window  # one implementation

__all__ = ["ExactAcceptance", "LanternAcceptance", "GroupedAcceptance", "codebook_neighbours", "couple",
           "drop_tokens", "gather_prob", "residual"]


class ExactAcceptance:
    """Speculative sampling (Leviathan et al.; Chen et al.): accept ``d ~ q`` iff ``u < min(1, p(d) / q(d))``,
    resample from ``norm(max(p - q, 0))``. The committed token is distributed exactly as ``p``.

    The one interface every method uses: :meth:`accept` / :meth:`resample` for drafts with their own ``q``
    (SJD, MuLo, ZipAR's first-token check), :meth:`verify_window` for a window of them (the first rejection
    and its draw; a fused kernel behind it where the rule allows), :meth:`verify_token` for a deterministic
    draft such as an EAGLE tree node (``q`` one-hot). Relaxed rules change :meth:`extra_mass` (LANTERN) or
    :meth:`accept` itself (GSD, which then runs unfused).
    """

    name = "exact"

    @property
    def fused(self) -> bool:
        """Whether the fused verify op computes this rule: its accept, resample and target are speculative
        sampling's, relaxed at most through :meth:`extra_mass` (LANTERN). A rule that redefines any of them
        (GSD, a test's broken rule) runs its own methods instead."""
        cls = type(self)
        return all(getattr(cls, m) is getattr(ExactAcceptance, m) for m in ("accept", "resample", "target"))

    def target(self, p: torch.Tensor) -> torch.Tensor:
        """The distribution the rule samples from in effect (``p`` here; a relaxed ``p~`` elsewhere)."""
        return p

    def extra_mass(self, p: torch.Tensor, drafts: torch.Tensor):
        """Mass a relaxed rule adds to ``p(d)`` when judging draft ``d`` (``[...]``), or ``None`` (exact)."""
        return None

    def accept(self, p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor, coins: torch.Tensor) -> torch.Tensor:
        """Bool ``[...]``: ``u < min(1, p~(d) / q(d))``, i.e. ``u q(d) < p~(d)``, with ``p~(d) = p(d) + extra_mass``."""
        p_d = gather_prob(self.target(p), drafts)
        extra = self.extra_mass(p, drafts)
        return coins * gather_prob(q, drafts) < (p_d if extra is None else p_d + extra)

    def resample(self, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """Distribution to draw from after a rejection: ``norm(max(p~ - q, 0))``."""
        return residual(self.target(p), q)

    def verify_window(self, probs: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor, coins: torch.Tensor,
                      valid: torch.Tensor, noise: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """A window of ``L`` drafts: ``(r [B], x [B])``, the drafts accepted before the first rejection and the
        token drawn at ``n + r`` (:meth:`resample` there, or the bonus from ``p_L`` if all pass); shapes as
        :func:`vargen.ops.verify_window`. The fused op (a CUDA kernel on GPU) computes exactly :meth:`accept`
        and :meth:`resample` when ``fused``; otherwise this rule's own methods run, step by step."""
        L = q.shape[1]
        if self.fused:
            return ops.verify_window(probs, q, drafts, coins, valid, noise, self.extra_mass(probs[:, :L], drafts))
        ok = self.accept(probs[:, :L], q, drafts, coins) & valid
        return settle_window(ok, probs, q, noise, resample=self.resample, target=self.target)

    def verify_token(self, p: torch.Tensor, x: torch.Tensor, coins: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """A deterministic draft ``x`` (``q`` one-hot at ``x``): ``(accepted [B], p after its rejection [B, V])``.
        :meth:`accept` becomes ``u < p~(x)`` and :meth:`resample` drops ``x`` and renormalises, which is what lets
        a tree try its next sibling against the rest (SpecInfer's multi-draft rejection)."""
        extra = self.extra_mass(p, x)
        p_x = gather_prob(p, x)
        return coins < (p_x if extra is None else p_x + extra), drop_tokens(p, x[:, None])

    def try_siblings(self, p: torch.Tensor, tokens: torch.Tensor, tried: torch.Tensor,
                     coins: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Deterministic sibling drafts ``tokens`` ``[B, K]`` tried in rank order against ``p`` ``[B, V]`` until one
        is accepted (SpecInfer's multi-draft rejection; EAGLE trees): each by :meth:`verify_token` against what
        its rejected elder siblings left. ``tried`` ``[B, K]`` marks real candidates. Returns ``(accepted [B, K]``,
        at most one True per row, ``p_left [B, V]``, ``p`` after every rejection: the final draw's distribution
        where none is accepted, unnormalised).

        Exact acceptance has a closed form, one pass over the ``K`` siblings instead of ``K`` renormalisations:
        after the elder siblings' mass ``S`` is dropped, sibling ``r`` is accepted with ``p(t_r) / (1 - S)``."""
        if type(self).verify_token is ExactAcceptance.verify_token:
            p_t = p.gather(1, tokens) * tried
            left = p.sum(-1, keepdim=True) - (p_t.cumsum(1) - p_t)  # mass not yet dropped when r is tried
            passed = tried & (coins * left < p_t)
            accepted = passed & (passed.long().cumsum(1) == 1)
            dropped = p.scatter_reduce(1, tokens, (~tried).to(p.dtype), reduce="prod")  # duplicates: harmless
            # a row whose tried siblings held all the mass (then the last one is always accepted) keeps p
            return accepted, torch.where(dropped.sum(-1, keepdim=True) > 1e-30, dropped, p)
        accepted = torch.zeros_like(tried)
        done = torch.zeros_like(tried[:, 0])
        for r in range(tokens.shape[1]):
            has = tried[:, r] & ~done
            passed, p_rejected = self.verify_token(p, tokens[:, r], coins[:, r])
            accepted[:, r] = has & passed
            done |= has & passed
            p = torch.where((has & ~passed)[:, None], p_rejected, p)  # the next sibling is judged against the rest
        return accepted, p


def drop_tokens(p: torch.Tensor, ids: torch.Tensor, drop: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``p`` with the tokens ``ids`` (``[B, k]``; where ``drop`` is True, all by default) set to 0, renormalised;
    a row with nothing left keeps ``p``."""
    keep = torch.ones_like(p, dtype=torch.bool)
    keep.scatter_(1, ids, torch.zeros_like(ids, dtype=torch.bool) if drop is None else ~drop)
    new = p * keep
    total = new.sum(-1, keepdim=True)
    return torch.where(total > 1e-30, new / total.clamp_min(1e-30), p)


def couple(new_q: torch.Tensor, old_q: torch.Tensor, old_draft: torch.Tensor, coins: torch.Tensor,
           u: torch.Tensor, where: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Maximal coupling of a redraw: a token distributed exactly as ``new_q`` that equals ``old_draft``
    (drawn from ``old_q``) with the largest possible probability, ``sum min(new_q, old_q)``.

    This is one step of speculative sampling with the old draft as the proposal, which is
    why the marginal is exact whatever ``old_q`` was: keep the old draft iff ``coins * old_q(d) < new_q(d)``,
    else draw from ``norm(max(new_q - old_q, 0))`` by inverse CDF with the U(0, 1) ``u``
    (:func:`vargen.ops.draw_categorical`). Cells where ``where`` is False are not coupled: a plain draw from
    ``new_q`` with the same ``u``, in the same kernel call.
    """
    coupled = torch.ones_like(old_draft, dtype=torch.bool) if where is None else where
    keep = coupled & (coins * gather_prob(old_q, old_draft) < gather_prob(new_q, old_draft))
    return torch.where(keep, old_draft, ops.draw_categorical(new_q, u, old_q, coupled))


def codebook_neighbours(codebook: torch.Tensor, k: int = 1000) -> torch.Tensor:
    """``[V, k]`` ids of each code's ``k`` nearest other codes by L2 distance, nearest first
    (LANTERN's offline table; ``k`` is capped at ``V - 1``)."""
    codes = codebook.detach().float()
    k = min(k, codes.shape[0] - 1)
    out = []
    for start in range(0, codes.shape[0], 1024):  # rows in chunks: 16384^2 distances would be 1 GB
        dist = torch.cdist(codes[start:start + 1024], codes)
        rows = torch.arange(dist.shape[0], device=dist.device)
        dist[rows, rows + start] = float("inf")
        out.append(dist.topk(k, dim=-1, largest=False).indices)
    return torch.cat(out)


class LanternAcceptance(ExactAcceptance):
    """LANTERN relaxed acceptance (Jang et al., ICLR 2025; LANTERN++ for the lambda mode).

    A draft ``x`` is judged against ``p~(x) = p(x) + S_m``, where ``S_m`` is the mass of
    ``x``'s ``m`` nearest codebook neighbours and ``m`` is the largest with
    ``S_m <= delta`` (delta mode) or ``S_m <= (lambda - 1) p(x)`` (lambda mode). Visually
    interchangeable codes then stop rejecting each other. Not lossless: ``TV(p, p~) = S_m
    <= delta`` for every draft, and with a deterministic (one-hot) draft the committed
    token's distribution is within that distance of ``p`` (tested). A draft outside the
    sampling support (``p(x) == 0`` after top-k / top-p) pools nothing and is never accepted;
    resamples and bonuses come from ``p``, so no output leaves the support (tested). With stochastic
    drafts the bound does not carry over to the committed token: every token with
    ``q > p`` may gain up to ``delta`` (tested: 0.63 total variation at delta 0.1 for
    random ``p, q`` over 32 codes), so the cost is measured per model in the benchmark.
    The residual is SJD's.

    Args:
        neighbours: ``[V, k]`` table from :func:`codebook_neighbours`.
        delta: pooled-mass budget (delta mode), ``0 <= delta <= 1``.
        lam: if given, lambda mode with this ``lambda > 1`` instead.
    """

    name = "lantern"

    def __init__(self, neighbours: torch.Tensor, delta: float = 0.1, lam: float = None):
        if lam is None and not 0 <= delta <= 1:
            raise ValueError(f"LANTERN delta must be in [0, 1], got {delta}")
        if lam is not None and lam < 1:
            raise ValueError(f"LANTERN lambda must be >= 1, got {lam}")
        self.neighbours, self.delta, self.lam = neighbours, delta, lam
        self._device_tables = {}

    def pooled_mass(self, p: torch.Tensor, drafts: torch.Tensor) -> torch.Tensor:
        """``S_m`` per draft: the neighbours' mass pooled into ``p(x)`` (``[...]``)."""
        return ops.lantern_pooled_mass(p, drafts, self._table(drafts.device), delta=self.delta, lam=self.lam)

    def pooled_neighbours(self, p: torch.Tensor, drafts: torch.Tensor) -> tuple:
        """``(ids [..., k], pooled [..., k] bool)``: each draft's neighbours and which of them its ``S_m`` pooled
        (for residuals that drop the pooled tokens, e.g. EAGLE trees)."""
        from ..ops.reference import lantern_pooled_set

        nb, _, pooled = lantern_pooled_set(p, drafts, self._table(drafts.device), delta=self.delta, lam=self.lam)
        return nb, pooled

    def extra_mass(self, p: torch.Tensor, drafts: torch.Tensor) -> torch.Tensor:
        return self.pooled_mass(p, drafts)

    def verify_token(self, p: torch.Tensor, x: torch.Tensor, coins: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """As :meth:`ExactAcceptance.verify_token` with ``p~(x) = p(x) + S_m``; a rejection drops ``x`` and the
        neighbours its ``S_m`` pooled (LANTERN's dynamic-tree residual), so they are not tried again."""
        nb, pooled = self.pooled_neighbours(p, x)
        ok = coins < gather_prob(p, x) + self.extra_mass(p, x)
        ids = torch.cat([nb, x[:, None]], 1)
        return ok, drop_tokens(p, ids, torch.cat([pooled, torch.ones_like(x[:, None], dtype=torch.bool)], 1))

    def _table(self, device: torch.device) -> torch.Tensor:
        # the [V, k] table is large (16384 x 1000 longs): copy it to the device once, not every step
        if self.neighbours.device != device:
            cached = self._device_tables.get(device)
            if cached is None:
                cached = self._device_tables[device] = self.neighbours.to(device)
            return cached
        return self.neighbours


class GroupedAcceptance(ExactAcceptance):
    """Grouped speculative decoding (GSD, So et al., ICCV 2025): judge a draft by its group.

    The group of draft ``x`` is ``x`` plus the tokens within ``rank_window`` ranks of ``x``
    in the verifier's ranking whose probability is within ``prob_gap`` of ``p(x)`` and whose
    input embedding is within squared distance ``emb_dist`` of ``x``'s; accept with
    ``min(1, sum_G p / sum_G q)``. Lossy (the group's mass is credited to ``x``); the
    residual is SJD's. With ``prob_gap = 0`` the group is ``{x}`` and the rule is exact. A draft that
    top-k / top-p removed (``p(x) == 0``) is never accepted, whatever its group's mass.

    Args:
        embeddings: ``[V, D]`` the AR model's input token embeddings.
    """

    name = "gsd"

    def __init__(self, embeddings: torch.Tensor, rank_window: int = 7, prob_gap: float = 0.15,
                 emb_dist: float = 0.5):
        self.embeddings = embeddings.detach().float()
        self.rank_window, self.prob_gap, self.emb_dist = rank_window, prob_gap, emb_dist

    def group(self, p: torch.Tensor, drafts: torch.Tensor) -> tuple:
        """``(members [..., 2w+1] token ids, in_group [..., 2w+1] bool)`` for each draft."""
        order = p.argsort(-1, descending=True)
        rank = order.argsort(-1).gather(-1, drafts[..., None])  # [..., 1]
        offsets = torch.arange(-self.rank_window, self.rank_window + 1, device=p.device)
        ranks = rank + offsets
        inside = (ranks >= 0) & (ranks < p.shape[-1])
        members = order.gather(-1, ranks.clamp(0, p.shape[-1] - 1))
        close_p = (p.gather(-1, members) - gather_prob(p, drafts)[..., None]).abs() < self.prob_gap
        emb = self.embeddings.to(p.device)
        close_e = (emb[members] - emb[drafts][..., None, :]).pow(2).sum(-1) < self.emb_dist
        return members, inside & ((close_p & close_e) | (members == drafts[..., None]))

    def verify_token(self, p, x, coins):
        raise ValueError("GSD judges a draft by its group's mass under q; a deterministic (tree) draft has none")

    def accept(self, p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor, coins: torch.Tensor) -> torch.Tensor:
        members, in_group = self.group(p, drafts)
        mass_p = (p.gather(-1, members) * in_group).sum(-1)
        mass_q = (q.gather(-1, members) * in_group).sum(-1)
        in_support = gather_prob(p, drafts) > 0  # a token top-k / top-p removed is never accepted
        return (coins * mass_q < mass_p) & in_support
