"""Compiled decoding: a protocol model whose image-token forward runs under ``torch.compile``.

gpt-fast's recipe: the static KV cache keeps every decode step at a fixed shape (``[B, 1]``
for AR, ``[B, L + 1]`` for a verify window of ``L``), so one compiled graph per shape
serves every step of every image; ``mode="reduce-overhead"`` then replays each step as a
CUDA graph, which removes the launch overhead that dominates a small model's step. The
condition prefill (variable caption length, once per image) stays eager.

Caches are pooled per ``(batch, max_len)`` and their buffers marked as static addresses:
CUDA graphs need the mutated cache at the same address on every replay, and a new cache
per image would force a re-record. A :class:`CompiledModel` therefore runs one decode at
a time (the decoding methods never interleave two sessions).
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

from .cache import StaticKVCache
from .linear import Linear

RECOMPILE_LIMIT = 64
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class CompiledModel:
    """Wrap a protocol model (e.g. :class:`vargen.models.LlamaGen`) so decode steps run compiled.

    Every attribute not defined here (``grid``, ``num_tokens``, ``condition_embeddings``,
    ``forward_train``, ``parameters``, ...) is the wrapped model's, so any decoding method
    takes a ``CompiledModel`` where it takes the model.

    Args:
        model: the model to compile (weights are shared, not copied).
        mode: ``torch.compile`` mode; ``"reduce-overhead"`` uses CUDA graphs on a GPU. On a CPU, inductor also
            freezes the weights (laid out for vargen's CPU kernel, or prepacked for oneDNN without it; a second
            copy of them in memory, and changes to the module's weights after the first call are not seen).
        backend: ``"inductor"`` (default); ``"eager"`` / ``"aot_eager"`` trace without code
            generation (tests use them to check graph breaks and recompilations on CPU).
        fullgraph: fail on a graph break instead of silently running pieces eagerly.
    """

    def __init__(self, model, mode: str = "reduce-overhead", backend: str = "inductor", fullgraph: bool = True):
        if mode not in COMPILE_MODES:
            raise ValueError(f"unknown torch.compile mode {mode!r}; choose from {COMPILE_MODES}")
        self.model, self.mode, self.backend = model, mode, backend
        self._cache_pool = {}
        options = {"mode": mode} if backend == "inductor" else {}
        # on a CPU, freezing folds the weights into the graph as constants, which lets inductor prepack them for
        # oneDNN: the matrix-vector products of a batch-1 step run about 1.7x faster (GPT-B, bf16). Inductor
        # reads the flag when it compiles, i.e. inside the first call of each shape.
        self._freeze = backend == "inductor" and next(model.parameters()).device.type == "cpu"
        if self._freeze:  # linears and attention call vargen's CPU kernels as opaque ops where they are built
            param = next(model.parameters())
            for module in model.modules():
                if isinstance(module, Linear):
                    module.freeze_stream_weight()
                elif hasattr(module, "freeze_cpu_kernel"):  # vargen.models.llamagen.Attention
                    module.freeze_cpu_kernel(param.dtype, param.device)
        # one graph per step shape and cache length: a few methods (ZipAR's active rows alone take several shapes)
        # pass dynamo's default of 8, after which it would run every later step eagerly, without a word
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        self._step = torch.compile(self._image_step, backend=backend, fullgraph=fullgraph, dynamic=False, **options)
        self._compile = dict(backend=backend, fullgraph=fullgraph, dynamic=False, **options)
        self._whole_steps = {}

    def __getattr__(self, name):
        return getattr(self.__dict__["model"], name)

    def __repr__(self) -> str:
        return f"CompiledModel({type(self.model).__name__}, mode={self.mode!r}, backend={self.backend!r})"

    def new_cache(self, batch: int, max_len: Optional[int] = None) -> StaticKVCache:
        """A reset cache from the pool (same buffers for the same shape, marked static for CUDA graphs)."""
        key = (batch, max_len or self.model.prefix_len + self.model.num_tokens)
        cache = self._cache_pool.get(key)
        if cache is None:
            cache = self.model.new_cache(batch, key[1])
            for t in (*cache.k, *cache.v, cache.visible, cache.length):
                torch._dynamo.mark_static_address(t)
            self._cache_pool[key] = cache
        cache.visible.zero_()  # stale keys/values stay but are invisible, as after a rollback
        cache.length.zero_()
        return cache

    def _image_step(self, tokens, positions, slots, mask, cache):
        return self.model(tokens=tokens, positions=positions, slots=slots, mask=mask, cache=cache)

    def __call__(self, tokens: Optional[torch.Tensor] = None, positions: Optional[torch.Tensor] = None,
                 slots: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None,
                 cache: Optional[StaticKVCache] = None, embeds: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The protocol forward: image-token steps with a cache run compiled, everything else eagerly."""
        if embeds is not None or cache is None:
            return self.model(tokens=tokens, positions=positions, slots=slots, mask=mask, cache=cache, embeds=embeds)
        if self.backend == "inductor" and self.mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()
        # a CUDA-graph output is overwritten by the next replay; the loops may keep probabilities a step longer
        with torch._inductor.config.patch(freezing=True) if self._freeze else contextlib.nullcontext():
            return self._step(tokens, positions, slots, mask, cache).clone()

    forward = __call__

    def companion(self, model) -> "CompiledModel":
        """``model`` (a method's own model, e.g. LPD's or NAR's, resolved beside this GPT) compiled with this
        wrapper's settings; made once per model, so its graphs and static caches serve every later decode."""
        pool = self.__dict__.setdefault("_companions", {})
        entry = pool.get(id(model))
        if entry is None or entry[0] is not model:
            entry = pool[id(model)] = (model, CompiledModel(model, self.mode, self.backend, self._compile["fullgraph"]))
        return entry[1]

    def whole_step(self, step, dynamic: Optional[bool] = False):
        """``step`` compiled as one graph, the wrapped model's forward inside it: a decoding method's whole step
        (forward, acceptance, commit, rollback, next drafts), which gets the wrapped model as its first argument
        and its random draws as tensors. One compiled function per ``step``, reused by every decode; its outputs
        are cloned, since a CUDA-graph replay overwrites them. ``dynamic=None`` (steps whose token count changes
        from pass to pass: LPD's groups, NAR's diagonals) lets dynamo make those sizes symbolic at the first
        recompile, so a decode compiles a few graphs instead of one per shape."""
        compiled = self._whole_steps.get(step)
        if compiled is None:
            compiled = self._whole_steps[step] = torch.compile(step, **{**self._compile, "dynamic": dynamic})

        def run(*args):
            if self.backend == "inductor" and self.mode == "reduce-overhead":
                torch.compiler.cudagraph_mark_step_begin()
            with torch._inductor.config.patch(freezing=True) if self._freeze else contextlib.nullcontext():
                out = compiled(*args)
            return tuple(t.clone() if torch.is_tensor(t) else t for t in out)

        return run


def compile_model(model, mode: str = "reduce-overhead", backend: str = "inductor") -> CompiledModel:
    """``CompiledModel(model, mode, backend)``; a model that is already compiled is returned as it is."""
    return model if isinstance(model, CompiledModel) else CompiledModel(model, mode, backend)
