"""``python -m vargen.ops.build``: compile and import the CUDA ops extension.

Works without a GPU (it compiles for ``TORCH_CUDA_ARCH_LIST``, default 9.0, and only imports
the result). Exits non-zero and prints the compiler error if compilation fails.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from . import _build


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vargen.ops.build", description=__doc__.splitlines()[0])
    parser.add_argument("-q", "--quiet", action="store_true", help="hide the ninja/nvcc command lines")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    try:
        module = _build.build(verbose=not args.quiet)
    except Exception as e:  # noqa: BLE001 - report any build/import failure with its full text
        print(f"vargen ops: build failed after {time.perf_counter() - t0:.0f} s\n{type(e).__name__}: {e}",
              file=sys.stderr)
        return 1
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none (built and imported only)"
    print(f"vargen ops: built and imported {module.__file__} in {time.perf_counter() - t0:.0f} s; "
          f"functions: {', '.join(_build.FUNCTIONS)}; GPU: {gpu}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
