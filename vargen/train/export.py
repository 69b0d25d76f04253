"""Package trained runs as an embedded model: fp16 pipeline folder, sample grid, model card."""
from __future__ import annotations

import json
import os
import platform
import time
from typing import Optional, Sequence

import torch

from ..data.registry import build_dataset, collate
from ..errors import UsageError, load_local
from ..models import LlamaGen
from ..models.text import WordTextEncoder
from ..pipeline import VarGenPipeline
from ..tokenizers import VQTokenizer


def _run_summary(run_dir: str) -> dict:
    """``run.json`` written at the end of training (device, processes, threads), or ``{}`` for older runs."""
    path = os.path.join(run_dir, "run.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _last_log(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return rows[-1]


@torch.no_grad()
def reconstruction_psnr(vq: VQTokenizer, data_specs: Sequence[dict], n: int = 64) -> float:
    """Mean per-image PSNR (dB, images in [0, 1]) of encode -> decode on ``n`` images of ``data_specs``."""
    dataset = build_dataset(data_specs)
    step = max(1, len(dataset) // n)
    batch = collate([dataset[i] for i in range(0, step * n, step)][:n])
    images = batch["image"]
    rec = torch.cat([vq.decode(vq.encode(chunk)) for chunk in images.split(16)]).clamp(-1, 1)
    mse = ((rec - images) / 2).pow(2).flatten(1).mean(1)
    return float((10 * torch.log10(1 / mse.clamp_min(1e-10))).mean())


def _phases(runs) -> list:
    """A run folder, or the list of a model's training phases (each started from the one before, the last
    holds the final weights)."""
    runs = [runs] if isinstance(runs, str) else list(runs)
    if not runs:
        raise UsageError("an export spec's run list is empty: name the run folders, earliest phase first")
    return runs


def _chain_final(runs: list) -> dict:
    """The last phase's final log line, with ``step`` and ``elapsed_s`` summed over every phase."""
    finals = [_last_log(r) for r in runs]
    return {**finals[-1], "step": sum(f["step"] for f in finals), "elapsed_s": sum(f["elapsed_s"] for f in finals),
            "phases": [{"run": r, "step": f["step"], "elapsed_s": f["elapsed_s"]} for r, f in zip(runs, finals)]}


def export_model(name: str, vq_run, ar_run, out_dir: str, prompts: Sequence, eval_data: dict,
                 cfg_scale: float = 4.0, top_k: int = 0, seed: int = 0, notes: Optional[str] = None) -> dict:
    """Write ``out_dir`` (fp16 pipeline, ``samples.png``, ``MODEL_CARD.md``, ``card.json``) from two runs.

    ``vq_run`` / ``ar_run`` are run folders, or lists of them for a model trained in phases (earliest first,
    each continuing the one before; the weights come from the last, the card's steps and time are the sums).
    ``eval_data`` maps a label (say where the images come from) to dataset specs; the
    card reports reconstruction PSNR per label.
    """
    vq_runs, ar_runs = _phases(vq_run), _phases(ar_run)
    vq_run, ar_run = vq_runs[-1], ar_runs[-1]
    from torchvision.utils import save_image

    hint = ("export packages vargen training runs (`vargen train ...`); for released checkpoint files use "
            "`vargen convert llamagen --gpt GPT.pt --vq VQ.pt -o FOLDER` (docs/checkpoints.md)")
    for run in (*vq_runs, *ar_runs):
        if os.path.isfile(run):
            raise UsageError(f"{run!r} is a file, not a training run folder; {hint}")
    vq = load_local(VQTokenizer, os.path.join(vq_run, "vq"), "the tokenizer run's vq/ folder").eval()
    gpt = load_local(LlamaGen, os.path.join(ar_run, "gpt"), "the AR run's gpt/ folder").eval()
    text_dir = os.path.join(ar_run, "text_encoder")
    text = load_local(WordTextEncoder, text_dir, "the text encoder").eval() if os.path.isdir(text_dir) else None
    pipe = VarGenPipeline(gpt=gpt, vq=vq, text_encoder=text)
    psnr = {label: reconstruction_psnr(vq, specs) for label, specs in eval_data.items()}
    start = time.perf_counter()
    out = pipe(list(prompts), cfg_scale=cfg_scale, top_k=top_k, seed=seed, output_type="pt", progress=False)
    sample_s = time.perf_counter() - start
    os.makedirs(out_dir, exist_ok=True)
    pipe.to(torch.float16).save_pretrained(out_dir)
    save_image(out.images, os.path.join(out_dir, "samples.png"), nrow=min(4, len(prompts)), padding=2)
    sizes = {c: sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(os.path.join(out_dir, c)) for f in fs)
             for c in ("gpt", "vq", "text_encoder") if os.path.isdir(os.path.join(out_dir, c))}
    card = {
        "name": name, "vq_run": vq_runs, "ar_run": ar_runs,
        "vq_final": _chain_final(vq_runs), "ar_final": _chain_final(ar_runs),
        "reconstruction_psnr_db": psnr, "eval_data": eval_data,
        "params": {"gpt": sum(p.numel() for p in gpt.parameters()), "vq": sum(p.numel() for p in vq.parameters()),
                   "text_encoder": sum(p.numel() for p in text.parameters()) if text else 0},
        "file_bytes": sizes, "sample_prompts": [str(p) for p in prompts],
        "sample_settings": {"cfg_scale": cfg_scale, "top_k": top_k, "seed": seed},
        "sample_wall_s": sample_s, "sample_device": f"{platform.processor() or platform.machine()} CPU",
        "vq_device": _run_summary(vq_run).get("device_name", "unknown"),
        "ar_device": _run_summary(ar_run).get("device_name", "unknown"),
    }
    with open(os.path.join(out_dir, "card.json"), "w") as f:
        json.dump(card, f, indent=2)
    with open(os.path.join(out_dir, "MODEL_CARD.md"), "w") as f:
        f.write(_card_markdown(card, notes))
    return card


def _phase_sum(final: dict, key: str, fmt: str, unit: float = 1) -> str:
    """``total`` of a chained run, with its phases when there are several: ``3150 (2000 + 1150)``."""
    def show(value):
        return fmt.format(value / unit if unit != 1 else value)

    phases = final.get("phases", [])
    if len(phases) < 2:
        return show(final[key])
    return f"{show(final[key])} ({' + '.join(show(p[key]).replace(' min', '') for p in phases)})"


def _card_markdown(card: dict, notes: Optional[str]) -> str:
    vq, ar = card["vq_final"], card["ar_final"]
    lines = [
        f"# {card['name']}", "",
        notes or "", "",
        "| | tokenizer | generator |", "|---|---|---|",
        "| recipe runs | " + " + ".join(f"`{r}`" for r in card["vq_run"]) + " | "
        + " + ".join(f"`{r}`" for r in card["ar_run"]) + " |",
        f"| steps | {_phase_sum(vq, 'step', '{}')} | {_phase_sum(ar, 'step', '{}')} |",
        f"| training time | {_phase_sum(vq, 'elapsed_s', '{:.1f} min', 60)} | "
        f"{_phase_sum(ar, 'elapsed_s', '{:.1f} min', 60)} |",
        f"| final loss | {vq['loss']:.4f} (L1 {vq.get('l1', float('nan')):.4f}) | {ar['loss']:.4f} "
        f"(token acc {ar.get('token_acc', float('nan')):.3f}) |",
        f"| parameters | {card['params']['vq'] / 1e6:.2f} M | {card['params']['gpt'] / 1e6:.2f} M "
        f"(+ text encoder {card['params']['text_encoder'] / 1e6:.2f} M) |",
        f"| shipped fp16 bytes | {card['file_bytes'].get('vq', 0) / 1e6:.2f} MB | "
        f"{(card['file_bytes'].get('gpt', 0) + card['file_bytes'].get('text_encoder', 0)) / 1e6:.2f} MB |",
        f"| training device | {card['vq_device']} | {card['ar_device']} |",
        "",
        "Reconstruction PSNR (64 images per set, [0, 1] range): "
        + ", ".join(f"{k} **{v:.2f} dB**" for k, v in card["reconstruction_psnr_db"].items()) + ".", "",
        f"Samples (`samples.png`, settings {card['sample_settings']}, {card['sample_wall_s']:.1f} s on "
        f"{card['sample_device']}):", "",
    ]
    lines += [f"{i + 1}. {p}" for i, p in enumerate(card["sample_prompts"])]
    lines += ["", "![samples](samples.png)", ""]
    return "\n".join(lines)
