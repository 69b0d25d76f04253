"""``python -m vargen.ops.build``: compile and import the CUDA ops extension (``--cpu``: the CPU kernels).

Works without a GPU (it compiles for ``TORCH_CUDA_ARCH_LIST``, default 9.0, and only imports
the result). ``--cpu`` needs only the host C++ compiler. Exits non-zero and prints the compiler
error if compilation fails.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from . import _build, cpu_kernels


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vargen.ops.build", description=__doc__.splitlines()[0])
    parser.add_argument("-q", "--quiet", action="store_true", help="hide the ninja/nvcc command lines")
    parser.add_argument("--cpu", action="store_true", help="build the CPU kernels (csrc/cpu, no nvcc needed)")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    label = "vargen CPU kernels" if args.cpu else "vargen ops"
    try:
        module = (cpu_kernels.build if args.cpu else _build.build)(verbose=not args.quiet)
    except Exception as e:  # noqa: BLE001 - report any build/import failure with its full text
        print(f"{label}: build failed after {time.perf_counter() - t0:.0f} s\n{type(e).__name__}: {e}", file=sys.stderr)
        return 1
    if args.cpu:
        use = "in use for bf16 inference matmuls" if module.supported() else \
            "not used: this CPU lacks AVX-512 BF16 (oneDNN runs every matmul)"
        print(f"{label}: built and imported {module.__file__} in {time.perf_counter() - t0:.0f} s; {use}")
        return 0
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none (built and imported only)"
    print(f"vargen ops: built and imported {module.__file__} in {time.perf_counter() - t0:.0f} s; "
          f"functions: {', '.join(_build.FUNCTIONS)}; GPU: {gpu}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
