"""ZipAR (He et al., ICML 2025): parallel decoding of spatially adjacent rows, training-free.

A token depends mostly on its neighbours, so row ``r + 1`` starts once row ``r`` has
``window`` tokens, and every forward pass decodes one new token in each active row, at
its true 2D position. Attention is causal by generation order over raster slots: a
query sees the slots already written at earlier raster cells, never an empty one.

A row's first token should follow the previous row's last cell, which does not exist
yet; as in ZipAR, the previous row's latest token is fed at that last cell's slot as a
proxy, and the slot is overwritten with the true token when that row finishes (in the
same pass as other work, so it costs no extra forward). The schedule depends only on
the grid and the window, so it is the same for every sample and computed on the host.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from tqdm.auto import tqdm

from .. import ops
from .sampling import SamplingConfig, sample_categorical, uniform_noise
from .session import DecodeSession, target_pass

Step = List[Tuple[int, int, int]]  # (input cell, slot/position cell, predicted cell or -1)


def zipar_schedule(height: int, width: int, window: int) -> List[Step]:
    """The forward passes after the prefill (which yields cell 0), each a list of inputs.

    Each input feeds the token of ``input cell`` at raster ``slot`` (also its RoPE position)
    and, unless ``-1``, samples ``predicted cell`` from the output. Every cell except 0 is
    predicted exactly once.
    """
    if window < 1:
        raise ValueError(f"ZipAR window must be >= 1, got {window}")
    count = [1] + [0] * (height - 1)  # tokens generated per row
    fixed = [False] * height  # whether the row's last slot holds its true token
    steps = []
    while min(count) < width:
        step: Step = []
        fixups = {}
        for r in range(height):
            if count[r] == width and not fixed[r]:
                fixups[r] = len(step)
                step.append((r * width + width - 1, r * width + width - 1, -1))
                fixed[r] = True
        for r in range(height):
            c = count[r]
            if 0 < c < width:
                step.append((r * width + c - 1, r * width + c - 1, r * width + c))
            elif c == 0 and count[r - 1] >= min(window, width):
                last = (r - 1) * width + width - 1
                if count[r - 1] == width:  # the true last token of the row above is known
                    if r - 1 in fixups:
                        i = fixups[r - 1]
                        step[i] = (last, last, r * width)
                    else:
                        step.append((last, last, r * width))
                else:  # proxy: the row above's latest token at its last cell's slot
                    step.append(((r - 1) * width + count[r - 1] - 1, last, r * width))
        for _, _, target in step:
            if target >= 0:
                count[target // width] += 1
        steps.append(step)
    return steps


def zipar_pass(model, sampling: SamplingConfig, cache, prefix_len: int, tokens: torch.Tensor, positions: torch.Tensor,
               slots: torch.Tensor, real: torch.Tensor, noise: torch.Tensor) -> tuple:
    """One ZipAR pass as a function of its inputs and its draws (``--compile`` captures it whole): one token per
    active row in at its raster ``slots`` and ``positions`` (padding inputs write the scratch slot), and the
    predictions of the inputs ``real`` drawn with ``noise`` (``[B, len(real)]`` U(0, 1), one per token, drawn
    outside the graph in eager's order; :func:`vargen.ops.draw_categorical`). Returns ``(tokens [B, len(real)],
    count of positions with non-finite logits)``."""
    probs, bad = target_pass(model, sampling, cache, prefix_len, tokens, positions, slots)
    return ops.draw_categorical(probs[:, real], noise), bad


@torch.no_grad()
def decode_zipar(model, cond, sampling: SamplingConfig = SamplingConfig(), seeds: Optional[Sequence[int]] = None,
                 cond_mask: Optional[torch.Tensor] = None, window: int = 8, progress: bool = False, callback=None):
    """Generate all image tokens with ZipAR's parallel rows (``window`` tokens of lead per row).

    Approximate (not lossless): a row's first tokens miss the end of the row above. The
    pass count is ``1 + len(zipar_schedule(H, W, window))`` for every sample.

    Returns:
        ``(tokens [B, N], DecodeStats)``.
    """
    H, W = model.grid
    N = model.num_tokens
    schedule = zipar_schedule(H, W, window)
    width = max(len(s) for s in schedule) if schedule else 1
    session = DecodeSession(model, cond, sampling, seeds, cond_mask, method="zipar",
                            max_len=model.prefix_len + N + 1)
    B, dev, gens = session.batch, session.device, session.generators
    # --compile: each pass (forward, guidance, sampling) is one graph; the number of rows a pass predicts
    # changes as rows start and finish, so that size becomes symbolic at the first recompile
    whole = hasattr(model, "whole_step")
    step, target_model = (model.whole_step(zipar_pass, dynamic=None), model.model) if whole else (zipar_pass, model)
    tokens = torch.zeros(B, N + 1, dtype=torch.long, device=dev)  # cell N: scratch for padding inputs
    tokens[:, 0] = sample_categorical(session.prefill(), gens)
    # the schedule is known up front: move it to the device once, so no pass syncs with the host
    passes = []
    for entry in schedule:
        pad = [(N, N, -1)] * (width - len(entry))  # fixed shapes: padding writes the scratch slot nobody sees
        src, slot, target = zip(*(entry + pad))
        real = [i for i, t in enumerate(target) if t >= 0]
        passes.append((torch.tensor(src, device=dev), torch.tensor(slot, device=dev).expand(B, -1),
                       torch.tensor(real, device=dev), torch.tensor([target[i] for i in real], device=dev)))
    per_pass = [len(real) for _, _, real, _ in passes]
    committed = torch.ones(B, dtype=torch.long, device=dev)
    session.advance(committed)
    for i, (src, slot, real, target) in enumerate(tqdm(passes, disable=not progress, desc="zipar", leave=False)):
        noise = uniform_noise((len(real),), gens, dev)
        tokens[:, target], bad = step(target_model, session.sampling, session.cache, session.prefix_len,
                                      tokens[:, src], slot.clamp(max=N - 1), slot, real, noise)
        session.count_pass(bad)
        committed += per_pass[i]
        session.advance(committed)
        if callback is not None:
            callback(i, tokens[:, :N], committed)
    stats = session.finish()
    stats.extra.update(window=window, whole_step_graph=whole)
    return tokens[:, :N], stats
