"""The latency table: time per decoding step of LlamaGen-size GPTs against the step's roofline floor.

A decode step reads every weight once (the embedding tables only a row each), so no step beats ``weight bytes /
memory bandwidth``; it also multiplies every input row by every matmul weight, so none beats ``2 x matmul
parameters x rows / matmul peak`` either. A batch-1 AR step (a row per CFG half) is bound by the first; a verify
pass of 17 tokens x 2 CFG halves is bound by the second wherever the peak is under ~17x the bandwidth in FLOP per
byte (a 2-core CPU: ~460 GFLOP/s of bf16 against ~30-50 GB/s), and then it cannot cost ~1 AR step however lean its
code. The floor of each row is the larger of the two, both measured on the machine at hand (a large copy; a 2048^2
matmul through the model's own linear layer) with the rows per pass counted in the method's own loop. Here
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


def matmul_peak(device, dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    """Measured FLOP/s of an ``n x n`` by ``n x n`` matmul through vargen's :class:`~vargen.models.linear.Linear` in
    inference (the path a model's forward takes: vargen's CPU kernel where it runs, else oneDNN or cuBLAS)."""
    from ..models.linear import Linear

    layer = torch.nn.Module.to(Linear(n, n, bias=False), device=device, dtype=dtype)
    x = torch.randn(n, n, device=device).to(dtype)
    with torch.no_grad():
        layer(x)  # warm-up: packing, kernel build
        _sync(device)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            layer(x)
            _sync(device)
            times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / min(times)


def parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes of the weights a decode step reads: every parameter but the embedding tables, of which it reads a row."""
    tables = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    return sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in tables)


def matmul_parameters(model: torch.nn.Module) -> int:
    """Weights every input row is multiplied by (the linear layers'): 2 FLOP per weight per row."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def count_rows(model: torch.nn.Module) -> tuple:
    """``(hook handle, counter)``: the counter's ``rows`` adds up the input rows (batch rows x tokens) of every call of
    the model's output head, i.e. of every forward pass."""
    counter = {"rows": 0}
    handle = model.output.register_forward_pre_hook(lambda _, args: counter.__setitem__(
        "rows", counter["rows"] + args[0].shape[:-1].numel()))
    return handle, counter


def depends_on_acceptance(method: str) -> bool:
    """Whether a method's number of forward passes depends on the model's distribution (Jacobi and the
    SJD family, adaptive ZipAR's first-token checks)."""
    return METHODS[method][0] in (decode_sjd, decode_jacobi, decode_zipar_adaptive)


def random_gpt(size: str, tokens: int, device, dtype: torch.dtype, vocab_size: int = 16384) -> LlamaGen:
    """A class-conditional LlamaGen GPT of a named size with random weights, for timing."""
    torch.manual_seed(0)
    model = LlamaGen.from_size(size, model_type="c2i", vocab_size=vocab_size, block_size=tokens, num_classes=1000)
    return torch.nn.Module.to(model, device=device, dtype=dtype).eval()  # plain cast: no fp32-module warning


def time_method(model, method: str, batch: int, sampling: SamplingConfig, options: dict, reps: int = 2,
                eager=None) -> dict:
    """Median wall time of whole decodes of ``batch`` images, after an untimed warm-up call.

    Returns ``ms_per_step`` (wall / forward passes, prefill included), the passes and ``rows_per_pass``: the input
    rows (CFG halves and tokens) of a step after the prefill, counted in an eager decode (``eager``, the
    uncompiled model, when ``model`` is a compiled wrapper).
    """
    device = next(model.parameters()).device
    # LANTERN's per-step cost depends on the neighbour table's size, not on which codes are close
    codebook = torch.randn(model.vocab_size, 8, generator=torch.Generator().manual_seed(0)).to(device)
    decode = get_method(method, codebook=codebook, **options)
    cond = torch.arange(batch, device=device) % 1000
    seeds = list(range(batch))
    counted = eager if eager is not None else model
    handle, counter = count_rows(counted)
    try:
        _, stats = decode(counted, cond, sampling, seeds)  # also compilation, CUDA-graph capture, allocator warm-up
    finally:
        handle.remove()
    prefix_rows = batch * (2 if sampling.uses_cfg else 1) * counted.prefix_len
    rows_per_pass = (counter["rows"] - prefix_rows) / max(1, stats.forward_passes - 1)
    if eager is not None:
        decode(model, cond, sampling, seeds)
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
            "ms_per_step": 1000 * wall / statistics.median(passes), "rows_per_pass": rows_per_pass}


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
    bandwidth, peak = copy_bandwidth(device), matmul_peak(device, DTYPES[dtype])
    rows = []
    jobs = [(s, t, b) for s in sizes for t in token_counts for b in batches]
    for size, tokens, batch in tqdm(jobs, desc="latency", disable=not progress):
        model = random_gpt(size, tokens, device, DTYPES[dtype])
        read_ms = 1000 * parameter_bytes(model) / bandwidth
        runner = model
        if compile_mode:  # one wrapper per model: its graphs ([B, 1], [B, L + 1], ...) serve every method
            from ..models.compiled import compile_model

            torch._dynamo.reset()
            runner = compile_model(model, compile_mode)
        timed = {m: time_method(runner, m, batch, sampling_cfg, (method_options or {}).get(m, {}), reps,
                                eager=model if compile_mode else None) for m in methods}
        ar = timed["ar"]
        for m, t in timed.items():
            steps = tokens / compression[m] if depends_on_acceptance(m) else t["forward_passes"]
            latency_s = steps * t["ms_per_step"] / 1000
            compute_ms = 1000 * 2 * matmul_parameters(model) * t["rows_per_pass"] / peak
            floor_ms = max(read_ms, compute_ms)
            rows.append({
                "size": size, "params_m": sum(p.numel() for p in model.parameters()) / 1e6, "tokens": tokens,
                "batch": batch, "method": m, "ms_per_step": t["ms_per_step"],
                "step_vs_ar": t["ms_per_step"] / ar["ms_per_step"], "steps_per_image": steps,
                "images_per_s": batch / latency_s,
                "speedup": ar["forward_passes"] * ar["ms_per_step"] / 1000 / latency_s,
                "rows_per_pass": t["rows_per_pass"], "read_floor_ms": read_ms, "compute_floor_ms": compute_ms,
                "floor_ms": floor_ms, "floor_bound": "compute" if compute_ms > read_ms else "memory",
                "step_vs_floor": t["ms_per_step"] / floor_ms, "timed_passes": t["forward_passes"],
            })
        del model, runner
    return {"device": _device_name(device), "dtype": dtype, "compile": compile_mode or "off",
            "bandwidth_gb_s": bandwidth / 1e9, "matmul_peak_gflop_s": peak / 1e9, "sampling": sampling_cfg.to_dict(),
            "reps": reps, "compression": compression, "compression_source": compression_source,
            "method_options": method_options or {}, "results": rows}


def format_latency_table(report: dict) -> str:
    """The latency report as a Markdown table."""
    head = ["size", "params", "tokens", "batch", "method", "ms/step", "step / AR step", "steps/img", "img/s",
            "speedup", "rows / step", "floor ms", "bound", "step / floor"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report["results"]:
        cells = [r["size"], f"{r['params_m']:.0f}M", str(r["tokens"]), str(r["batch"]), r["method"],
                 f"{r['ms_per_step']:.2f}", f"{r['step_vs_ar']:.2f}x", f"{r['steps_per_image']:.0f}",
                 f"{r['images_per_s']:.2f}", f"{r['speedup']:.2f}x", f"{r['rows_per_pass']:.0f}",
                 f"{r['floor_ms']:.2f}", r["floor_bound"], f"{r['step_vs_floor']:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(f"\n{report['device']}, {report['dtype']}, compile {report['compile']}, copy bandwidth "
                 f"{report['bandwidth_gb_s']:.0f} GB/s, matmul peak {report['matmul_peak_gflop_s']:.0f} GFLOP/s "
                 "(floor: the larger of weight bytes / bandwidth and 2 x matmul weights x rows / peak); steps of "
                 "acceptance-based methods from "
                 f"{report['compression_source'] or 'the given compression'}")
    return "\n".join(lines)
