"""FID, improved precision / recall and Inception Score, through clean-fid.

Images are always read and resized by clean-fid (``cleanfid.fid.get_folder_features``) and
Frechet distances come from ``cleanfid.fid.frechet_distance``; this module adds offline
Inception loading, injectable feature extractors, cached reference statistics and the
extra metrics.

Feature extractors:

* default (``extractor=None``): clean-fid's Inception-v3 (TorchScript port of the
  TensorFlow 2015-12-05 graph, 2048-d pool features). It is **never downloaded here**: pass
  the local file (``inception_path``, the CLI's ``--inception PATH``) or put it where clean-fid
  caches it; otherwise a ``FileNotFoundError`` names the file and its download URL. Only this
  network in ``clean`` / ``legacy_tensorflow`` mode gives numbers comparable with published
  FID. It has no logits, so IS is ``None`` there.
* injected: any module / callable mapping ``[B, 3, H, W]`` floats in [0, 255] to ``[B, D]``;
  optional ``name`` (stored with cached stats), ``logits(features)`` (enables IS) and
  ``image_size`` (clean-fid then resizes straight to that size with the mode's own filter
  instead of to Inception's 299 x 299, e.g. 32 for :class:`vargen.eval.classifier.FDVargen`;
  ``legacy_tensorflow`` never resizes outside the network, so the extractor must).
"""
from __future__ import annotations

import dataclasses
import os
import platform
import tempfile
from typing import Callable, Optional, Union

import numpy as np
import torch
from cleanfid import fid as cleanfid_fid
from cleanfid.downloads_helper import inception_url as INCEPTION_URL
from cleanfid.inception_pytorch import FID_WEIGHTS_URL as PT_INCEPTION_URL
from cleanfid.inception_torchscript import InceptionV3W
from cleanfid.resize import make_resizer
from cleanfid.utils import EXTENSIONS

MODES = ("clean", "legacy_tensorflow", "legacy_pytorch")
PUBLISHED_MODES = ("clean", "legacy_tensorflow")
INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_NAME = "inception-v3-2015-12-05"
# clean-fid's feature_extractor() keeps its downloaded TorchScript Inception here.
CLEANFID_CACHE_DIR = "./" if platform.system() == "Windows" else "/tmp"
# The resize clean-fid's build_resizer() applies per mode, reused at an extractor's own image_size.
_RESIZERS = {"clean": ("PIL", "bicubic"), "legacy_pytorch": ("PyTorch", "bilinear")}

Extractor = Union[torch.nn.Module, Callable[[torch.Tensor], torch.Tensor]]


@dataclasses.dataclass
class FIDResult:
    """Scores of one generated set against one reference; ``None`` where a metric is unavailable."""

    fid: float
    precision: Optional[float]
    recall: Optional[float]
    is_mean: Optional[float]
    is_std: Optional[float]
    n_gen: int
    n_ref: int
    mode: str
    extractor: str
    comparable_with_published: bool

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _missing(path: str, url: str, then: str) -> FileNotFoundError:
    return FileNotFoundError(f"Inception weights not found: {path} does not exist. No network is used to fetch "
                             f"them: download {url} on a connected machine, then {then}.")


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose from {MODES}")


def load_inception(mode: str = "clean", inception_path: Optional[str] = None, device: Optional[str] = None):
    """clean-fid's Inception feature extractor for ``mode``, from local files only.

    ``inception_path`` is ``inception-2015-12-05.pt`` (clean / legacy_tensorflow) or the folder
    holding it; without it clean-fid's cache folder is tried. ``legacy_pytorch`` uses clean-fid's
    PyTorch port, which reads torch hub's checkpoint cache. Raises ``FileNotFoundError``
    naming the missing file and its URL rather than downloading anything.
    """
    _check_mode(mode)
    device = device or _default_device()
    if mode == "legacy_pytorch":
        if inception_path is not None:
            raise ValueError("legacy_pytorch mode loads clean-fid's PyTorch Inception from torch hub's cache; "
                             "inception_path applies to the TorchScript file of clean / legacy_tensorflow modes")
        path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(PT_INCEPTION_URL))
        if not os.path.isfile(path):
            raise _missing(path, PT_INCEPTION_URL,
                           "copy it to that path (--inception does not apply to legacy_pytorch)")
        # The file is cached, so clean-fid's loader (load_state_dict_from_url) reads it without downloading.
        net = cleanfid_fid.build_feature_extractor(mode, torch.device(device), use_dataparallel=False)
        net.name = INCEPTION_NAME
        return net
    path = inception_path or os.path.join(CLEANFID_CACHE_DIR, INCEPTION_FILE)
    if os.path.isdir(path):
        path = os.path.join(path, INCEPTION_FILE)
    if not os.path.isfile(path):
        raise _missing(path, INCEPTION_URL, "copy it here and pass --inception PATH (inception_path=PATH)")
    if os.path.basename(path) != INCEPTION_FILE:
        raise ValueError(f"clean-fid loads the Inception file by its name: rename {path} to {INCEPTION_FILE}")
    # download=False: clean-fid's own build_feature_extractor() would download when the file is missing.
    # legacy_tensorflow feeds unresized images and lets the network resize them, as clean-fid does.
    net = InceptionV3W(os.path.dirname(path), download=False, resize_inside=mode == "legacy_tensorflow")
    net.name = INCEPTION_NAME
    return net.to(device).eval()


def _extractor_name(extractor: Extractor) -> str:
    return getattr(extractor, "name", None) or type(extractor).__name__


def _resizer(extractor: Extractor, mode: str):
    """clean-fid's resize for ``mode`` but to the extractor's ``image_size``; ``None``: clean-fid's default."""
    size = getattr(extractor, "image_size", None)
    if size is None or mode not in _RESIZERS or isinstance(extractor, InceptionV3W):
        return None
    size = (size, size) if isinstance(size, int) else tuple(size)
    return make_resizer(_RESIZERS[mode][0], False, _RESIZERS[mode][1], size)


def _folder_features(folder: str, extractor: Extractor, mode: str, batch_size: int, device: str,
                     num_workers: int, verbose: bool) -> np.ndarray:
    if not os.path.exists(folder):
        raise FileNotFoundError(f"image folder not found: {folder}")
    if os.path.isdir(folder) and not any(f.rsplit(".", 1)[-1] in EXTENSIONS
                                         for _, _, files in os.walk(folder) for f in files):
        raise ValueError(f"no images in {folder} (extensions: {sorted(EXTENSIONS)})")
    feats = cleanfid_fid.get_folder_features(
        folder, model=extractor, num_workers=num_workers, batch_size=batch_size, device=torch.device(device),
        mode=mode, custom_fn_resize=_resizer(extractor, mode), description=f"features {os.path.basename(folder)}: ",
        verbose=verbose)
    return feats.astype(np.float64)


def _prepare(extractor: Optional[Extractor], mode: str, inception_path: Optional[str], device: Optional[str]):
    _check_mode(mode)
    device = device or _default_device()
    if extractor is None:
        extractor = load_inception(mode, inception_path, device)
    elif isinstance(extractor, torch.nn.Module):
        extractor.to(device).eval()  # batch-norm statistics must not follow the evaluated images
    return extractor, device


def feature_stats(feats: np.ndarray) -> tuple:
    """``(mu, sigma)`` of ``[N, D]`` features, as clean-fid computes them."""
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """clean-fid's Frechet distance between two Gaussians."""
    return float(cleanfid_fid.frechet_distance(mu1, sigma1, mu2, sigma2))


def folder_features(folder: str, extractor: Optional[Extractor] = None, mode: str = "clean",
                    inception_path: Optional[str] = None, batch_size: int = 64, device: Optional[str] = None,
                    num_workers: int = 0, verbose: bool = False) -> np.ndarray:
    """``[N, D]`` features of a folder's images read and resized by clean-fid, rows in sorted file order
    (for vargen sample folders: image index order)."""
    extractor, device = _prepare(extractor, mode, inception_path, device)
    return _folder_features(folder, extractor, mode, batch_size, device, num_workers, verbose)


def _dataset_to_pngs(dataset: torch.utils.data.Dataset, folder: str, num_workers: int) -> None:
    from PIL import Image

    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=num_workers)
    for i, item in enumerate(loader):
        pixels = ((item["image"].float().clamp(-1, 1) + 1) * 127.5).round().byte()
        Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(os.path.join(folder, f"{i:06d}.png"))


def reference_stats(source: Union[str, torch.utils.data.Dataset], out_npz: Optional[str] = None,
                    extractor: Optional[Extractor] = None, mode: str = "clean",
                    inception_path: Optional[str] = None, batch_size: int = 64, device: Optional[str] = None,
                    num_workers: int = 0, keep_feats: bool = True, verbose: bool = False) -> dict:
    """Reference statistics ``mu``, ``sigma`` (and ``feats`` for precision / recall) of ``source``.

    ``source`` is an image folder (or zip) or a vargen dataset (items ``{"image": [3, H, W] in
    [-1, 1]}``). A dataset is written as 8-bit PNGs to a temporary folder first, so it goes
    through clean-fid's reader and resize exactly like saved samples do. The stats are tagged
    with ``extractor_name`` and ``mode`` and, when ``out_npz`` is given, cached there atomically.
    """
    extractor, device = _prepare(extractor, mode, inception_path, device)
    if isinstance(source, (str, os.PathLike)):
        feats = _folder_features(str(source), extractor, mode, batch_size, device, num_workers, verbose)
    else:
        with tempfile.TemporaryDirectory() as folder:
            _dataset_to_pngs(source, folder, num_workers)
            feats = _folder_features(folder, extractor, mode, batch_size, device, num_workers, verbose)
    mu, sigma = feature_stats(feats)
    stats = dict(mu=mu, sigma=sigma, n=np.int64(len(feats)), extractor_name=np.str_(_extractor_name(extractor)),
                 mode=np.str_(mode))
    if keep_feats:
        stats["feats"] = feats.astype(np.float32)
    if out_npz:
        folder = os.path.dirname(os.path.abspath(out_npz))
        os.makedirs(folder, exist_ok=True)
        # A temporary file and a rename: an interrupted run never leaves a truncated cache behind.
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".npz.tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **stats)
            os.replace(tmp, out_npz)
        except BaseException:
            os.unlink(tmp)
            raise
    return stats


def load_stats(path: str, extractor_name: str, mode: str) -> dict:
    """A ``.npz`` from :func:`reference_stats`; refuses stats of another extractor or mode."""
    with np.load(path) as data:
        stats = {k: data[k] for k in data.files}
    if "extractor_name" not in stats or "mode" not in stats:
        raise ValueError(f"{path} does not say which extractor / mode made it (no extractor_name / mode); "
                         "recompute it with vargen.eval.fid.reference_stats")
    made = (str(stats["extractor_name"]), str(stats["mode"]))
    if made != (extractor_name, mode):
        raise ValueError(f"reference stats {path} were made with extractor {made[0]!r} in mode {made[1]!r}, "
                         f"but this evaluation uses extractor {extractor_name!r} in mode {mode!r}; "
                         "their features are not comparable: recompute the stats with the same extractor")
    return stats


def _inside_balls(a: torch.Tensor, b: torch.Tensor, radii_b: torch.Tensor, chunk: int) -> torch.Tensor:
    """For each row of ``a``: is it inside some ball (centre ``b[j]``, radius ``radii_b[j]``)?"""
    inside = [(torch.cdist(a[i:i + chunk], b) <= radii_b).any(dim=1) for i in range(0, len(a), chunk)]
    return torch.cat(inside)


def _knn_radii(x: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    # k + 1: each point's distance to itself (0) is the smallest.
    return torch.cat([torch.cdist(x[i:i + chunk], x).kthvalue(k + 1, dim=1).values for i in range(0, len(x), chunk)])


def precision_recall(real_feats, fake_feats, k: int = 3, chunk: int = 512, device: str = "cpu") -> tuple:
    """Improved precision and recall (Kynkaanniemi et al., 2019) of features ``[N, D]``.

    The real (fake) manifold is the union of balls around each real (fake) sample with the
    distance to its k-th nearest neighbour as radius. Precision: the fraction of fakes inside
    the real manifold; recall: the fraction of reals inside the fake manifold. Distances are
    computed ``chunk`` rows at a time in float64 on ``device`` to bound memory.
    """
    real = torch.as_tensor(np.asarray(real_feats), dtype=torch.float64, device=device)
    fake = torch.as_tensor(np.asarray(fake_feats), dtype=torch.float64, device=device)
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision / recall with k={k} needs more than {k} samples per set, "
                         f"got {len(real)} real and {len(fake)} fake")
    precision = _inside_balls(fake, real, _knn_radii(real, k, chunk), chunk).double().mean().item()
    recall = _inside_balls(real, fake, _knn_radii(fake, k, chunk), chunk).double().mean().item()
    return precision, recall


def inception_score(logits, splits: int = 10) -> tuple:
    """``(mean, std)`` over ``splits`` of ``exp(E_x KL(p(y|x) || p(y)))`` from classifier logits ``[N, C]``."""
    logp = torch.log_softmax(torch.as_tensor(np.asarray(logits), dtype=torch.float64), dim=1)
    if len(logp) < splits:
        raise ValueError(f"inception_score needs at least {splits} samples for {splits} splits, got {len(logp)}")
    scores = []
    for part in torch.tensor_split(logp, splits):
        logp_y = torch.logsumexp(part, dim=0) - np.log(len(part))  # log of the split's marginal p(y)
        scores.append(torch.exp((part.exp() * (part - logp_y)).sum(dim=1).mean()).item())
    return float(np.mean(scores)), float(np.std(scores))


def compute_fid(gen_dir: str, ref: Union[str, torch.utils.data.Dataset], mode: str = "clean",
                extractor: Optional[Extractor] = None, inception_path: Optional[str] = None,
                batch_size: int = 64, device: Optional[str] = None, num_workers: int = 0, k: int = 3,
                verbose: bool = False) -> FIDResult:
    """FID of the images in ``gen_dir`` against ``ref``, plus precision / recall and IS when possible.

    ``ref`` is an image folder, a ``.npz`` from :func:`reference_stats` (precision / recall
    need its ``feats``) or a vargen dataset. ``extractor=None`` uses clean-fid's Inception
    from ``inception_path`` (see :func:`load_inception`). IS is reported only when the extractor
    has ``logits(features)``; it uses at most 10 splits.
    """
    extractor, device = _prepare(extractor, mode, inception_path, device)
    name = _extractor_name(extractor)
    gen = _folder_features(gen_dir, extractor, mode, batch_size, device, num_workers, verbose)
    if isinstance(ref, (str, os.PathLike)) and str(ref).endswith(".npz"):
        stats = load_stats(str(ref), name, mode)
    else:
        stats = reference_stats(ref, None, extractor, mode, batch_size=batch_size, device=device,
                                num_workers=num_workers, verbose=verbose)
    ref_feats = stats.get("feats")
    mu, sigma = feature_stats(gen)
    fid = frechet_distance(mu, sigma, stats["mu"], stats["sigma"])
    precision = recall = is_mean = is_std = None
    if ref_feats is not None and min(len(ref_feats), len(gen)) > k:
        precision, recall = precision_recall(ref_feats, gen, k, device=device)
    if callable(getattr(extractor, "logits", None)):
        with torch.no_grad():
            logits = extractor.logits(torch.as_tensor(gen, dtype=torch.float32, device=device))
        is_mean, is_std = inception_score(logits.cpu(), splits=min(10, len(gen)))
    return FIDResult(fid=fid, precision=precision, recall=recall, is_mean=is_mean, is_std=is_std, n_gen=len(gen),
                     n_ref=int(stats["n"]), mode=mode, extractor=name,
                     comparable_with_published=isinstance(extractor, InceptionV3W) and mode in PUBLISHED_MODES)
