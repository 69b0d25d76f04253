"""Speculative Jacobi Decoding (Teng et al., ICLR 2025) and its lossless draft coupling.

One loop: a window of ``L`` drafts after the last committed token is verified in one
forward pass (the last committed token plus ``L`` drafts, so a fully accepted window
also yields a bonus token); the acceptance rule commits the longest accepted prefix and
resamples at the first rejection; the cache rolls back by moving its length pointer;
the drafts after the rejection become this pass's samples (Jacobi iteration, ``q := p``)
and fresh drafts fill the window. Each sample advances by its own accepted length.

SJD-PAC (``pac=True``, Kang et al., CVPR 2026) adds proactive drafting (a K-ary tree at the head of the
window, :mod:`vargen.decoding.pac`) and adaptive continuation. Continuation, read naively ("keep the drafts
after the rejection as they are, verified next pass against their old ``q``") is not lossless in one
respect: a draft that already passed or failed a test against this pass's ``p`` is no longer a fresh ``q``
sample if the outcome decides whether it is kept. The lossless version (the paper's code): each draft
``d_j`` after the committed path is tested against this pass's ``p_j`` (stale context, ``u_j q_j(d) <
p_j(d)``) and kept if it passes, else replaced by a draw from ``norm(max(p_j - q_j, 0))``; the new draft
is then an exact ``p_j`` sample (speculative sampling's marginal) and its ``q`` becomes ``p_j``, exactly as
in SJD's Jacobi step. ``u_j`` is the window's own coin, unused because the committed path stopped before
``j``. That is the maximal coupling of the redraw below, with the verification coin: so ``sjd+pac`` and
``sjd+coupling+pac`` draw their chains from the same distribution, and PAC's gain over coupling comes from
the tree.

With ``coupling="maximal"`` a redrawn draft keeps its old token with probability
``min(1, q_new / q_old)`` (else it comes from the residual); with ``"gumbel"`` every
cell keeps one Exp(1) noise vector and drafts are ``argmax(q / E)``. Either way each draft
is still an exact sample of its ``q``, so verification stays lossless, and drafts stop
flickering between iterations, which is what raises acceptance (the MC-SJD idea).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm

from .. import ops
from .acceptance import ExactAcceptance, couple
from .drafts import check_init, fill_fresh
from .pac import pac_ancestors, pac_layout, tree_draws, verify_with_tree
from .sampling import SamplingConfig, exponential_noise, sample_categorical, uniform_noise
from .session import DecodeSession, cfg_rows, target_pass

COUPLINGS = ("none", "maximal", "gumbel")
PAC_SIBLINGS = ("left", "q")
COUPLING_SUFFIX = {"none": "", "maximal": "+coupling", "gumbel": "+gumbel"}


def sjd_method_name(coupling: str = "none", acceptance: str = "exact", pac: bool = False) -> str:
    """The registry name of an SJD variant, e.g. ``"sjd+coupling+lantern"`` or ``"sjd+coupling+pac"``; GSD
    (grouped acceptance on plain SJD drafts) is ``"gsd"``. The one definition the decode loop, the CLI flags and
    ``METHODS`` share."""
    if acceptance == "gsd" and coupling == "none" and not pac:
        return "gsd"
    return "sjd" + COUPLING_SUFFIX[coupling] + ("+pac" if pac else "") + \
        ("" if acceptance == "exact" else f"+{acceptance}")


def commit_accepted(canvas: torch.Tensor, from_draft: torch.Tensor, n: torch.Tensor, drafts: torch.Tensor,
                    accepted: torch.Tensor, token: torch.Tensor, active: torch.Tensor, N: int) -> tuple:
    """Commit ``accepted[b]`` of ``drafts`` ``[B, L]`` at cells ``n .. n+a-1`` and ``token`` (the resample or
    bonus) at ``n+a`` (inside the grid), for ``active`` samples; marks the drafts in ``from_draft``.
    Returns ``(keep [B, L], n_new [B])``."""
    steps = torch.arange(drafts.shape[1], device=n.device)
    cells = n[:, None] + steps
    keep = (steps[None] < accepted[:, None]) & active[:, None]
    canvas.scatter_(1, cells, torch.where(keep, drafts, canvas.gather(1, cells)))
    from_draft.scatter_(1, cells, from_draft.gather(1, cells) | keep)
    at = (n + accepted)[:, None]
    put = (active & (n + accepted < N))[:, None]
    canvas.scatter_(1, at, torch.where(put, token[:, None], canvas.gather(1, at)))
    return keep, torch.where(active, (n + accepted + 1).clamp(max=N), n)


def _rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[b, index[b, j]]`` for ``x`` ``[B, T, V]`` and ``index`` ``[B, L]`` -> ``[B, L, V]``."""
    return x.gather(1, index[..., None].expand(*index.shape, x.shape[-1]))


def sjd_step(model, sampling: SamplingConfig, cache, prefix_len: int, acceptance, init: str, width: int,
             canvas: torch.Tensor, from_draft: torch.Tensor, n: torch.Tensor, drafts: torch.Tensor, q: torch.Tensor,
             draws: dict, gumbel: Optional[torch.Tensor], tree: Optional[tuple] = None, generators=None) -> tuple:
    """One SJD verify step as a function of its state and its random draws, so that ``--compile`` can capture it
    whole: the target pass over the last committed token and the ``L`` drafts (with ``tree = (layout, K, T, C,
    left)``, SJD-PAC's window plus tree, :func:`vargen.decoding.pac.verify_with_tree`), the acceptance rule, the commit,
    the cache rollback and the next window (:func:`next_window`). ``draws`` (:func:`step_draws`): the coins and
    noise of the verification, ``redraw`` ``[B, L, V]`` for the redrawn window (else rows of the ``gumbel``
    table), ``keep`` the maximal coupling's coins; ``generators`` only for the sampling inits. Returns
    ``(canvas, from_draft, n, drafts, q, positions with non-finite logits)``; only the cache changes in place."""
    N, L = canvas.shape[1] - drafts.shape[1] - 1, drafts.shape[1]
    canvas, from_draft = canvas.clone(), from_draft.clone()
    active = n < N
    last = canvas.gather(1, (n - 1)[:, None])
    if tree is not None:  # the window plus a K-ary tree on its first T levels; the accepted path may leave it
        layout, K, T, C, left = tree
        probs, r, x, path, bad = verify_with_tree(model, sampling, cache, prefix_len, acceptance, layout, last[:, 0],
                                                  n, drafts, q, active, K, T, N, draws, C, left)
    else:
        pos = (n - 1)[:, None] + torch.arange(L + 1, device=n.device)
        probs, bad = target_pass(model, sampling, cache, prefix_len, torch.cat([last, drafts], 1),
                                 pos.clamp(max=N - 1), pos)
        # r: drafts accepted before the first rejection; x: the residual (or bonus) token at n + r
        r, x = acceptance.verify_window(probs, q, drafts, draws["coins"], (pos[:, 1:] < N) & active[:, None],
                                        draws["noise"])
        path = drafts
    # commit the accepted path at n .. n+r-1 and the resampled (or bonus) token at n+r
    _, n_new = commit_accepted(canvas, from_draft, n, path, r, x, active, N)
    cache.rollback(cfg_rows(prefix_len + n_new - 1, sampling))  # the newest token has no KV yet
    keep = draws.get("keep")
    if tree is not None and keep is None and gumbel is None:
        # PAC's continuation: a kept draft is judged with its own coin, unused because the path stopped before it
        keep = draws["coins"].gather(1, (r[:, None] + 1 + torch.arange(L, device=n.device)).clamp(max=L - 1))
    drafts, q = next_window(probs, r, n_new, q, drafts, draws.get("redraw"), gumbel, keep, canvas, init, generators,
                            width)
    return canvas, from_draft, n_new, drafts, q, bad


def step_draws(generators, L: int, V: int, coupling: str, tree: Optional[tuple], device) -> dict:
    """One step's random draws for :func:`sjd_step`, made outside it (per-sample generators cannot run inside a
    graph) and in the order the step uses them, so a compiled step samples eager's tokens. The next window's
    redraws take one U(0, 1) number per cell (inverse CDF): an ``L x V`` table of Exp(1) noise for ``argmax(q / E)``
    cost ~0.25 ms of each pass of the default model on the 2-core CPU, and nothing else in the step reads it."""
    if tree is not None:
        draws = tree_draws(generators, L, tree[1], tree[2], V, device, tree[3])
    else:
        draws = {"coins": uniform_noise((L,), generators, device), "noise": exponential_noise((V,), generators, device)}
    if coupling != "gumbel":
        draws["redraw"] = uniform_noise((L,), generators, device)
    if coupling == "maximal":
        draws["keep"] = uniform_noise((L,), generators, device)
    return draws


def next_window(probs: torch.Tensor, r: torch.Tensor, n: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor,
                redraw: Optional[torch.Tensor], gumbel: Optional[torch.Tensor], keep: Optional[torch.Tensor],
                canvas: torch.Tensor, init: str, generators, width: int) -> tuple:
    """The window after a pass that accepted ``r`` drafts (now ``n`` tokens committed): this pass's distributions
    where they reach (Jacobi, ``q := p``), each cell redrawn from its new ``q`` by inverse CDF with its ``redraw``
    uniform (or as ``argmax(q / E)`` with its row of the ``gumbel`` table); with ``keep`` coins a redrawn cell keeps
    its old draft by the maximal coupling (:func:`couple`); cells past this pass's reach get fresh drafts
    (:func:`fill_fresh`). Returns ``(drafts, q)``."""
    L = drafts.shape[1]
    steps = torch.arange(L, device=n.device)
    src = r[:, None] + 1 + steps
    new_q = _rows(probs, src.clamp(max=L))
    if gumbel is not None:
        new_d = sample_categorical(new_q, noise=_rows(gumbel, (n[:, None] + steps).clamp(max=gumbel.shape[1] - 1)))
    elif keep is None:
        new_d = ops.draw_categorical(new_q, redraw)
    else:  # cells with an old draft are coupled to it; the cell of the bonus row draws afresh (one kernel call)
        old = src.clamp(max=L - 1)
        new_d = couple(new_q, _rows(q, old), drafts.gather(1, old), keep, redraw, where=src <= L - 1)
    return fill_fresh(canvas, n, new_d, new_q, src > L, _rows(probs, r[:, None])[:, 0], init, generators, width)


@torch.no_grad()
def decode_sjd(model, cond, sampling: SamplingConfig = SamplingConfig(), seeds: Optional[Sequence[int]] = None,
               cond_mask: Optional[torch.Tensor] = None, window: int = 16, init: str = "left",
               coupling: str = "none", acceptance=None, pac: bool = False, pac_width: int = 3, pac_depth: int = 2,
               pac_chain: int = 0, pac_siblings: str = "left", progress: bool = False, callback=None):
    """Generate all image tokens with Speculative Jacobi Decoding.

    Args:
        model, cond, sampling, seeds, cond_mask: as :func:`vargen.decoding.decode_ar`.
        window: drafts verified per forward pass (``L``; SJD's default is 16).
        init: draft initialisation for new window positions, see :mod:`vargen.decoding.drafts`.
        coupling: ``"none"`` (SJD), ``"maximal"`` or ``"gumbel"`` (lossless coupled redraws).
        acceptance: the acceptance rule (default :class:`ExactAcceptance`, lossless).
        pac: SJD-PAC. Proactive drafting: the window's first ``pac_depth`` levels become a ``pac_width``-ary
            tree verified in the same pass (:mod:`vargen.decoding.pac`; the paper's K = 3, D = 3 counting the
            root). Adaptive continuation: the drafts after the accepted path are kept where they pass the
            speculative test against this pass's ``p`` (with their own, so far unused, coins) and redrawn from
            ``norm(max(p - q, 0))`` where they fail (module docstring: this is the maximal coupling).
        pac_chain: with ``pac``, each off-main leaf of the tree goes on with the window's next ``pac_chain`` drafts
            (capped so that tree and chain stay inside the window), so a path that left the main chain at the
            head can still accept a run of drafts in the same pass.
        pac_siblings: with ``pac``, where a tree node's extra candidates come from: ``"left"`` (vargen's default)
            tries the token of the cell before it first (after a rejection the next cell often repeats the
            token just drawn, which the stale window cannot know), then draws from ``q``; ``"q"`` draws them all
            from ``q`` (the paper).
        progress: tqdm bar over the least advanced sample's committed tokens.
        callback: optional ``callback(step, tokens, committed)`` after each verify pass
            (``tokens [B, N]``; cells past ``committed[b]`` hold drafts).

    Returns:
        ``(tokens [B, N], DecodeStats)``; ``stats.per_sample_forward_passes`` counts each
        sample's passes (prefill included) until it finished.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if pac and (pac_width < 1 or pac_depth < 0 or pac_chain < 0):
        raise ValueError(f"SJD-PAC needs pac_width >= 1, pac_depth >= 0 and pac_chain >= 0; got {pac_width}, "
                         f"{pac_depth}, {pac_chain}")
    init = check_init(init)
    if pac and pac_siblings not in PAC_SIBLINGS:
        raise ValueError(f"unknown pac_siblings {pac_siblings!r}; choose from {PAC_SIBLINGS}")
    if coupling not in COUPLINGS:
        raise ValueError(f"unknown coupling {coupling!r}; choose from {COUPLINGS}")
    acceptance = acceptance or ExactAcceptance()
    N, V, L, width = model.num_tokens, model.vocab_size, window, model.grid[1]
    name = sjd_method_name(coupling, acceptance.name, pac)
    K, T = min(pac_width, V), (min(pac_depth, L - 1) if pac else 0)  # T tree levels, always < L
    C = min(pac_chain, L - 1 - T) if pac else 0  # walked levels T + C, always < L
    if pac and pac_chain > 0 and (K < 2 or T < 1 or L - 1 - T < 1):  # a chain needs an off-main leaf and room
        raise ValueError(f"pac_chain={pac_chain} has nothing to continue: chains hang under the tree's off-main "
                         f"leaves, which need pac_width >= 2, pac_depth >= 1 and a window longer than the tree "
                         f"(got width {pac_width}, depth {pac_depth}, window {L})")
    extra_nodes = len(pac_layout(L, K, T, C)[0]) - L if pac else 0
    session = DecodeSession(model, cond, sampling, seeds, cond_mask, method=name,
                            max_len=model.prefix_len + N + L + extra_nodes + 1)
    B, dev, gens = session.batch, session.device, session.generators
    canvas = torch.zeros(B, N + L + 1, dtype=torch.long, device=dev)  # committed tokens, then drafts
    from_draft = torch.zeros(B, N + L + 1, dtype=torch.bool, device=dev)  # cells committed as accepted drafts
    first = session.prefill()
    canvas[:, 0] = sample_categorical(first, gens)
    n = torch.ones(B, dtype=torch.long, device=dev)  # committed tokens per sample
    session.advance(n)
    gumbel = exponential_noise((N + L + 1, V), gens, dev) if coupling == "gumbel" else None
    drafts, q = fill_fresh(canvas, n, torch.zeros(B, L, dtype=torch.long, device=dev),
                           torch.zeros(B, L, V, device=dev), torch.ones(B, L, dtype=torch.bool, device=dev),
                           first, init, gens, width)
    # --compile: the whole verify step (forward, acceptance, commit, rollback, next window) as one graph; the
    # sampling inits draw inside the step, so they run eagerly around the compiled forward
    tree = (tuple(t.to(dev) for t in pac_layout(L, K, T, C) + (pac_ancestors(L, K, T, C),)), K, T, C,
            pac_siblings == "left") if pac else None
    whole = hasattr(model, "whole_step") and acceptance.fused and init in ("left", "above")
    step, target = (model.whole_step(sjd_step), model.model) if whole else (sjd_step, model)
    step_i = 0
    bar = tqdm(total=N, disable=not progress, desc=name, leave=False)
    while True:
        active = n < N
        if not bool(active.any()):  # one host sync per verify step, none per token
            break
        draws = step_draws(gens, L, V, coupling, tree, dev)
        canvas, from_draft, n_new, drafts, q, bad = step(
            target, session.sampling, session.cache, session.prefix_len, acceptance, init, width, canvas, from_draft,
            n, drafts, q, draws, gumbel, tree, None if whole else gens)
        session.count_pass(bad)
        session.advance(n_new)
        n = n_new
        if callback is not None:
            callback(step_i, canvas[:, :N], n)
        step_i += 1
        if progress:
            bar.n = int(n.min())
            bar.refresh()
    bar.close()
    stats = session.finish()
    stats.extra.update(window=L, init=init, coupling=coupling, acceptance=acceptance.name, pac=pac,
                       whole_step_graph=whole, accepted_cells=from_draft[:, :N].float().mean(0).tolist())
    return canvas[:, :N], stats


def decode_jacobi(model, cond, sampling: SamplingConfig = SamplingConfig(), seeds: Optional[Sequence[int]] = None,
                  cond_mask: Optional[torch.Tensor] = None, window: int = 16, init: str = "left",
                  progress: bool = False, callback=None):
    """Plain Jacobi decoding, the greedy fixed-point iteration SJD generalises (the reference point).

    Every pass replaces each draft in the window by the argmax given the drafts before it
    and commits the prefix that stopped changing. This is SJD at temperature 0: a one-hot
    ``p`` accepts a draft iff it is the argmax, and the "residual" is the argmax itself, so
    the output is exactly greedy AR. ``sampling``'s CFG is kept; its temperature, top-k and
    top-p are replaced by greedy selection.
    """
    greedy = replace(sampling, temperature=0.0, top_k=0, top_p=1.0)
    tokens, stats = decode_sjd(model, cond, greedy, seeds, cond_mask, window=window, init=init, progress=progress,
                               callback=callback)
    stats.method = "jacobi"
    return tokens, stats
