"""NAR decoding (arXiv 2503.10696): one anti-diagonal of cells per forward pass, ``H + W - 1`` passes.

Needs a :class:`vargen.models.nar.NARModel` (trained from the AR model with ``vargen train nar``).
The prefill runs the condition and gives cell ``(0, 0)`` (both heads at the last condition
row, averaged). Step ``c = 1 .. H + W - 2`` feeds the tokens of anti-diagonal ``c - 1`` at their
cells' positions, writes them at their raster cache slots (``prefix + cell``), and reads the
logits of diagonal ``c``: right head at the left parent, below head at the upper parent,
averaged where a cell has both (:meth:`NARModel.child_logits`). The mask is the proximity mask
of training (condition + every slot on diagonals ``<= c - 1``), so each step reproduces the
teacher-forced forward exactly. CFG folds the two halves' averaged logits as every method does
(linear, so folding before or after averaging is the same).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm

from .. import ops
from ..models.nar import TRAIN_HINT, NARModel, load_nar
from .nar_order import anti_diagonals, proximity_slot_mask
from .sampling import SamplingConfig, sample_categorical, uniform_noise
from .session import DecodeSession, target_pass
from .trained import resolve_trained


def resolve_nar(model, weights=None) -> NARModel:
    """The NAR model to decode with (see :func:`~vargen.decoding.trained.resolve_trained`)."""
    return resolve_trained(model, weights, NARModel, "NAR", "nar", "a NAR model", load_nar, TRAIN_HINT)


def nar_pass(model, sampling: SamplingConfig, cache, prefix_len: int, tokens: torch.Tensor, cells: torch.Tensor,
             mask: torch.Tensor, targets: torch.Tensor, noise: torch.Tensor) -> tuple:
    """One NAR pass as a function of its inputs and its draws (``--compile`` captures it whole): the tokens of one
    anti-diagonal in at their ``cells`` (position and raster slot), the next diagonal's ``targets`` sampled with
    ``noise`` (``[B, targets]`` U(0, 1), drawn outside the graph in eager's order;
    :func:`vargen.ops.draw_categorical`). Returns ``(tokens [B, targets],
    count of positions with non-finite logits)``."""
    probs, bad = target_pass(model, sampling, cache, prefix_len, tokens, cells, cells, mask,
                             model_inputs={"targets": targets})
    return ops.draw_categorical(probs, noise), bad


@torch.no_grad()
def decode_nar(model, cond, sampling: SamplingConfig = SamplingConfig(), seeds: Optional[Sequence[int]] = None,
               cond_mask: Optional[torch.Tensor] = None, weights=None, progress: bool = False, callback=None):
    """Generate all image tokens anti-diagonal by anti-diagonal with a NAR model.

    Args:
        model: a :class:`NARModel`, or the AR LlamaGen it was trained from (then ``weights``).
        cond, sampling, seeds, cond_mask: as :func:`vargen.decoding.decode_ar`.
        weights: a :class:`NARModel` or its folder; default ``<AR model folder>/nar``.
        progress: tqdm bar over steps.
        callback: optional ``callback(step, tokens, committed)`` after each step (``tokens [B, N]`` raster,
            zero where not generated yet; ``committed`` the number of tokens generated so far).

    Returns:
        ``(tokens [B, N] long in raster order, DecodeStats)``; ``forward_passes == H + W - 1`` (the prefill
        gives cell (0, 0)); ``stats.extra["step_compression"] == N / (H + W - 1)``.
    """
    nar = resolve_nar(model, weights)
    grid, N = nar.grid, nar.num_tokens
    # --compile (the pipeline's GPT wrapped): NAR's own model, compiled alike, runs each pass as one graph
    runner = model.companion(nar) if hasattr(model, "companion") else None
    step = runner.whole_step(nar_pass, dynamic=None) if runner is not None else nar_pass
    session = DecodeSession(runner or nar, cond, sampling, seeds, cond_mask, method="nar")
    B, dev, P = session.batch, session.device, session.prefix_len
    groups = anti_diagonals(grid)
    cells = [torch.tensor(g, device=dev) for g in groups]
    tokens = torch.zeros(B, N, dtype=torch.long, device=dev)
    tokens[:, 0] = sample_categorical(session.prefill(), session.generators)
    cond_visible = session.cache.visible[:B, :P].clone()  # real caption tokens (pads stay hidden)
    done = 1
    session.advance(torch.full((B,), done, device=dev))
    if callback is not None:
        callback(0, tokens, torch.full((B,), done, device=dev))
    for c in tqdm(range(1, len(groups)), disable=not progress, desc="nar", leave=False):
        parents, children = cells[c - 1].expand(B, -1), cells[c].expand(B, -1)
        mask = proximity_slot_mask(grid, c - 1, parents.shape[1], cond_visible, session.cache.max_len)
        noise = uniform_noise((children.shape[1],), session.generators, dev)
        new, bad = step(nar, session.sampling, session.cache, P, tokens.gather(1, parents), parents, mask, children,
                        noise)
        session.count_pass(bad)
        tokens.scatter_(1, children, new)
        done += len(groups[c])
        session.advance(torch.full((B,), done, device=dev))
        if callback is not None:
            callback(c, tokens, torch.full((B,), done, device=dev))
    stats = session.finish()
    stats.extra.update(steps=len(groups), grid=list(grid), head_layers=nar.config.head_layers,
                       whole_step_graph=runner is not None)
    return tokens, stats
