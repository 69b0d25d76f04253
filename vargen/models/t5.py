"""T5 caption features as LlamaGen's text-to-image models take them.

LlamaGen encodes prompts with FLAN-T5-XL (120 tokens, 2048-d), moves the right padding
to the left and zeroes the padded features; the GPT masks pads from image tokens. The
same ``(features, mask)`` pair comes out of vargen's own :class:`WordTextEncoder`, so
both go through the one caption path of :class:`vargen.models.LlamaGen`.
"""
from __future__ import annotations

from typing import Sequence

import torch

T5_HUB_ID = "google/flan-t5-xl"  # LlamaGen's text encoder (2048-d features)


def left_pad(features: torch.Tensor, mask: torch.Tensor):
    """Move right padding to the left (per row) and zero the padded features."""
    mask = mask.bool()
    lengths = mask.sum(1)
    L = mask.shape[1]
    # row b: real tokens 0..n-1 go to L-n..L-1
    idx = (torch.arange(L, device=mask.device)[None] - (L - lengths)[:, None]) % L
    feats = torch.gather(features, 1, idx[..., None].expand_as(features))
    new_mask = torch.arange(L, device=mask.device)[None] >= (L - lengths)[:, None]
    return feats * new_mask[..., None], new_mask


@torch.no_grad()
def t5_caption_features(text_encoder, tokenizer, prompts: Sequence[str], max_length: int = 120):
    """Prompts -> ``(features [B, max_length, D], mask [B, max_length])`` the LlamaGen way.

    ``text_encoder`` is a transformers ``T5EncoderModel`` (``T5_HUB_ID`` or a local folder
    loaded with ``local_files_only=True``); ``tokenizer`` its tokenizer. A prompt longer
    than ``max_length`` tokens raises instead of being cut silently.
    """
    lengths = [len(ids) for ids in tokenizer(list(prompts), add_special_tokens=True)["input_ids"]]
    too_long = [(p, n) for p, n in zip(prompts, lengths) if n > max_length]
    if too_long:
        p, n = too_long[0]
        raise ValueError(f"prompt too long: {n} tokens, the model takes at most {max_length}; shorten {p!r}")
    batch = tokenizer(list(prompts), max_length=max_length, padding="max_length", truncation=True,
                      return_attention_mask=True, add_special_tokens=True, return_tensors="pt")
    device = next(text_encoder.parameters()).device
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    feats = text_encoder(input_ids=ids, attention_mask=mask)["last_hidden_state"]
    return left_pad(feats, mask)
