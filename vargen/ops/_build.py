"""Build and load the ``csrc/`` CUDA extension just in time, or report why it is unavailable.

Decoding never crashes on a missing toolchain: a failed build is remembered (with its
reason, warned once) and every op falls back to :mod:`vargen.ops.reference`.
``VARGEN_NO_EXT=1`` forces the fallback without trying.
"""
from __future__ import annotations

import importlib.util
import os
import re
import sys
import threading
import warnings
from pathlib import Path
from types import ModuleType
from typing import List, Optional

import torch

NAME = "vargen_ops"
FUNCTIONS = ("sampling_probs", "verify_window", "lantern_pooled_mass", "liif_corners")

_lock = threading.Lock()
_state = {"tried": False, "module": None, "status": None}


def csrc_dir() -> Path:
    """``vargen/csrc``: the sources ship inside the package (package_data), so an installed wheel can build too."""
    return Path(__file__).resolve().parents[1] / "csrc"


def sources() -> List[str]:
    """The extension's C++/CUDA sources."""
    root = csrc_dir()
    return sorted(str(p) for p in root.glob("*.cpp")) + sorted(str(p) for p in root.glob("*.cu"))


def build_directory(name: str = NAME) -> Path:
    """``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/vargen/torch_extensions``, one folder per extension and Python/torch
    version (a binary built against one torch does not load in another)."""
    base = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "vargen",
                                                                 "torch_extensions")
    py = f"{sys.version_info[0]}{sys.version_info[1]}"
    tag = re.sub(r"[^A-Za-z0-9_.]", "_", f"{name}_py{py}_torch{torch.__version__}")
    return Path(base) / tag


def library_path(name: str = NAME) -> Path:
    return build_directory(name) / f"{name}.so"


def stale(path: Path, srcs) -> bool:
    """Whether any of ``srcs`` changed after the library at ``path`` was built."""
    return any(os.path.getmtime(s) > os.path.getmtime(path) for s in srcs)


def disabled() -> bool:
    return os.environ.get("VARGEN_NO_EXT", "").strip() not in ("", "0")


def _toolchain_env() -> None:
    """Defaults when unset: nvcc in /usr/local/cuda; without a visible GPU, code for sm_90 (H100/H200).
    With a GPU, torch compiles for the GPUs it sees (an sm_90-only binary would not run on an A100)."""
    os.environ.setdefault("CUDA_HOME", "/usr/local/cuda")
    if not torch.cuda.is_available():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None:  # resolved when torch.utils.cpp_extension was first imported
        cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"]


def build(verbose: bool = False) -> ModuleType:
    """Compile (if the sources changed) and import the extension; raises with the compiler output on failure."""
    _toolchain_env()
    from torch.utils.cpp_extension import load

    srcs = sources()
    if not srcs:
        raise RuntimeError(f"no CUDA sources found in {csrc_dir()}")
    out = build_directory()
    out.mkdir(parents=True, exist_ok=True)
    module = load(name=NAME, sources=srcs, build_directory=str(out), verbose=verbose,
                  extra_cflags=["-O3"], extra_cuda_cflags=["-O3", "-lineinfo"])
    missing = [f for f in FUNCTIONS if not hasattr(module, f)]
    if missing:
        raise RuntimeError(f"extension {module.__file__} lacks {missing}")
    return module


def import_built(name: str = NAME) -> ModuleType:
    """Import an already built extension without compiling anything (raises if there is none)."""
    path = library_path(name)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; build it with `python -m vargen.ops.build`")
    spec = importlib.util.spec_from_file_location(name, str(path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_once(state: dict, lock, build_fn, what: str, fallback: str, unusable=None) -> Optional[ModuleType]:
    """``build_fn()``'s module, built and imported once per process; ``None`` if disabled, if the build failed
    (remembered in ``state["status"]`` with its reason, warned once) or if ``unusable(module)`` gives a reason."""
    if disabled():
        return None
    if state["tried"]:
        return state["module"]
    with lock:
        if not state["tried"]:
            try:
                module = build_fn()
                reason = unusable(module) if unusable is not None else None
                if reason:
                    state["status"] = f"built, but {reason}: {fallback}"
                else:
                    state["module"], state["status"] = module, f"loaded from {module.__file__}"
            except Exception as e:  # noqa: BLE001 - any toolchain failure means "use the fallback"
                reason = f"{type(e).__name__}: {e}"
                if len(reason) > 4000:
                    reason = reason[:1000] + "\n...\n" + reason[-3000:]
                state["status"] = f"unavailable: {reason}"
                warnings.warn(f"{what} unavailable, {fallback} ({reason[:500]})", RuntimeWarning, stacklevel=3)
            state["tried"] = True
    return state["module"]


def extension() -> Optional[ModuleType]:
    """The loaded extension (built on first use), or ``None`` if disabled or unavailable."""
    return load_once(_state, _lock, lambda: build(), "vargen CUDA ops extension", "using the PyTorch fallbacks")


def extension_status() -> str:
    """One line (or a compiler error) saying whether the kernels are in use; never builds."""
    if disabled():
        return "disabled (VARGEN_NO_EXT=1): PyTorch fallbacks"
    if _state["status"] is not None:
        return _state["status"]
    path = library_path()
    if path.exists():
        note = " (stale: csrc changed since; rebuilt on first use)" if stale(path, sources()) else ""
        return f"built at {path}" + note + \
            ", not loaded yet"
    return "not built (run `python -m vargen.ops.build`; otherwise built on first CUDA use)"
