"""FD-vargen: a small CIFAR-10 classifier vargen trains itself, used as an offline feature extractor.

No Inception weights can be downloaded on an offline machine, so method-against-AR
quality comparisons use the penultimate features of this classifier (a timm ResNet with
a CIFAR stem). Frechet distances in its feature space are called **FD-vargen**: they
rank sample sets of the same model against each other and are **not comparable with
published FID** (different network, different training data, 32 x 32 inputs).
"""
from __future__ import annotations

import json
import os
from typing import Optional

import torch
import torch.nn.functional as F

FD_VARGEN = "fd-vargen-cifar10"
DEFAULT_CONFIG = {"layers": [1, 1, 1, 1], "channels": [32, 64, 128, 256], "num_classes": 10, "image_size": 32}
# CIFAR-10 channel statistics, applied inside the extractor so callers pass plain pixels.
_MEAN, _STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def build_classifier(layers=(1, 1, 1, 1), channels=(32, 64, 128, 256), num_classes: int = 10, **_) -> torch.nn.Module:
    """A timm ResNet (BasicBlock) with the usual CIFAR stem: a 3 x 3 stride-1 conv, no max-pool."""
    from timm.models.resnet import BasicBlock, ResNet

    net = ResNet(BasicBlock, list(layers), num_classes=num_classes, channels=tuple(channels))
    # ImageNet's 7 x 7 stride-2 stem plus max-pool would shrink a 32-px image to 8 px before the first block.
    net.conv1 = torch.nn.Conv2d(3, net.bn1.num_features, 3, 1, 1, bias=False)
    net.maxpool = torch.nn.Identity()
    return net


class FDVargen(torch.nn.Module):
    """Feature extractor: ``forward(images) -> [B, D]`` penultimate features; ``logits(features)`` for IS.

    ``images`` are ``[B, 3, H, W]`` floats in [0, 255] (clean-fid's convention) at any size;
    they are resized to the classifier's 32 x 32 with antialiasing.
    """

    def __init__(self, classifier: torch.nn.Module, image_size: int = 32):
        super().__init__()
        self.classifier, self.image_size = classifier.eval(), image_size
        self.register_buffer("mean", torch.tensor(_MEAN).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(_STD).view(1, 3, 1, 1) * 255)
        self.name = FD_VARGEN

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().to(self.mean.device)
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True,
                              align_corners=False)
        return (x - self.mean) / self.std

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        net = self.classifier
        return net.forward_head(net.forward_features(self.normalise(images)), pre_logits=True)

    @torch.no_grad()
    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier.get_classifier()(features)


def save_classifier(net: torch.nn.Module, config: dict, folder: str, half: bool = False) -> None:
    """``config.json`` + ``model.safetensors`` (fp16 when ``half``: the shipped copy)."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    state = {k: (v.half() if half and v.is_floating_point() else v).contiguous() for k, v in net.state_dict().items()}
    save_file(state, os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({**DEFAULT_CONFIG, **config}, f, indent=2)


def load_classifier(folder: str) -> tuple:
    """``(classifier, config)`` from a folder written by :func:`save_classifier`."""
    from safetensors.torch import load_file

    paths = [os.path.join(folder, n) for n in ("config.json", "model.safetensors")]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(f"not a vargen classifier folder (missing {', '.join(missing)}); "
                                "train one with `vargen train classifier --config configs/cifar10_classifier.json`")
    with open(paths[0]) as f:
        config = json.load(f)
    net = build_classifier(**config)
    state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(paths[1]).items()}
    net.load_state_dict(state)
    return net.eval(), config


def load_fd_vargen(folder: Optional[str] = None, device: str = "cpu") -> FDVargen:
    """The FD-vargen extractor: the shipped classifier (``vargen/weights/fd-vargen-cifar10``) or ``folder``."""
    folder = folder or os.path.join(os.path.dirname(os.path.dirname(__file__)), "weights", FD_VARGEN)
    net, config = load_classifier(folder)
    return FDVargen(net, config.get("image_size", 32)).to(device)
