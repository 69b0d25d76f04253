"""A memory budget for the image side of generation: token decoding and LIIF rendering run in chunks of
images and pixels sized to it, and a request whose output alone cannot fit is refused before work starts.

The estimates are deliberately generous (measured on the shipped scenes-t2i: a VQ decode takes ~22 MB per
128 x 128 image, a LIIF query ~8 KB), so a budget is an upper bound on the chunks' working memory, not on the
process (weights, the interpreter and torch come on top: ~0.5 GB).
"""
from __future__ import annotations

import re
from typing import Optional

from .errors import MemoryBudgetError, UsageError

GB = 1024 ** 3
# the default budget: a quarter of the memory available now, and no more than this (chunks beyond a few
# hundred MB are no faster, and the process must stay small on a shared machine)
DEFAULT_FRACTION, DEFAULT_CAP = 0.25, 1 * GB
_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1024, "m": 1024 ** 2, "mb": 1024 ** 2, "g": GB, "gb": GB, "t": 1024 * GB,
          "tb": 1024 * GB}


def available_memory() -> int:
    """Bytes of RAM the system can give now (``MemAvailable``)."""
    import psutil

    return int(psutil.virtual_memory().available)


def default_budget() -> int:
    return int(min(DEFAULT_FRACTION * available_memory(), DEFAULT_CAP))


def parse_bytes(text: str) -> int:
    """``"2G"``, ``"512MB"``, ``"1.5gb"`` -> bytes (powers of 1024)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS or float(m.group(1)) <= 0:
        raise UsageError(f"--max-memory takes a size such as 2G or 512M, got {text!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def budget_or_default(max_memory: Optional[int]) -> int:
    return default_budget() if max_memory is None else int(max_memory)


def human(n: float) -> str:
    return f"{n / GB:.1f} GB" if n >= GB / 10 else f"{n / 1024 ** 2:.0f} MB"


def per_chunk(total: int, cost_each: float, budget: int) -> int:
    """How many of ``total`` items costing ``cost_each`` bytes fit in ``budget`` at once (at least 1)."""
    return max(1, min(total, int(budget // max(cost_each, 1))))


def refuse_unless_fits(what: str, need: float, budget: int, fix: str) -> None:
    """:class:`MemoryBudgetError` with the estimate when ``need`` bytes (that no chunking can split) exceed
    ``budget``."""
    if need > budget:
        raise MemoryBudgetError(f"{what} needs about {human(need)}, over the memory budget of {human(budget)} "
                                f"(--max-memory; {human(available_memory())} available): {fix}")


def vq_decode_bytes(channels: int, height: int, width: int) -> float:
    """Working memory of a VQ decode of one ``height x width`` image whose decoder ends at ``channels``
    channels: ~40 floats per channel per pixel (the full-resolution convolutions, norms and activations)."""
    return 40.0 * 4 * channels * height * width


def liif_query_bytes(liif) -> float:
    """Working memory of one LIIF query: four corners' inputs, then one corner's MLP activations at a time."""
    linear = [m for m in liif.imnet.modules() if hasattr(m, "in_features")]
    in_dim, widest = linear[0].in_features, max(m.out_features for m in linear)
    return 4.0 * (4 * (in_dim + 8) + 3 * widest)


def gpt_bytes_per_image(config, cfg: bool) -> float:
    """Working memory of one image in a decoding batch: its KV cache (twice with guidance), the step's
    activations over the sequence, and a window of fp32 probabilities; doubled for the methods' extra buffers."""
    seq = config.cls_token_num + config.block_size
    kv = 2 * config.n_layer * config.dim * seq * 4
    activations = 8 * config.dim * seq * 4
    probs = 4 * 64 * config.vocab_size * 4
    return 2.0 * ((2 if cfg else 1) * (kv + activations) + probs)
