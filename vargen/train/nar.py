"""Recipe: train NAR's next-neighbour heads (and optionally the trunk) from a trained AR GPT.

Same data and tokenizer as the AR recipe (:mod:`vargen.train.ar`'s token cache, shared with
:mod:`vargen.train.lpd`). Every step is one teacher-forced forward under the proximity mask
(:meth:`NARModel.training_loss`): the cross-entropy of every cell, each predicted from its
parents (right head at the left neighbour, below head at the upper one, averaged where both
exist). ``config["head_layers"]`` (default 1) sets the blocks per head; ``config["train_trunk"]``
(default true) also fine-tunes the GPT (embeddings, blocks, shared norm and output), which the
proximity mask needs for good samples (the AR trunk was trained causal-by-raster); false trains
the head blocks alone. Condition dropout (for CFG) is the GPT's ``class_dropout_prob``; a t2i
model keeps its trained text encoder frozen (``config["text_encoder"]``).
"""
from __future__ import annotations

from functools import partial
from typing import Optional

import torch

from ..models.nar import NARModel
from ..models.text import WordTextEncoder
from .ar import token_batches
from .common import run_training, save_trained
from .lpd import load_start


def nar_step(modules, batch, text_encoder: Optional[WordTextEncoder] = None):
    """One NAR training step: the mean per-cell cross-entropy of one teacher-forced proximity-mask forward."""
    nar = modules["nar"]
    device = next(nar.parameters()).device
    tokens = batch["tokens"].to(device)
    if text_encoder is not None:
        with torch.no_grad():
            cond, cond_mask = text_encoder.to(device)(batch["captions"])
    else:
        cond, cond_mask = batch["labels"].to(device), None
    loss, logits = nar.training_loss(tokens, cond, cond_mask=cond_mask)
    return loss, {"token_acc": (logits.argmax(-1) == tokens).float().mean().detach(), "tokens": tokens.numel()}


def train_nar(config: dict, out_dir: str) -> dict:
    """Train ``NARModel.from_ar(config["init"], config["head_layers"])`` on ``config["data"]`` tokenised by
    ``config["tokenizer"]``; t2i models read captions through the frozen ``config["text_encoder"]``.
    Saves ``out_dir/nar``."""
    torch.manual_seed(config.get("seed", 0))
    cache, gpt, text_encoder = load_start(config, out_dir)
    nar = NARModel.from_ar(gpt, head_layers=config.get("head_layers", 1))
    if config.get("train_trunk", True):
        params = list(nar.parameters())
    else:
        nar.gpt.requires_grad_(False)
        params = [p for head in (nar.right_head, nar.below_head) for p in head.parameters()]
    result = run_training(config, {"nar": nar}, params, token_batches(cache, config["batch_size"]),
                          partial(nar_step, text_encoder=text_encoder), out_dir,
                          log_every=config.get("log_every", 10), save_every=config.get("save_every", 200))
    save_trained(result, "nar", out_dir)
    return result
