"""Fused decoding/rendering ops: CUDA kernels (``csrc/``) with PyTorch reference fallbacks.

Each op runs its kernel when every tensor is on a CUDA device, no gradient is needed and
the extension is available (see :func:`extension_status`); :func:`verify_window` and
:func:`draw_categorical` also run CPU kernels (``csrc/cpu/sampling_cpu.cpp``) once vargen's CPU
extension is loaded (:func:`vargen.ops.cpu_kernels.for_sampling`). Otherwise each runs the
reference in :mod:`vargen.ops.reference`, which also defines what the kernels compute.
Kernels and references agree exactly on discrete outputs (accepted lengths, tokens,
supports) up to float rounding at ties and boundaries, and on probabilities to ~1e-6.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import cpu_kernels, reference
from ._build import extension, extension_status

__all__ = ["sampling_probs", "verify_window", "draw_categorical", "lantern_pooled_mass", "liif_corners", "extension",
           "extension_status", "reference"]

_LOGIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _kernels(*tensors: Optional[torch.Tensor]):
    """The extension if these tensors can go to a kernel, else ``None``."""
    present = [t for t in tensors if t is not None]
    if torch.compiler.is_compiling():
        return None  # inside a compiled graph the reference is traced (and fused by the compiler) instead
    if not all(t.is_cuda for t in present):
        return None
    if torch.is_grad_enabled() and any(t.requires_grad for t in present):
        return None  # kernels have no backward
    return extension()


def sampling_probs(logits: torch.Tensor, cfg_scale: float = 1.0, temperature: float = 1.0, top_k: int = 0,
                   top_p: float = 1.0) -> torch.Tensor:
    """Logits ``[R, ..., V]`` (``[2R, ..., V]`` = ``[cond; uncond]`` when ``cfg_scale != 1``) -> fp32 probs.

    CFG ``u + s (c - u)``, temperature (0 = one-hot argmax), top-k (ties at the k-th value
    kept), top-p, softmax. The kernel keeps a token under top-p iff the mass of tokens with
    a strictly larger logit is below ``top_p``; the reference's sort agrees except on exact ties.
    """
    V = logits.shape[-1] if logits.dim() else 0
    cfg = cfg_scale != 1.0
    ext = _kernels(logits)
    if ext is None or logits.dtype not in _LOGIT_DTYPES or logits.numel() == 0 or (cfg and logits.shape[0] % 2):
        return reference.sampling_probs(logits, cfg_scale, temperature, top_k, top_p)
    out_shape = (logits.shape[0] // 2 if cfg else logits.shape[0], *logits.shape[1:])
    probs = ext.sampling_probs(logits.reshape(-1, V).contiguous(), cfg, float(cfg_scale), float(temperature),
                               int(top_k) if 0 < top_k < V else 0, float(top_p))
    return probs.view(out_shape)


def verify_window(probs: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor, coins: torch.Tensor,
                  valid: torch.Tensor, noise: torch.Tensor,
                  extra: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Verify ``L`` drafts per sample and draw the next token, with no host sync.

    Args:
        probs: ``[B, L+1, V]`` verifier distributions (row ``j`` judges draft ``j``; row ``L`` is the bonus).
        q: ``[B, L, V]`` the drafts' own distributions.
        drafts: ``[B, L]`` long; coins: ``[B, L]`` U(0, 1); valid: ``[B, L]`` bool.
        noise: ``[B, V]`` Exp(1) noise for the draw.
        extra: optional ``[B, L]`` mass a relaxed rule adds to ``p(d)`` (LANTERN).

    Returns:
        ``(r [B], x [B])``: drafts accepted before the first rejection (``coins * q(d) < p(d) + extra``
        and valid) and ``argmax(dist / noise)`` with ``dist = norm(max(p_r - q_r, 0))`` (``p_r`` if that
        mass is 0) when ``r < L``, else ``p_L``.
    """
    tensors = (probs, q, drafts, coins, valid, noise, extra)
    fits = q.shape[1] > 0 and all(t.dtype == torch.float32 for t in (probs, q, coins, noise, extra) if t is not None)
    # the CPU kernel on CPU tensors, the CUDA one on CUDA tensors: the same signature
    kernel = (cpu_kernels.for_sampling(*tensors) or _kernels(*tensors)) if fits else None
    if kernel is None:
        return reference.verify_window(*tensors)
    return kernel.verify_window(probs.contiguous(), q.contiguous(), drafts.long().contiguous(), coins.contiguous(),
                                valid.bool().contiguous(), noise.contiguous(),
                                None if extra is None else extra.contiguous())


def draw_categorical(p: torch.Tensor, u: torch.Tensor, q: Optional[torch.Tensor] = None,
                     residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One exact draw per row of ``p`` ``[..., V]`` by inverse CDF with ``u`` ``[...]`` U(0, 1); where ``residual``
    is True, from ``max(p - q, 0)`` (:func:`vargen.ops.reference.draw_categorical`). Returns ``[...]`` long."""
    if (q is None) != (residual is None):
        raise ValueError("draw_categorical takes q and residual together")
    cpu = cpu_kernels.for_sampling(p, u, q, residual)
    if cpu is None or p.dtype != torch.float32 or u.dtype != torch.float32 or (q is not None and q.dtype != p.dtype) \
            or p.numel() == 0:
        return reference.draw_categorical(p, u, q, residual)
    V = p.shape[-1]
    rows = lambda t: t.reshape(-1, V).contiguous()  # noqa: E731
    out = cpu.draw_categorical(rows(p), None if q is None else rows(q.expand_as(p)),
                               None if residual is None else residual.expand(p.shape[:-1]).reshape(-1).contiguous(),
                               u.expand(p.shape[:-1]).reshape(-1).contiguous())
    return out.view(p.shape[:-1])


def lantern_pooled_mass(p: torch.Tensor, drafts: torch.Tensor, neighbours: torch.Tensor,
                        delta: Optional[float] = None, lam: Optional[float] = None) -> torch.Tensor:
    """LANTERN's pooled mass ``S_m`` per draft (``[...]`` for ``p [..., V]``, ``drafts [...]``).

    ``S_m`` is the largest prefix sum of ``p`` over the draft's neighbours (``neighbours [V, k]``,
    nearest first) that stays within the budget: ``delta``, or ``(lam - 1) p(d)`` when ``lam`` is given.
    """
    if lam is None and delta is None:
        raise ValueError("lantern_pooled_mass needs delta or lam")
    ext = _kernels(p, drafts)
    if ext is None or p.dtype != torch.float32 or drafts.numel() == 0 or neighbours.shape[-1] == 0 or \
            tuple(drafts.shape) != tuple(p.shape[:-1]):
        return reference.lantern_pooled_mass(p, drafts, neighbours, delta, lam)
    V = p.shape[-1]
    p3 = p.reshape(1, 1, V) if p.dim() == 1 else p.unsqueeze(0) if p.dim() == 2 else p.reshape(-1, p.shape[-2], V)
    if p3.stride(-1) != 1:
        p3 = p3.contiguous()
    table = neighbours.to(device=p.device, dtype=torch.long).contiguous()
    budget = float(lam) - 1.0 if lam is not None else float(delta)
    out = ext.lantern_pooled_mass(p3, drafts.long().reshape(-1).contiguous(), table, lam is not None, budget)
    return out.view(drafts.shape)


def liif_corners(feat: torch.Tensor, coord: torch.Tensor, cell: Optional[torch.Tensor] = None,
                 local_ensemble: bool = True, cell_decode: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """LIIF's nearest-feature gather for each local-ensemble corner.

    Args:
        feat: ``[B, C, h, w]`` features (already unfolded).
        coord, cell: ``[B, Q, 2]`` query centres (row, col in [-1, 1]) and pixel sizes.

    Returns:
        ``inp [S, B, Q, C + 2 (+ 2)]``: the nearest feature, the query's offset from its centre
        and (with ``cell_decode``) the cell, both in feature cells; ``areas [S, B, Q]``.
        ``S`` is 4 with the local ensemble, else 1. As ``grid_sample(mode="nearest",
        align_corners=False)`` (the kernel uses CUDA's index rounding).
    """
    ext = _kernels(feat, coord, cell if cell_decode else None)
    if ext is None or feat.dtype != torch.float32 or coord.dtype != torch.float32 or \
            (cell_decode and (cell is None or cell.dtype != torch.float32)) or coord.numel() == 0 or feat.numel() == 0:
        return reference.liif_corners(feat, coord, cell, local_ensemble, cell_decode)
    h, w = feat.shape[-2:]
    offsets = reference.liif_offsets(h, w, local_ensemble)
    inp, areas = ext.liif_corners(feat, coord.contiguous(), cell.contiguous() if cell_decode else None,
                                  [o[0] for o in offsets], [o[1] for o in offsets])
    return inp, areas
