"""Recipe: train MuLo-SD's drafting pair for a target AR model: a low-resolution drafter GPT and a token up-sampler.

Data are paired renders of the same procedural scenes (:class:`~vargen.data.scenes.SceneDataset`
renders one scene description at any resolution): every scene is rendered at
``config["low_resolution"]`` (default 64 px) and ``config["high_resolution"]`` (the target's, default
128 px) and both are tokenised once by the target's VQ tokenizer (``out_dir/pairs.pt``), giving
``(low tokens [h*w], high tokens [H*W], caption)`` triples.

(a) The **drafter** is a LlamaGen GPT (``config["drafter"]``: dims; the vocabulary, grid and caption
    shape are set from the tokenizer and the target) trained by teacher-forced cross-entropy on the
    low-resolution tokens, reading captions through the target's frozen text encoder
    (``config["text_encoder"]``), so at decoding time it takes the target's condition as it is.
    Condition dropout (``class_dropout_prob``, for CFG) as in the AR recipe.
(b) The **up-sampler** (:class:`~vargen.models.mulo.TokenUpsampler`, ``config["upsampler"]``, its token
    embedding initialised from the VQ codebook) is trained by per-cell cross-entropy from the
    low-resolution tokens to the high-resolution tokens of the same scene.

``config["drafter_train"]`` / ``config["upsampler_train"]`` override the shared optimisation settings
(``steps``, ``batch_size``, ``lr``, ...) per part; each part logs to ``out_dir/<part>/log.jsonl`` and
resumes from its own state. The pair is saved to ``out_dir/mulo`` (``drafter/`` + ``upsampler/``).
"""
from __future__ import annotations

import os
from functools import partial
from typing import Optional

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data.registry import collate
from ..data.scenes import SceneDataset
from ..errors import load_local
from ..models import LlamaGen
from ..models.mulo import MuLo, TokenUpsampler
from ..models.text import WordTextEncoder
from ..tokenizers import load_tokenizer
from .common import infinite, run_training

TRAIN_KEYS = ("steps", "batch_size", "lr", "warmup", "weight_decay", "grad_clip", "log_every", "save_every", "betas",
              "mixed_precision", "seed")


@torch.no_grad()
def tokenize_pairs(vq, data: dict, low: int, high: int, limit: int, batch_size: int = 64) -> dict:
    """``{"low": [n, (low/f)^2], "high": [n, (high/f)^2], "captions": [...]}``: each scene of ``SceneDataset(**data)``
    rendered at both resolutions and tokenised by ``vq``."""
    spec = {k: v for k, v in data.items() if k not in ("name", "resolution")}
    sets = {"low": SceneDataset(resolution=low, **spec), "high": SceneDataset(resolution=high, **spec)}
    n = min(limit or len(sets["low"]), len(sets["low"]))
    out, captions = {"low": [], "high": []}, []
    vq.eval()
    for start in tqdm(range(0, n, batch_size), desc="tokenizing pairs", leave=False):
        idx = range(start, min(n, start + batch_size))
        for key, ds in sets.items():
            batch = collate([ds[i] for i in idx])
            out[key].append(vq.encode(batch["image"].to(vq.device)).flatten(1).cpu())
            if key == "low":
                captions += batch["caption"]
    return {"low": torch.cat(out["low"]), "high": torch.cat(out["high"]), "captions": captions}


def load_pairs(config: dict, out_dir: str):
    """``(vq, pairs)``: the tokenizer ``config["tokenizer"]`` and the paired token cache (``out_dir/pairs.pt``)."""
    vq = load_tokenizer(config["tokenizer"], config.get("tokenizer_type"))
    path = os.path.join(out_dir, "pairs.pt")
    os.makedirs(out_dir, exist_ok=True)
    if os.path.exists(path):
        return vq, torch.load(path)
    data = config.get("data", {"name": "scenes", "seed": 1})
    if data.get("name", "scenes") != "scenes":
        raise ValueError("the MuLo recipe needs paired low/high-resolution renders: config['data'] must be the "
                         f"procedural scenes (name 'scenes'), got {data.get('name')!r}")
    pairs = tokenize_pairs(vq, data, config.get("low_resolution", 64), config.get("high_resolution", 128),
                           config.get("num_images", 1000))
    torch.save(pairs, path + ".tmp")
    os.replace(path + ".tmp", path)
    return vq, pairs


class _Pairs(torch.utils.data.Dataset):
    def __init__(self, pairs: dict):
        self.pairs = pairs

    def __len__(self):
        return len(self.pairs["low"])

    def __getitem__(self, i):
        return {"low": self.pairs["low"][i], "high": self.pairs["high"][i], "captions": self.pairs["captions"][i]}


def _collate(items):
    return {"low": torch.stack([it["low"] for it in items]), "high": torch.stack([it["high"] for it in items]),
            "captions": [it["captions"] for it in items]}


def pair_batches(pairs: dict, batch_size: int):
    loader = torch.utils.data.DataLoader(_Pairs(pairs), batch_size=batch_size, shuffle=True, drop_last=True,
                                         collate_fn=_collate)
    return infinite(loader)


def drafter_step(modules, batch, text_encoder: Optional[WordTextEncoder] = None):
    """Teacher-forced cross-entropy of the low-resolution tokens given the target's condition."""
    gpt = modules["drafter"]
    tokens = batch["low"].to(gpt.device)
    with torch.no_grad():
        feats, mask = text_encoder.to(gpt.device)(batch["captions"])
    logits = gpt.forward_train(tokens, feats, cond_mask=mask)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1))
    return loss, {"token_acc": (logits.argmax(-1) == tokens).float().mean().detach(), "tokens": tokens.numel()}


def upsampler_step(modules, batch):
    """Per-cell cross-entropy of the high-resolution tokens given the low-resolution ones."""
    up = modules["upsampler"]
    device = next(up.parameters()).device
    low, high = batch["low"].to(device), batch["high"].to(device)
    logits = up(low)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), high.reshape(-1))
    return loss, {"token_acc": (logits.argmax(-1) == high).float().mean().detach(), "tokens": high.numel()}


def _part_config(config: dict, part: str) -> dict:
    base = {k: config[k] for k in TRAIN_KEYS if k in config}
    return {**base, **config.get(f"{part}_train", {})}


def train_mulo(config: dict, out_dir: str) -> dict:
    """Train the drafter and the up-sampler (see the module docstring); saves ``out_dir/mulo``."""
    torch.manual_seed(config.get("seed", 0))
    vq, pairs = load_pairs(config, out_dir)
    if not config.get("text_encoder"):
        raise ValueError("set config['text_encoder'] to the target's trained text encoder folder "
                         "(e.g. vargen/weights/scenes-t2i/text_encoder): the drafter reads the target's captions")
    text_encoder = load_local(WordTextEncoder, config["text_encoder"], "the text encoder")
    text_encoder = text_encoder.float().eval().requires_grad_(False)
    enc = text_encoder.config
    if config.get("target"):
        target = load_local(LlamaGen, config["target"], "the target AR model (target)")
        want = (vq.vocab_size, pairs["high"].shape[1], enc.caption_dim, enc.max_length)
        got = (target.vocab_size, target.num_tokens, target.config.caption_dim, target.config.cls_token_num)
        if want != got:
            raise ValueError(f"the target at {config['target']!r} (vocabulary, tokens, caption dim, caption length "
                             f"{got}) does not fit the tokenizer/resolution/text encoder {want}; pair them as trained")
    dcfg = dict(config.get("drafter", {}))
    size = dcfg.pop("size", None)
    dcfg.update(model_type="t2i", vocab_size=vq.vocab_size, block_size=pairs["low"].shape[1],
                caption_dim=enc.caption_dim, cls_token_num=enc.max_length)
    drafter = LlamaGen.from_size(size, **dcfg) if size else LlamaGen(**dcfg)
    side = int(round(pairs["low"].shape[1] ** 0.5))
    scale = int(round((pairs["high"].shape[1] / pairs["low"].shape[1]) ** 0.5))
    upsampler = TokenUpsampler.from_codebook(vq.codebook_embeddings, (side, side), scale,
                                             **config.get("upsampler", {}))
    results = {}
    for part, module, step_fn in (("drafter", drafter, partial(drafter_step, text_encoder=text_encoder)),
                                  ("upsampler", upsampler, upsampler_step)):
        cfg = _part_config(config, part)
        res = run_training(cfg, {part: module}, list(module.parameters()), pair_batches(pairs, cfg["batch_size"]),
                           step_fn, os.path.join(out_dir, part), log_every=cfg.get("log_every", 10),
                           save_every=cfg.get("save_every", 200))
        results[part] = res
    mulo = MuLo(results["drafter"].pop("modules")["drafter"].eval(),
                results["upsampler"].pop("modules")["upsampler"].eval())
    mulo.save_pretrained(os.path.join(out_dir, "mulo"))
    summary = {f"{part}_{k}": v for part, r in results.items() for k, v in r.items()
               if isinstance(v, (int, float, str))}
    return {**summary, "run_dirs": [os.path.join(out_dir, part) for part in results],
            "steps": sum(r["steps"] for r in results.values()),
            "wall_s": sum(r["wall_s"] for r in results.values()), "device": results["drafter"]["device"]}
