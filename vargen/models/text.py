"""A small word-level text encoder for vargen's own text-to-image models.

It produces caption features ``[B, L, caption_dim]`` plus a padding mask, left-padded
with zeroed pads exactly as LlamaGen's inference feeds T5 features, so a vargen t2i
model and a LlamaGen t2i model take their text through the same caption path.
"""
from __future__ import annotations

import re
import unicodedata
from collections import Counter
from typing import Iterable, List, Sequence

import torch
import torch.nn as nn
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from ..errors import PromptError, shorten

PAD, UNK = "<pad>", "<unk>"
_WORD = re.compile(r"[a-z0-9]+")


def normalise(text: str) -> str:
    """Unicode NFKC (full-width letters, ligatures), lowercased, accents folded: the vocabulary is ASCII
    words, so "Café Crème" must read "cafe creme", not "caf", "cr"."""
    text = unicodedata.normalize("NFKC", text).lower()
    return "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))


def split_words(text: str) -> List[str]:
    """Normalised alphanumeric words: the unit of the vocabulary."""
    return _WORD.findall(normalise(text))


def dropped_characters(text: str) -> List[str]:
    """Letters, digits and symbols (CJK, emoji, "ß") of ``text`` that no vocabulary word can hold: they are
    dropped, so say which. Spaces and punctuation are separators, not content."""
    return sorted({c for c in normalise(text) if not _WORD.fullmatch(c)
                   and unicodedata.category(c)[0] in "LNS"})


def build_vocabulary(captions: Iterable[str], min_count: int = 1) -> List[str]:
    """Words seen at least ``min_count`` times, most frequent first, after ``<pad>`` and ``<unk>``."""
    counts = Counter(w for c in captions for w in split_words(c))
    words = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
    return [PAD, UNK] + words


class WordTextEncoder(ModelMixin, ConfigMixin):
    """Word embeddings + a small bidirectional transformer -> caption features.

    Example:
        >>> enc = WordTextEncoder(vocabulary=build_vocabulary(["a red circle"]), caption_dim=16, max_length=8)
        >>> feats, mask = enc(["a red square"])
        >>> feats.shape, enc.unknown_words(["a red square"])
        (torch.Size([1, 8, 16]), ['square'])
    """

    config_name = "config.json"

    @register_to_config
    def __init__(self, vocabulary: Sequence[str] = (PAD, UNK), caption_dim: int = 256, width: int = 128,
                 layers: int = 2, heads: int = 4, max_length: int = 24):
        super().__init__()
        if list(vocabulary[:2]) != [PAD, UNK]:
            raise ValueError("vocabulary must start with '<pad>', '<unk>' (use build_vocabulary)")
        self.index = {w: i for i, w in enumerate(vocabulary)}
        self.embed = nn.Embedding(len(vocabulary), width, padding_idx=0)
        self.position = nn.Parameter(torch.zeros(max_length, width))
        nn.init.normal_(self.position, std=0.02)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, caption_dim)

    def unknown_words(self, captions: Sequence[str]) -> List[str]:
        """Words of ``captions`` that map to ``<unk>`` (sorted, unique): report them to users."""
        return sorted({w for c in captions for w in split_words(c) if w not in self.index})

    def check_prompts(self, prompts: Sequence[str], unconditional: bool = False) -> List[str]:
        """Refuse prompts that would condition on nothing; return warnings for what the encoder drops.

        An empty prompt is an error unless ``unconditional`` (then every prompt must be empty); a prompt
        none of whose words the vocabulary knows would silently act as an empty one, so it is an error too.
        """
        warnings = []
        for prompt in prompts:
            words = split_words(prompt)
            if unconditional:
                if words:
                    raise PromptError(f"unconditional generation takes no prompt, got {shorten(prompt)!r}")
                continue
            if not words:
                raise PromptError(f"prompt {shorten(prompt)!r} has no words this text encoder reads (it reads "
                                  "ASCII letters and digits after folding accents); give a prompt, or ask for "
                                  "unconditional images explicitly (vargen generate --unconditional)")
            known = [w for w in words if w in self.index]
            if not known:
                vocab = ", ".join(list(self.index)[2:12])
                raise PromptError(f"none of the words of {shorten(prompt)!r} is known to this text encoder "
                                  f"(its vocabulary: {vocab}, ...): rephrase it with known words")
            dropped = dropped_characters(prompt)
            if dropped:
                warnings.append(f"characters this text encoder cannot read were dropped from "
                                f"{shorten(prompt, 60)!r}: {shorten(' '.join(dropped), 60)}")
        unknown = self.unknown_words(prompts)
        if unknown:
            warnings.append("words unknown to the text encoder (mapped to <unk>): "
                            + shorten(", ".join(unknown), 200))
        return warnings

    def tokenize(self, captions: Sequence[str]):
        """Captions -> left-padded ids ``[B, max_length]`` and mask (True = real word).

        Raises if a caption is longer than ``max_length`` words.
        """
        L = self.config.max_length
        ids = torch.zeros(len(captions), L, dtype=torch.long)
        for b, caption in enumerate(captions):
            words = split_words(caption)
            if len(words) > L:
                raise PromptError(f"prompt too long: {len(words)} words, this text encoder takes at most {L}; "
                                  f"shorten {shorten(caption)!r}")
            if words:
                ids[b, L - len(words):] = torch.tensor([self.index.get(w, 1) for w in words])
        return ids, ids != 0

    def forward(self, captions: Sequence[str]):
        """Captions -> ``(features [B, L, caption_dim], mask [B, L])``; pads are zero features."""
        ids, mask = self.tokenize(captions)
        ids, mask = ids.to(self.device), mask.to(self.device)
        h = self.embed(ids) + self.position
        # an all-pad caption (empty prompt) would give an all-masked row: let it see its pads
        key_pad = ~mask & mask.any(1, keepdim=True)
        h = self.norm(self.encoder(h, src_key_padding_mask=key_pad))
        return self.proj(h) * mask[..., None], mask
