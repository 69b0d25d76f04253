"""Sampling at scale: numbered PNG folders for FID / GenEval, sharded, atomic and resumable.

Image ``i`` of a run has a fixed condition and seed (``seed + i``), so it is the same
whichever process draws it and however the work is batched. Process ``r`` of ``P`` draws
the indices ``i % P == r`` (``accelerate launch`` sets ``P``; one process works
unchanged). Every PNG is written under a temporary name and renamed, so a file that
exists is complete. A batch is committed by its cost line in ``stats-<process>.jsonl``, written after
its PNGs: a rerun counts an image as done only when its PNG and its line both exist, so a kill between the
two redraws the batch (same seeds, same bytes) and every image in the folder has its cost on record. A
rerun removes its own stale temporary files and draws exactly the missing images.
``run.json`` records the settings (and the thread count, since CPU rounding follows it), and a rerun with
different settings is refused instead of mixing two sample sets in one folder; a larger ``n`` with the same
conditions for the images already drawn is a resume. One writer per process index: a lock file refuses a
second.
"""
from __future__ import annotations

import json
import os
import random
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

import numpy as np

from .atomic import TMP_MARK, save_png_atomic, write_atomic

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


# settings that may differ on a resume: n (checked through the conditions instead), the thread count (warned)
RESUMABLE = ("n", "conditions_sha1", "threads")


def _same_setting(key: str, there, now) -> bool:
    """Equal, or the same model named two ways (older run.json files say "default")."""
    if there == now:
        return True
    if key == "model" and "default" in (there, now):
        from .pipeline import default_model

        return default_model() in (there, now)
    return False


def check_run_settings(out_dir: str, settings: dict, run_file: str = RUN_FILE, grows: bool = False) -> None:
    """Write ``run_file`` (``run.json``) on a new folder; refuse a folder whose samples were drawn with
    other settings. ``grows``: the caller checked that the drawn images' conditions are unchanged, so a new
    ``n`` is a resume (run.json is rewritten with it)."""
    import warnings

    path = os.path.join(out_dir, run_file)
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        changed = {k: (saved.get(k), v) for k, v in settings.items()
                   if not _same_setting(k, saved.get(k), v) and not (grows and k in RESUMABLE) and k != "threads"}
        if changed:
            detail = "; ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in changed.items())
            raise ValueError(f"{out_dir} holds samples drawn with other settings ({detail}); "
                             "use a new --out folder or the same settings to resume")
        if saved.get("threads") not in (None, settings.get("threads")):
            warnings.warn(f"{out_dir} was drawn with {saved['threads']} CPU threads and this run uses "
                          f"{settings.get('threads')}: CPU float rounding follows the thread count, so images of the "
                          "two runs may differ by a grey level; set OMP_NUM_THREADS to match for identical pixels")
        if saved.get("n") == settings.get("n"):
            return
    os.makedirs(out_dir, exist_ok=True)
    write_atomic(path, json.dumps(settings, indent=2))


def start_run(out_dir: str, settings: dict, items: Sequence[SampleItem]) -> dict:
    """:func:`check_run_settings` with the conditions' digest added to ``settings``; the first
    run also writes ``conditions.txt`` (image ``i``'s condition on line ``i``). Returns the settings."""
    import hashlib

    import torch

    conditions = "\n".join(str(it.condition) for it in items) + "\n"
    settings = {**settings, "conditions_sha1": hashlib.sha1(conditions.encode()).hexdigest(),
                "threads": torch.get_num_threads()}
    path = os.path.join(out_dir, "conditions.txt")
    grows = False
    if os.path.exists(path):
        with open(path) as f:
            drawn = f.read()
        # a larger (or smaller) n keeps image i's condition: the shorter list is a prefix of the longer
        grows = conditions.startswith(drawn) or drawn.startswith(conditions)
    check_run_settings(out_dir, settings, grows=grows)
    if not os.path.exists(path) or (grows and len(conditions) > len(drawn)):
        write_atomic(path, conditions)
    return settings


def recorded_indices(out_dir: str) -> set:
    """Indices whose batch cost line is in the folder's ``stats-*.jsonl`` (a line cut by a kill is skipped)."""
    done = set()
    for name in os.listdir(out_dir) if os.path.isdir(out_dir) else []:
        if name.startswith("stats-") and name.endswith(".jsonl"):
            with open(os.path.join(out_dir, name)) as f:
                for line in f:
                    try:
                        done.update(json.loads(line)["indices"])
                    except (ValueError, KeyError):
                        continue
    return done


def missing_items(items: Sequence[SampleItem], out_dir: str, process_index: int = 0,
                  num_processes: int = 1) -> List[SampleItem]:
    """This process's share of ``items`` not committed yet: no PNG, or no cost line for its batch."""
    recorded = recorded_indices(out_dir)
    return [it for it in items if it.index % num_processes == process_index
            and not (it.index in recorded and os.path.exists(image_path(out_dir, it.index)))]


def remove_stale_temporaries(out_dir: str, process_index: int = 0, num_processes: int = 1) -> int:
    """Delete the temporary PNGs a killed run of this process's share left (``.000014.png.tmp-PID``)."""
    stale = re.compile(r"\.(\d+)\.png" + re.escape(TMP_MARK) + r"\d+")
    removed = 0
    for name in os.listdir(out_dir):
        m = stale.fullmatch(name)
        if m and int(m.group(1)) % num_processes == process_index:
            os.remove(os.path.join(out_dir, name))
            removed += 1
    return removed


@contextmanager
def writer_lock(out_dir: str, process_index: int = 0):
    """Hold ``.lock-<process>`` for the run: a second writer of the same share is refused, not let to draw
    everything again and double-count its cost. The OS drops the lock when the holder dies."""
    import fcntl

    from .errors import RunLockedError

    with open(os.path.join(out_dir, f".lock-{process_index}"), "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunLockedError(f"another process is sampling into {out_dir} (process index {process_index}); "
                                 "wait for it to finish or use another --out folder") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def sample_to_folder(pipe, items: Sequence[SampleItem], out_dir: str, batch_size: int = 16, method: str = "ar",
                     method_options: Optional[dict] = None, process_index: int = 0, num_processes: int = 1,
                     progress: bool = True, **sampling) -> dict:
    """Draw this process's missing images of ``items`` into ``out_dir``; returns counts and decoding cost.

    ``sampling`` goes to the pipeline (``cfg_scale``, ``top_k``, ...). Per-batch decoding
    statistics are appended to ``stats-<process>.jsonl`` (one line per batch, written after
    its images), so a benchmark can read the cost of the images in the folder.
    """
    os.makedirs(out_dir, exist_ok=True)
    with writer_lock(out_dir, process_index):
        remove_stale_temporaries(out_dir, process_index, num_processes)
        return _draw(pipe, items, out_dir, batch_size, method, method_options, process_index, num_processes,
                     progress, sampling)


def _draw(pipe, items, out_dir, batch_size, method, method_options, process_index, num_processes, progress,
          sampling) -> dict:
    from tqdm.auto import tqdm

    todo = missing_items(items, out_dir, process_index, num_processes)
    stats_path = os.path.join(out_dir, f"stats-{process_index}.jsonl")
    if os.path.exists(stats_path) and os.path.getsize(stats_path):
        with open(stats_path, "rb+") as f:  # a line cut by a kill must not swallow the next one
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")
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
        with open(stats_path, "a") as f:  # the commit: until this line lands, the batch counts as not drawn
            f.write(json.dumps({"indices": [it.index for it in chunk], **out.stats.to_dict()}) + "\n")
            f.flush()
            os.fsync(f.fileno())
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
