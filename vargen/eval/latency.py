"""The latency table: time per decoding step of LlamaGen-size GPTs against the memory-bandwidth floor.

A decode step of a model under a billion parameters reads every weight once and does
little arithmetic per byte, so its floor is ``parameter bytes / memory bandwidth``. Here
each LlamaGen size (random weights: time does not depend on them) runs every method's
real decoding loop, and the measured cost per forward pass is set against plain AR's
step and against that floor. How many steps a method needs does depend on the weights:
for acceptance-based methods (SJD and its variants) it comes from a trained model's step
compression, measured in the same run on the same device; for fixed schedules (AR,
ZipAR) it is the timed run's own count.
"""
from __future__ import annotations

import statistics
import time
from typing import Dict, Optional, Sequence

import torch

from ..decoding import SamplingConfig, get_method
from ..decoding.methods import METHODS
from ..decoding.speculative import decode_jacobi, decode_sjd
from ..decoding.zipar_adaptive import decode_zipar_adaptive
from ..models import LlamaGen
from ..precision import DTYPES
from .speed import _device_name, _sync



def copy_bandwidth(device, megabytes: int = 1024, reps: int = 10) -> float:
    """Measured memory bandwidth in bytes/s of a large on-device copy (bytes read + bytes written)."""
    n = megabytes * 2 ** 20 // 4
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up
    _sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * src.numel() * src.element_size() / min(times)


def parameter_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def depends_on_acceptance(method: str) -> bool:
    """Whether a method's number of forward passes depends on the model's distribution (Jacobi and the
    SJD family, adaptive ZipAR's first-token checks)."""
    return METHODS[method][0] in (decode_sjd, decode_jacobi, decode_zipar_adaptive)


def random_gpt(size: str, tokens: int, device, dtype: torch.dtype, vocab_size: int = 16384) -> LlamaGen:
    """A class-conditional LlamaGen GPT of a named size with random weights, for timing."""
    torch.manual_seed(0)
    model = LlamaGen.from_size(size, model_type="c2i", vocab_size=vocab_size, block_size=tokens, num_classes=1000)
    return torch.nn.Module.to(model, device=device, dtype=dtype).eval()  # plain cast: no fp32-module warning


def time_method(model, method: str, batch: int, sampling: SamplingConfig, options: dict, reps: int = 2) -> dict:
    """Median wall time of whole decodes of ``batch`` images, after an untimed warm-up call.

    Returns ``ms_per_step`` (wall / forward passes, prefill included) and the passes.
    """
    device = next(model.parameters()).device
    # LANTERN's per-step cost depends on the neighbour table's size, not on which codes are close
    codebook = torch.randn(model.vocab_size, 8, generator=torch.Generator().manual_seed(0)).to(device)
    decode = get_method(method, codebook=codebook, **options)
    cond = torch.arange(batch, device=device) % 1000
    seeds = list(range(batch))
    decode(model, cond, sampling, seeds)  # compilation, CUDA-graph capture, allocator warm-up
    walls, passes = [], []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        _, stats = decode(model, cond, sampling, seeds)
        _sync(device)
        walls.append(time.perf_counter() - t0)
        passes.append(stats.forward_passes)
    wall = statistics.median(walls)
    return {"wall_s": wall, "forward_passes": statistics.median(passes),
            "ms_per_step": 1000 * wall / statistics.median(passes)}


def bench_latency(sizes: Sequence[str], batches: Sequence[int], token_counts: Sequence[int],
                  methods: Sequence[str], compression: Dict[str, float], device="cuda", dtype: str = "bf16",
                  sampling: Optional[dict] = None, method_options: Optional[dict] = None,
                  compile_mode: Optional[str] = None, reps: int = 2, compression_source: str = "",
                  progress: bool = True) -> dict:
    """Time every method at every size x token count x batch; returns the JSON-able table.

    Args:
        compression: step compression (``tokens / forward passes``) of each acceptance-based
            method on a trained model, e.g. from :func:`vargen.eval.speed.bench_speed`.
        compile_mode: decode under ``torch.compile`` with this mode (``None``: eager).
    """
    from tqdm.auto import tqdm

    if "ar" not in methods:
        methods = ["ar", *methods]
    missing = [m for m in methods if depends_on_acceptance(m) and m not in compression]
    if missing:
        raise ValueError(f"no step compression for {missing}: measure them on a trained model first")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    sampling_cfg = SamplingConfig(**(sampling or {}))
    bandwidth = copy_bandwidth(device)
    rows = []
    jobs = [(s, t, b) for s in sizes for t in token_counts for b in batches]
    for size, tokens, batch in tqdm(jobs, desc="latency", disable=not progress):
        model = random_gpt(size, tokens, device, DTYPES[dtype])
        floor_ms = 1000 * parameter_bytes(model) / bandwidth
        runner = model
        if compile_mode:  # one wrapper per model: its graphs ([B, 1], [B, L + 1], ...) serve every method
            from ..models.compiled import compile_model

            torch._dynamo.reset()
            runner = compile_model(model, compile_mode)
        timed = {m: time_method(runner, m, batch, sampling_cfg, (method_options or {}).get(m, {}), reps)
                 for m in methods}
        ar = timed["ar"]
        for m, t in timed.items():
            steps = tokens / compression[m] if depends_on_acceptance(m) else t["forward_passes"]
            latency_s = steps * t["ms_per_step"] / 1000
            rows.append({
                "size": size, "params_m": sum(p.numel() for p in model.parameters()) / 1e6, "tokens": tokens,
                "batch": batch, "method": m, "ms_per_step": t["ms_per_step"],
                "step_vs_ar": t["ms_per_step"] / ar["ms_per_step"], "steps_per_image": steps,
                "images_per_s": batch / latency_s, "speedup": ar["forward_passes"] * ar["ms_per_step"] / 1000 / latency_s,
                "floor_ms": floor_ms, "step_vs_floor": t["ms_per_step"] / floor_ms, "timed_passes": t["forward_passes"],
            })
        del model, runner
    return {"device": _device_name(device), "dtype": dtype, "compile": compile_mode or "off",
            "bandwidth_gb_s": bandwidth / 1e9, "sampling": sampling_cfg.to_dict(), "reps": reps,
            "compression": compression, "compression_source": compression_source,
            "method_options": method_options or {}, "results": rows}


def format_latency_table(report: dict) -> str:
    """The latency report as a Markdown table."""
    head = ["size", "params", "tokens", "batch", "method", "ms/step", "step / AR step", "steps/img", "img/s",
            "speedup", "floor ms", "step / floor"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report["results"]:
        cells = [r["size"], f"{r['params_m']:.0f}M", str(r["tokens"]), str(r["batch"]), r["method"],
                 f"{r['ms_per_step']:.2f}", f"{r['step_vs_ar']:.2f}x", f"{r['steps_per_image']:.0f}",
                 f"{r['images_per_s']:.2f}", f"{r['speedup']:.2f}x", f"{r['floor_ms']:.2f}",
                 f"{r['step_vs_floor']:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(f"\n{report['device']}, {report['dtype']}, compile {report['compile']}, copy bandwidth "
                 f"{report['bandwidth_gb_s']:.0f} GB/s; steps of acceptance-based methods from "
                 f"{report['compression_source'] or 'the given compression'}")
    return "\n".join(lines)
