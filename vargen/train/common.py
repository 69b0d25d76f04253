"""The training loop every vargen recipe shares: accelerate, resume, loss log, safetensors.

A recipe supplies ``build(config) -> (modules dict, trainable parameters, batches, step_fn)``;
this module runs the steps, logs ``log.jsonl`` and a loss-curve plot, and keeps one
resumable state folder (written to a temporary folder, then renamed, so a crash never
leaves a half-written checkpoint).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from typing import Callable, Dict, Iterator

import torch


def load_config(path: str) -> dict:
    """Read a JSON recipe config (see ``configs/``)."""
    from ..errors import MissingInputError, UsageError

    if not os.path.exists(path):
        raise MissingInputError(f"config not found: {path}")
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as err:
            raise UsageError(f"{path} is not valid JSON ({err}): fix it") from None


def with_steps(config: dict, steps: int, **train_keys) -> dict:
    """``config`` run for ``steps`` steps (with other training keys, e.g. ``log_every``), in every part a recipe
    trains: MuLo's ``"drafter_train"`` / ``"upsampler_train"`` carry their own step counts."""
    keys = {"steps": steps, **train_keys}
    out = {**config, **keys}
    for name, part in config.items():
        if name.endswith("_train") and isinstance(part, dict):
            out[name] = {**part, **{k: v for k, v in keys.items() if k in part or k == "steps"}}
    return out


def infinite(loader) -> Iterator:
    """Cycle a DataLoader forever (a new shuffle each epoch)."""
    while True:
        yield from loader


def cosine_lr(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def run_training(config: dict, modules: Dict[str, torch.nn.Module], params, batches: Iterator,
                 step_fn: Callable, out_dir: str, log_every: int = 10, save_every: int = 200) -> dict:
    """Run ``config["steps"]`` optimisation steps, resuming from ``out_dir/state`` if present.

    ``step_fn(modules, batch) -> (loss tensor, metrics dict)``. Returns the last logged
    metrics plus ``steps``, ``wall_s`` and ``device``.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from ..precision import default_mixed_precision

    os.makedirs(out_dir, exist_ok=True)
    # bf16 autocast by default where the hardware has it (3-5x faster steps on this project's CPU);
    # a recipe that sets "mixed_precision" ("no", "bf16", "fp16") keeps its choice
    device = "cuda" if torch.cuda.is_available() else "cpu"
    accelerator = Accelerator(mixed_precision=config.get("mixed_precision") or default_mixed_precision(device))
    set_seed(config.get("seed", 0))
    # param groups may carry an "lr_scale" (a multiple of the scheduled learning rate)
    groups = [dict(g) for g in params] if params and isinstance(params[0], dict) else [{"params": list(params)}]
    params = [p for g in groups for p in g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=config["lr"], betas=tuple(config.get("betas", (0.9, 0.95))),
                                  weight_decay=config.get("weight_decay", 0.0))
    names = list(modules)
    prepared = accelerator.prepare(*[modules[n] for n in names], optimizer)
    modules = dict(zip(names, prepared[:-1]))
    optimizer = prepared[-1]
    state_dir = os.path.join(out_dir, "state")
    step, prior_s = 0, 0.0
    if os.path.isdir(state_dir):
        accelerator.load_state(state_dir)
        with open(os.path.join(state_dir, "step.json")) as f:
            saved = json.load(f)
        step, prior_s = saved["step"], saved.get("elapsed_s", 0.0)
        accelerator.print(f"resumed from {state_dir} at step {step}")
    total, warmup = config["steps"], config.get("warmup", 0)
    log_path = os.path.join(out_dir, "log.jsonl")
    for m in modules.values():
        m.train()
    start, metrics = time.perf_counter() - prior_s, {}  # elapsed_s counts training time across resumes
    meter = Throughput(step, total)
    while step < total:
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, total, config["lr"], warmup) * group.get("lr_scale", 1.0)
        loss, metrics = step_fn(modules, next(batches))
        meter.add(metrics.pop("tokens", 0))
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        if config.get("grad_clip"):
            accelerator.clip_grad_norm_(params, config["grad_clip"])
        optimizer.step()
        step += 1
        if step % log_every == 0 or step == total:
            metrics = {"step": step, "loss": float(loss.detach()), **{k: float(v) for k, v in metrics.items()},
                       "lr": optimizer.param_groups[0]["lr"], "elapsed_s": time.perf_counter() - start,
                       **meter.rates(step)}
            if accelerator.is_main_process:
                with open(log_path, "a") as f:
                    f.write(json.dumps(metrics) + "\n")
            accelerator.print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                       for k, v in metrics.items()) + f" eta={meter.eta(step)}")
        if step % save_every == 0 or step == total:
            _save_state(accelerator, state_dir, step, time.perf_counter() - start)
    for m in modules.values():
        m.eval()
    summary = {**metrics, "steps": step, "wall_s": time.perf_counter() - start, "device": str(accelerator.device),
               "mixed_precision": accelerator.mixed_precision,
               "device_name": _device_name(accelerator.device), "num_processes": accelerator.num_processes,
               "torch_threads": torch.get_num_threads(), "torch": torch.__version__}
    if accelerator.is_main_process:
        plot_losses(log_path, os.path.join(out_dir, "loss.png"))
        with open(os.path.join(out_dir, "run.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return {**summary, "modules": {n: accelerator.unwrap_model(m) for n, m in modules.items()}}


class Throughput:
    """Steps/s, tokens/s and an ETA over this process's steps (a resume starts a fresh clock).

    A recipe's ``step_fn`` may put ``"tokens"`` (an int: tokens, or pixels' tokens, in the batch) in
    its metrics; it is counted here, not logged.
    """

    def __init__(self, first_step: int, total: int):
        self.first, self.total, self.tokens, self.t0 = first_step, total, 0, time.perf_counter()

    def add(self, tokens) -> None:
        self.tokens += int(tokens)

    def rates(self, step: int) -> dict:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        out = {"steps_per_s": (step - self.first) / dt}
        if self.tokens:
            out["tokens_per_s"] = self.tokens / dt
        return out

    def eta(self, step: int) -> str:
        done = step - self.first
        if done <= 0:
            return "?"
        left = (time.perf_counter() - self.t0) / done * (self.total - step)
        return f"{int(left // 3600)}h{int(left % 3600 // 60):02d}m" if left >= 3600 else f"{int(left // 60)}m{int(left % 60):02d}s"


def save_trained(result: dict, name: str, out_dir: str):
    """Pop the trained module ``name`` from ``run_training``'s result, save it to ``out_dir/name`` in eval mode;
    returns ``(module, folder)``."""
    trained = result.pop("modules")[name].eval()
    folder = os.path.join(out_dir, name)
    trained.save_pretrained(folder)
    return trained, folder


def write_metrics(folder: str, metrics: dict) -> None:
    """Held-out metrics of a trained module, next to its weights (``folder/metrics.json``), written atomically."""
    from ..atomic import write_atomic

    write_atomic(os.path.join(folder, "metrics.json"), json.dumps(metrics, indent=2))


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"


def _save_state(accelerator, state_dir: str, step: int, elapsed_s: float) -> None:
    tmp = state_dir + ".tmp"
    if accelerator.is_main_process and os.path.isdir(tmp):
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    if accelerator.is_main_process:
        with open(os.path.join(tmp, "step.json"), "w") as f:
            json.dump({"step": step, "elapsed_s": elapsed_s}, f)
        old = state_dir + ".old"
        if os.path.isdir(state_dir):
            os.replace(state_dir, old)
        os.replace(tmp, state_dir)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def plot_losses(log_path: str, out_png: str) -> None:
    """Loss curve(s) from ``log.jsonl`` to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not os.path.exists(log_path):
        return
    with open(log_path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    keys = [k for k in rows[0] if k not in ("step", "lr", "elapsed_s")]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
    for ax, k in zip(axes[0], keys):
        ax.plot([r["step"] for r in rows], [r.get(k, float("nan")) for r in rows])
        ax.set_title(k)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out_png, dpi=80)
    plt.close(fig)
