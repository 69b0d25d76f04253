"""Stop a 1D-token model after its first ``k`` tokens: a view every decoding method takes as the model.

A flexible-length 1D tokenizer decodes any prefix of its sequence, so an AR model over
such sequences can stop anywhere. Rather than teach each decoding loop a stopping length,
:class:`PrefixModel` presents the model as one with ``k`` tokens (a ``1 x k`` grid); the
loops run unchanged and their first ``k`` tokens are distributed exactly as the model's
(a prefix of an AR sample is a sample of the prefix).
"""
from __future__ import annotations

from typing import Optional


class PrefixModel:
    """The model ``model`` (any protocol model with a ``(1, N)`` grid) generating only ``k <= N`` tokens.

    Every attribute but ``num_tokens``, ``grid`` and ``new_cache``'s default length is the
    wrapped model's, as for :class:`vargen.models.compiled.CompiledModel` (which it can wrap).

    Example:
        >>> from vargen.models import LlamaGen
        >>> gpt = LlamaGen.from_size("GPT-tiny", block_size=32, grid_rows=1, vocab_size=64, num_classes=2)
        >>> view = PrefixModel(gpt, 8)
        >>> view.num_tokens, view.grid
        (8, (1, 8))
    """

    def __init__(self, model, k: int):
        rows, cols = model.grid
        if rows != 1:
            raise ValueError(f"--tokens needs a 1D-token model; this one generates a {rows} x {cols} grid")
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= model.num_tokens:
            raise ValueError(f"--tokens must be an integer in 1..{model.num_tokens} (the model's length), got {k!r}")
        self.model, self.num_tokens, self.grid = model, k, (1, k)

    def __getattr__(self, name):
        return getattr(self.__dict__["model"], name)

    def __repr__(self) -> str:
        return f"PrefixModel({self.model!r}, k={self.num_tokens})"

    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def new_cache(self, batch: int, max_len: Optional[int] = None):
        return self.model.new_cache(batch, max_len or self.model.prefix_len + self.num_tokens)
