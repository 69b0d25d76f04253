"""The ``csrc/cpu/`` extension: bf16 inference matmuls on CPUs with AVX-512 BF16.

A batch-1 step multiplies 1-4 rows by every weight once, so its matmuls stream weights, and oneDNN's prepacked
bf16 path reads them at ~20 GB/s on the 2-core EPYC these presets are timed on, against ~55 GB/s for a plain read;
a verify pass of 17-72 tokens is compute-bound, where oneDNN reached ~83% of the bf16 peak at the default model's
shapes. ``matmul_bf16.cpp`` reads a weight laid out for it as one sequential stream of 64-output panels with a
register-blocked micro-kernel, and is the faster of the two at every row count measured (1 to 544, the default
model's and GPT-B's shapes; see there). Built with the host C++ compiler alone (no nvcc) by
``python -m vargen.ops.build --cpu`` / ``make cpu-ext``, else on first use; a failed build, a CPU without AVX-512
BF16 or ``VARGEN_NO_EXT=1`` leave :class:`vargen.models.linear.Linear` on oneDNN.
"""
from __future__ import annotations

import os
import sys
import threading
from types import ModuleType
from typing import Optional

import torch

from . import _build

NAME = "vargen_cpu_ops"
FUNCTIONS = ("supported", "pack_weight", "linear", "attention", "rms_norm", "rope", "silu_mul", "write_kv", "block",
             "draw_categorical", "verify_window")

_lock = threading.Lock()
_state = {"tried": False, "module": None, "status": None}


def sources() -> list:
    return sorted(str(p) for p in (_build.csrc_dir() / "cpu").glob("*.cpp"))


def headers() -> list:
    return sorted(str(p) for p in (_build.csrc_dir() / "cpu").glob("*.h"))


def library_path():
    return _build.library_path(NAME)


def build(verbose: bool = False) -> ModuleType:
    """Compile (if the sources changed) and import the extension; raises with the compiler output on failure.
    ``-fopenmp``: ATen's ``parallel_for`` is a header template, threaded only when compiled with OpenMP."""
    path = library_path()
    if path.exists() and not _build.stale(path, sources() + headers()):
        return import_built()  # up to date: skip cpp_extension (its import alone warns about CUDA on a CPU host)
    from torch.utils.cpp_extension import load

    bin_dir = os.path.dirname(sys.executable)  # ninja comes with vargen's environment, which may not be on PATH
    if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    out = _build.build_directory(NAME)
    out.mkdir(parents=True, exist_ok=True)
    module = load(name=NAME, sources=sources(), build_directory=str(out), verbose=verbose,
                  extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"])
    missing = [f for f in FUNCTIONS if not hasattr(module, f)]
    if missing:
        raise RuntimeError(f"extension {module.__file__} lacks {missing}")
    return module


def import_built() -> ModuleType:
    """Import the already built extension without compiling anything (raises if there is none)."""
    return _build.import_built(NAME)


def kernels() -> Optional[ModuleType]:
    """The loaded extension when this CPU runs it (built on first use), else ``None``; never raises."""
    return _build.load_once(_state, _lock, lambda: build(), "vargen CPU kernels", "oneDNN runs the decode matmuls",
                            lambda m: None if m.supported() else "this CPU lacks AVX-512 BF16")


def in_use() -> bool:
    """Whether this process runs the kernel (loaded, usable, not disabled); never builds."""
    return not _build.disabled() and _state["module"] is not None


def status() -> str:
    """One line saying whether the CPU kernels are in use; never builds."""
    if _build.disabled():
        return "disabled (VARGEN_NO_EXT=1): oneDNN"
    if _state["status"] is not None:
        return _state["status"]
    return f"built at {library_path()}, not loaded yet" if library_path().exists() else \
        "not built (run `python -m vargen.ops.build`; otherwise built on first bf16 CPU decode)"


def takes(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``x @ weight.T`` fits the kernel: bf16 on a CPU, out features a multiple of 16 and in features
    even (every LlamaGen size). Says nothing about the extension being there."""
    n, k = weight.shape
    return (x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16 and x.device.type == "cpu"
            and n % 16 == 0 and k % 2 == 0)


def for_sampling(*tensors: Optional[torch.Tensor]) -> Optional[ModuleType]:
    """The extension when its fp32 sampling ops (``sampling_cpu.cpp``: a window's verification, inverse-CDF draws)
    can run on ``tensors`` (``None`` entries ignored): all on a CPU, none needing a gradient, not inside
    ``torch.compile`` (graphs trace the reference) and the extension already loaded, i.e. by a bf16 model's first
    step. Sampling alone never builds it: an fp32 run without it keeps the reference, which agrees with the kernels."""
    if torch.compiler.is_compiling() or not in_use():
        return None
    present = [t for t in tensors if t is not None]
    if not all(t.device.type == "cpu" for t in present) or \
            (torch.is_grad_enabled() and any(t.requires_grad for t in present)):
        return None
    return _state["module"]


def for_eager(*tensors: torch.Tensor) -> Optional[ModuleType]:
    """The extension when eager bf16 inference on the CPU can use its ops (the matmul, the attention and the layer
    ops: RMSNorm, RoPE, SwiGLU's gate, the KV-cache write) on ``tensors``: all bf16 on a CPU, no autograd, no
    autocast (whose mixed dtypes the PyTorch code handles), not inside ``torch.compile`` (inductor fuses the layer
    ops itself) and the kernels in use; else ``None``."""
    if torch.compiler.is_compiling() or torch.is_grad_enabled() or torch.is_autocast_enabled("cpu"):
        return None
    if not all(t.dtype == torch.bfloat16 and t.device.type == "cpu" for t in tensors):
        return None
    return kernels()
