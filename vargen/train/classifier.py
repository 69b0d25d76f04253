"""Recipe: train the FD-vargen CIFAR-10 classifier (cross-entropy, pad-crop + flip augmentation).

Its penultimate features are vargen's offline quality extractor (:mod:`vargen.eval.classifier`).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from ..data.registry import build_dataset, collate
from ..eval.classifier import DEFAULT_CONFIG, FDVargen, build_classifier, save_classifier
from .common import infinite, run_training


def augment(images: torch.Tensor, pad: int = 4) -> torch.Tensor:
    """Random translation by up to ``pad`` pixels (reflect padding) and horizontal flips, per image."""
    B, _, H, W = images.shape
    padded = F.pad(images, (pad,) * 4, mode="reflect")
    ys, xs = torch.randint(0, 2 * pad + 1, (2, B)).tolist()
    out = torch.stack([padded[i, :, y:y + H, x:x + W] for i, (y, x) in enumerate(zip(ys, xs))])
    flip = torch.rand(B) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


def classifier_step(modules, batch, extractor: FDVargen):
    """Cross-entropy on augmented images; images arrive in [-1, 1] and are mapped to the extractor's pixels."""
    net = modules["classifier"]
    pixels = (augment(batch["image"]) + 1) * 127.5
    logits = net(extractor.normalise(pixels))
    loss = F.cross_entropy(logits, batch["label"].to(logits.device))
    acc = (logits.argmax(-1) == batch["label"].to(logits.device)).float().mean()
    return loss, {"acc": acc.detach()}


@torch.no_grad()
def accuracy(extractor: FDVargen, data, batch_size: int = 256) -> float:
    """Top-1 accuracy of the extractor's classifier on a labelled dataset."""
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, collate_fn=collate)
    right = total = 0
    for batch in loader:
        feats = extractor((batch["image"] + 1) * 127.5)
        right += (extractor.logits(feats).argmax(-1).cpu() == batch["label"]).sum().item()
        total += len(batch["label"])
    return right / total


def train_classifier(config: dict, out_dir: str) -> dict:
    """Train ``build_classifier(**config["model"])`` on ``config["data"]``; saves ``out_dir/classifier``
    and reports test accuracy on ``config["eval_data"]`` when given."""
    torch.manual_seed(config.get("seed", 0))
    model_config = {**DEFAULT_CONFIG, **config.get("model", {})}
    net = build_classifier(**model_config)
    extractor = FDVargen(net, model_config["image_size"])
    data = build_dataset(config["data"])
    loader = torch.utils.data.DataLoader(data, batch_size=config["batch_size"], shuffle=True, drop_last=True,
                                         num_workers=config.get("num_workers", 0), collate_fn=collate)
    step = lambda modules, batch: classifier_step(modules, batch, extractor)  # noqa: E731
    result = run_training(config, {"classifier": net}, list(net.parameters()), infinite(loader), step, out_dir,
                          log_every=config.get("log_every", 10), save_every=config.get("save_every", 200))
    trained = result.pop("modules")["classifier"].eval()
    if config.get("eval_data"):
        result["test_accuracy"] = accuracy(FDVargen(trained, model_config["image_size"]),
                                           build_dataset(config["eval_data"]))
    save_classifier(trained, model_config, os.path.join(out_dir, "classifier"))
    with open(os.path.join(out_dir, "classifier", "metrics.json"), "w") as f:
        import json

        json.dump({k: v for k, v in result.items() if isinstance(v, (int, float, str))}, f, indent=2)
    return result
