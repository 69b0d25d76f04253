"""Acceptance rules for verifying drafts: exact speculative sampling, and the pieces it is made of.

Every rule sees the same fp32 tensors: the verifier's ``p`` and the draft's own ``q``
(``[..., V]``), the drafted tokens and one U(0, 1) coin per draft. A rule returns which
drafts are accepted and the distribution to resample from at a rejection. Exact rules
keep the output distribution equal to ``p``; relaxed rules (LANTERN, GSD) change it by a
bounded, stated amount.
"""
from __future__ import annotations

import torch

from .sampling import sample_categorical


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``norm(max(p - q, 0))``, the distribution to resample from after rejecting a draft from ``q``.

    Where ``p <= q`` everywhere (a rejection that had probability 0, reachable only through
    rounding) the result is ``p`` itself, so a draw is always well defined.
    """
    r = (p - q).clamp_min(0)
    mass = r.sum(-1, keepdim=True)
    return torch.where(mass > 0, r / mass.clamp_min(1e-30), p)


def gather_prob(dist: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``dist[..., tokens]``: the probability of each token under its own row."""
    return dist.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


class ExactAcceptance:
    """Speculative sampling (Leviathan et al.; Chen et al.): accept ``d ~ q`` iff ``u < min(1, p(d) / q(d))``,
    resample from ``norm(max(p - q, 0))``. The committed token is distributed exactly as ``p``."""

    name = "exact"

    def target(self, p: torch.Tensor) -> torch.Tensor:
        """The distribution the rule samples from in effect (``p`` here; a relaxed ``p~`` elsewhere)."""
        return p

    def accept(self, p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor, coins: torch.Tensor) -> torch.Tensor:
        """Bool ``[...]``: which drafts pass their coin."""
        t = self.target(p)
        return coins * gather_prob(q, drafts) < gather_prob(t, drafts)

    def resample(self, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """Distribution to draw from after a rejection."""
        return residual(self.target(p), q)


def couple(new_q: torch.Tensor, old_q: torch.Tensor, old_draft: torch.Tensor, coins: torch.Tensor,
           noise: torch.Tensor) -> torch.Tensor:
    """Maximal coupling of a redraw: a token distributed exactly as ``new_q`` that equals ``old_draft``
    (drawn from ``old_q``) with the largest possible probability, ``sum min(new_q, old_q)``.

    This is one step of speculative sampling with the old draft as the proposal, which is
    why the marginal is exact whatever ``old_q`` was.
    """
    keep = coins * gather_prob(old_q, old_draft) < gather_prob(new_q, old_draft)
    fresh = sample_categorical(residual(new_q, old_q), noise=noise)
    return torch.where(keep, old_draft, fresh)
