"""The shared substrate of every decoding method: condition prefill, CFG doubling, cache, probs, progress.

A method asks a :class:`DecodeSession` for next-token distributions of any tokens at any
positions and slots; the session runs the model once per call, folds the CFG halves,
applies the sampling config in fp32 and counts forward passes. After each target pass the
method reports how far each sample has got (:meth:`DecodeSession.advance`); :meth:`finish`
turns that into the statistics every method reports the same way (per-sample passes, the
accepted-length histogram, step compression). Methods never touch the model's internals
or duplicate this bookkeeping.
"""
from __future__ import annotations

import time
from dataclasses import replace
from typing import Optional, Sequence

import torch

from .sampling import SamplingConfig, logits_to_probs, make_generators, non_finite_error, non_finite_rows
from ..models.protocol import check_model
from ..ops.reference import guided_logits
from .stats import DecodeStats


def cfg_rows(x: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """Per-sample inputs for every model row: the CFG halves share tokens, positions, slots and masks."""
    return torch.cat([x, x]) if sampling.uses_cfg else x


def hide_slots(cache, sampling: SamplingConfig, prefix_len: int, image_slots: torch.Tensor) -> None:
    """Make the image slots where ``image_slots`` (``[B, S]`` bool) is True invisible to later tokens, in both CFG
    halves; the length pointer is untouched (see :meth:`DecodeSession.hide`)."""
    m = cfg_rows(image_slots, sampling)
    cache.visible[:, prefix_len:prefix_len + m.shape[1]] &= ~m


def target_pass(model, sampling: SamplingConfig, cache, prefix_len: int, tokens: torch.Tensor,
                positions: torch.Tensor, slots: torch.Tensor, mask: Optional[torch.Tensor] = None,
                cfg_scale: Optional[torch.Tensor] = None, model_inputs: Optional[dict] = None) -> tuple:
    """A target pass with nothing counted: image ``tokens`` ``[B, T]`` at grid ``positions`` into image ``slots``
    (the CFG halves share them) -> ``(probs [B, T, V] fp32, positions with non-finite logits)``. The one place the
    model's forward meets the sampling config; :meth:`DecodeSession.forward` and whole-step graphs (which count
    passes outside the graph) both run it. ``cfg_scale`` and ``model_inputs``: see :meth:`DecodeSession.forward`."""
    extra = {k: cfg_rows(v, sampling) for k, v in (model_inputs or {}).items()}
    logits = model(tokens=cfg_rows(tokens, sampling), positions=cfg_rows(positions, sampling),
                   slots=cfg_rows(slots + prefix_len, sampling), mask=None if mask is None else cfg_rows(mask, sampling),
                   cache=cache, **extra)
    return guided_probs(logits, sampling, cfg_scale), non_finite_rows(logits)


def guided_probs(logits: torch.Tensor, sampling: SamplingConfig, cfg_scale: Optional[torch.Tensor] = None):
    """fp32 probabilities of the model's ``logits`` (both CFG halves) under ``sampling``; a ``cfg_scale`` tensor
    (broadcasting to ``[B, T, 1]``) replaces the guidance scale, e.g. for LPD's ramp."""
    if cfg_scale is not None and sampling.uses_cfg:
        return logits_to_probs(guided_logits(logits, cfg_scale), replace(sampling, cfg_scale=1.0), check_finite=False)
    return logits_to_probs(logits, sampling, check_finite=False)


class DecodeSession:
    """One batch of generations in flight.

    Args:
        model: any model implementing the vargen protocol (``forward``, ``new_cache``,
            ``condition_embeddings``, ``prefix_len``, ``num_tokens``, ``vocab_size``).
        cond: class ids ``[B]`` or caption features ``[B, P, C]``.
        sampling: the :class:`SamplingConfig`; validated against the model here.
        seeds: one seed per sample (default ``0..B-1``); drives that sample's generator.
        cond_mask: ``[B, P]`` bool for caption padding (pads see only themselves).
        method: name written into the stats.
    """

    def __init__(self, model, cond, sampling: SamplingConfig, seeds: Optional[Sequence[int]] = None,
                 cond_mask: Optional[torch.Tensor] = None, method: str = "ar", max_len: Optional[int] = None):
        check_model(model)
        self.model = model
        self.sampling = sampling.validate(model.vocab_size, model.has_null_condition)
        device = next(model.parameters()).device
        self.device = device
        prefix = model.condition_embeddings(cond)
        if sampling.uses_cfg:
            prefix = torch.cat([prefix, model.condition_embeddings(cond, null=True)])
        self.batch = prefix.shape[0] // (2 if sampling.uses_cfg else 1)
        self.prefix = prefix
        self.prefix_len = prefix.shape[1]
        if cond_mask is not None:
            cond_mask = cond_mask.to(device).bool()
            if sampling.uses_cfg:
                cond_mask = torch.cat([cond_mask, cond_mask])  # LlamaGen masks both halves alike
        self.cond_mask = cond_mask
        seeds = list(range(self.batch)) if seeds is None else list(seeds)
        if len(seeds) != self.batch:
            raise ValueError(f"got {len(seeds)} seeds for a batch of {self.batch}")
        self.generators = make_generators(seeds, device)
        self.cache = model.new_cache(prefix.shape[0], max_len or self.prefix_len + model.num_tokens)
        self.stats = DecodeStats(method=method, batch_size=self.batch, tokens=model.num_tokens)
        self._t0 = None
        self._non_finite = torch.zeros((), dtype=torch.long, device=device)  # checked once, in finish()
        # progress: final tokens per sample, the passes each sample took part in, and per pass what it committed
        self.committed = torch.zeros(self.batch, dtype=torch.long, device=device)
        self._passes = torch.zeros(self.batch, dtype=torch.long, device=device)
        self._commit_log = []

    # ----------------------------------------------------------------------------- model calls
    def _double(self, x: torch.Tensor) -> torch.Tensor:
        return cfg_rows(x, self.sampling)

    @torch.no_grad()
    def prefill(self, return_hidden: bool = False):
        """Run the condition prefix; returns ``[B, V]`` probabilities of the first image token.

        ``return_hidden=True`` also returns the model's last hidden states of every prefix position,
        ``[rows, P, dim]`` for all batch rows (both CFG halves: cond rows first), as ``(probs, hidden)``."""
        self._t0 = time.perf_counter()
        P, rows = self.prefix_len, self.prefix.shape[0]
        slots = torch.arange(P, device=self.device).expand(rows, P)
        positions = torch.full_like(slots, -1)
        mask = self.prefix_mask(self.cache.max_len)
        logits = self.model(embeds=self.prefix, positions=positions, slots=slots, mask=mask, cache=self.cache,
                            **({"return_hidden": True} if return_hidden else {}))
        logits, hidden = logits if return_hidden else (logits, None)
        if self.cond_mask is not None:
            self.cache.visible[:, :P] = self.cond_mask
        self.cache.length.fill_(P)
        probs = self._probs(logits[:, -1])
        return (probs, hidden) if return_hidden else probs

    def prefix_mask(self, max_len: int) -> Optional[torch.Tensor]:
        """``[rows, P, max_len]`` mask of the condition prefix over a cache of ``max_len`` slots (causal; caption
        pads see only themselves), or ``None`` without caption padding (plain causal)."""
        if self.cond_mask is None:
            return None
        P = self.prefix_len
        causal = torch.ones(P, P, dtype=torch.bool, device=self.device).tril()
        mask = torch.zeros(self.prefix.shape[0], P, max_len, dtype=torch.bool, device=self.device)
        mask[:, :, :P] = (causal[None] & self.cond_mask[:, None, :]) | torch.eye(P, dtype=torch.bool,
                                                                                 device=self.device)
        return mask

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                mask: Optional[torch.Tensor] = None, cfg_scale: Optional[torch.Tensor] = None,
                model_inputs: Optional[dict] = None, return_hidden: bool = False):
        """Feed image ``tokens`` ``[B, T]`` at grid ``positions`` into cache ``slots``; returns ``[B, T, V]`` probs.

        Slots count from 0 at the first image token (the prefix is added here). ``cfg_scale``
        (a tensor broadcasting to ``[B, T, 1]``) replaces the guidance scale for this call, for
        schedules such as LPD's ramp; it applies only when the session guides (``cfg_scale != 1``).
        ``model_inputs`` are extra per-sample model arguments (``[B, ...]`` tensors, doubled for the
        CFG halves), e.g. NAR's ``targets`` (the cells to predict; then the probs are ``[B, S, V]``).
        ``return_hidden=True`` returns ``(probs, hidden)`` with the model's last hidden states ``[rows, T, dim]``
        of every batch row (both CFG halves, cond rows first), e.g. for an EAGLE drafter.
        """
        if not return_hidden:
            probs, bad = target_pass(self.model, self.sampling, self.cache, self.prefix_len, tokens, positions, slots,
                                     mask, cfg_scale, model_inputs)
            self.count_pass(bad)
            return probs
        logits, hidden = self.model(tokens=self._double(tokens), positions=self._double(positions),
                                    slots=self._double(slots + self.prefix_len),
                                    mask=None if mask is None else self._double(mask), cache=self.cache,
                                    return_hidden=True, **{k: self._double(v) for k, v in (model_inputs or {}).items()})
        return self._probs(logits, cfg_scale), hidden

    def rollback(self, image_slots: torch.Tensor) -> None:
        """Keep the prefix and the first ``image_slots[b]`` image slots of sample ``b`` (``[B]``);
        later slots become invisible (``visible`` cleared past them; no keys or values are copied)."""
        self.cache.rollback(self._double(image_slots + self.prefix_len))

    def hide(self, image_slots: torch.Tensor) -> None:
        """Make the image slots where ``image_slots`` (``[B, S]`` bool) is True invisible to later tokens
        (discarded tokens written out of order, e.g. a restarted row); the length pointer is untouched."""
        hide_slots(self.cache, self.sampling, self.prefix_len, image_slots)

    def count_pass(self, non_finite: torch.Tensor) -> None:
        """Count one target pass and its non-finite logits (checked once, in :meth:`finish`)."""
        self.stats.forward_passes += 1
        self._non_finite += non_finite

    def _probs(self, logits: torch.Tensor, cfg_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        self.count_pass(non_finite_rows(logits))
        return guided_probs(logits, self.sampling, cfg_scale)

    # ----------------------------------------------------------------------------- progress
    def advance(self, committed: torch.Tensor) -> None:
        """Record one target pass (the prefill included): ``committed`` ``[B]`` is each sample's count of final
        tokens after it. A sample takes part in a pass while it has tokens left; no host sync here."""
        live = self.committed < self.stats.tokens
        self._commit_log.append(torch.where(live, committed - self.committed, -1))
        self._passes += live.long()
        self.committed = committed.clone()

    def finish(self, committed: Optional[torch.Tensor] = None) -> DecodeStats:
        """Stop the clock (synchronising the device), raise if any logits were NaN/inf, and fill the stats.

        ``committed`` (``[B]``): tokens made final without a pass at the end (e.g. MuLo keeping its pending
        cells), credited to each sample's last pass. Every sample must end with all its tokens.

        The statistics, defined here once for every method: ``per_sample_forward_passes`` (target passes each
        sample took part in, prefill included); ``accepted_hist`` (tokens committed per pass per sample, so
        ``sum(k * count) == B * N`` and ``sum(count) == sum(passes)``); ``step_compression`` (``N`` / mean passes).
        """
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        bad = int(self._non_finite)
        if bad:
            raise non_finite_error(bad, rows=True)
        self.stats.wall_s = time.perf_counter() - (self._t0 or time.perf_counter())
        log = torch.stack(self._commit_log) if self._commit_log else torch.zeros(0, self.batch, dtype=torch.long)
        if committed is not None and len(self._commit_log):
            last = (log >= 0).long().cumsum(0).argmax(0)  # each sample's last pass
            log[last, torch.arange(self.batch, device=log.device)] += committed.to(log.device) - self.committed
            self.committed = committed.clone()
        if bool((self.committed != self.stats.tokens).any()):
            raise RuntimeError(f"{self.stats.method} finished with {self.committed.tolist()} of "
                               f"{self.stats.tokens} tokens committed")
        self.stats.per_sample_forward_passes = self._passes.tolist()
        self.stats.record_accepted(log[log >= 0].tolist())
        self.stats.extra["step_compression"] = self.stats.step_compression
        return self.stats
