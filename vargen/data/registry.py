"""Datasets by name, for recipe configs: ``[{"name": "scenes", "resolution": 128}, {"name": "emoji", "path": ...}]``."""
from __future__ import annotations

from typing import Sequence

import torch

from .images import Cifar10Dataset, EmojiDataset, ImageFolderDataset
from .scenes import SceneDataset

DATASETS = {"scenes": SceneDataset, "emoji": EmojiDataset, "cifar10": Cifar10Dataset, "folder": ImageFolderDataset}


def build_dataset(specs: Sequence[dict]) -> torch.utils.data.Dataset:
    """One dataset, or several concatenated; each spec is ``{"name": ..., **constructor kwargs}``.

    ``path`` maps to the dataset's root folder. Unknown names fail with the known ones.
    """
    parts = []
    for spec in specs:
        spec = dict(spec)
        name = spec.pop("name", None)
        if name not in DATASETS:
            raise ValueError(f"unknown dataset {name!r}; choose from {sorted(DATASETS)}")
        if "path" in spec:
            spec["root"] = spec.pop("path")
        parts.append(DATASETS[name](**spec))
    return parts[0] if len(parts) == 1 else torch.utils.data.ConcatDataset(parts)


def collate(items):
    """Stack images (and labels); keep captions as a list."""
    out = {"image": torch.stack([it["image"] for it in items]), "caption": [it.get("caption", "") for it in items]}
    if "label" in items[0]:
        out["label"] = torch.tensor([it["label"] for it in items])
    return out
