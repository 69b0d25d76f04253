"""Image datasets read in place: Noto emoji with captions, CIFAR-10 archives, any image folder.

Every dataset takes a path, returns ``{"image": [3, H, W] in [-1, 1], "caption": str}``
(plus ``"label"`` for CIFAR-10) and fails with an error that says where data is expected.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from typing import Optional

import numpy as np
import torch
from PIL import Image

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def _require(path: str, what: str, hint: str) -> str:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} not found at {path!r}: {hint}")
    return path


def to_tensor(image: Image.Image, resolution: Optional[int]) -> torch.Tensor:
    """RGB(A) PIL image -> ``[3, R, R]`` float in [-1, 1]; alpha is composited on white."""
    if image.mode in ("RGBA", "LA", "P"):
        image = image.convert("RGBA")
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image)
    image = image.convert("RGB")
    if resolution and image.size != (resolution, resolution):
        image = image.resize((resolution, resolution), Image.BICUBIC)
    return torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1


class EmojiDataset(torch.utils.data.Dataset):
    """Noto colour emoji (``png/*.png`` + ``captions.jsonl``), alpha composited on white."""

    def __init__(self, root: str, resolution: int = 128):
        captions = _require(os.path.join(root, "captions.jsonl"), "emoji captions",
                            "point root at the emoji folder (e.g. ../shared/data/emoji) holding captions.jsonl and png/")
        with open(captions) as f:
            self.items = [json.loads(line) for line in f if line.strip()]
        self.root, self.resolution = root, resolution

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        item = self.items[index]
        with Image.open(os.path.join(self.root, item["file"])) as im:
            image = to_tensor(im, self.resolution)
        return {"image": image, "caption": item["caption"]}


class Cifar10Dataset(torch.utils.data.Dataset):
    """CIFAR-10 from the ``train.tar.gz`` / ``test.tar.gz`` archives, read in place (JPEG bytes kept in memory)."""

    def __init__(self, root: str, split: str = "train", resolution: Optional[int] = 32, limit: Optional[int] = None):
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        archive = _require(os.path.join(root, f"{split}.tar.gz"), f"CIFAR-10 {split} archive",
                           "point root at the folder holding train.tar.gz and test.tar.gz (e.g. ../shared/data/cifar10)")
        self.items = []
        with tarfile.open(archive) as tar:
            for member in tar:
                parts = member.name.split("/")
                if member.isfile() and len(parts) == 3 and parts[1] in CIFAR10_CLASSES:
                    self.items.append((tar.extractfile(member).read(), CIFAR10_CLASSES.index(parts[1])))
        self.items.sort(key=lambda it: it[1])  # archive order varies; keep a stable, class-grouped order
        if limit is not None:
            # keep classes balanced when taking a slice: interleave by class
            by_class = [[it for it in self.items if it[1] == c] for c in range(10)]
            self.items = [by_class[i % 10][i // 10] for i in range(min(limit, len(self.items)))]
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        data, label = self.items[index]
        with Image.open(io.BytesIO(data)) as im:
            image = to_tensor(im, self.resolution)
        return {"image": image, "label": label, "caption": CIFAR10_CLASSES[label]}


class ImageFolderDataset(torch.utils.data.Dataset):
    """Any folder of images, optionally with captions (``captions.jsonl`` of ``{"file", "caption"}``)."""

    def __init__(self, root: str, resolution: int = 128, captions: Optional[str] = None):
        _require(root, "image folder", "pass a folder that contains image files")
        self.files = sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs
                            if f.lower().endswith(IMAGE_EXTENSIONS))
        if not self.files:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {root!r}")
        self.captions = {}
        if captions:
            with open(_require(captions, "captions file", "give a JSONL file of {\"file\", \"caption\"} lines")) as f:
                self.captions = {d["file"]: d["caption"] for d in map(json.loads, filter(str.strip, f))}
        self.root, self.resolution = root, resolution

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        name = self.files[index]
        with Image.open(os.path.join(self.root, name)) as im:
            image = to_tensor(im, self.resolution)
        return {"image": image, "caption": self.captions.get(name, "")}
