"""What a decoding step costs besides its matmuls: aten ops and host syncs, counted per forward pass.

A verify step that runs three times the ops of an AR step, or syncs with the host every few ops, is slow
however few passes it needs; ``vargen bench speed`` prints these counts next to milliseconds per pass so
the overhead shows in every report.
"""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# a tensor's value read on the host (.item(), bool(), int() of a tensor): the host waits for the device
_SCALAR_READ = torch.ops.aten._local_scalar_dense.default


class OpCounter(TorchDispatchMode):
    """Counts every aten op dispatched inside the ``with`` block, and the host syncs among them (scalar reads,
    and copies from a GPU to the host)."""

    def __init__(self):
        super().__init__()
        self.ops = 0
        self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.ops += 1
        if func is _SCALAR_READ:
            self.syncs += 1
        elif func.__name__.startswith(("_to_copy", "copy_")):
            src = args[1] if func.__name__.startswith("copy_") else args[0]
            dst = args[0] if func.__name__.startswith("copy_") else out
            if isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor) and src.is_cuda and not dst.is_cuda:
                self.syncs += 1
        return out


def count_ops(decode, *args, **kwargs) -> dict:
    """Run ``decode(*args, **kwargs)`` once under :class:`OpCounter`; ``{"ops_per_pass", "syncs_per_pass"}`` over
    its batch-level forward passes (``stats.forward_passes``)."""
    with OpCounter() as counter:
        _, stats = decode(*args, **kwargs)
    passes = max(stats.forward_passes, 1)
    return {"ops_per_pass": counter.ops / passes, "syncs_per_pass": counter.syncs / passes}
