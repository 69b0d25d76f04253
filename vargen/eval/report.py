"""The speed/quality report: every method against plain AR, same model, conditions and seeds.

``bench_report`` draws the same ``n`` images (image ``i``: same condition, seed ``seed + i``)
with each method into ``OUT/<method>/`` through :func:`vargen.sample.sample_to_folder`, so
the sample sets are resumable PNG folders that FID tools can read, and then reports per
method:

- cost: forward passes per image, step compression (tokens / passes), decoding latency
  per image and the speedup over AR's (both from the runs' ``stats-*.jsonl``);
- quality: the Frechet distance of the method's images to AR's images in the features of
  an extractor (FD-vargen by default: vargen's own CIFAR-10 classifier, **not comparable
  with published FID**), next to its noise floor, AR against AR on ``n`` other seeds; and
  for default scene prompts the exact scene score (GenEval's six tasks, unweighted mean) and its
  strict form, "scene exact" (no object beyond those the prompt names).

Every figure carries a 95% bootstrap interval over images (for Frechet distances: +- 1.96
bootstrap standard errors, see :func:`paired_frechet`).
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Sequence

import numpy as np

from ..atomic import write_atomic
from .speed import _device_name

FLOOR = "ar@other-seeds"


def read_costs(folder: str) -> dict:
    """Per-image forward passes and decoding latency from a sample folder's ``stats-*.jsonl``.

    A batch's wall time is shared equally by its images (``latency_s``); ``batch_latency_s``
    keeps one value per batch, the unit a latency interval must resample (images of a batch
    share one timing). A line cut by a kill is skipped; :func:`vargen.sample.sample_to_folder` redraws
    such a batch, and :func:`bench_report` refuses a folder whose images are not all on record.
    """
    passes, latency, batches = {}, {}, []
    for name in sorted(os.listdir(folder)):
        if not (name.startswith("stats-") and name.endswith(".jsonl")):
            continue
        with open(os.path.join(folder, name)) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                per = rec.get("per_sample_forward_passes") or [rec["forward_passes"]] * len(rec["indices"])
                for i, p in zip(rec["indices"], per):
                    passes[i], latency[i] = p, rec["wall_s"] / len(rec["indices"])
                batches.append(rec["wall_s"] / len(rec["indices"]))
    idx = sorted(passes)
    return {"indices": idx, "passes": np.array([passes[i] for i in idx], dtype=np.float64),
            "latency_s": np.array([latency[i] for i in idx], dtype=np.float64),
            "batch_latency_s": np.array(batches, dtype=np.float64)}


def _interval(values: np.ndarray) -> List[float]:
    lo, hi = np.percentile(values, [2.5, 97.5])
    return [float(lo), float(hi)]


def _bootstrap_mean(x: np.ndarray, rng: np.random.Generator, rounds: int) -> List[float]:
    idx = rng.integers(0, len(x), size=(rounds, len(x)))
    return _interval(x[idx].mean(1))


def _bootstrap_ratio(num: np.ndarray, den: np.ndarray, rng: np.random.Generator, rounds: int) -> List[float]:
    a = num[rng.integers(0, len(num), size=(rounds, len(num)))].mean(1)
    b = den[rng.integers(0, len(den), size=(rounds, len(den)))].mean(1)
    return _interval(a / b)


def frechet_distance_eigh(a: np.ndarray, b: np.ndarray) -> float:
    """The Frechet distance of two feature sets by symmetric eigendecompositions:
    tr sqrt(S_a S_b) = sum sqrt(eig(S_a^1/2 S_b S_a^1/2)). Equal to clean-fid's ``sqrtm`` form
    (tested) and two orders of magnitude faster, which is what makes bootstrap intervals affordable."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(s_a)
    root = (v * np.sqrt(w.clip(min=0))) @ v.T
    cross = np.sqrt(np.linalg.eigvalsh(root @ s_b @ root).clip(min=0)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * cross)


def paired_frechet(a: np.ndarray, b: np.ndarray, rng: np.random.Generator, rounds: int) -> dict:
    """Frechet distance between feature sets ``a`` and ``b`` (rows: images of the same seeds and
    conditions): clean-fid's value, and value +- 1.96 bootstrap standard errors (image indices
    resampled jointly).

    Not the bootstrap percentiles: resampling with replacement duplicates images, which biases
    a Frechet distance upwards (measured: the percentile interval can miss the estimate
    entirely), while its spread is still a fair standard error.
    """
    from .fid import feature_stats, frechet_distance

    fd = frechet_distance(*feature_stats(a), *feature_stats(b))
    boot = []
    for _ in range(rounds):
        idx = rng.integers(0, len(a), size=len(a))
        boot.append(frechet_distance_eigh(a[idx], b[idx]))
    se = float(np.std(boot))
    return {"value": float(fd), "se": se, "ci95": [max(0.0, fd - 1.96 * se), fd + 1.96 * se]}


def bench_report(pipe, methods: Sequence[str], n: int, out_dir: str, seed: int = 0, batch_size: int = 16,
                 sampling: Optional[dict] = None, method_options: Optional[Dict[str, dict]] = None,
                 extractor=None, scene_seed: int = 999, model_name: Optional[str] = None,
                 reference: Optional[str] = None, bootstrap: int = 200, progress: bool = True) -> dict:
    """Sample every method (and AR on other seeds, the noise floor) into ``out_dir`` and compare.

    ``methods``: decoding method names (``ar`` is added first when absent);
    ``method_options`` maps a method name to its options. ``extractor`` maps ``[B, 3, H, W]``
    images in [0, 255] to features (default: the shipped FD-vargen classifier). ``reference``: an
    image folder or a ``.npz`` from :func:`vargen.eval.fid.reference_stats` made with the same
    extractor (e.g. the CIFAR-10 test split); each method then also gets its FD to the real
    data. Reruns resume the sample folders and recompute the figures. Returns the JSON-able report.
    """
    from ..errors import RunStateError
    from ..pipeline import default_model
    from ..sample import SampleItem, plan_for_pipeline, sample_to_folder, start_run
    from .fid import folder_features

    if extractor is None:
        from .classifier import load_fd_vargen

        extractor = load_fd_vargen(device=str(pipe.device))
    methods = ["ar", *[m for m in methods if m != "ar"]]
    items, scenes = plan_for_pipeline(pipe, n, seed, scene_seed=scene_seed)
    # the noise floor: AR itself on seeds no method uses, same conditions
    floor_items = [SampleItem(it.index, it.condition, it.seed + n) for it in items]
    sampling = sampling or {}
    runs = {}
    for name, its in [*((m, items) for m in methods), (FLOOR, floor_items)]:
        method = "ar" if name == FLOOR else name
        options = (method_options or {}).get(method, {})
        folder = os.path.join(out_dir, name.replace("+", "_").replace("@", "_"))
        start_run(folder, {"model": model_name or default_model(), "n": n, "seed": its[0].seed, "method": method,
                           "method_options": options, "sampling": sampling}, its)
        sample_to_folder(pipe, its, folder, batch_size=batch_size, method=method, method_options=options,
                         progress=progress, **sampling)
        costs = read_costs(folder)
        unrecorded = sorted({it.index for it in its} - set(costs["indices"]))
        if unrecorded:  # latency from part of the images would be reported as if it were all of them
            raise RunStateError(f"{folder}: {len(unrecorded)} of {len(its)} images have no cost record (first: "
                                f"{unrecorded[:5]}); rerun the same command to redraw them")
        runs[name] = {"folder": folder, "costs": costs,
                      "features": folder_features(folder, extractor, batch_size=64)}
    ref_stats = None
    if reference:
        from .fid import load_stats, reference_stats

        name = getattr(extractor, "name", type(extractor).__name__)
        ref_stats = (load_stats(reference, name, "clean") if reference.endswith(".npz")
                     else reference_stats(reference, extractor=extractor, keep_feats=False))
    ar = runs["ar"]
    results = []
    tokens = pipe.gpt.num_tokens
    for i, (name, run) in enumerate(runs.items()):
        # one generator per figure, so that an interval never depends on how many draws another one made
        rngs = [np.random.default_rng([seed % 2 ** 32, i, k]) for k in range(4)]
        passes, latency = run["costs"]["passes"], run["costs"]["latency_s"]
        passes_ci = _bootstrap_mean(passes, rngs[0], bootstrap)
        row = {
            "method": name, "folder": run["folder"], "n": int(len(passes)),
            "options": (method_options or {}).get("ar" if name == FLOOR else name, {}),
            "forward_passes_mean": float(passes.mean()), "forward_passes_ci95": passes_ci,
            "step_compression": float(tokens / passes.mean()),
            "step_compression_ci95": [tokens / c for c in passes_ci[::-1]],
            "latency_s_mean": float(latency.mean()),
            "speedup": float(ar["costs"]["latency_s"].mean() / latency.mean()),
            "speedup_ci95": _bootstrap_ratio(ar["costs"]["batch_latency_s"], run["costs"]["batch_latency_s"], rngs[1],
                                             bootstrap),
            "fd_vs_ar": None if name == "ar" else paired_frechet(run["features"], ar["features"], rngs[2], bootstrap),
        }
        if ref_stats is not None:
            from .fid import feature_stats, frechet_distance

            row["fd_vs_reference"] = frechet_distance(*feature_stats(run["features"]), ref_stats["mu"],
                                                      ref_stats["sigma"])
        if scenes is not None:
            row["scenes"] = _scene_scores(run["folder"], scenes, rngs[3], bootstrap)
        results.append(row)
    return {"model": model_name or "default", "device": _device_name(pipe.device), "n": n, "seed": seed,
            "batch_size": batch_size, "tokens": tokens, "sampling": sampling,
            "extractor": getattr(extractor, "name", type(extractor).__name__),
            "comparable_with_published_fid": False, "noise_floor_method": FLOOR, "reference": reference,
            "results": results}


def _scene_scores(folder: str, scenes, rng: np.random.Generator, rounds: int) -> dict:
    """GenEval-style scene scores of a folder's images against their scenes, with a bootstrap interval
    of the overall score (unweighted mean over tasks) resampling images."""
    from PIL import Image

    from ..sample import image_path
    from .scenes import score_scenes, summarize_checks

    images = [np.asarray(Image.open(image_path(folder, i)).convert("RGB")) for i in range(len(scenes))]
    result = score_scenes(images, scenes, return_checks=True)
    checks = result.pop("checks")
    boot, boot_exact = [], []
    for _ in range(rounds):  # resample the per-image verdicts; detection runs once
        idx = rng.integers(0, len(scenes), size=len(scenes))
        part = summarize_checks([checks[i] for i in idx])
        boot.append(part["overall"])
        boot_exact.append(part["overall_exact"])
    return {**result, "overall_ci95": _interval(np.array(boot)), "overall_exact_ci95": _interval(np.array(boot_exact))}


def _ci(value: float, ci: Sequence[float], fmt: str = "{:.2f}") -> str:
    return f"{fmt.format(value)} [{fmt.format(ci[0])}, {fmt.format(ci[1])}]"


def format_report(report: dict) -> str:
    """The report as a Markdown table, one row per method, 95% intervals in brackets."""
    scene = any("scenes" in r for r in report["results"])
    head = ["method", "passes / image", "step compr.", "latency ms / image", "speedup", "FD-vargen vs AR"]
    ref = any("fd_vs_reference" in r for r in report["results"])
    head += ["FD-vargen vs reference"] if ref else []
    head += ["scene score", "scene exact"] if scene else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report["results"]:
        fd = r["fd_vs_ar"]
        cells = [r["method"], _ci(r["forward_passes_mean"], r["forward_passes_ci95"], "{:.1f}"),
                 _ci(r["step_compression"], r["step_compression_ci95"]) + "x", f"{1000 * r['latency_s_mean']:.1f}",
                 _ci(r["speedup"], r["speedup_ci95"]) + "x",
                 "(reference)" if fd is None else _ci(fd["value"], fd["ci95"], "{:.3g}")]
        if ref:
            cells.append(f"{r['fd_vs_reference']:.3g}")
        if scene:
            cells.append(_ci(r["scenes"]["overall"], r["scenes"]["overall_ci95"]))
            cells.append(_ci(r["scenes"]["overall_exact"], r["scenes"]["overall_exact_ci95"]))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(f"\n{report['n']} images per method, seeds {report['seed']}..{report['seed'] + report['n'] - 1}; "
                 f"`{FLOOR}` is AR on seeds {report['seed'] + report['n']}.., its FD to AR is the noise floor. "
                 f"FD-vargen uses the features of `{report['extractor']}` and is not comparable with published FID."
                 + (f" Reference: `{report['reference']}`." if report.get("reference") else ""))
    return "\n".join(lines)


def plot_report(report: dict, path: str) -> None:
    """Speedup (latency and step compression) against the quality cost (FD-vargen vs AR), per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    floor = next((r["fd_vs_ar"]["value"] for r in report["results"] if r["method"] == FLOOR), None)
    for ax, key, label in ((axes[0], "speedup", "latency speedup over AR"),
                           (axes[1], "step_compression", "step compression (tokens / forward)")):
        for r in report["results"]:
            if r["method"] == FLOOR:
                continue
            x = 0.0 if r["fd_vs_ar"] is None else r["fd_vs_ar"]["value"]
            xerr = None if r["fd_vs_ar"] is None else [[x - r["fd_vs_ar"]["ci95"][0]], [r["fd_vs_ar"]["ci95"][1] - x]]
            y, ci = r[key], r[f"{key}_ci95"]
            ax.errorbar(x, y, xerr=xerr, yerr=[[y - ci[0]], [ci[1] - y]], fmt="o", capsize=3)
            ax.annotate(r["method"], (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
        if floor is not None:
            ax.axvline(floor, ls="--", c="gray", lw=1, label="noise floor (AR vs AR, other seeds)")
            ax.legend(fontsize=8)
        ax.axhline(1.0, c="k", lw=0.5)
        ax.set_xlabel(f"quality cost: FD-vargen vs AR ({report['extractor']})")
        ax.set_ylabel(label)
    fig.suptitle(f"{report['model']}: speed against quality cost, n={report['n']} ({report['device']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_report(report: dict, out_dir: str) -> Dict[str, str]:
    """``report.json``, ``report.md`` and ``report.png`` in ``out_dir`` (text files written atomically)."""
    paths = {k: os.path.join(out_dir, f"report.{k}") for k in ("json", "md", "png")}
    for key, text in (("json", json.dumps(report, indent=2)), ("md", format_report(report) + "\n")):
        write_atomic(paths[key], text)
    plot_report(report, paths["png"])
    return paths
