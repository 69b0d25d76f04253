"""Recipe: train an EAGLE drafter (:class:`~vargen.models.eagle.EagleDrafter`) for a target GPT by self-distillation.

1. **Data**: ``config["num_samples"]`` images are sampled from the target itself with vargen's
   sampling (``config["sampling"]``: CFG scale, temperature, top-k/p, as decoding will use), one seed
   per sample; t2i captions come from the procedural scenes (``config["captions"]``: ``seed``), c2i
   classes cycle through ``0 .. num_classes - 1``. The target is then run teacher-forced on
   ``[condition, tokens]`` to record its last hidden state (the post-norm feature) at every position,
   for the conditional prompt and, with ``config["train_uncond"]`` (default true, since decoding with
   CFG drafts on both halves), for the null condition too. Cached in ``OUT/distill.pt``.
2. **Training** (the target is frozen; only ``fc`` and the drafter block learn): at position ``t`` the
   drafter sees ``[embedding of input t, f_{t-1} + U(-noise/2, noise/2)]`` (EAGLE's uniform feature noise,
   ``config["feature_noise"]``, default 0.2) under the causal mask of the target (caption pads hidden)
   and predicts ``f_t``; the loss over the positions that predict image tokens is
   ``smooth_l1(f^_t, f_t) + ce_weight * CE(softmax(output(f_t)), output(f^_t))`` (``ce_weight`` 0.1:
   the cross-entropy against the target's own next-token distribution of that half). EAGLE's grad clip
   0.5 and 3% warm-up are the config's ``grad_clip`` and ``warmup``.

Saves ``OUT/eagle`` (config + safetensors of the drafter's own weights).
"""
from __future__ import annotations

import os
from functools import partial
from typing import Optional

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..decoding import SamplingConfig, decode_ar
from ..errors import load_local
from ..models import LlamaGen
from ..models.eagle import EagleDrafter
from .common import infinite, run_training, save_trained


@torch.no_grad()
def target_features(gpt: LlamaGen, tokens: torch.Tensor, cond, cond_mask: Optional[torch.Tensor] = None,
                    null: bool = False) -> tuple:
    """``(embeds [B, T, dim], features [B, T, dim])`` of the teacher-forced sequence ``[condition, tokens[:, :-1]]``
    (``T = P + N - 1``): the target's inputs and its last hidden state (after the final norm) at every position."""
    prefix = gpt.condition_embeddings(cond, null=null)
    P = prefix.shape[1]
    embeds = torch.cat([prefix, gpt.tok_embeddings(tokens[:, :-1])], 1)
    positions, mask = _layout(P, embeds.shape[1], cond_mask, embeds.device)
    _, hidden = gpt(embeds=embeds, positions=positions.expand(len(tokens), -1), mask=mask, return_hidden=True)
    return embeds, hidden


def _layout(P: int, T: int, cond_mask: Optional[torch.Tensor], device) -> tuple:
    """Positions ``[1, T]`` (-1 for the condition) and the training mask (causal, caption pads hidden) of a sequence."""
    positions = torch.cat([torch.full((P,), -1, device=device), torch.arange(T - P, device=device)])[None]
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    if cond_mask is None:
        return positions, causal[None]
    keys = torch.cat([cond_mask.bool(), torch.ones(len(cond_mask), T - P, dtype=torch.bool, device=device)], 1)
    return positions, (causal[None] & keys[:, None, :]) | torch.eye(T, dtype=torch.bool, device=device)[None]


def _conditions(config: dict, gpt: LlamaGen, n: int) -> list:
    if gpt.config.model_type == "t2i":
        from ..data.scenes import SceneDataset

        data = SceneDataset(seed=config.get("captions", {}).get("seed", 0))
        return [data.scene(i).caption for i in range(n)]
    return [i % gpt.config.num_classes for i in range(n)]


@torch.no_grad()
def distill_dataset(config: dict, gpt: LlamaGen, text_encoder=None, out_dir: Optional[str] = None) -> dict:
    """Self-distilled training data (module docstring, step 1); cached in ``out_dir/distill.pt``."""
    path = os.path.join(out_dir, "distill.pt") if out_dir else None
    if path and os.path.exists(path):
        return torch.load(path)
    n, bs = config.get("num_samples", 256), config.get("sample_batch_size", 64)
    sampling = SamplingConfig(**config.get("sampling", {}))
    halves = [False, True] if config.get("train_uncond", True) and sampling.uses_cfg else [False]
    inputs = _conditions(config, gpt, n)
    out = {"tokens": [], "embeds": [], "features": [], "cond_mask": []}
    device = gpt.output.weight.device
    for start in tqdm(range(0, n, bs), desc="self-distillation samples", leave=False):
        chunk = inputs[start:start + bs]
        if text_encoder is not None:
            cond, cond_mask = text_encoder(chunk)
            cond, cond_mask = cond.to(device), cond_mask.to(device)
        else:
            cond, cond_mask = torch.tensor(chunk, device=device), None
        tokens, _ = decode_ar(gpt, cond, sampling, seeds=range(start, start + len(chunk)), cond_mask=cond_mask)
        for null in halves:
            embeds, feats = target_features(gpt, tokens, cond, cond_mask, null=null)
            out["tokens"].append(tokens.cpu())
            out["embeds"].append(embeds[:, :gpt.prefix_len].cpu())  # the rest are token embeddings
            out["features"].append(feats.cpu())
            out["cond_mask"].append((cond_mask if cond_mask is not None
                                     else torch.ones(len(tokens), gpt.prefix_len, dtype=torch.bool)).cpu())
    data = {k: torch.cat(v) for k, v in out.items()}
    data.update(sampling=sampling.to_dict(), halves=len(halves), num_samples=n)
    if path:
        os.makedirs(out_dir, exist_ok=True)
        torch.save(data, path + ".tmp")
        os.replace(path + ".tmp", path)
    return data


def row_batches(data: dict, batch_size: int, seed: int = 0):
    """Endless shuffled batches of row indices into the distillation data."""
    loader = torch.utils.data.DataLoader(torch.arange(len(data["tokens"])), batch_size=batch_size, shuffle=True,
                                         drop_last=True, generator=torch.Generator().manual_seed(seed))
    return infinite(loader)


def eagle_loss(drafter: EagleDrafter, gpt: LlamaGen, data: dict, rows: torch.Tensor, feature_noise: float = 0.2,
               ce_weight: float = 0.1) -> tuple:
    """``(loss, metrics)`` of the drafter on distillation ``rows`` (module docstring, step 2)."""
    device = drafter.fc.weight.device
    tokens = data["tokens"][rows].to(device)
    feats = data["features"][rows].to(device)
    prefix = data["embeds"][rows].to(device)
    cond_mask = data["cond_mask"][rows].to(device)
    P = prefix.shape[1]
    with torch.no_grad():
        embeds = torch.cat([prefix, gpt.tok_embeddings(tokens[:, :-1])], 1)
        target_p = F.softmax(gpt.output(feats[:, P - 1:]).float(), -1)
    prev = torch.cat([torch.zeros_like(feats[:, :1]), feats[:, :-1]], 1)
    if drafter.training and feature_noise:
        prev = prev + (torch.rand_like(prev) - 0.5) * feature_noise
    positions, mask = _layout(P, embeds.shape[1], cond_mask, device)
    logits, pred = drafter(gpt, prev, embeds=embeds, positions=positions.expand(len(rows), -1), mask=mask)
    logits, pred = logits[:, P - 1:], pred[:, P - 1:]
    reg = F.smooth_l1_loss(pred, feats[:, P - 1:])
    ce = -(target_p * F.log_softmax(logits, -1)).sum(-1).mean()
    with torch.no_grad():
        draft = logits.argmax(-1)
        metrics = {"reg": reg.detach(), "ce": ce.detach(),
                   "top1": (draft == target_p.argmax(-1)).float().mean(),
                   "p_draft": target_p.gather(-1, draft[..., None]).mean()}  # acceptance of a top-1 draft at q=1
    return reg + ce_weight * ce, metrics


def eagle_step(modules, rows, gpt: LlamaGen, data: dict, feature_noise: float, ce_weight: float):
    return eagle_loss(modules["eagle"], gpt, data, rows, feature_noise, ce_weight)


def train_eagle(config: dict, out_dir: str) -> dict:
    """Train ``EagleDrafter.from_target(config["init"])`` on samples of that GPT (module docstring);
    a t2i target reads captions through its frozen ``config["text_encoder"]``. Saves ``out_dir/eagle``."""
    torch.manual_seed(config.get("seed", 0))
    gpt = load_local(LlamaGen, config["init"], "the AR model to draft for (init)")
    gpt = gpt.float().eval().requires_grad_(False)
    text_encoder = None
    if gpt.config.model_type == "t2i":
        if not config.get("text_encoder"):
            raise ValueError("a text-to-image target needs its text encoder: set config['text_encoder'] to its folder "
                             "(e.g. vargen/weights/scenes-t2i/text_encoder)")
        from ..models.text import WordTextEncoder

        text_encoder = load_local(WordTextEncoder, config["text_encoder"], "the text encoder")
        text_encoder = text_encoder.float().eval().requires_grad_(False)
    data = distill_dataset(config, gpt, text_encoder, out_dir)
    drafter = EagleDrafter.from_target(gpt)
    step = partial(eagle_step, gpt=gpt, data=data, feature_noise=config.get("feature_noise", 0.2),
                   ce_weight=config.get("ce_weight", 0.1))
    result = run_training(config, {"eagle": drafter}, list(drafter.parameters()),
                          row_batches(data, config["batch_size"], config.get("seed", 0)), step, out_dir,
                          log_every=config.get("log_every", 10), save_every=config.get("save_every", 200))
    trained, folder = save_trained(result, "eagle", out_dir)
    # the loss terms on the first training rows with the feature noise off (a sanity check, not held out)
    with torch.no_grad():
        rows = torch.arange(min(len(data["tokens"]), config["batch_size"]))
        _, metrics = eagle_loss(trained, gpt, data, rows, 0.0, config.get("ce_weight", 0.1))
    result["final_train_batch"] = {k: float(v) for k, v in metrics.items()}
    return result
