"""EAGLE tree decoding with a one-layer drafter (EAGLE-1/2), exact or with LANTERN relaxed acceptance.

Needs an :class:`vargen.models.eagle.EagleDrafter` trained for the target GPT (``vargen train eagle``).
Per sample, the state is the committed tokens ``x_0 .. x_{n-1}``; the newest, ``c = x_{n-1}``, has no
target KV yet (as in SJD), and the target features ``f_{-1} .. f_{n-2}`` are known (``f_{-1}`` is the
last condition position's). One iteration = one target forward:

1. **Drafter catch-up** (1 drafter pass): the pairs ``(x_j, f_{j-1})`` of the tokens committed since
   the last iteration (``j = m .. n-1``, padded to ``depth + 1`` per batch) go into the drafter's own
   cache with the *true* target features (EAGLE re-feeds accepted tokens; the draft tree's drafter KV is
   dropped by a pointer rollback). The last pair's output ``f^_{n-1}`` gives ``q`` of cell ``n``.
2. **Draft tree** (``depth - 1`` drafter passes): a node ``x`` at depth ``d`` (cell ``n - 1 + d``) is the
   pair ``(x, f^_parent)`` at its cell's RoPE position, written at drafter slot ``prefix + n + index``
   and attending to the committed context and its ancestors (tree mask).
   - ``tree="dynamic"`` (EAGLE-2): every expanded node proposes its top-``topk`` tokens; the value of a
     node is the product of draft probabilities along its path; at each depth the ``topk`` best new
     nodes are expanded; finally the ``total_tokens`` best nodes of all depths are kept (stable sort:
     a child never beats its parent, so the kept set is a tree).
   - static trees (LANTERN++ / Medusa style): ``"chain"`` (top-1 ``depth`` times) or a named list of
     paths (:data:`STATIC_TREES`), the ``r``-th ranked token at every node regardless of confidence.
3. **Verify** (1 target pass): ``[c, node_1 .. node_M]`` at their cells' positions, written at target
   slots ``n - 1 .. n - 1 + M`` (``c`` at its final slot), with the tree mask: every node sees the
   committed context and its ancestors (and itself).
4. **Acceptance walk** (drafts are deterministic top-k, so ``q`` is taken as 1; LANTERN's dynamic-tree
   residual): at node ``u`` with target ``p = p_u``, try its children in draft-rank order: accept ``x``
   with probability ``min(1, p~(x))``, ``p~(x) = p(x) + S_m`` (LANTERN pooling of ``x``'s latent
   neighbours, ``S_m <= delta``; ``S_m = 0`` for exact acceptance); on a reject set ``p`` to zero at
   ``x`` (and at the pooled neighbours), renormalise and try the next sibling. An accepted child becomes
   ``u``; if every child is rejected (or ``u`` is a leaf: the bonus token) the next token is sampled
   from what remains of ``p`` and the walk stops. With exact acceptance this is sampling without
   replacement against ``p``, so each committed token is exactly distributed as the target's ``p``
   (lossless; tested against the enumerated AR distribution).
5. **Commit and compact**: the accepted nodes and the final token are committed (``1 + accepted`` tokens
   per target pass). The accepted nodes' target KV entries are **copied** (every layer, both CFG halves)
   from their tree slots to the contiguous slots ``n .. n + a - 1`` (their KV saw exactly the accepted
   path, so the copy equals a sequential forward); then a pointer rollback to ``n + a`` keeps them and
   drops the rest. Their target features feed the next catch-up.

CFG: target and drafter both run on the ``[cond; uncond]`` rows (the drafter on each half's features);
draft distributions go through the same CFG / temperature / top-k / top-p pipeline as ``p``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm

from ..models.eagle import TRAIN_HINT, EagleDrafter, load_eagle
from .acceptance import ExactAcceptance, drop_tokens, gather_prob
from .sampling import SamplingConfig, exponential_noise, logits_to_probs, sample_categorical, uniform_noise
from .session import DecodeSession
from .speculative import commit_accepted
from .trained import resolve_trained

# static draft trees as lists of paths (tuples of sibling ranks): Medusa's mc_sim_7b_63, first 25 paths
STATIC_TREES = {
    "mc_sim_25": [(0,), (0, 0), (1,), (0, 1), (2,), (0, 0, 0), (1, 0), (0, 2), (3,), (0, 3), (4,), (0, 4),
                  (2, 0), (0, 5), (0, 0, 1), (5,), (0, 6), (6,), (0, 7), (0, 1, 0), (1, 1), (7,), (0, 8),
                  (0, 0, 2), (3, 0)],
}
TREES = ("dynamic", "chain", *STATIC_TREES)
DEFAULTS = {"dynamic": dict(depth=5, topk=8, total_tokens=48), "chain": dict(depth=5)}
# On a CPU a verify pass is compute-bound (every node is a row of every matmul) and each drafter pass costs
# its launch overhead, so the dynamic tree is smaller: scenes-t2i at batch 1 in bf16 (n = 4, one run) kept
# about the same passes per image (120 against 116) at 27 instead of 45 ms per pass.
CPU_DYNAMIC = dict(depth=4, topk=4, total_tokens=16)


def resolve_eagle(model, weights=None) -> EagleDrafter:
    """The drafter for target ``model``: ``weights`` (a drafter or its folder; default ``<model folder>/eagle``),
    checked against the target (:meth:`EagleDrafter.check_matches`) and moved to its device and dtype."""
    return resolve_trained(model, weights, EagleDrafter, "EAGLE drafter", "eagle", "an EAGLE drafter", load_eagle,
                           TRAIN_HINT)


# ----------------------------------------------------------------------------- trees
def check_paths(paths: Sequence[Sequence[int]]) -> None:
    """Raise ``ValueError`` unless ``paths`` is a tree: unique non-empty paths, every path's parent present,
    sibling ranks ``0 .. k-1`` without gaps."""
    seen = set()
    for path in paths:
        path = tuple(path)
        if not path or any(r < 0 for r in path):
            raise ValueError(f"tree path {path} must be a non-empty tuple of ranks >= 0")
        if path in seen:
            raise ValueError(f"tree path {path} is listed twice")
        seen.add(path)
    for path in seen:
        if len(path) > 1 and path[:-1] not in seen:
            raise ValueError(f"tree path {path} has no parent {path[:-1]} in the tree")
        if path[-1] > 0 and path[:-1] + (path[-1] - 1,) not in seen:
            raise ValueError(f"tree path {path}: sibling rank {path[-1] - 1} is missing")


def static_tree(tree: str, depth: Optional[int] = None, vocab_size: Optional[int] = None) -> tuple:
    """``(parents, ranks, depths)`` lists of a static tree in breadth-first order (parents before children,
    siblings by rank); node ``i``'s parent is a node index or ``-1`` (the last committed token). Paths that
    rank beyond ``vocab_size`` tokens are pruned."""
    if tree == "chain":
        paths = [(0,) * d for d in range(1, (depth or DEFAULTS["chain"]["depth"]) + 1)]
    elif tree in STATIC_TREES:
        paths = [tuple(p) for p in STATIC_TREES[tree]]
    else:
        raise ValueError(f"unknown draft tree {tree!r}; choose from {', '.join(TREES)}")
    check_paths(paths)
    if vocab_size is not None:
        paths = [p for p in paths if max(p) < vocab_size]
    paths = sorted(paths, key=lambda p: (len(p), p))
    index = {p: i for i, p in enumerate(paths)}
    return ([index[p[:-1]] if len(p) > 1 else -1 for p in paths], [p[-1] for p in paths], [len(p) for p in paths])


def tree_ancestors(parents: torch.Tensor, depth: int) -> torch.Tensor:
    """``[B, M+1, M+1]`` bool, ``[b, i, j]`` = node ``j`` is node ``i`` or one of its ancestors; index 0 is the
    root (the last committed token, an ancestor of every node), node ``i >= 1`` has parent ``parents[b, i-1]``
    (``-1`` = root)."""
    B, M = parents.shape
    dev = parents.device
    par = torch.cat([torch.full((B, 1), -1, device=dev, dtype=torch.long), parents + 1], 1)  # root = 0
    anc = torch.eye(M + 1, dtype=torch.bool, device=dev).expand(B, -1, -1).clone()
    rows = torch.arange(M + 1, device=dev).expand(B, -1)
    cur = par
    for _ in range(depth):
        has = cur >= 0
        anc[torch.arange(B, device=dev)[:, None], rows, cur.clamp(min=0)] |= has
        cur = torch.where(has, par.gather(1, cur.clamp(min=0)), cur)
    return anc


def tree_children(parents: torch.Tensor, width: int) -> torch.Tensor:
    """``[B, M+1, width]`` long: the children (node indices ``1..M``; root = 0) of every node in list order
    (= draft-rank order), ``-1`` where there are fewer."""
    B, M = parents.shape
    dev = parents.device
    same = parents[:, :, None] == parents[:, None, :]  # [B, M, M]
    order = (same & torch.ones(M, M, dtype=torch.bool, device=dev).tril(-1)).sum(-1)  # earlier siblings
    out = torch.full((B, (M + 1) * (width + 1)), -1, dtype=torch.long, device=dev)
    nodes = torch.arange(1, M + 1, device=dev).expand(B, -1)
    out.scatter_(1, (parents + 1) * (width + 1) + order.clamp(max=width), nodes)
    return out.view(B, M + 1, width + 1)[:, :, :width]


# ----------------------------------------------------------------------------- acceptance walk
def walk_tree(acceptance, probs: torch.Tensor, tokens: torch.Tensor, children: torch.Tensor, valid: torch.Tensor,
              coins: torch.Tensor, noise: torch.Tensor, active: torch.Tensor, first=None, widths=None,
              fixed: int = 0, q_siblings: Optional[torch.Tensor] = None) -> tuple:
    """Accept a path down the verified tree (module docstring, step 4), vectorised over the batch: at each level
    the children of the current node are tried in rank order, each a token fixed before its coin (a one-hot
    proposal, :meth:`~vargen.decoding.acceptance.ExactAcceptance.verify_token`; a rejected one is dropped from
    ``p``), until one is accepted; if none is, the final token is drawn from what is left of ``p``.

    Args:
        probs: ``[B, M+1, V]`` target distributions at the root (0) and every node.
        tokens: ``[B, M+1]`` node tokens (entry 0 unused); children ``[B, M+1, K]`` (:func:`tree_children`) or
            ``[M+1, K]`` shared by the batch.
        valid: ``[B, M+1]`` nodes inside the grid; coins ``[B, levels, K]`` U(0, 1); noise ``[B, V]`` Exp(1).
        first: ``(q [B, >=levels, V], drafts, coins [B, >=levels])`` when a level's candidates are draws from
            ``q[:, l]`` without replacement, the sampled draft ``drafts[:, l]`` first (SJD-PAC's tree): candidate
            ``r`` is judged by speculative sampling (:meth:`accept`, :meth:`resample`) against ``q[:, l]`` with
            candidates ``0 .. r-1`` removed, the draft with its own coin (recursive rejection without replacement).
        widths: with ``first``, the most candidates any node has at each level (default ``K`` everywhere), so
            levels with one candidate (SJD-PAC's chains) cost one try, not ``K``.
        fixed: with ``first``, candidates ``1 .. fixed`` after the draft are tokens fixed before the pass, each
            tried as a one-hot draft (:meth:`verify_token`: accepted with what is left of ``p`` at it, else dropped).
        q_siblings: with ``first``, ``[B, >=levels, V]``: the distribution the later candidates are drawn from
            (without replacement) at each level, in place of ``q[:, l]`` without the draft.

    Returns:
        ``(cur [B] node reached, path [B, levels] accepted node per level, accepted [B] path length, stopped [B]
        every candidate was rejected at the level after the path, final [B] token drawn there)``.
    """
    B, levels, K = coins.shape
    if children.dim() == 2:
        children = children.expand(B, -1, -1)
    dev = probs.device
    rows = torch.arange(B, device=dev)
    cur = torch.zeros(B, dtype=torch.long, device=dev)
    alive, stopped = active.clone(), torch.zeros_like(active)
    accepted = torch.zeros(B, dtype=torch.long, device=dev)
    path = torch.zeros(B, levels, dtype=torch.long, device=dev)
    final = torch.zeros(B, dtype=torch.long, device=dev)
    for level in range(levels):
        p = probs[rows, cur]
        kids = children[rows, cur]  # [B, K]
        has = (kids >= 0) & alive[:, None]
        has &= valid.gather(1, kids.clamp(min=0))
        if first is None:  # one-hot drafts: the acceptance rule's sibling tries
            ok, p = acceptance.try_siblings(p, tokens.gather(1, kids.clamp(min=0)), has, coins[:, level])
            moved = ok.any(1)
            nxt = torch.where(moved, kids.gather(1, ok.long().argmax(1, keepdim=True))[:, 0], cur)
        else:
            moved = torch.zeros(B, dtype=torch.bool, device=dev)
            nxt = cur
            q_r = first[0][:, level]
            width = K if widths is None else widths[level]
            for r in range(width):
                child = kids[:, r]
                has_r = has[:, r] & ~moved
                tok_r = tokens[rows, child.clamp(min=0)]
                coin = first[2][:, level] if r == 0 else coins[:, level, r]
                if 1 <= r <= fixed:  # a token fixed before the pass: a one-hot draft
                    passed, p_rejected = acceptance.verify_token(p, tok_r, coin)
                else:  # candidate r ~ q_l without the candidates before it: speculative sampling
                    if r == fixed + 1 and q_siblings is not None:
                        q_r = q_siblings[:, level]
                    has_r &= gather_prob(q_r, tok_r) > 0
                    passed = acceptance.accept(p, q_r, tok_r, coin)
                    p_rejected = acceptance.resample(p, q_r)
                    # the next q-drawn candidate reads q_r without this one, unless q_siblings replaces it first
                    if width - 1 > max(r, fixed) and (q_siblings is None or r > fixed):
                        q_r = drop_tokens(q_r, tok_r[:, None])
                ok = has_r & passed
                moved |= ok
                nxt = torch.where(ok, child, nxt)
                p = torch.where((has_r & ~ok)[:, None], p_rejected, p)  # the next sibling is judged against the rest
        stop = alive & ~moved
        final = torch.where(stop, sample_categorical(p, noise=noise), final)
        stopped |= stop
        path[:, level] = torch.where(moved, nxt, path[:, level])
        accepted += moved.long()
        alive &= moved
        cur = nxt
    return cur, path, accepted, stopped, final


# ----------------------------------------------------------------------------- decoding
def _topk(q: torch.Tensor, k: int) -> tuple:
    """Top-``k`` (values, ids) of ``q`` along the vocabulary, sorted, ties by lower id."""
    return q.topk(min(k, q.shape[-1]), dim=-1, sorted=True)


@torch.no_grad()
def decode_eagle(model, cond, sampling: SamplingConfig = SamplingConfig(), seeds: Optional[Sequence[int]] = None,
                 cond_mask: Optional[torch.Tensor] = None, weights=None, tree: str = "dynamic",
                 depth: Optional[int] = None, topk: Optional[int] = None, total_tokens: Optional[int] = None,
                 acceptance=None, progress: bool = False, callback=None):
    """Generate with EAGLE draft trees verified by the target in one forward each (module docstring).

    Args:
        model: the target LlamaGen GPT (a :class:`~vargen.models.compiled.CompiledModel` runs it eagerly here).
        cond, sampling, seeds, cond_mask: as :func:`vargen.decoding.decode_ar`.
        weights: an :class:`EagleDrafter` or its folder (default ``<model folder>/eagle``).
        tree: ``"dynamic"`` (EAGLE-2), ``"chain"`` or a name in :data:`STATIC_TREES`.
        depth: draft tokens along the longest path (dynamic default 5, 4 on a CPU; chain default 5; fixed by
            the topology for the other static trees).
        topk: dynamic: children per expanded node and nodes expanded per depth (default 8, 4 on a CPU).
        total_tokens: dynamic: nodes kept for verification (default 48, 16 on a CPU: :data:`CPU_DYNAMIC`).
        acceptance: :class:`ExactAcceptance` (default, lossless) or :class:`LanternAcceptance`.
        progress, callback: tqdm bar; ``callback(step, tokens [B, N], committed [B])`` after each pass.

    Returns:
        ``(tokens [B, N], DecodeStats)``; ``stats.extra`` has ``step_compression`` (``N`` / mean target passes,
        the prefill included), ``drafter_passes``, ``mean_accepted`` (tokens committed per verify pass) and
        ``mean_accepted_drafts`` (draft tokens accepted per verify pass).
    """
    from ..models.compiled import CompiledModel

    target = model.model if isinstance(model, CompiledModel) else model
    acceptance = acceptance or ExactAcceptance()
    if not acceptance.fused:
        raise ValueError(f"EAGLE tree decoding takes rules that judge a draft by p(x) plus extra mass (exact, "
                         f"LANTERN), not {type(acceptance).__name__}")
    cpu = next(target.parameters()).device.type == "cpu"
    shape = TreeShape.make(tree, depth, topk, total_tokens, target.vocab_size, cpu=cpu)
    run = _EagleRun(target, resolve_eagle(target, weights), cond, sampling, seeds, cond_mask, shape, acceptance)
    N, B = target.num_tokens, run.B
    accepted_log, step = [], 0
    bar = tqdm(total=N, disable=not progress, desc=run.name, leave=False)
    while True:
        active = run.n < N
        if not bool(active.any()):  # one host sync per target pass
            break
        root_feat, q_root = run.catch_up()  # 1. the drafter sees the newly committed tokens
        node_tok, parents, node_depth = run.build_tree(root_feat, q_root)  # 2. the draft tree
        inputs, probs, hid, path, acc, final = run.verify(node_tok, parents, node_depth, active)  # 3-4.
        run.commit(inputs, hid, path, acc, final, active)  # 5. accepted nodes, the final token, features, KV
        accepted_log.append(torch.where(active, acc, -1))
        if callback is not None:
            callback(step, run.canvas[:, :N], run.n)
        step += 1
        if progress:
            bar.n = int(run.n.min())
            bar.refresh()
    bar.close()
    stats = run.session.finish()
    alog = torch.stack(accepted_log) if accepted_log else torch.zeros(0, B, dtype=torch.long)
    verify = alog[alog >= 0]  # accepted drafts per verify pass; the pass also commits one token of its own
    stats.extra.update(
        tree=tree, depth=shape.D, tree_tokens=shape.M, topk=shape.K if shape.dynamic else None,
        acceptance=acceptance.name, drafter_passes=run.drafter_passes,
        # every sample commits N - 1 tokens in its verify passes (a pass that accepts up to the last cell has no
        # token of its own, so accepted drafts + 1 would overcount there)
        mean_accepted=B * (N - 1) / len(verify) if len(verify) else 0.0,
        mean_accepted_drafts=float(verify.float().mean()) if len(verify) else 0.0,
        accepted_cells=run.from_draft[:, :N].float().mean(0).tolist())
    return run.canvas[:, :N], stats


@dataclass
class TreeShape:
    """The draft tree's shape: ``M`` nodes verified, depth ``D``, ``K`` children per node at most; ``pool``
    nodes a dynamic tree can propose; a static tree's parent / rank / depth lists."""

    dynamic: bool
    M: int
    D: int
    K: int
    pool: int
    static: Optional[tuple] = None

    @classmethod
    def make(cls, tree: str, depth, topk, total_tokens, vocab_size: int, cpu: bool = False) -> "TreeShape":
        if tree == "dynamic":
            default = CPU_DYNAMIC if cpu else DEFAULTS["dynamic"]
            D = depth or default["depth"]
            k = min(topk or default["topk"], vocab_size)
            pool = k + (D - 1) * k * k  # every node a dynamic tree can propose
            M = min(total_tokens or default["total_tokens"], pool)
            if D < 1 or k < 1 or M < 1:
                raise ValueError(f"dynamic tree needs depth, topk, total_tokens >= 1, got {D}, {k}, {M}")
            return cls(True, M, D, k, pool)
        if tree != "chain" and depth is not None:
            raise ValueError(f"tree {tree!r} fixes its depth; depth is for 'dynamic' and 'chain'")
        if topk is not None or total_tokens is not None:
            raise ValueError("topk and total_tokens are for tree='dynamic'")
        s_par, s_rank, s_depth = static_tree(tree, depth, vocab_size)
        return cls(False, len(s_par), max(s_depth), max(s_rank) + 1, len(s_par), (s_par, s_rank, s_depth))


class _EagleRun:
    """One batch of EAGLE decoding: the target session, the drafter and its cache, the canvas and the features.

    ``n`` counts each sample's committed tokens; ``m`` those whose ``(token, feature)`` pair is in the drafter's
    cache; ``feats[:, j + 1]`` is the target's feature of cell ``j`` (``feats[:, 0]``: of the last prefix token).
    """

    def __init__(self, target, drafter, cond, sampling, seeds, cond_mask, shape: TreeShape, acceptance):
        N, V = target.num_tokens, target.vocab_size
        self.target, self.drafter, self.shape, self.acceptance = target, drafter, shape, acceptance
        self.name = "eagle" + ("" if acceptance.name == "exact" else f"+{acceptance.name}")
        self.session = session = DecodeSession(target, cond, sampling, seeds, cond_mask, method=self.name,
                                               max_len=target.prefix_len + N + shape.M + 1)
        self.B, self.dev, self.gens, self.P = session.batch, session.device, session.generators, session.prefix_len
        self.R = session.prefix.shape[0]  # rows: B, or 2B with CFG
        self.dbl, self.dim, self.N, self.V = session._double, target.config.dim, N, V
        B, dev, P, D = self.B, self.dev, self.P, shape.D
        self.dcache = drafter.new_cache(self.R, P + N + shape.pool + D + 2)
        # prefill: target over the condition, then the drafter over (condition embedding i, feature i-1)
        first, hidden = session.prefill(return_hidden=True)
        self.canvas = torch.zeros(B, N + D + 2, dtype=torch.long, device=dev)
        self.canvas[:, 0] = sample_categorical(first, self.gens)
        self.feats = torch.zeros(self.R, N + D + 2, self.dim, dtype=hidden.dtype, device=dev)
        self.feats[:, 0] = hidden[:, -1]
        pslots = torch.arange(P, device=dev).expand(self.R, P)
        prev = torch.cat([torch.zeros_like(hidden[:, :1]), hidden[:, :-1]], 1)
        drafter(target, prev, embeds=session.prefix, positions=torch.full_like(pslots, -1), slots=pslots,
                mask=session.prefix_mask(self.dcache.max_len), cache=self.dcache)
        self.dcache.visible[:, :P] = session.cache.visible[:, :P]  # caption pads stay hidden
        self.dcache.length.fill_(P)
        self.drafter_passes = 1
        self.n = torch.ones(B, dtype=torch.long, device=dev)
        session.advance(self.n)
        self.m = torch.zeros(B, dtype=torch.long, device=dev)
        self.from_draft = torch.zeros(B, N + D + 2, dtype=torch.bool, device=dev)
        self.catch = torch.arange(D + 1, device=dev)
        if not shape.dynamic:
            s_par, s_rank, s_depth = shape.static
            self.s_par = torch.tensor(s_par, device=dev).expand(B, -1)
            self.s_depth = torch.tensor(s_depth, device=dev)
            self.s_rank = torch.tensor(s_rank, device=dev)
            self.s_anc = tree_ancestors(self.s_par[:1], D)[:, 1:, 1:]  # [1, M, M] among the nodes

    def _draft_probs(self, logits):
        return logits_to_probs(logits, self.session.sampling, check_finite=False)

    # ---- 1. drafter catch-up: pairs j = m .. n-1 with true features, padded to D + 1 entries
    def catch_up(self):
        """Feed the newly committed ``(token, feature)`` pairs; returns the root's drafted feature ``[R, dim]``
        and the drafter's distribution after the last committed token ``[B, V]``."""
        n, m, P, dim, V, dbl = self.n, self.m, self.P, self.dim, self.V, self.dbl
        cnt = (n - m).clamp(min=1)  # finished samples re-feed one harmless pair
        j = (m[:, None] + self.catch).clamp(max=self.N - 1)
        real = self.catch[None] < cnt[:, None]
        slots = torch.where(real, P + j, P + n[:, None] + self.catch - cnt[:, None])
        logits, f = self.drafter(self.target, self.feats.gather(1, dbl(j)[..., None].expand(-1, -1, dim)),
                                 tokens=dbl(self.canvas.gather(1, j)), positions=dbl(j), slots=dbl(slots),
                                 cache=self.dcache)
        self.drafter_passes += 1
        last = dbl(cnt - 1)[:, None]
        root_feat = f.gather(1, last[..., None].expand(-1, -1, dim))[:, 0]  # f^_{n-1}: [R, dim]
        q_root = self._draft_probs(logits.gather(1, last[..., None].expand(-1, -1, V))[:, 0])  # [B, V]
        self.m = n.clone()
        self.dcache.rollback(dbl(P + self.m))
        self.base = self.dcache.visible[:, None, :].clone()  # committed drafter context, [R, 1, L]
        return root_feat, q_root

    def _expand(self, nodes, node_tokens, parent_feat, node_depth, anc_slots):
        """Drafter pass over ``nodes`` (slot offsets [B, E]) -> (q [B, E, V], features [R, E, dim])."""
        n, P, dbl, dcache = self.n, self.P, self.dbl, self.dcache
        pos = (n[:, None] - 1 + node_depth).clamp(max=self.N - 1)
        mask = self.base.expand(-1, nodes.shape[1], -1).clone()
        # non-ancestors point at the last slot, which is never written (so always False)
        idx = torch.where(anc_slots >= 0, P + n[:, None, None] + anc_slots, dcache.max_len - 1)
        mask.scatter_(2, dbl(idx), dbl(anc_slots >= 0))
        lg, ft = self.drafter(self.target, parent_feat, tokens=dbl(node_tokens), positions=dbl(pos),
                              slots=dbl(P + n[:, None] + nodes), mask=mask, cache=dcache)
        self.drafter_passes += 1
        return self._draft_probs(lg), ft

    # ---- 2. the draft tree
    def build_tree(self, root_feat, q_root):
        """``(node tokens [B, M], parents [B, M] (-1: the root), depths [B, M])``; the tree's drafter KV is
        dropped afterwards (accepted tokens are re-fed by the next catch-up)."""
        out = self._dynamic_tree(root_feat, q_root) if self.shape.dynamic else self._static_tree(root_feat, q_root)
        self.dcache.rollback(self.dbl(self.P + self.m))
        return out

    def _dynamic_tree(self, root_feat, q_root):
        """EAGLE-2: expand the ``k`` best-scoring nodes per depth, keep the ``M`` best of all (parents first)."""
        B, dev, dbl, dim = self.B, self.dev, self.dbl, self.dim
        D, k, M = self.shape.D, self.shape.K, self.shape.M
        val, tok = _topk(q_root, k)  # depth 1: k nodes, pool indices 0..k-1
        p_tok, p_par, p_score = [tok], [torch.full_like(tok, -1)], [val]
        anc = torch.eye(k, dtype=torch.bool, device=dev).expand(B, -1, -1)  # [B, k, pool so far]
        frontier = torch.arange(k, device=dev).expand(B, -1)
        frontier_feat_parent = root_feat[:, None].expand(-1, k, -1)
        frontier_tok, frontier_score, offset = tok, val, k
        for d in range(1, D):
            anc_slots = torch.where(anc, torch.arange(anc.shape[-1], device=dev), -1)
            q, ft = self._expand(frontier, frontier_tok, frontier_feat_parent, torch.full_like(frontier, d), anc_slots)
            val, tok = _topk(q, k)  # [B, k, k]
            score = (frontier_score[..., None] * val).flatten(1)  # [B, k*k]
            ids = offset + torch.arange(k * k, device=dev).expand(B, -1)
            p_tok.append(tok.flatten(1))
            p_par.append(frontier.repeat_interleave(k, 1))
            p_score.append(score)
            pick = score.sort(dim=-1, descending=True, stable=True).indices[:, :k]  # next frontier
            new_anc = torch.zeros(B, k, offset + k * k, dtype=torch.bool, device=dev)
            new_anc[:, :, :offset] = anc.gather(1, (pick // k)[..., None].expand(-1, -1, offset))
            new_anc.scatter_(2, ids.gather(1, pick)[..., None], True)
            anc = new_anc
            frontier_feat_parent = ft.gather(1, dbl(pick // k)[..., None].expand(-1, -1, dim))
            frontier, frontier_tok = ids.gather(1, pick), tok.flatten(1).gather(1, pick)
            frontier_score = score.gather(1, pick)
            offset += k * k
        all_tok, all_par, all_score = torch.cat(p_tok, 1), torch.cat(p_par, 1), torch.cat(p_score, 1)
        all_depth = torch.cat([torch.full((k,), 1, device=dev)] +
                              [torch.full((k * k,), d + 1, device=dev) for d in range(1, D)])
        sel = all_score.sort(dim=-1, descending=True, stable=True).indices[:, :M]  # parents before children
        inv = torch.full((B, all_tok.shape[1]), -1, dtype=torch.long, device=dev)
        inv.scatter_(1, sel, torch.arange(M, device=dev).expand(B, -1))
        par_pool = all_par.gather(1, sel)
        parents = torch.where(par_pool >= 0, inv.gather(1, par_pool.clamp(min=0)), -1)
        return all_tok.gather(1, sel), parents, all_depth[sel]

    def _static_tree(self, root_feat, q_root):
        """A fixed topology: node ``i`` at depth ``d`` takes its parent's ``rank``-th most likely token."""
        B, dev, M, D, K = self.B, self.dev, self.shape.M, self.shape.D, self.shape.K
        s_par, s_depth, s_rank = self.s_par, self.s_depth, self.s_rank
        node_tok = torch.zeros(B, M, dtype=torch.long, device=dev)
        node_feat = torch.zeros(self.R, M, self.dim, dtype=root_feat.dtype, device=dev)
        top = _topk(q_root, K)[1]
        lvl = (s_depth == 1).nonzero()[:, 0]
        node_tok[:, lvl] = top[:, s_rank[lvl]]
        for d in range(1, D):
            lvl = (s_depth == d).nonzero()[:, 0]
            kids = (s_depth == d + 1).nonzero()[:, 0]
            if len(kids) == 0:
                continue
            par = s_par[0, lvl]
            pfeat = torch.where((par >= 0)[None, :, None], node_feat[:, par.clamp(min=0)], root_feat[:, None])
            anc_slots = torch.where(self.s_anc[:, lvl], torch.arange(M, device=dev), -1).expand(B, -1, -1)
            q, ft = self._expand(lvl.expand(B, -1), node_tok[:, lvl], pfeat, torch.full_like(lvl, d).expand(B, -1),
                                 anc_slots)
            node_feat[:, lvl] = ft
            top = _topk(q, K)[1]  # [B, |lvl|, K]
            where = (lvl[:, None] == s_par[0, kids][None, :]).int().argmax(0)  # each kid's parent in lvl
            node_tok[:, kids] = top[:, where, s_rank[kids]]
        return node_tok, s_par, s_depth.expand(B, -1)

    # ---- 3-4. one target pass over the whole tree (tree mask), then the acceptance walk
    def verify(self, node_tok, parents, node_depth, active):
        """``(inputs [B, M+1], probs, hidden, path [B, D+1], accepted [B], final [B])``: the target's distributions
        at the last committed token (tree index 0) and every node, and the path the rule accepts."""
        B, dev, n, N, M, D, K, V = self.B, self.dev, self.n, self.N, self.shape.M, self.shape.D, self.shape.K, self.V
        ancestors = tree_ancestors(parents, D)  # [B, M+1, M+1]
        inputs = torch.cat([self.canvas.gather(1, (n - 1)[:, None]), node_tok], 1)
        depth_all = torch.cat([torch.zeros(B, 1, dtype=torch.long, device=dev), node_depth], 1)
        pos = (n[:, None] - 1 + depth_all).clamp(max=N - 1)
        vslots = n[:, None] - 1 + torch.arange(M + 1, device=dev)
        mask = self.session.cache.visible[:B, None, :].expand(-1, M + 1, -1).clone()
        mask.scatter_(2, (self.P + vslots)[:, None, :].expand(-1, M + 1, -1), ancestors)
        probs, hid = self.session.forward(inputs, pos, vslots, mask, return_hidden=True)  # [B, M+1, V], [R, M+1, dim]
        valid = (n[:, None] - 1 + depth_all) <= N - 1
        _, path, acc, _, final = walk_tree(self.acceptance, probs, inputs, tree_children(parents, K), valid,
                                     uniform_noise((D + 1, K), self.gens, dev), exponential_noise((V,), self.gens, dev),
                                     active)
        return inputs, probs, hid, path, acc, final

    # ---- 5. commit: accepted nodes at n .. n+a-1, the final token at n+a (inside the grid)
    def commit(self, inputs, hid, path, acc, final, active):
        B, dev, n, N, D, P, dim, dbl = self.B, self.dev, self.n, self.N, self.shape.D, self.P, self.dim, self.dbl
        keep, n_new = commit_accepted(self.canvas, self.from_draft, n, inputs.gather(1, path[:, :D]), acc, final,
                                      active, N)
        cells = n[:, None] + torch.arange(D, device=dev)
        # features of the last committed token (tree index 0) and of the accepted nodes, for the next catch-up
        chosen = torch.cat([torch.zeros(B, 1, dtype=torch.long, device=dev), path[:, :D]], 1)  # [B, D+1]
        fcells = n[:, None] + torch.arange(D + 1, device=dev)  # feats index of cell n-1+i is n+i
        fkeep = dbl((torch.arange(D + 1, device=dev)[None] <= acc[:, None]) & active[:, None])[..., None]
        new_f = hid.gather(1, dbl(chosen)[..., None].expand(-1, -1, dim))
        old_f = self.feats.gather(1, dbl(fcells)[..., None].expand(-1, -1, dim))
        self.feats.scatter_(1, dbl(fcells)[..., None].expand(-1, -1, dim), torch.where(fkeep, new_f, old_f))
        # move the accepted nodes' target KV to contiguous slots (a copy), then roll back past them
        src = torch.where(keep, P + n[:, None] - 1 + path[:, :D], P + cells)
        self.session.cache.copy_slots(dbl(src), dbl(P + cells))
        self.session.advance(n_new)
        self.session.rollback(n_new - 1)  # keeps c and the accepted nodes; the newest token has no KV yet
        self.n = n_new
