"""Recipe: train an AR generator (c2i or t2i) on token grids from a trained VQ tokenizer, or on the
1D token sequences of a flexible-length tokenizer (:class:`~vargen.tokenizers.Flex1DTokenizer`).

Images are tokenised once and cached (``out_dir/tokens.pt``); t2i trains the word-level
text encoder jointly through LlamaGen's caption path. Condition dropout (for CFG) is the
model's ``class_dropout_prob``. A 1D tokenizer gives a 1D-token GPT (``grid_rows=1``, one
position per sequence index) that can stop after any number of tokens when generating.
"""
from __future__ import annotations

import hashlib
import os
from typing import Union

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..atomic import atomic_path
from ..data.registry import build_dataset, collate
from ..models import LlamaGen
from ..models.text import WordTextEncoder, build_vocabulary
from ..tokenizers import Flex1DTokenizer, VQTokenizer, load_tokenizer
from ..errors import load_local
from .common import infinite, run_training


@torch.no_grad()
def tokenize_dataset(vq: Union[VQTokenizer, Flex1DTokenizer], dataset, batch_size: int = 64, limit: int = 0,
                     num_workers: int = 0) -> dict:
    """Encode every image once: ``{"tokens": [N, h*w] (1D: [N, K]) long, "captions": [...], "labels": [N] or None}``."""
    n = min(len(dataset), limit) if limit else len(dataset)
    subset = torch.utils.data.Subset(dataset, range(n))
    loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, collate_fn=collate, num_workers=num_workers)
    tokens, captions, labels = [], [], []
    vq.eval()
    for batch in tqdm(loader, desc="tokenizing", leave=False):
        tokens.append(vq.encode(batch["image"].to(vq.device)).flatten(1).cpu())
        captions += batch["caption"]
        if "label" in batch:
            labels.append(batch["label"])
    return {"tokens": torch.cat(tokens), "captions": captions, "labels": torch.cat(labels) if labels else None}


def ar_step(modules, batch):
    gpt = modules["gpt"]
    tokens = batch["tokens"].to(gpt.device)
    if "text_encoder" in modules:
        feats, mask = modules["text_encoder"](batch["captions"])
        logits = gpt.forward_train(tokens, feats, cond_mask=mask)
    else:
        logits = gpt.forward_train(tokens, batch["labels"].to(gpt.device))
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1))
    acc = (logits.argmax(-1) == tokens).float().mean()
    return loss, {"token_acc": acc.detach(), "tokens": tokens.numel()}


class _TokenBatches(torch.utils.data.Dataset):
    def __init__(self, cache: dict):
        self.cache = cache

    def __len__(self):
        return len(self.cache["tokens"])

    def __getitem__(self, i):
        item = {"tokens": self.cache["tokens"][i], "captions": self.cache["captions"][i]}
        if self.cache["labels"] is not None:
            item["labels"] = self.cache["labels"][i]
        return item


def _collate_tokens(items):
    out = {"tokens": torch.stack([it["tokens"] for it in items]), "captions": [it["captions"] for it in items]}
    if "labels" in items[0]:
        out["labels"] = torch.stack([it["labels"] for it in items])
    return out


def load_token_cache(config: dict, out_dir: str):
    """``(vq, cache)``: the tokenizer ``config["tokenizer"]`` (a VQ or 1D tokenizer folder, by its config or
    ``config["tokenizer_type"]``) and ``config["data"]`` tokenised once (``config["num_images"]`` limits it).

    The cache is ``config["token_cache"]`` if given (e.g. the AR run's ``tokens.pt``, so that the LPD and NAR
    recipes on the same data skip tokenising it again), else ``out_dir/tokens.pt``. It records which tokenizer
    weights (a fingerprint) and which data made it; a cache made by other weights or data is refused."""
    vq = load_tokenizer(config["tokenizer"], config.get("tokenizer_type"))
    source = {"tokenizer": tokenizer_fingerprint(vq), "data": config["data"],
              "num_images": config.get("num_images", 0)}
    cache_path = config.get("token_cache") or os.path.join(out_dir, "tokens.pt")
    os.makedirs(out_dir, exist_ok=True)
    if os.path.exists(cache_path):
        cache = torch.load(cache_path)
        made_by = cache.get("source")
        if made_by is not None and made_by != source:
            what = [k for k in source if made_by.get(k) != source[k]]
            raise ValueError(f"token cache {cache_path} was made with another {' and '.join(what)} than this config "
                             f"asks for ({config['tokenizer']}); delete it, or point \"token_cache\" at a new file")
    else:
        cache = tokenize_dataset(vq, build_dataset(config["data"]), limit=config.get("num_images", 0),
                                 num_workers=config.get("num_workers", 0))
        cache["source"] = source
        with atomic_path(cache_path) as tmp:  # creates the folder; a killed run leaves no half-written cache
            torch.save(cache, tmp)
    return vq, cache


def tokenizer_fingerprint(vq) -> str:
    """A short hash of a tokenizer's weights: the same weights give the same tokens, wherever they were loaded from."""
    digest = hashlib.sha256()
    for name, tensor in sorted(vq.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def token_batches(cache: dict, batch_size: int):
    """Endless shuffled batches ``{"tokens", "captions"[, "labels"]}`` of a token cache."""
    loader = torch.utils.data.DataLoader(_TokenBatches(cache), batch_size=batch_size, shuffle=True,
                                         drop_last=True, collate_fn=_collate_tokens)
    return infinite(loader)


def _fresh_modules(config: dict, vq, cache: dict) -> dict:
    """A new GPT of ``config["model"]`` (+ a text encoder whose vocabulary is the cached captions' words for t2i)."""
    model_cfg = dict(config["model"])
    size = model_cfg.pop("size", None)  # a named size, or the explicit dims in the config
    modules = {}
    if model_cfg.get("model_type", "c2i") == "t2i":
        text_cfg = dict(config.get("text_encoder", {}))
        vocab = build_vocabulary(cache["captions"], text_cfg.pop("min_count", 1))
        modules["text_encoder"] = WordTextEncoder(vocabulary=vocab, **text_cfg)
        model_cfg.update(caption_dim=modules["text_encoder"].config.caption_dim,
                         cls_token_num=modules["text_encoder"].config.max_length)
    model_cfg.update(vocab_size=vq.vocab_size, block_size=cache["tokens"].shape[1])
    if isinstance(vq, Flex1DTokenizer):
        model_cfg.update(grid_rows=1)
    gpt = LlamaGen.from_size(size, **model_cfg) if size else LlamaGen(**model_cfg)
    return {"gpt": gpt, **modules}


def _continued_modules(config: dict, vq, cache: dict) -> dict:
    """The GPT (+ text encoder) of the AR run folder ``config["init"]``, to train further on this config's data
    with a fresh optimiser and schedule. ``"model"`` / ``"text_encoder"`` in the config, if given, must agree with
    the saved ones (a different architecture cannot continue a run)."""
    init = config["init"]
    gpt = load_local(LlamaGen, os.path.join(init, "gpt"), "the AR run to continue (init)").float()
    if gpt.vocab_size != vq.vocab_size or gpt.num_tokens != cache["tokens"].shape[1]:
        raise ValueError(f"the GPT in {init!r} has {gpt.vocab_size} tokens x {gpt.num_tokens} positions but the "
                         f"tokenizer gives {vq.vocab_size} x {cache['tokens'].shape[1]}: continue it with its own "
                         "tokenizer")
    modules = {"gpt": gpt}
    if os.path.isdir(os.path.join(init, "text_encoder")):
        modules["text_encoder"] = load_local(WordTextEncoder, os.path.join(init, "text_encoder"),
                                             "the AR run's text encoder (init)")
        unknown = modules["text_encoder"].unknown_words(cache["captions"])
        if unknown:
            raise ValueError(f"the captions use words the text encoder of {init!r} never saw ({', '.join(unknown[:8])}"
                             f"{', ...' if len(unknown) > 8 else ''}): train a fresh model on this data instead")
    for key, saved in (("model", gpt), ("text_encoder", modules.get("text_encoder"))):
        asked = {k: v for k, v in config.get(key, {}).items() if k not in ("size", "min_count")}
        differ = [k for k, v in asked.items() if saved is None or saved.config.get(k) != v]
        if differ:
            raise ValueError(f"config {key!r} sets {', '.join(differ)} unlike the saved model in {init!r}; "
                             f"drop {key!r} from the config or make it match")
    return modules


def train_ar(config: dict, out_dir: str) -> dict:
    """Train the GPT of ``config["model"]`` (+ text encoder for t2i) on ``config["data"]`` tokenised by
    ``config["tokenizer"]`` (a saved VQTokenizer folder, or a Flex1DTokenizer folder for a 1D-token GPT).
    ``config["init"]`` (an AR run folder with ``gpt/`` and, for t2i, ``text_encoder/``) continues a finished run
    on new data or with a new schedule instead of starting from random weights. ``config["compile"]`` runs the
    training pass through ``torch.compile``.
    Saves ``out_dir/gpt`` (and ``out_dir/text_encoder``); ``config["save_pipeline"]`` also writes
    ``out_dir/pipeline``, a :class:`~vargen.pipeline.VarGenPipeline` folder for ``vargen generate --model``."""
    torch.manual_seed(config.get("seed", 0))
    vq, cache = load_token_cache(config, out_dir)
    modules = _continued_modules(config, vq, cache) if config.get("init") else _fresh_modules(config, vq, cache)
    if config.get("compile"):
        # inductor fuses the teacher-forced pass: 1.31x per step for the 17.5 M scenes-t2i GPT under bf16 on
        # 2 CPU cores (4.69 -> 3.59 s at batch 32, one-off compile ~35 s); weights and saved files are unchanged
        modules["gpt"].forward_train = torch.compile(modules["gpt"].forward_train)
    params = [p for m in modules.values() for p in m.parameters()]
    result = run_training(config, modules, params, token_batches(cache, config["batch_size"]), ar_step, out_dir,
                          log_every=config.get("log_every", 10), save_every=config.get("save_every", 200))
    trained = result.pop("modules")
    for name, module in trained.items():
        module.save_pretrained(os.path.join(out_dir, name))
    if config.get("save_pipeline"):
        from ..pipeline import VarGenPipeline

        VarGenPipeline(gpt=trained["gpt"], vq=vq.eval(), text_encoder=trained.get("text_encoder")).save_pretrained(
            os.path.join(out_dir, "pipeline"))
    return result
