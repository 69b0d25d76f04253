"""T5 caption features as LlamaGen's text-to-image models take them.

LlamaGen (``language/t5.py``, ``T5Embedder``) cleans each prompt twice with PixArt's
``clean_caption`` (lower-case, URLs, HTML, @names, CJK, odd punctuation, ...), encodes it
with FLAN-T5-XL padded / truncated to 120 tokens, then (``sample_t2i.py``) moves the right
padding to the left and zeroes the padded features; the GPT masks pads from image tokens.
The same ``(features, mask)`` pair comes out of vargen's own :class:`WordTextEncoder`, so
both go through the one caption path of :class:`vargen.models.LlamaGen`.
"""
from __future__ import annotations

import html
import os
import re
import unicodedata
import urllib.parse
import warnings
from html.parser import HTMLParser
from typing import Sequence

import torch

T5_HUB_ID = "google/flan-t5-xl"  # LlamaGen's text encoder (2048-d features)



def _compiled(rules):
    return [(re.compile(pattern), replacement) for pattern, replacement in rules]


# PixArt / LlamaGen caption cleaning, in order. Each entry: (pattern, replacement).
_URL = r"[a-zA-Z0-9.\-]+[.](?:com|co|ru|net|org|edu|gov|it)[\w/-]*\b\/?(?!@)"
_EARLY_RULES = _compiled([
    (r"<person>", "person"),
    (r"\b((?:https?:(?:\/{1,3}|[a-zA-Z0-9%])|" + _URL + r"))", ""),
    (r"\b((?:www:(?:\/{1,3}|[a-zA-Z0-9%])|" + _URL + r"))", ""),
])
_DASHES = (r"[\u002D\u058A\u05BE\u1400\u1806\u2010-\u2015\u2E17\u2E1A\u2E3A\u2E3B\u2E40\u301C\u3030\u30A0"
           r"\uFE31\uFE32\uFE58\uFE63\uFF0D]+")
_MIDDLE_RULES = _compiled([
    (r"@[\w\d]+\b", ""),  # @nickname
    (r"[\u31c0-\u31ef\u31f0-\u31ff\u3200-\u32ff\u3300-\u33ff\u3400-\u4dbf\u4dc0-\u4dff\u4e00-\u9fff]+", ""),  # CJK
    (_DASHES, "-"),
    (r"[`´«»“”¨]", '"'),
    (r"[‘’]", "'"),
    (r"&quot;?", ""),
    (r"&amp", ""),
    (r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}", " "),  # IP addresses
    (r"\d:\d\d\s+$", ""),  # article ids
    (r"\\n", " "),  # a literal backslash-n
    (r"#\d{1,3}\b", ""),
    (r"#\d{5,}\b", ""),
    (r"\b\d{6,}\b", ""),
    (r"[\S]+\.(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)", ""),  # file names
    (r"[\"\']{2,}", '"'),
    (r"[\.]{2,}", " "),
    (r"[#®•©™&@·º½¾¿¡§~\)\(\]\[\}\{\|\\\/\*]{1,}", " "),  # ***SALE***, #SALE
    (r"\s+\.\s+", " "),
])
_LATE_RULES = _compiled([
    (r"\b[a-zA-Z]{1,3}\d{3,15}\b", ""),  # jc6640
    (r"\b[a-zA-Z]+\d+[a-zA-Z]+\b", ""),  # jc6640vc
    (r"\b\d+[a-zA-Z]+\d+\b", ""),  # 6640vc231
    (r"(worldwide\s+)?(free\s+)?shipping", ""),
    (r"(free\s)?download(\sfree)?", ""),
    (r"\bclick\b\s(?:for|on)\s\w+", ""),
    (r"\b(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)(\simage[s]?)?", ""),
    (r"\bpage\s+\d+\b", ""),
    (r"\b\d*[a-zA-Z]+\d+[a-zA-Z]+\d+[a-zA-Z\d]*\b", " "),  # j2d1a2a...
    (r"\b\d+\.?\d*[xх×]\d+\.?\d*\b", ""),  # sizes 1920x1080
    (r"\b\s+\:\s+", ": "),
    (r"(\D[,\./])\b", r"\1 "),
    (r"\s+", " "),
    (r"^[\"\']([\w\W]+)[\"\']$", r"\1"),
    (r"^[\'\_,\-\:;]", ""),
    (r"[\'\_,\-\:\-\+]$", ""),
    (r"^\.\S+$", ""),
])
# ftfy.fix_text's fixes that need no tables: curly quotes, full-width ASCII, ligatures, line breaks, controls
_UNCURL = str.maketrans({"‘": "'", "’": "'", "‚": "'", "‛": "'", "“": '"', "”": '"', "„": '"', "‟": '"'})


def _sub_all(rules, text: str) -> str:
    for pattern, replacement in rules:
        text = pattern.sub(replacement, text)
    return text


class _TextOnly(HTMLParser):
    """The text of an HTML fragment (what BeautifulSoup's ``.text`` gives): tags dropped, entities decoded."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts = []

    def handle_data(self, data):
        self.parts.append(data)


def _html_text(text: str) -> str:
    parser = _TextOnly()
    parser.feed(text)
    parser.close()
    return "".join(parser.parts)


def _fix_text(text: str) -> str:
    """The stdlib part of ``ftfy.fix_text`` (mojibake repair, which needs ftfy's tables, is left out)."""
    text = re.sub(r"\r\n|[\r\u2028\u2029\x85]", "\n", text)
    text = "".join(c for c in text if c in "\n\t" or unicodedata.category(c) != "Cc")
    text = "".join(unicodedata.normalize("NFKC", c) if "\ufb00" <= c <= "\ufb06" or "\uff01" <= c <= "\uff5e" else c
                   for c in text)  # ligatures, full-width ASCII
    return unicodedata.normalize("NFC", text.translate(_UNCURL))


def clean_caption(caption: str) -> str:
    """One pass of LlamaGen's (PixArt's) ``T5Embedder.clean_caption``; :func:`clean_prompt` applies it twice."""
    caption = urllib.parse.unquote_plus(str(caption)).strip().lower()
    caption = _html_text(_sub_all(_EARLY_RULES, caption))
    caption = _sub_all(_MIDDLE_RULES, caption)
    if len(re.findall(r"[-_]", caption)) > 3:  # this-is-my-cute-cat / this_is_my_cute_cat
        caption = re.sub(r"[-_]", " ", caption)
    caption = html.unescape(html.unescape(_fix_text(caption))).strip()
    return _sub_all(_LATE_RULES, caption).strip()


def clean_prompt(prompt: str) -> str:
    """A prompt as LlamaGen's T5 saw its training captions (``T5Embedder.text_preprocessing``)."""
    return clean_caption(clean_caption(prompt))


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


def load_t5(folder: str):
    """``(T5EncoderModel, tokenizer)`` from a local FLAN-T5 folder (``google/flan-t5-xl`` as downloaded:
    a full T5 checkpoint loads its encoder half). Nothing is fetched from the internet."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"no T5 folder at {folder!r}: give a local copy of {T5_HUB_ID} "
                                "(config.json, model weights, spiece.model or tokenizer.json)")
    from transformers import AutoTokenizer, T5EncoderModel

    from ..loading import quiet_loading

    try:
        with quiet_loading():  # a full T5 file's unused decoder weights are expected, not news
            encoder = T5EncoderModel.from_pretrained(folder, local_files_only=True).eval()
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ValueError(f"could not load T5 from {folder!r} ({err}); it must hold a T5 encoder and its tokenizer, "
                         f"e.g. a download of {T5_HUB_ID}") from None
    return encoder, tokenizer


@torch.no_grad()
def t5_caption_features(text_encoder, tokenizer, prompts: Sequence[str], max_length: int = 120):
    """Prompts -> ``(features [B, max_length, D], mask [B, max_length])`` the LlamaGen way.

    ``text_encoder`` is a transformers ``T5EncoderModel`` (see :func:`load_t5`); ``tokenizer``
    its tokenizer. Prompts are cleaned (:func:`clean_prompt`); one longer than ``max_length``
    tokens is cut to it as LlamaGen does, with a warning saying how much was cut.
    """
    texts = [clean_prompt(p) for p in prompts]
    for i, ids in enumerate(tokenizer(texts, add_special_tokens=True)["input_ids"]):
        if len(ids) > max_length:
            kept = tokenizer.decode(ids[:max_length - 1], skip_special_tokens=True)
            warnings.warn(f"prompt {i} has {len(ids)} T5 tokens and the model takes {max_length}: the last "
                          f"{len(ids) - max_length} were cut (as LlamaGen does); it kept {kept[-60:]!r} at its end")
    batch = tokenizer(texts, max_length=max_length, padding="max_length", truncation=True,
                      return_attention_mask=True, add_special_tokens=True, return_tensors="pt")
    param = next(text_encoder.parameters())
    ids, mask = batch["input_ids"].to(param.device), batch["attention_mask"].to(param.device)
    feats = text_encoder(input_ids=ids, attention_mask=mask)["last_hidden_state"]
    return left_pad(feats, mask)
