"""GenEval: write generated images in the official layout, validate it, and score it.

GenEval (Ghosh et al. 2023, https://github.com/djghosh13/geneval) evaluates a text-to-image
model on 553 prompts (``prompts/evaluation_metadata.jsonl``, one JSON line per prompt with
``tag``, ``include``, optional ``exclude`` and ``prompt``) by detecting objects in the images
with Mask2Former and judging colours with CLIP. Its evaluator
(``evaluation/evaluate_images.py``) reads this layout::

    DIR/
        00000/
            metadata.jsonl      # the prompt's metadata line, as json.dump writes it
            grid.png            # optional
            samples/
                0000.png
                0001.png ...
        00001/ ...

It lists ``DIR``, keeps the entries that are folders with an all-digit name, loads each
folder's ``metadata.jsonl`` with ``json.load``, and evaluates every file of ``samples/``
whose name matches ``\\d+\\.png`` (``re.match``: a prefix match, so ``0001.png.tmp`` would
be read too; :func:`write_geneval` never leaves such names). ``summary_scores.py`` then
reports the accuracy per tag and the overall score: the unweighted mean of the six tag
accuracies.

* :func:`read_metadata` reads the prompt file (from a path; it is not shipped with vargen);
* :func:`write_geneval` draws ``n_samples`` images per prompt into the layout, with fixed
  per-image seeds, atomic PNG writes and resume;
* :func:`check_layout` validates a folder the way the evaluator will read it;
* :func:`score_geneval` runs the official evaluator (it needs mmdet, open_clip, the
  Mask2Former checkpoint, CLIP ViT-L-14 weights and a CUDA GPU) and fails clearly without them;
* :func:`summary_scores` / :func:`format_summary` compute and print the official summary
  from the evaluator's ``results.jsonl``.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..atomic import save_png_atomic, write_atomic
from ..sample import check_run_settings

METADATA_SOURCE = "prompts/evaluation_metadata.jsonl of https://github.com/djghosh13/geneval"
DETECTOR_NAME = "mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco"
DETECTOR_URL = ("https://download.openmmlab.com/mmdetection/v2.0/mask2former/"
                "mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco/"
                "mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco_20220504_001756-743b7d99.pth")
CLIP_ARCH = "ViT-L-14"
CLIP_HF_HUB = "timm/vit_large_patch14_clip_224.openai"  # where open_clip's "openai" ViT-L-14 weights live
RUN_FILE = "vargen_geneval.json"  # settings of the run; the evaluator ignores plain files in DIR
SAMPLE_NAME = re.compile(r"\d+\.png")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

OFFICIAL_COMMANDS = (
    "python evaluation/evaluate_images.py {dir} --outfile {dir}/results.jsonl --model-path <OBJECT_DETECTOR_FOLDER>\n"
    "python evaluation/summary_scores.py {dir}/results.jsonl"
)


class GenEvalUnavailable(RuntimeError):
    """The official GenEval scoring path cannot run here (a package, a weight file or CUDA is missing)."""


# ----------------------------------------------------------------------------- metadata
def read_metadata(path: str) -> List[dict]:
    """The prompts of a GenEval metadata file: one dict per line (``tag``, ``include``, ``prompt``, ...).

    Line ``i`` (0-based) is prompt ``i``, written to folder ``{i:05d}``. Raises
    :class:`FileNotFoundError` naming the path when it is missing and :class:`ValueError`
    naming the line when one is not a JSON object with ``prompt``, ``tag`` and ``include``.
    Trailing empty lines are allowed; an empty line inside the file is an error (it would
    shift every later prompt's index).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GenEval metadata file not found: {path} (it is {METADATA_SOURCE}; "
                                "download it and pass its path)")
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            raise ValueError(f"{path}: line {number} is empty")
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {number} is not JSON ({e})") from None
        records.append(_validated(record, f"{path}: line {number}"))
    if not records:
        raise ValueError(f"{path} holds no prompts")
    return records


def _validated(record, where: str) -> dict:
    if not isinstance(record, dict):
        raise ValueError(f"{where} is not a JSON object")
    missing = [k for k in ("prompt", "tag", "include") if k not in record]
    if missing:
        raise ValueError(f"{where} lacks {', '.join(repr(k) for k in missing)} (GenEval metadata lines have "
                         "'tag', 'include' and 'prompt')")
    if not isinstance(record["prompt"], str) or not isinstance(record["tag"], str):
        raise ValueError(f"{where}: 'prompt' and 'tag' must be strings")
    if not isinstance(record["include"], list):
        raise ValueError(f"{where}: 'include' must be a list")
    return record


def metadata_line(metadata: dict) -> str:
    """A prompt folder's ``metadata.jsonl`` content: exactly what the official generation script's
    ``json.dump(metadata, fp)`` writes (no trailing newline)."""
    return json.dumps(metadata)


# ----------------------------------------------------------------------------- writing
def prompt_dir(out_dir: str, index: int) -> str:
    return os.path.join(out_dir, f"{index:05d}")


def sample_path(out_dir: str, index: int, n: int) -> str:
    return os.path.join(out_dir, f"{index:05d}", "samples", f"{n:04d}.png")


def sample_seed(seed: int, index: int, n: int, n_samples: int) -> int:
    """The seed of sample ``n`` of prompt ``index``: ``seed + index * n_samples + n`` (distinct for every image)."""
    return seed + index * n_samples + n


def _grid(images: Sequence[np.ndarray], pad: int = 2) -> np.ndarray:
    """One row of images with ``pad`` black pixels around each (torchvision ``make_grid``'s look)."""
    h, w = images[0].shape[:2]
    out = np.zeros((h + 2 * pad, len(images) * (w + pad) + pad, 3), dtype=np.uint8)
    for k, im in enumerate(images):
        out[pad:pad + h, pad + k * (w + pad):pad + k * (w + pad) + w] = im
    return out


def _run_settings(pipe, n_samples: int, seed: int, sampling: dict) -> dict:
    settings = {"model": getattr(pipe, "name_or_path", None), "n_samples": n_samples, "seed": seed,
                "sampling": {k: v for k, v in sorted(sampling.items())}}
    return json.loads(json.dumps(settings, default=str))  # as it reads back from the file


def write_geneval(pipe, metadata: Union[str, Sequence[dict]], out_dir: str, n_samples: int = 4, seed: int = 0,
                  batch_size: int = 16, limit: Optional[int] = None, progress: bool = True, grid: bool = False,
                  **sampling) -> Dict[str, object]:
    """Draw ``n_samples`` images for each GenEval prompt into ``out_dir`` in the official layout.

    ``metadata``: the prompt dicts (:func:`read_metadata`) or the path of the metadata file.
    ``limit``: only the first ``limit`` prompts. Prompt ``i`` gets ``out_dir/{i:05d}/metadata.jsonl``
    (its metadata line, as the official script writes it) and ``samples/{n:04d}.png`` for
    ``n < n_samples``; sample ``n`` uses seed :func:`sample_seed` (``seed + i * n_samples + n``),
    so a rerun, another ``batch_size`` or another ``limit`` draws the same image. Images are
    drawn ``batch_size`` at a time across prompts with
    ``pipe(prompts, seed=[one per image], output_type="np", progress=False, **sampling)``
    (``sampling``: ``cfg_scale``, ``temperature``, ``top_k``, ``top_p``, ``method``, ...).

    Every file is written under a hidden temporary name in its folder and renamed, so a file
    that exists is complete; a rerun skips existing samples and draws exactly the missing
    ones. ``out_dir/vargen_geneval.json`` records the settings (model name, ``n_samples``,
    ``seed``, ``sampling``); a rerun with other settings, or a prompt folder whose
    ``metadata.jsonl`` holds another prompt, is refused instead of mixing two sample sets
    (a larger ``limit`` later just adds prompts). ``grid=True`` also writes ``grid.png`` (the
    samples in a row) once a prompt's samples are complete (the evaluator does not read it).

    Returns ``{"prompts", "images", "drawn", "skipped", "wall_s"}``.
    """
    if isinstance(metadata, (str, os.PathLike)):
        metadata = read_metadata(metadata)
    metadata = [_validated(m, f"metadata[{i}]") for i, m in enumerate(metadata)]
    if n_samples < 1 or batch_size < 1:
        raise ValueError(f"n_samples and batch_size must be >= 1, got {n_samples} and {batch_size}")
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        metadata = metadata[:limit]
    t0 = time.perf_counter()
    os.makedirs(out_dir, exist_ok=True)
    check_run_settings(out_dir, _run_settings(pipe, n_samples, seed, sampling), RUN_FILE)
    todo: List[Tuple[int, int]] = []
    for i, meta in enumerate(metadata):
        os.makedirs(os.path.join(prompt_dir(out_dir, i), "samples"), exist_ok=True)
        path = os.path.join(prompt_dir(out_dir, i), "metadata.jsonl")
        line = metadata_line(meta)
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                there = f.read()
            if there != line:
                raise ValueError(f"{path} holds another prompt's metadata ({there[:80]!r}); "
                                 "use a new output folder for another metadata file")
        else:
            write_atomic(path, line)
        todo += [(i, n) for n in range(n_samples) if not os.path.exists(sample_path(out_dir, i, n))]
    total = len(metadata) * n_samples
    from tqdm.auto import tqdm

    bar = tqdm(total=len(todo), desc="GenEval samples", disable=not progress)
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        out = pipe([metadata[i]["prompt"] for i, _ in chunk], seed=[sample_seed(seed, i, n, n_samples)
                                                                     for i, n in chunk],
                   output_type="np", progress=False, **sampling)
        images = np.asarray(out.images)
        if images.ndim != 4 or images.shape[0] != len(chunk) or images.shape[-1] != 3:
            raise ValueError(f"the pipeline returned images of shape {images.shape} for {len(chunk)} prompts; "
                             "expected [B, H, W, 3]")
        images = (np.clip(images, 0, 1) * 255).round().astype(np.uint8)
        for (i, n), image in zip(chunk, images):
            save_png_atomic(image, sample_path(out_dir, i, n))
        bar.update(len(chunk))
    bar.close()
    if grid:
        from PIL import Image

        for i in range(len(metadata)):
            path = os.path.join(prompt_dir(out_dir, i), "grid.png")
            if not os.path.exists(path):
                save_png_atomic(_grid([np.asarray(Image.open(sample_path(out_dir, i, n)).convert("RGB"))
                                         for n in range(n_samples)]), path)
    return {"prompts": len(metadata), "images": total, "drawn": len(todo), "skipped": total - len(todo),
            "wall_s": time.perf_counter() - t0}


# ----------------------------------------------------------------------------- validation
def check_layout(out_dir: str, metadata: Union[str, Sequence[dict], None] = None, n_samples: Optional[int] = None,
                 limit: Optional[int] = None) -> Tuple[int, int]:
    """Validate ``out_dir`` the way GenEval's ``evaluate_images.py`` reads it; returns ``(prompts, images)``.

    The evaluator's rules: prompt folders are the entries of ``out_dir`` that are folders with
    an all-digit name (everything else is ignored); each must hold ``metadata.jsonl`` that
    ``json.load`` reads as one object (with ``tag``, ``include`` and ``prompt``) and a
    ``samples/`` folder; the images are the files of ``samples/`` named ``\\d+\\.png``.
    Stricter here, since the evaluator would silently skip or misread them: every entry of
    ``samples/`` (hidden files aside) must be a file named exactly ``<digits>.png`` that starts
    with the PNG signature; every prompt folder needs at least one image; two folders may not
    name the same prompt index.

    ``metadata`` (dicts or a path): every folder's metadata must equal line ``int(name)`` of it,
    and the folders must be exactly ``0 .. len(metadata) - 1`` (the first ``limit`` when given).
    ``n_samples``: every prompt has exactly the images ``0 .. n_samples - 1``.
    Raises :class:`ValueError` naming the first problem (:class:`FileNotFoundError` when
    ``out_dir`` does not exist).
    """
    if not os.path.isdir(out_dir):
        raise FileNotFoundError(f"GenEval image folder not found: {out_dir}")
    if isinstance(metadata, (str, os.PathLike)):
        metadata = read_metadata(metadata)
    folders = sorted(name for name in os.listdir(out_dir)
                     if name.isdigit() and os.path.isdir(os.path.join(out_dir, name)))
    if not folders:
        raise ValueError(f"{out_dir} holds no prompt folders (folders with an all-digit name, e.g. 00000)")
    seen: Dict[int, str] = {}
    images = 0
    for name in folders:
        folder = os.path.join(out_dir, name)
        index = int(name)
        if index in seen:
            raise ValueError(f"{folder} and {os.path.join(out_dir, seen[index])} are both prompt {index}")
        seen[index] = name
        meta_path = os.path.join(folder, "metadata.jsonl")
        if not os.path.isfile(meta_path):
            raise ValueError(f"{meta_path} is missing (every prompt folder needs its metadata line)")
        try:
            with open(meta_path, encoding="utf-8") as f:
                meta = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{meta_path} is not one JSON object, as json.load reads it ({e})") from None
        _validated(meta, meta_path)
        if metadata is not None:
            if index >= len(metadata):
                raise ValueError(f"{folder}: prompt {index} is beyond the {len(metadata)} metadata lines")
            if meta != metadata[index]:
                raise ValueError(f"{meta_path} differs from metadata line {index}: {json.dumps(meta)[:100]} "
                                 f"there, {json.dumps(metadata[index])[:100]} expected")
        samples = os.path.join(folder, "samples")
        if not os.path.isdir(samples):
            raise ValueError(f"{samples} is missing (the evaluator lists that folder)")
        numbers = []
        for entry in sorted(os.listdir(samples)):
            path = os.path.join(samples, entry)
            if entry.startswith("."):
                continue  # hidden (e.g. an interrupted write's temporary file): the evaluator skips it too
            if not SAMPLE_NAME.fullmatch(entry) or not os.path.isfile(path):
                raise ValueError(f"{path}: not an image the evaluator reads as a sample (expected files named "
                                 "<digits>.png, e.g. 0000.png)")
            with open(path, "rb") as f:
                if f.read(len(PNG_SIGNATURE)) != PNG_SIGNATURE:
                    raise ValueError(f"{path} is not a PNG file")
            numbers.append(int(entry[:-4]))
        if not numbers:
            raise ValueError(f"{samples} holds no images (the prompt would drop out of the scores)")
        if n_samples is not None and sorted(numbers) != list(range(n_samples)):
            raise ValueError(f"{samples} holds samples {sorted(numbers)}, expected 0 .. {n_samples - 1}")
        images += len(numbers)
    if metadata is not None:
        expected = len(metadata) if limit is None else min(limit, len(metadata))
        missing = sorted(set(range(expected)) - set(seen))
        if missing:
            raise ValueError(f"{out_dir} lacks prompt folders {', '.join(f'{i:05d}' for i in missing[:5])}"
                             f"{' ...' if len(missing) > 5 else ''} ({len(missing)} of {expected})")
        extra = sorted(set(seen) - set(range(expected)))
        if extra:
            raise ValueError(f"{out_dir} holds prompt folder {seen[extra[0]]} beyond the {expected} expected")
    return len(folders), images


# ----------------------------------------------------------------------------- scoring
def _missing_requirements(detector_path: Optional[str], clip_path: Optional[str],
                          geneval_repo: Optional[str]) -> List[str]:
    import importlib.util

    missing = []
    if not detector_path:
        missing.append(f"the Mask2Former checkpoint: pass detector_path (--detector), the folder holding "
                       f"{DETECTOR_NAME}.pth "
                       f"(evaluation/download_models.sh <FOLDER> fetches it from {DETECTOR_URL})")
    else:
        ckpt = detector_path if detector_path.endswith(".pth") else os.path.join(detector_path,
                                                                                 f"{DETECTOR_NAME}.pth")
        if not os.path.isfile(ckpt):
            missing.append(f"the Mask2Former checkpoint {ckpt} (evaluation/download_models.sh <FOLDER> fetches "
                           f"it from {DETECTOR_URL})")
        elif os.path.basename(ckpt) != f"{DETECTOR_NAME}.pth":
            missing.append(f"the Mask2Former checkpoint must be named {DETECTOR_NAME}.pth (the evaluator builds "
                           f"that name), got {ckpt}")
    if not clip_path:
        missing.append(f"the CLIP {CLIP_ARCH} weights (open_clip pretrained='openai'): pass clip_path (--clip), "
                       f"the open_clip weights file of {CLIP_HF_HUB} (or 'openai' to let open_clip fetch them)")
    elif clip_path != "openai" and not os.path.isfile(clip_path):
        missing.append(f"the CLIP {CLIP_ARCH} weights file {clip_path}")
    if not geneval_repo:
        missing.append("a checkout of https://github.com/djghosh13/geneval: pass geneval_repo (--geneval-repo)")
    else:
        for rel in ("evaluation/evaluate_images.py", "evaluation/object_names.txt"):
            if not os.path.isfile(os.path.join(geneval_repo, rel)):
                missing.append(f"{os.path.join(geneval_repo, rel)} (geneval_repo must be a geneval checkout)")
    for module, package in (("mmdet", "mmdet 2.x (mmdetection, branch 2.x) with mmcv-full"),
                            ("open_clip", "open_clip_torch"), ("clip_benchmark", "clip-benchmark"),
                            ("pandas", "pandas")):
        if importlib.util.find_spec(module) is None:
            missing.append(f"the package {package} (import {module})")
    try:
        import torch

        if not torch.cuda.is_available():
            missing.append("a CUDA GPU (evaluate_images.py asserts DEVICE == 'cuda')")
    except ImportError:  # pragma: no cover
        missing.append("the package torch")
    return missing


# Runs evaluate_images.py unchanged; only open_clip's pretrained="openai" weights may come from a local file
# (open_clip format, loaded with QuickGELU like the "openai" tag).
_RUNNER = """
import runpy, sys
import open_clip
script, clip_path = sys.argv[1], sys.argv[2]
if clip_path != "openai":
    _create = open_clip.create_model_and_transforms
    def create(arch, pretrained=None, **kw):
        if pretrained == "openai":
            pretrained, kw = clip_path, {**kw, "force_quick_gelu": True}
        return _create(arch, pretrained=pretrained, **kw)
    open_clip.create_model_and_transforms = create
sys.argv = [script] + sys.argv[3:]
sys.path.insert(0, __import__("os").path.dirname(script))
runpy.run_path(script, run_name="__main__")
"""


def score_geneval(out_dir: str, detector_path: Optional[str] = None, clip_path: Optional[str] = None,
                  geneval_repo: Optional[str] = None, outfile: Optional[str] = None,
                  options: Optional[Dict[str, str]] = None, python: str = sys.executable) -> dict:
    """Score ``out_dir`` with the official GenEval evaluator; returns :func:`summary_scores` of its results.

    Runs ``geneval_repo/evaluation/evaluate_images.py out_dir --outfile outfile --model-path
    <detector folder>`` unchanged in a subprocess (``options``: its ``--options key=value``,
    e.g. ``{"threshold": "0.3"}``), except that open_clip's ``pretrained="openai"`` ViT-L-14
    weights are read from ``clip_path`` (an open_clip weights file of
    ``timm/vit_large_patch14_clip_224.openai``, loaded with QuickGELU as that tag is) instead
    of downloaded; ``clip_path="openai"`` leaves that to open_clip (its cache or the network).
    ``detector_path``: the folder holding ``mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.pth``
    (or that file). ``outfile`` defaults to ``out_dir/results.jsonl``.

    Raises :class:`GenEvalUnavailable` listing everything missing (weights, packages: mmdet 2.x,
    open_clip, clip_benchmark, pandas; the geneval checkout; CUDA) together with the official
    command lines, and :class:`ValueError` when the layout is broken (:func:`check_layout`).
    """
    check_layout(out_dir)
    missing = _missing_requirements(detector_path, clip_path, geneval_repo)
    if missing:
        raise GenEvalUnavailable(
            "GenEval's official scoring cannot run here; missing:\n  - " + "\n  - ".join(missing)
            + "\nThe images are in the official layout; to score them with the official tools (geneval "
              "checkout, its conda environment, the detector folder from evaluation/download_models.sh), run:\n"
            + OFFICIAL_COMMANDS.format(dir=out_dir))
    detector_dir = os.path.dirname(detector_path) if detector_path.endswith(".pth") else detector_path
    outfile = outfile or os.path.join(out_dir, "results.jsonl")
    cmd = [python, "-c", _RUNNER, os.path.join(geneval_repo, "evaluation", "evaluate_images.py"), clip_path,
           out_dir, "--outfile", outfile, "--model-path", detector_dir]
    if options:
        cmd += ["--options", *[f"{k}={v}" for k, v in options.items()]]
    done = subprocess.run(cmd)
    if done.returncode != 0:
        raise RuntimeError(f"the GenEval evaluator failed (exit {done.returncode}): {' '.join(cmd[:2])} ... "
                           f"{' '.join(cmd[3:])}")
    return summary_scores(outfile)


def _read_results(results: Union[str, Iterable[dict]]) -> List[dict]:
    if isinstance(results, (str, os.PathLike)):
        if not os.path.isfile(results):
            raise FileNotFoundError(f"GenEval results file not found: {results}")
        with open(results, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    else:
        rows = list(results)
    for k, row in enumerate(rows):
        missing = [key for key in ("tag", "correct") if key not in row]
        if missing:
            raise ValueError(f"results row {k} lacks {', '.join(missing)} (evaluate_images.py writes "
                             "filename, tag, prompt, correct, reason, metadata, details)")
    if not rows:
        raise ValueError("no GenEval results")
    return rows


def summary_scores(results: Union[str, Iterable[dict]]) -> dict:
    """The official summary (``evaluation/summary_scores.py``) of the evaluator's ``results.jsonl``.

    ``results``: the path or the rows. Returns ``{"images", "prompts", "correct_images",
    "correct_prompts", "tasks": {tag: {"accuracy", "correct", "n"}}, "overall"}``: prompts are
    grouped by their ``metadata`` string (``prompt`` when absent); a prompt is correct when any
    of its images is; tasks are in order of first appearance; ``overall`` is the unweighted
    mean of the task accuracies (GenEval's score).
    """
    rows = _read_results(results)
    correct = [bool(r["correct"]) for r in rows]
    prompts: Dict[str, bool] = {}
    tasks: Dict[str, List[bool]] = {}
    for r, ok in zip(rows, correct):
        key = r.get("metadata", r.get("prompt"))
        key = key if isinstance(key, str) else json.dumps(key, sort_keys=True)
        prompts[key] = prompts.get(key, False) or ok
        tasks.setdefault(r["tag"], []).append(ok)
    by_task = {tag: {"accuracy": float(np.mean(v)), "correct": int(sum(v)), "n": len(v)} for tag, v in tasks.items()}
    return {"images": len(rows), "prompts": len(prompts), "correct_images": float(np.mean(correct)),
            "correct_prompts": float(np.mean(list(prompts.values()))), "tasks": by_task,
            "overall": float(np.mean([t["accuracy"] for t in by_task.values()]))}


def format_summary(summary: dict) -> str:
    """:func:`summary_scores`' figures as the official ``summary_scores.py`` prints them."""
    lines = ["Summary", "=======", f"Total images: {summary['images']}", f"Total prompts: {summary['prompts']}",
             f"% correct images: {summary['correct_images']:.2%}",
             f"% correct prompts: {summary['correct_prompts']:.2%}", "", "Task breakdown", "=============="]
    for tag, t in summary["tasks"].items():
        lines.append(f"{tag:<16} = {t['accuracy']:.2%} ({t['correct']} / {t['n']})")
    lines += ["", f"Overall score (avg. over tasks): {summary['overall']:.5f}"]
    return "\n".join(lines)
