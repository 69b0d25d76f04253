"""The copying draft inits: the vectorised forward fill equals the window loop it replaces, cell for cell, for
windows narrower and wider than a row (a wide window copies from above cells inside itself)."""
import random

import torch

from vargen.decoding.drafts import fill_fresh


def loop_fill(canvas, start, drafts, q, fresh, init, width):
    """The per-cell loop (a fresh cell copies its left / upper neighbour as written so far), verbatim."""
    B, L = drafts.shape
    V = q.shape[-1]
    rows, last = torch.arange(B), canvas.shape[1] - 1
    drafts, q = drafts.clone(), q.clone()
    for j in range(L):
        cell = start + j
        left, above = canvas[rows, (cell - 1).clamp(0, last)], canvas[rows, (cell - width).clamp(0, last)]
        d = torch.where(cell % width > 0, left, above) if init == "left" else torch.where(cell >= width, above, left)
        f = fresh[:, j]
        drafts[:, j] = torch.where(f, d, drafts[:, j])
        q[:, j] = torch.where(f[:, None], torch.zeros(B, V).scatter_(1, d[:, None], 1.0), q[:, j])
        canvas[rows, cell.clamp(max=last)] = drafts[:, j]
    return drafts, q


def test_copying_inits_match_the_window_loop():
    rng = random.Random(0)
    torch.manual_seed(0)
    for _ in range(200):
        width = rng.choice([4, 8, 16])
        B, L, V, N = 3, rng.randint(1, 4 * width), 7, width * rng.choice([1, 2, 4])
        canvas = torch.randint(0, V, (B, N + L + 1))
        start, drafts = torch.randint(1, N + 1, (B,)), torch.randint(0, V, (B, L))
        q, fresh = torch.rand(B, L, V), torch.rand(B, L) < 0.6
        init = rng.choice(["left", "above"])
        looped, filled = canvas.clone(), canvas.clone()
        want = loop_fill(looped, start, drafts, q, fresh, init, width)
        got = fill_fresh(filled, start, drafts, q, fresh, torch.rand(B, V), init, [], width)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]) and torch.equal(filled, looped)
