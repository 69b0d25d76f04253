"""SJD-PAC's proactive drafting (Kang et al., CVPR 2026), vargen's lossless version: a shallow K-ary draft tree
at the head of the SJD window, verified in the same pass under a tree mask.

Layout of one verify pass (``M + 1`` inputs, index 0 = the last committed token, the root):
nodes ``1 .. L`` are the SJD window (the main path: node ``j`` sits at depth ``j``), so a pass that stays on
the main path is exactly an SJD pass; nodes ``L+1 ..`` are the extra branches of the tree's first ``T`` levels.
At level ``l`` every parent offers the same ``K`` candidates: the window's draft ``d_l ~ q_l`` first, then
``K - 1`` more tokens drawn from ``q_l`` without replacement (the paper draws its siblings from the cached,
possibly stale distributions; Gumbel top-k on the same ``q``; ``pac_siblings="q"``). Drawn before any coin, with
no extra pass.

Lossless: at each level the walk is recursive rejection sampling without replacement (Yang et al., 2024,
multi-candidate speculative decoding). Candidate ``k`` is a draw from ``q_l^k`` = ``q_l`` with candidates
``0 .. k-1`` removed and renormalised, judged by speculative sampling against the current target
(``u q_l^k(s) < p(s)``, else ``p := norm(max(p - q_l^k, 0))``). Speculative sampling outputs its target
exactly for any proposal drawn independently of its coin, and the residual after a rejection does not
depend on which token was rejected, so each stage outputs the previous stage's residual exactly and the
committed token at every level is distributed as the verifier's ``p`` given the accepted path. ``d_l`` and
its siblings are exact ``q_l`` draws whatever the parent, because a level's candidates are the same for
every parent.

Left candidates (``pac_siblings="left"``, vargen's addition, the default): a node's candidate 1 is its parent's
own token, the cell before it, tried as a one-hot draft right after the window draft; the other siblings are
``q_l`` draws with the draft and every level-``l-1`` token removed. Why: the head of the window was drafted
from a context whose last cell has just been resampled, and on images the next cell often repeats the cell
before it (flat regions, runs along a row), which the stale ``q`` cannot know: on scenes-t2i's level-1
distributions the fresh ``p`` gives the previous token 0.27 of its mass on average, the stale ``q`` 0.10; at the
default K = 3, two levels, the passes that commit a single token fell from 50% to 35% (docs/lossless.md).
Lossless: the token is fixed before the pass, so its test (accept with what is left of ``p`` at it, else drop it
from ``p``) is speculative sampling with a one-hot proposal; the later siblings are draws from the reduced ``q_l``,
judged against that same reduced ``q_l``; each stage is exact for a proposal drawn independently of its coin, as
above.

Chains (``C > 0``, vargen's addition): every off-main leaf at depth ``T`` goes on with the window's next ``C``
drafts ``d_{T+1} .. d_{T+C}`` as candidate 0, so a path that left the main chain at the head (a sibling accepted
where the window draft was rejected, the common case after a rejection: the window's head was drafted from a
context that has just changed) can still accept a run of drafts in the same pass instead of stopping at a bonus
token. Lossless for the same reason as the window: ``d_l`` is a ``q_l`` draw made before the pass, independent of
which branch the walk takes above it, and judged with its own coin by speculative sampling against the ``p`` of
whichever node the walk reached (one path is walked, so each coin is used once).
"""
from __future__ import annotations

from functools import lru_cache

import torch

from .sampling import sample_categorical


@lru_cache(maxsize=None)
def pac_layout(L: int, K: int, T: int, C: int = 0) -> tuple:
    """``(parents [M], depth [M], candidate [M], children [M+1, K])`` of the window plus tree plus chains of ``C``
    drafts under the tree's off-main leaves (module docstring):
    node ``i + 1``'s parent is ``parents[i]`` (0 = root), its depth ``depth[i]``, and its token is candidate
    ``candidate[i]`` of its level (0 = the window draft); ``children[v, k]`` is node ``v``'s ``k``-th candidate
    (``-1`` past the tree)."""
    parents, depth, cand = list(range(L)), list(range(1, L + 1)), [0] * L
    children = {(j, 0): j + 1 for j in range(L)}
    level_nodes = [0]
    for level in range(1, T + 1):
        nxt = []
        for parent in level_nodes:
            for k in range(K):
                if (parent, k) not in children:
                    parents.append(parent)
                    depth.append(level)
                    cand.append(k)
                    children[(parent, k)] = len(parents)
                nxt.append(children[(parent, k)])
        level_nodes = nxt
    for leaf in level_nodes:  # every off-main leaf goes on with the window's next C drafts (a chain)
        v = leaf
        for level in range(T + 1, T + 1 + C if leaf != T else T + 1):
            parents.append(v)
            depth.append(level)
            cand.append(0)
            children[(v, 0)] = v = len(parents)
    M = len(parents)
    table = torch.full((M + 1, K), -1, dtype=torch.long)
    for (v, k), c in children.items():
        if k < K:
            table[v, k] = c
    return torch.tensor(parents), torch.tensor(depth), torch.tensor(cand), table


@lru_cache(maxsize=None)
def pac_ancestors(L: int, K: int, T: int, C: int = 0) -> torch.Tensor:
    """``[M+1, M+1]`` bool, the tree mask of :func:`pac_layout` (:func:`vargen.decoding.eagle.tree_ancestors`): the
    layout is fixed, so it is built once, not in every pass (its loop was 180 of a pass's ~1050 aten ops)."""
    from .eagle import tree_ancestors

    parents = pac_layout(L, K, T, C)[0]
    return tree_ancestors((parents - 1)[None], L)[0]


def sibling_drafts(q: torch.Tensor, k: int, noise: torch.Tensor) -> torch.Tensor:
    """``[B, k]`` tokens drawn from ``q`` (``[B, V]``) without replacement, by Gumbel top-k (``log q - log E``,
    ``E ~ Exp(1)`` ``noise``). A sibling past ``q``'s support (``q = 0``) is never tried
    (:func:`vargen.decoding.eagle.walk_tree`)."""
    score = torch.where(q > 0, q.clamp_min(1e-38).log() - noise.log(), float("-inf"))
    return score.topk(k, dim=-1).indices


def tree_tokens(last: torch.Tensor, drafts: torch.Tensor, q: torch.Tensor, layout: tuple, K: int, T: int,
                left: bool, noise: torch.Tensor) -> tuple:
    """The tokens of the window plus tree (module docstring) and what the walk needs to judge them.

    Candidate 0 at every node is the window draft at its depth; with ``left``, candidate 1 is the node's parent's
    own token (the cell before it); the rest are ``q_l`` draws without replacement, none of them the draft or
    any parent's token. Returns ``(tokens [B, M+1]`` (0 = ``last``), ``fresh [B, M+1]`` (False where a left
    candidate repeats the draft), ``q_siblings [B, T, V]`` (the later candidates' distribution per level))."""
    from .acceptance import drop_tokens

    parents, depth, cand = layout[:3]
    B, L = drafts.shape
    fixed = int(left)
    depth_all = torch.cat([depth.new_zeros(1), depth])
    cand_all = torch.cat([cand.new_zeros(1), cand])
    parent_all = torch.cat([parents.new_zeros(1), parents])
    tok = torch.cat([last[:, None], drafts[:, (depth - 1).clamp(max=L - 1)]], 1)
    fresh = torch.ones_like(tok, dtype=torch.bool)
    q_sib = []
    for level in range(1, T + 1):
        at, d_l = depth_all == level, drafts[:, level - 1]
        excluded = d_l[:, None]
        if left:
            # the previous level's tokens are every node's left candidate here: the siblings avoid all of them
            excluded = torch.where(depth_all == level - 1, tok, excluded)
            is_left = at & (cand_all == 1)
            par_tok = tok.gather(1, parent_all.expand(B, -1))
            tok = torch.where(is_left, par_tok, tok)
            fresh &= ~(is_left & (par_tok == d_l[:, None]))
        q_l = drop_tokens(q[:, level - 1], excluded)
        if K - 1 - fixed > 0:
            sib = sibling_drafts(q_l, K - 1 - fixed, noise[:, level - 1])
            tok = torch.where(at & (cand_all > fixed), sib[:, (cand_all - fixed - 1).clamp(min=0, max=K - 2 - fixed)],
                              tok)
        q_sib.append(q_l)
    return tok, fresh, (torch.stack(q_sib, 1) if q_sib else q[:, :0])


def tree_draws(generators, L: int, K: int, T: int, V: int, device, C: int = 0) -> dict:
    """A PAC verify pass's random draws, in the order the pass uses them: the siblings' Exp(1) noise
    ``[B, T, V]``, the window's coins ``[B, L]``, the walked levels' coins ``[B, max(T + C, 1), K]``, the final draw's
    noise ``[B, V]``."""
    from .sampling import exponential_noise, uniform_noise

    return {"siblings": exponential_noise((T, V), generators, device), "coins": uniform_noise((L,), generators, device),
            "sib_coins": uniform_noise((max(T + C, 1), K), generators, device),
            "noise": exponential_noise((V,), generators, device)}


def verify_with_tree(model, sampling, cache, prefix_len: int, acceptance, layout: tuple, last, n, drafts, q, active,
                     K: int, T: int, N: int, draws: dict, C: int = 0, left: bool = True):
    """One SJD-PAC verify pass: the window plus its tree in one tree-masked forward, the walk, and the accepted
    path's keys and values moved to contiguous slots. ``layout`` is :func:`pac_layout` plus :func:`pac_ancestors`
    on the device, ``draws`` :func:`tree_draws`.

    Returns ``(probs [B, L+1, V] along the window, accepted [B], final [B], path_tokens [B, L], non-finite
    logits)``; the window drafts' coins past the accepted path are unused, free for continuation.
    """
    from .eagle import walk_tree
    from .session import cfg_rows, target_pass

    B, L, V = q.shape
    dev = q.device
    parents, depth, cand, children, ancestors = layout
    M = parents.shape[0]
    tok, fresh, q_siblings = tree_tokens(last, drafts, q, layout, K, T, left, draws["siblings"])
    depth_all = torch.cat([depth.new_zeros(1), depth])
    pos = (n - 1)[:, None] + depth_all
    vslots = (n - 1)[:, None] + torch.arange(M + 1, device=dev)
    mask = cache.visible[:B, None, :].expand(-1, M + 1, -1).clone()
    mask.scatter_(2, (prefix_len + vslots)[:, None, :].expand(-1, M + 1, -1), ancestors.expand(B, -1, -1))
    probs, bad = target_pass(model, sampling, cache, prefix_len, tok, pos.clamp(max=N - 1), vslots, mask)
    valid = (pos < N) & active[:, None] & fresh
    coins, sib_coins, noise = draws["coins"], draws["sib_coins"], draws["noise"]
    rows = torch.arange(B, device=dev)
    # the tree's first T levels (the window draft first, by speculative sampling, then the fixed siblings), then
    # the C chain levels (one candidate each)
    W = T + C  # levels walked as a tree: the K-ary head and the chains under its off-main leaves
    cur, path, acc_tree, stopped, final_tree = walk_tree(acceptance, probs, tok, children, valid, sib_coins[:, :W],
                                                         noise, active, first=(q, drafts, coins),
                                                         widths=[K] * T + [1] * C, fixed=int(left),
                                                         q_siblings=q_siblings)
    # past the tree: the main path goes on as an SJD window; an off-main leaf draws its bonus from its own row
    window = probs[:, :L + 1]
    r, x = acceptance.verify_window(window[:, W:], q[:, W:], drafts[:, W:], coins[:, W:], valid[:, W + 1:L + 1],
                                    noise)
    on_main = ~stopped & (cur == W)
    bonus = sample_categorical(acceptance.target(probs[rows, cur]), noise=noise)
    accepted = torch.where(on_main, W + r, acc_tree)
    final = torch.where(on_main, x, torch.where(stopped, final_tree, bonus))
    path_nodes = torch.cat([path, torch.arange(W + 1, L + 1, device=dev).expand(B, -1)], 1)  # [B, L]
    steps = torch.arange(L, device=dev)
    keep = (steps[None] < accepted[:, None]) & active[:, None]
    src = torch.where(keep, prefix_len + (n - 1)[:, None] + path_nodes, prefix_len + n[:, None] + steps)
    cache.copy_slots(cfg_rows(src, sampling), cfg_rows(prefix_len + n[:, None] + steps, sampling))
    return window, accepted, final, tok.gather(1, path_nodes), bad
