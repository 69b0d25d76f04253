"""``nn.Linear`` whose bf16 CPU inference runs on a oneDNN-prepacked copy of its weight.

``F.linear`` on a CPU hands oneDNN the plain ``[out, in]`` weight, and oneDNN reorders it into its blocked layout on
every call. A batch-1 decode step multiplies a few rows by every weight once, so that reorder is most of the
matmul: at the default model's shapes (2 rows x 384 -> 1152 / 4096, bf16, 2 threads) a prepacked weight took
23-48 us against 58-149 us, and 89-265 us against 139-414 us for a 34-row verify window, with bit-identical
outputs. This is what ``torch.compile`` does on a CPU when it freezes the weights (:mod:`vargen.models.compiled`);
here the eager path gets it too.

The packed copy is made on the first eligible call and remade whenever the weight changes (its storage or its
version counter), so a ``load_state_dict`` or an optimiser step is never served stale. It costs a second copy of
the weight in memory (35 MB at the default model's 17.5 M parameters in bf16). Only bf16 takes the packed path:
fp32 packed matmuls were slower at 34 rows and not bit-identical. Training (grad enabled), autocast and
``torch.compile`` tracing keep ``F.linear``, so the state dict, gradients and compiled graphs are unchanged.

On CPUs with AVX-512 BF16, bf16 inference goes further: vargen's own kernel (:mod:`vargen.ops.cpu_kernels`) runs
every matmul whose shape it takes (out features a multiple of 16, every LlamaGen size) on another copy of the
weight, laid out as one sequential stream and made on first use like the oneDNN one, which is then never made. It
streams a batch-1 step's weights at ~45 GB/s where oneDNN reads ~20, and runs a verify pass's 34 rows at the bf16
peak where oneDNN reached ~83% of it. Both round each fp32-accumulated output to bf16 once; the sums' order
differs, so outputs can differ from oneDNN's in the last bf16 place.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import cpu_kernels

_PACKED = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class Linear(nn.Linear):
    """Drop-in ``nn.Linear`` (same parameters, same state-dict keys) with the prepacked bf16 CPU inference path."""

    def _packable(self, x: torch.Tensor) -> bool:
        return (_PACKED and x.device.type == "cpu" and x.dtype == torch.bfloat16 and self.weight.dtype == torch.bfloat16
                and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")
                and not torch.compiler.is_compiling())

    def _cached(self, slot: str, pack) -> torch.Tensor:
        """``pack(weight)``, kept until the weight changes (its storage, version counter or shape)."""
        w = self.weight
        key = (w.data_ptr(), w._version, w.shape)
        cached = self.__dict__.get(slot)
        if cached is None or cached[0] != key:
            cached = (key, pack(w.detach()))
            self.__dict__[slot] = cached  # not a buffer: never saved, never moved by .to()
        return cached[1]

    def packed_weight(self) -> torch.Tensor:
        """The oneDNN-blocked copy of ``weight``, repacked when the weight changed since the last call."""
        return self._cached("_packed", lambda w: torch.ops.mkldnn._reorder_linear_weight(w, 1))

    def stream_weight(self, kernels) -> torch.Tensor:
        """The copy of ``weight`` laid out for :mod:`vargen.ops.cpu_kernels`, remade like :meth:`packed_weight`."""
        return self._cached("_stream", kernels.pack_weight)

    def freeze_stream_weight(self) -> bool:
        """Keep a :meth:`stream_weight` for compiled graphs, which read it as a constant (no repack check): for
        :class:`~vargen.models.compiled.CompiledModel`, whose frozen weights do not follow later changes either.
        Returns whether the kernel is in use (else compiled graphs keep ``F.linear``)."""
        w = self.weight
        # the dtype and shape first: an fp32 or GPU model never builds the extension
        kernels = cpu_kernels.kernels() if cpu_kernels.takes(w[:1], w) else None
        if kernels is None:
            self.__dict__.pop("stream_frozen", None)
            return False
        self.__dict__["stream_frozen"] = self.stream_weight(kernels)
        return True

    def _apply(self, fn, recurse=True):
        # .to(), .cuda(), .half() that convert: the packed copy belongs to the old weight. A no-op move (the
        # decoders move their trained models to the GPT's device and dtype before every decode) keeps the same
        # tensor, and repacking there cost LPD and NAR ~0.6 ms per pass. Both tensors are alive while the new one
        # is allocated, so a converted weight never has the old one's address.
        before = self.weight.data_ptr()
        out = super()._apply(fn, recurse)
        if self.weight.data_ptr() != before:
            for key in ("_packed", "_stream", "stream_frozen"):
                self.__dict__.pop(key, None)
        return out

    def __getstate__(self):  # pickling and deepcopy: oneDNN tensors do not copy, and the copy repacks on use
        state = self.__dict__.copy()
        for key in ("_packed", "_stream", "stream_frozen"):
            state.pop(key, None)
        return state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            frozen = self.__dict__.get("stream_frozen")
            if frozen is not None and cpu_kernels.takes(x, self.weight) and not torch.is_grad_enabled():
                y = torch.ops.vargen_cpu.stream_linear(x, frozen)  # registered by the extension
                return y if self.bias is None else y + self.bias
            return F.linear(x, self.weight, self.bias)
        if cpu_kernels.takes(x, self.weight) and (kernels := cpu_kernels.for_eager(x, self.weight)) is not None:
            y = kernels.linear(x, self.stream_weight(kernels))
            return y if self.bias is None else y + self.bias
        if self._packable(x):
            return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight(), self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)
