"""Datasets: procedural scenes, emoji, CIFAR-10, image folders (all read from a given path)."""
from .images import CIFAR10_CLASSES, Cifar10Dataset, EmojiDataset, ImageFolderDataset
from .scenes import Scene, SceneDataset, render_scene, sample_scene

__all__ = ["CIFAR10_CLASSES", "Cifar10Dataset", "EmojiDataset", "ImageFolderDataset", "Scene", "SceneDataset",
           "render_scene", "sample_scene"]
