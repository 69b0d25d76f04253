"""Which precision to run in: one answer for training recipes, generation and benchmarks.

bf16 is the lever on hardware that has it natively: this project's CPU (AVX-512 BF16) runs
bf16 matmuls ~5x faster than fp32, and GPUs since Ampere do too. Probabilities, acceptance
and sampling stay fp32 wherever the weights run in bf16.
"""
from __future__ import annotations

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def native_bf16(device) -> bool:
    """True where bf16 matmuls run in hardware: CUDA with bf16 support, or a CPU with AVX-512 BF16 / AMX."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def default_mixed_precision(device) -> str:
    """accelerate's ``mixed_precision`` for a recipe that does not set one: ``"bf16"`` where native, else ``"no"``."""
    return "bf16" if native_bf16(device) else "no"


DTYPE_CHOICES = ("auto", "bf16", "fp16", "fp32")


def resolve_dtype(spec, device="cpu") -> torch.dtype:
    """The weights / activations dtype for ``spec``: ``"auto"`` (or ``None``) is bf16 where the hardware runs it
    natively (:func:`native_bf16`) and fp32 elsewhere; ``"bf16"``, ``"fp16"``, ``"fp32"`` or a ``torch.dtype``
    as given. fp16 is refused on CPU (no fast fp16 matmuls there; bf16 is the CPU's half precision)."""
    from .errors import UsageError

    if spec is None or spec == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    dtype = DTYPES.get(spec, spec) if isinstance(spec, str) else spec
    if dtype not in DTYPES.values():
        raise UsageError(f"dtype must be one of {', '.join(DTYPE_CHOICES)} (or a torch float dtype), got {spec!r}")
    if dtype == torch.float16 and torch.device(device).type == "cpu":
        raise UsageError("fp16 has no fast matmuls on a CPU: use bf16 (or fp32)")
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]
