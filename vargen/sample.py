"""Sampling at scale: numbered PNG folders for FID / GenEval, sharded, atomic and resumable.

Image ``i`` of a run has a fixed condition and seed (``seed + i``), so it is the same
whichever process draws it and however the work is batched. Process ``r`` of ``P`` draws
the indices ``i % P == r`` (``accelerate launch`` sets ``P``; one process works
unchanged). Every PNG is written under a temporary name and renamed, so a file that
exists is complete; a rerun skips finished indices and draws exactly the missing ones.
``run.json`` records the settings, and a rerun with different settings is refused
instead of mixing two sample sets in one folder.
"""
from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

import numpy as np

from .atomic import save_png_atomic, write_atomic

RUN_FILE = "run.json"


@dataclass(frozen=True)
class SampleItem:
    """One image to draw: its index (file name), condition and seed."""

    index: int
    condition: Union[int, str]
    seed: int


def image_path(out_dir: str, index: int) -> str:
    return os.path.join(out_dir, f"{index:06d}.png")


def read_prompts(path: str) -> List[str]:
    """Prompts from a text file (one per line) or JSONL (``prompt`` or ``caption`` field per line)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"prompt file not found: {path}")
    with open(path) as f:
        lines = [line.strip() for line in f if line.strip()]
    if path.endswith(".jsonl"):
        records = [json.loads(line) for line in lines]
        missing = [i for i, r in enumerate(records) if not ({"prompt", "caption"} & set(r))]
        if missing:
            raise ValueError(f"{path}: lines {missing[:5]} have neither a 'prompt' nor a 'caption' field")
        lines = [r.get("prompt", r.get("caption")) for r in records]
    if not lines:
        raise ValueError(f"{path} holds no prompts")
    return lines


def plan_samples(n: int, seed: int = 0, num_classes: Optional[int] = None, classes: str = "balanced",
                 prompts: Optional[Sequence[str]] = None) -> List[SampleItem]:
    """The ``n`` images of a run.

    c2i (``num_classes``): ``classes="balanced"`` gives class ``i % num_classes`` (FID-50K's
    50 per class for 1000 classes); ``"random"`` draws classes from a generator seeded by
    ``seed``. t2i (``prompts``): prompt ``i % len(prompts)``. Image ``i`` uses seed ``seed + i``.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if prompts is not None:
        conditions = [prompts[i % len(prompts)] for i in range(n)]
    elif num_classes:
        if classes == "balanced":
            conditions = [i % num_classes for i in range(n)]
        elif classes == "random":
            rng = random.Random(seed)
            conditions = [rng.randrange(num_classes) for _ in range(n)]
        else:
            raise ValueError(f"classes must be 'balanced' or 'random', got {classes!r}")
    else:
        raise ValueError("give num_classes (c2i) or prompts (t2i)")
    return [SampleItem(i, c, seed + i) for i, c in enumerate(conditions)]


def plan_for_pipeline(pipe, n: int, seed: int = 0, prompts: Optional[Sequence[str]] = None,
                      classes: str = "balanced", scene_seed: int = 999) -> tuple:
    """``(items, scenes)`` for a pipeline: classes for c2i; for t2i the ``prompts`` or, by
    default, the captions of held-out scenes ``SceneDataset(seed=scene_seed).scene(i)``, whose
    exact metadata (``scenes``, else ``None``) lets the scene scorer check the images."""
    if not pipe.takes_text:
        if prompts:
            raise ValueError("this model is class-conditional: it takes classes (--classes), not prompts")
        return plan_samples(n, seed, num_classes=pipe.gpt.config.num_classes, classes=classes), None
    scenes = None
    if not prompts:
        from .data.scenes import SceneDataset

        data = SceneDataset(seed=scene_seed)
        scenes = [data.scene(i) for i in range(n)]
        prompts = [s.caption for s in scenes]
    return plan_samples(n, seed, prompts=prompts), scenes


def check_run_settings(out_dir: str, settings: dict, run_file: str = RUN_FILE) -> None:
    """Write ``run_file`` (``run.json``) on a new folder; refuse a folder whose samples were drawn with
    other settings."""
    path = os.path.join(out_dir, run_file)
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        changed = {k: (saved.get(k), v) for k, v in settings.items() if saved.get(k) != v}
        if changed:
            detail = "; ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in changed.items())
            raise ValueError(f"{out_dir} holds samples drawn with other settings ({detail}); "
                             "use a new --out folder or the same settings to resume")
        return
    os.makedirs(out_dir, exist_ok=True)
    write_atomic(path, json.dumps(settings, indent=2))


def start_run(out_dir: str, settings: dict, items: Sequence[SampleItem]) -> dict:
    """:func:`check_run_settings` with the conditions' digest added to ``settings``; the first
    run also writes ``conditions.txt`` (image ``i``'s condition on line ``i``). Returns the settings."""
    import hashlib

    conditions = "\n".join(str(it.condition) for it in items) + "\n"
    settings = {**settings, "conditions_sha1": hashlib.sha1(conditions.encode()).hexdigest()}
    check_run_settings(out_dir, settings)
    path = os.path.join(out_dir, "conditions.txt")
    if not os.path.exists(path):
        write_atomic(path, conditions)
    return settings


def missing_items(items: Sequence[SampleItem], out_dir: str, process_index: int = 0,
                  num_processes: int = 1) -> List[SampleItem]:
    """This process's share of ``items`` whose PNG does not exist yet."""
    return [it for it in items if it.index % num_processes == process_index
            and not os.path.exists(image_path(out_dir, it.index))]


def sample_to_folder(pipe, items: Sequence[SampleItem], out_dir: str, batch_size: int = 16, method: str = "ar",
                     method_options: Optional[dict] = None, process_index: int = 0, num_processes: int = 1,
                     progress: bool = True, **sampling) -> dict:
    """Draw this process's missing images of ``items`` into ``out_dir``; returns counts and decoding cost.

    ``sampling`` goes to the pipeline (``cfg_scale``, ``top_k``, ...). Per-batch decoding
    statistics are appended to ``stats-<process>.jsonl`` (one line per batch, written after
    its images), so a benchmark can read the cost of the images in the folder.
    """
    from tqdm.auto import tqdm

    os.makedirs(out_dir, exist_ok=True)
    todo = missing_items(items, out_dir, process_index, num_processes)
    stats_path = os.path.join(out_dir, f"stats-{process_index}.jsonl")
    bar = tqdm(total=len(todo), desc=f"sampling ({method})", unit="img", disable=not progress)
    start = time.perf_counter()
    for b in range(0, len(todo), batch_size):
        chunk = todo[b:b + batch_size]
        out = pipe([it.condition for it in chunk], seed=[it.seed for it in chunk], output_type="latent",
                   progress=False, method=method, method_options=method_options, **sampling)
        for it, tokens in zip(chunk, out.images):
            # one image per tokenizer call: batch composition changes float rounding in the decoder,
            # and a resumed run batches differently, so this keeps its pixels identical
            image = pipe.decode_tokens(tokens[None])[0].permute(1, 2, 0).mul(255).round().byte().cpu().numpy()
            save_png_atomic(image, image_path(out_dir, it.index))
        with open(stats_path, "a") as f:
            f.write(json.dumps({"indices": [it.index for it in chunk], **out.stats.to_dict()}) + "\n")
        bar.update(len(chunk))
    bar.close()
    return {"drawn": len(todo), "skipped": len([it for it in items if it.index % num_processes == process_index])
            - len(todo), "wall_s": time.perf_counter() - start}


def pack_npz(out_dir: str, n: int, path: Optional[str] = None) -> str:
    """Pack ``000000.png .. n-1`` into ``arr_0`` ``[n, H, W, 3]`` uint8 (the ADM / LlamaGen evaluation format)."""
    from PIL import Image

    missing = [i for i in range(n) if not os.path.exists(image_path(out_dir, i))]
    if missing:
        raise ValueError(f"{out_dir} lacks {len(missing)} of {n} images (first: {missing[:5]}); "
                         "rerun the same sampling command to finish them before packing")
    arr = np.stack([np.asarray(Image.open(image_path(out_dir, i)).convert("RGB")) for i in range(n)])
    path = path or os.path.join(out_dir, f"samples_{n}.npz")
    tmp = f"{path}.tmp-{os.getpid()}.npz"
    np.savez(tmp, arr_0=arr)
    os.replace(tmp, path)
    return path
