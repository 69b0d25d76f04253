"""Recipe: fine-tune an LPD model (position queries, any order and group size) from a trained AR GPT.

Same data and tokenizer as the AR recipe (:mod:`vargen.train.ar`'s token cache). Each
batch draws one group partition (a :func:`group_schedule` for a step count drawn from
``config["train_steps"]``, so group sizes from 1 up to ~50 for 256 tokens are seen) and each
sample one uniformly random permutation, as the official training does; the loss is the
cross-entropy of the queries. Condition dropout (for CFG) is the GPT's ``class_dropout_prob``.
A t2i model keeps its trained text encoder frozen (``config["text_encoder"]``), so the LPD
model takes captions through the same caption path as its AR model.
"""
from __future__ import annotations

from functools import partial
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..decoding.lpd_order import group_schedule
from ..errors import load_local
from ..models import LlamaGen
from ..models.lpd import LPD
from ..models.text import WordTextEncoder
from .ar import load_token_cache, token_batches
from .common import run_training, save_trained

# step counts of the official training schedules for 256 tokens (orders/group_sizes_training)
DEFAULT_TRAIN_STEPS = (8, 12, 16, 20, 24, 32, 64, 128, 256)


def lpd_step(modules, batch, text_encoder: Optional[WordTextEncoder] = None,
             train_steps: Sequence[int] = DEFAULT_TRAIN_STEPS):
    """One LPD training step: random orders per sample, a random group schedule per batch."""
    lpd = modules["lpd"]
    device = next(lpd.parameters()).device
    tokens = batch["tokens"].to(device)
    B, N = tokens.shape
    steps = min(int(train_steps[int(torch.randint(len(train_steps), (1,)))]), N)
    sizes = group_schedule(N, steps)
    orders = torch.rand(B, N, device=device).argsort(1)  # one uniformly random permutation per sample
    if text_encoder is not None:
        with torch.no_grad():
            cond, cond_mask = text_encoder.to(device)(batch["captions"])
    else:
        cond, cond_mask = batch["labels"].to(device), None
    logits = lpd.forward_train(tokens, cond, sizes, orders, cond_mask=cond_mask)
    target = tokens.gather(1, orders)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
    acc = (logits.argmax(-1) == target).float().mean()
    return loss, {"token_acc": acc.detach(), "groups": torch.tensor(float(steps)), "tokens": tokens.numel()}


def _check_pairing(gpt: LlamaGen, vq, cache: dict, text_encoder: Optional[WordTextEncoder], init: str) -> None:
    """The AR GPT must fit the tokenizer, the token grid and the text encoder it is trained with."""
    if gpt.vocab_size != vq.vocab_size:
        raise ValueError(f"the AR GPT at {init!r} has {gpt.vocab_size} tokens but the tokenizer has "
                         f"{vq.vocab_size} codes; use the tokenizer the GPT was trained on")
    if gpt.num_tokens != cache["tokens"].shape[1]:
        raise ValueError(f"the AR GPT at {init!r} generates {gpt.num_tokens} tokens but the tokenizer gives "
                         f"{cache['tokens'].shape[1]} per image; check the data resolution")
    if gpt.config.model_type == "t2i":
        if text_encoder is None:
            raise ValueError("a text-to-image GPT needs its trained text encoder: set config['text_encoder'] "
                             "to its folder (e.g. vargen/weights/scenes-t2i/text_encoder)")
        enc = text_encoder.config
        if (enc.caption_dim, enc.max_length) != (gpt.config.caption_dim, gpt.config.cls_token_num):
            raise ValueError(f"the text encoder gives {enc.max_length} x {enc.caption_dim} caption features but the "
                             f"GPT takes {gpt.config.cls_token_num} x {gpt.config.caption_dim}; pair them as trained")


def load_start(config: dict, out_dir: str):
    """What a recipe that trains from an AR GPT starts with: ``(token cache, GPT from config["init"],
    frozen text encoder or None)``, checked to belong together."""
    vq, cache = load_token_cache(config, out_dir)
    gpt = load_local(LlamaGen, config["init"], "the AR model to start from (init)").float()
    text_encoder = None
    if config.get("text_encoder"):
        text_encoder = load_local(WordTextEncoder, config["text_encoder"], "the text encoder")
        text_encoder = text_encoder.float().eval().requires_grad_(False)
    _check_pairing(gpt, vq, cache, text_encoder, config["init"])
    return cache, gpt, text_encoder


def train_lpd(config: dict, out_dir: str) -> dict:
    """Fine-tune ``LPD.from_ar(config["init"])`` (an AR GPT folder) on ``config["data"]`` tokenised by
    ``config["tokenizer"]``; t2i models read captions through the frozen ``config["text_encoder"]``.
    Saves ``out_dir/lpd``."""
    torch.manual_seed(config.get("seed", 0))
    cache, gpt, text_encoder = load_start(config, out_dir)
    lpd = LPD.from_ar(gpt, mask_init=config.get("mask_init", "mean"))
    step_fn = partial(lpd_step, text_encoder=text_encoder,
                      train_steps=tuple(config.get("train_steps", DEFAULT_TRAIN_STEPS)))
    result = run_training(config, {"lpd": lpd}, list(lpd.parameters()), token_batches(cache, config["batch_size"]),
                          step_fn, out_dir, log_every=config.get("log_every", 10),
                          save_every=config.get("save_every", 200))
    save_trained(result, "lpd", out_dir)
    return result
