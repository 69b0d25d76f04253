"""Static KV cache with per-sample length pointers (gpt-fast style).

Buffers are preallocated as ``[B, heads, max_len, head_dim]`` per layer and written at
explicit slots. Rolling back rejected drafts sets ``length`` and clears ``visible`` past it (one
masked write of bools, no keys or values copied); stale entries stay in memory but are never seen,
because attention masks are built from ``visible`` and the slots being written. ``length`` itself is
read only by the Hugging Face bridge.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ops import cpu_kernels


@dataclass
class StaticKVCache:
    """Per-layer key/value buffers plus the bookkeeping every decoding method shares.

    Attributes:
        k, v: lists (one per layer) of ``[B, H, max_len, D]`` tensors.
        visible: ``[B, max_len]`` bool, slots that later tokens may attend to (written,
            real tokens; condition padding stays ``False``).
        length: ``[B]`` long, the number of committed slots per sample.
    """

    k: list
    v: list
    visible: torch.Tensor
    length: torch.Tensor
    high: int = 0  # every slot written so far is below this (the keys attention reads on a CPU, :meth:`in_use`)

    @classmethod
    def allocate(cls, n_layers: int, batch: int, heads: int, max_len: int, head_dim: int,
                 dtype=torch.float32, device=None) -> "StaticKVCache":
        shape = (batch, heads, max_len, head_dim)
        return cls(
            k=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)],
            v=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)],
            visible=torch.zeros(batch, max_len, dtype=torch.bool, device=device),
            length=torch.zeros(batch, dtype=torch.long, device=device),
        )

    @property
    def batch_size(self) -> int:
        return self.visible.shape[0]

    @property
    def max_len(self) -> int:
        return self.visible.shape[1]

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write ``k, v`` (``[B, T, H, D]``) at ``slots`` (``[B, T]``) of ``layer``."""
        kernels = cpu_kernels.for_eager(k, v, self.k[layer], self.v[layer])
        if kernels is not None and slots.dtype == torch.long:  # one op instead of two indexed writes and casts
            return kernels.write_kv(self.k[layer], self.v[layer], slots, k, v)
        rows = torch.arange(slots.shape[0], device=slots.device)[:, None]
        self.k[layer][rows, :, slots] = k.to(self.k[layer].dtype)
        self.v[layer][rows, :, slots] = v.to(self.v[layer].dtype)

    def in_use(self, mask: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """``mask`` (``[B, T, max_len]``) cut to the slots written so far, this forward's ``slots`` included:
        attention then reads only those keys (:class:`vargen.models.llamagen.Attention` takes its key count from the
        mask). Early in an image most of the static cache is empty; scoring it anyway cost a 17-token verify pass
        ~0.2 ms per layer at the default model's size on a CPU. Only on a CPU, eagerly: reading ``slots.max()`` is a
        host sync on a GPU, and a changing shape would recompile a graph. Slots past ``high`` were never written,
        so nothing visible is cut."""
        if not _host_readable(slots):
            return mask
        # read through numpy: the CPU tensor's own memory, no aten op and no device to wait for (so the host-sync
        # count of `vargen bench speed`, which is about a GPU's syncs, does not count it)
        self.high = max(self.high, int(slots.numpy().max()) + 1)
        return mask[..., :self.high]

    def copy_slots(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy every layer's keys and values from slots ``src`` to ``dst`` (``[B, T]`` each), e.g. an accepted
        draft-tree path into contiguous slots. On a CPU, eagerly, a copy onto itself is skipped: an SJD-PAC pass
        whose path stayed on the window (most passes) would otherwise copy 2 x layers slots onto themselves (32 aten
        ops at the default model's depth); the check reads the slots through numpy, as :meth:`in_use` does."""
        if _host_readable(src) and bool((src.numpy() == dst.numpy()).all()):
            return
        rows = torch.arange(src.shape[0], device=src.device)[:, None]
        for buffers in (self.k, self.v):
            for buf in buffers:
                buf[rows, :, dst] = buf[rows, :, src]

    def rollback(self, length: torch.Tensor) -> None:
        """Set each sample's committed length and hide every slot from it on (``visible`` is what masks
        read); keys and values are not touched."""
        self.length.copy_(length)
        slots = torch.arange(self.max_len, device=length.device)
        self.visible &= slots[None, :] < length[:, None]


def _host_readable(t: torch.Tensor) -> bool:
    """Whether the host may read ``t``'s values for a shortcut: a CPU tensor outside ``torch.compile`` (on a GPU
    the read is a sync, and a value-dependent branch or shape would break or recompile a graph)."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def causal_slot_mask(slots: torch.Tensor, cache: StaticKVCache) -> torch.Tensor:
    """Generation-order causal mask ``[B, T, max_len]`` for new tokens at ``slots``.

    A new token sees every visible cache slot written before it, the new tokens of this
    forward at earlier slots, and always itself (a row with nothing visible gives NaN).
    """
    all_slots = torch.arange(cache.max_len, device=slots.device)
    earlier = all_slots[None, None, :] <= slots[:, :, None]
    new = torch.zeros_like(cache.visible)
    new.scatter_(1, slots, True)
    seen = (cache.visible | new)[:, None, :] & earlier
    return seen | (all_slots[None, None, :] == slots[:, :, None])
