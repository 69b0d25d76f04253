"""Speed next to quality: every method against plain AR on the same model, conditions and seeds.

``bench_speed`` decodes the same ``n`` conditions with each method (image ``i`` uses seed
``seed + i`` everywhere) and reports forward passes, step compression, accepted lengths,
latency and speedup against the ``ar`` run of the same call, plus quality proxies: the
mean log-likelihood of the samples under the model's own sampling distribution, the
total-variation distance between the method's and AR's token histograms, and, for scene
prompts, the exact scene score.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from typing import Dict, Optional, Sequence

import numpy as np
import torch

from ..atomic import write_atomic

from ..decoding import SamplingConfig, get_method, logits_to_probs
from .opcount import count_ops


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def sample_log_likelihood(model, tokens: torch.Tensor, cond, sampling: SamplingConfig,
                          cond_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``[B]`` log-probability of each token sequence under the distribution decoding samples from
    (CFG, temperature, top-k/p applied), by one teacher-forced pass."""
    if not hasattr(model, "forward_train"):  # other protocol models (Hugging Face adapters): prefill + one pass
        from ..decoding.session import DecodeSession

        session = DecodeSession(model, cond, sampling, cond_mask=cond_mask)
        cells = torch.arange(tokens.shape[1] - 1, device=tokens.device).expand(tokens.shape[0], -1)
        probs = torch.cat([session.prefill()[:, None], session.forward(tokens[:, :-1], cells, cells)], 1)
    else:
        logits = model.forward_train(tokens, cond, cond_mask=cond_mask, train=False)
        if sampling.uses_cfg:
            logits = torch.cat([logits, model.forward_train(tokens, cond, cond_mask=cond_mask, train=False, null=True)])
        probs = logits_to_probs(logits, sampling)
    return probs.gather(-1, tokens[..., None]).squeeze(-1).clamp_min(1e-30).log().sum(1)


def token_histogram_tv(a: torch.Tensor, b: torch.Tensor, vocab: int) -> float:
    """Total-variation distance between the token frequencies of two sample sets."""
    ha = torch.bincount(a.flatten().cpu(), minlength=vocab).double()
    hb = torch.bincount(b.flatten().cpu(), minlength=vocab).double()
    return float(0.5 * (ha / ha.sum() - hb / hb.sum()).abs().sum())


def bench_conditions(pipe, n: int, seed: int) -> tuple:
    """``(inputs, scenes)``: classes ``i % num_classes`` for c2i; held-out scene captions for t2i."""
    if pipe.takes_text:
        from ..data.scenes import SceneDataset

        data = SceneDataset(seed=seed)
        scenes = [data.scene(i) for i in range(n)]
        return [s.caption for s in scenes], scenes
    return [i % pipe.gpt.config.num_classes for i in range(n)], None


def bench_speed(pipe, methods: Sequence[str], n: int = 32, seed: int = 0, batch_size: int = 8,
                sampling: Optional[dict] = None, method_options: Optional[dict] = None,
                scene_seed: int = 999, progress: bool = True, reps: int = 1) -> dict:
    """Run every method on the same ``n`` conditions and seeds; returns the JSON-able report.

    The methods take turns on each batch, ``reps`` timed decodes each (the median counts), so that ratios to AR
    are measured under the same machine load.

    ``methods`` must include ``"ar"`` (the reference of every ratio); ``method_options``
    maps a method name to its options (e.g. ``{"sjd": {"window": 16}}``).
    """
    from tqdm.auto import tqdm

    if "ar" not in methods:
        methods = ["ar", *methods]
    sampling_cfg = SamplingConfig(**(sampling or {}))
    inputs, scenes = bench_conditions(pipe, n, scene_seed)
    # conditions once (the text encoder is not part of any method's cost): (start, cond, cond_mask, seeds)
    batches = []
    for start in range(0, n, batch_size):
        cond, cond_mask = pipe.parse_conditions(inputs[start:start + batch_size])
        batches.append((start, cond, cond_mask, [seed + i for i in range(start, start + len(cond))]))
    decoders = {name: get_method(name, codebook=pipe.vq.codebook_embeddings, **(method_options or {}).get(name, {}))
                for name in methods}
    if pipe.decode_model is not pipe.gpt or torch.device(pipe.device).type == "cuda":
        # untimed first calls: compilation / CUDA-graph capture and allocator warm-up are not decoding cost
        _, cond, cond_mask, seeds = batches[0]
        for decode in decoders.values():
            decode(pipe.decode_model, cond, sampling_cfg, seeds, cond_mask=cond_mask)
    timed = {name: {"tokens": [], "passes": [], "latencies": [], "hist": {}, "cells": [], "batch_passes": []}
             for name in methods}
    # methods in turn on each batch (and each repeat), not one method after another: a shared machine's drift
    # (AR's batch-1 pass on the 2-core CPU moved 6.9-9.5 ms within 25 minutes) then falls on every method alike
    for start, cond, cond_mask, seeds in tqdm(batches, desc="bench speed", disable=not progress, leave=False):
        times = {name: [] for name in methods}
        for rep in range(reps):
            for name in methods:
                _sync(pipe.device)
                t0 = time.perf_counter()
                out, stats = decoders[name](pipe.decode_model, cond, sampling_cfg, seeds, cond_mask=cond_mask)
                _sync(pipe.device)  # kernels still queued belong to this decode
                times[name].append(time.perf_counter() - t0)
                if rep:
                    continue
                run = timed[name]
                run["batch_passes"].append(stats.forward_passes)
                run["tokens"].append(out)
                run["passes"] += stats.per_sample_forward_passes or [stats.forward_passes] * len(cond)
                for k, v in stats.accepted_hist.items():
                    run["hist"][int(k)] = run["hist"].get(int(k), 0) + v
                run["cells"].append(torch.tensor(stats.extra.get("accepted_cells", [0.0] * pipe.gpt.num_tokens))
                                    * len(cond))
        for name in methods:
            timed[name]["latencies"].append(statistics.median(times[name]))
    runs: Dict[str, dict] = {}
    for name, run in timed.items():
        tokens = torch.cat(run["tokens"])
        ll = torch.cat([sample_log_likelihood(pipe.gpt, tokens[start:start + len(cond)], cond, sampling_cfg, cond_mask)
                        for start, cond, cond_mask, _ in batches])
        runs[name] = {"tokens": tokens, "passes": run["passes"], "latencies": run["latencies"], "hist": run["hist"],
                      "accepted_cells": (torch.stack(run["cells"]).sum(0) / n).tolist(), "log_likelihood": ll,
                      "ms_per_pass": 1000 * sum(run["latencies"]) / max(1, sum(run["batch_passes"]))}
    for name, run in runs.items():
        # after all timing, one more decode of the first batch under the op counter, eagerly: counting slows every
        # op down, and a compiled model run under the counter's dispatch mode recompiles and slows later methods
        _, cond, cond_mask, seeds = batches[0]
        run.update(count_ops(decoders[name], pipe.gpt, cond, sampling_cfg, seeds, cond_mask=cond_mask))
    N = pipe.gpt.num_tokens
    ar = runs["ar"]
    ar_latency = statistics.median(ar["latencies"])
    results = []
    for name, run in runs.items():
        fp = float(np.mean(run["passes"]))
        lat = statistics.median(run["latencies"])
        row = {
            "method": name, "forward_passes_mean": fp, "step_compression": N / fp,
            "accepted_mean": sum(k * v for k, v in run["hist"].items()) / max(1, sum(run["hist"].values())),
            "latency_s_median": lat, "speedup": ar_latency / lat,
            "ms_per_pass": run["ms_per_pass"], "ops_per_pass": run["ops_per_pass"],
            "syncs_per_pass": run["syncs_per_pass"],
            "log_likelihood_mean": float(run["log_likelihood"].mean()),
            "log_likelihood_sem": float(run["log_likelihood"].std() / max(1, n) ** 0.5),
            "token_tv_vs_ar": token_histogram_tv(run["tokens"], ar["tokens"], pipe.gpt.vocab_size),
            "accepted_hist": {str(k): v for k, v in sorted(run["hist"].items())},
            "accepted_cells": run["accepted_cells"], "options": (method_options or {}).get(name, {}),
        }
        if scenes is not None and pipe.decodes_images:  # a model without an image decoder is timed only
            from .scenes import score_scenes

            images = (pipe.decode_tokens(run["tokens"]).permute(0, 2, 3, 1).cpu().numpy() * 255).round()
            row["scene_score"] = score_scenes(list(images.astype(np.uint8)), scenes)["overall"]
        results.append(row)
    # noise floor: AR itself on other seeds, so a lossless method's distances have a scale
    ar_decode, other = get_method("ar"), []
    for _, cond, cond_mask, seeds in batches:
        other.append(ar_decode(pipe.decode_model, cond, sampling_cfg, [s + n for s in seeds], cond_mask=cond_mask)[0])
    floor = {"token_tv_ar_other_seeds": token_histogram_tv(torch.cat(other), ar["tokens"], pipe.gpt.vocab_size)}
    return {"model": getattr(pipe, "name_or_path", None), "device": _device_name(pipe.device), "n": n,
            "seed": seed, "batch_size": batch_size, "reps": reps, "tokens": N, "sampling": sampling_cfg.to_dict(),
            "dtype": str(next(pipe.gpt.parameters()).dtype).replace("torch.", ""),
            "results": results, "noise_floor": floor}


def _device_name(device) -> str:
    """The device as a report names it; on a CPU also whether vargen's CPU kernels ran (read when the report is
    made, after the decodes), which moved AR's batch-1 step by ~1.8x on the default model."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from ..ops import cpu_kernels

    kernel = "vargen CPU kernel" if cpu_kernels.in_use() else "oneDNN only"
    return f"{platform.processor() or platform.machine()} CPU ({torch.get_num_threads()} threads, {kernel})"


def format_table(report: dict) -> str:
    """The report as a Markdown table (one row per method)."""
    scene = any("scene_score" in r for r in report["results"])
    head = ["method", "passes", "step compr.", "accepted", "latency s", "speedup", "ms / pass", "ops / pass",
            "syncs / pass", "log-lik", "token TV vs AR"]
    head += ["scene score"] if scene else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report["results"]:
        cells = [r["method"], f"{r['forward_passes_mean']:.1f}", f"{r['step_compression']:.2f}x",
                 f"{r['accepted_mean']:.2f}", f"{r['latency_s_median']:.3f}", f"{r['speedup']:.2f}x",
                 f"{r['ms_per_pass']:.2f}", f"{r['ops_per_pass']:.0f}", f"{r['syncs_per_pass']:.2f}",
                 f"{r['log_likelihood_mean']:.1f} ± {r['log_likelihood_sem']:.1f}", f"{r['token_tv_vs_ar']:.3f}"]
        cells += [f"{r['scene_score']:.2f}"] if scene else []
        lines.append("| " + " | ".join(cells) + " |")
    if "noise_floor" in report:
        lines.append(f"\nnoise floor: token TV between AR on these seeds and AR on {report['n']} other seeds = "
                     f"{report['noise_floor']['token_tv_ar_other_seeds']:.3f}")
    return "\n".join(lines)


def format_sweep(reports: list) -> str:
    """Reports of the same images at several batch sizes as one table: per method and batch size, latency per
    image, images/s and the speedup over AR at that batch size (ratios from one run each)."""
    head = ["method", "batch", "passes / image", "ms / image", "images / s", "speedup vs AR", "ms / pass",
            "ops / pass", "syncs / pass"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for report in reports:
        B = report["batch_size"]
        for r in report["results"]:
            per_image = r["latency_s_median"] / B
            lines.append("| " + " | ".join([
                r["method"], str(B), f"{r['forward_passes_mean']:.1f}", f"{1000 * per_image:.1f}",
                f"{1 / per_image:.2f}", f"{r['speedup']:.2f}x", f"{r['ms_per_pass']:.2f}",
                f"{r['ops_per_pass']:.0f}", f"{r['syncs_per_pass']:.2f}"]) + " |")
    return "\n".join(lines)


def plot_report(report: dict, path: str, grid: Sequence[int]) -> None:
    """Accepted-length histograms and per-cell acceptance heat maps, one column per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["results"]
    fig, axes = plt.subplots(2, len(rows), figsize=(3.2 * len(rows), 6), squeeze=False)
    for i, r in enumerate(rows):
        hist = {int(k): v for k, v in r["accepted_hist"].items()}
        axes[0, i].bar(list(hist), list(hist.values()))
        axes[0, i].set_title(f"{r['method']}\n{r['step_compression']:.2f}x fewer passes", fontsize=9)
        axes[0, i].set_xlabel("tokens committed per pass")
        im = axes[1, i].imshow(np.array(r["accepted_cells"]).reshape(grid), vmin=0, vmax=1, cmap="viridis")
        axes[1, i].set_title("P(cell accepted as a draft)", fontsize=9)
        axes[1, i].axis("off")
    fig.colorbar(im, ax=axes[1].tolist(), shrink=0.8)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_report(report: dict, json_path: Optional[str] = None, plot_path: Optional[str] = None,
                 grid: Sequence[int] = (16, 16)) -> None:
    """Write the JSON (atomically) and the plot."""
    if json_path:
        write_atomic(json_path, json.dumps(report, indent=2))
    if plot_path:
        os.makedirs(os.path.dirname(os.path.abspath(plot_path)), exist_ok=True)
        plot_report(report, plot_path, grid)
